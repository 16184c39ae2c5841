"""TPU chips and slices: published per-chip figures (`CHIPS`), Cloud TPU accelerator types as
chip grids (`parse_topology("v4-64")`), and the slice's devices described by libtpu on a machine
without a TPU (`slice_devices`), which XLA compiles for.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (Cloud TPU system architecture pages)."""
  name: str
  hbm_bytes: float  # HBM the compiler may allocate on one chip.
  peak_flops: float  # bf16 FLOP/s.
  hbm_bandwidth: float  # bytes/s.
  ici_bandwidth: float  # bytes/s, bidirectional inter-chip interconnect per chip.
  megacore: bool  # Two TensorCores act as one device (v4, v5p).
  dims: int  # Torus dimensions (3 for v4/v5p, 2 for v5e/v6e).


CHIPS = {
    # v4: 32 GiB HBM2 of which libtpu lets a program use 30.75 GiB; 275 TFLOP/s; 1200 GB/s; 2400 Gb/s ICI.
    "v4": Chip("v4", 30.75 * GiB, 275e12, 1200e9, 300e9, megacore=True, dims=3),
    # v5p: 95 GB HBM2e, 459 TFLOP/s, 2765 GB/s, 4800 Gb/s ICI.
    "v5p": Chip("v5p", 95e9, 459e12, 2765e9, 600e9, megacore=True, dims=3),
    # v5e: 16 GB HBM2, 197 TFLOP/s, 819 GB/s, 1600 Gb/s ICI.
    "v5e": Chip("v5e", 16e9, 197e12, 819e9, 200e9, megacore=False, dims=2),
    # v6e (Trillium): 32 GB HBM, 918 TFLOP/s, 1640 GB/s, 3584 Gb/s ICI.
    "v6e": Chip("v6e", 32e9, 918e12, 1640e9, 448e9, megacore=False, dims=2),
}
# Chip grids of the standard slice shapes by chip count.
_GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8)}
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
             256: (16, 16)}
_CHIP_PREFIXES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}
# libtpu's names of the chip generations in a topology string.
_LIBTPU_NAMES = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v6e": "v6e"}
TOPOLOGY_FORMS = ("v4-8 ... v4-1024 (cores: 2 per chip), v5p-8 ... v5p-1024 (cores), "
                  "v5litepod-1 ... v5litepod-256 or v5e-N (chips), v6e-1 ... v6e-256 (chips)")


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # As Cloud TPU names the accelerator type: "v4-64".
  chip: Chip
  grid: tuple[int, ...]  # Chips along each torus axis.

  @property
  def num_chips(self) -> int:
    return math.prod(self.grid)

  @property
  def topology_name(self) -> str:
    return f"{_LIBTPU_NAMES[self.chip.name]}:" + "x".join(map(str, self.grid))

  @property
  def wrap(self) -> tuple[bool, ...]:
    """Torus wrap-around links: on the axes of full 4-chip (3D) or 16-chip (2D) rings."""
    full = 4 if self.chip.dims == 3 else 16
    wrap = tuple(n >= full and self.num_chips >= (64 if self.chip.dims == 3 else 128) for n in self.grid)
    return wrap + (False,) * (3 - len(wrap))


def parse_topology(name: str) -> Slice:
  """A Cloud TPU accelerator type ("v4-64", "v5p-128", "v5litepod-16", "v6e-8") as a `Slice`."""
  match = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name.strip().lower())
  if not match:
    raise ValueError(f"--topology={name!r}: unknown TPU slice; expected one of {TOPOLOGY_FORMS}")
  chip = CHIPS[_CHIP_PREFIXES[match.group(1)]]
  count = int(match.group(2))
  chips = count // 2 if chip.megacore else count
  grids = _GRIDS_3D if chip.dims == 3 else _GRIDS_2D
  if (chip.megacore and count % 2) or chips not in grids:
    sizes = sorted(n * (2 if chip.megacore else 1) for n in grids)
    raise ValueError(f"--topology={name!r}: {match.group(1)} slices come in sizes {sizes}; "
                     f"expected one of {TOPOLOGY_FORMS}")
  return Slice(name=name, chip=chip, grid=grids[chips])


def slice_devices(tpu: Slice) -> list:
  """The slice's devices, described by libtpu on this (TPU-less) machine."""
  # Compiling opens no TPU: let libtpu load in several processes at once (a report next to a
  # running job or another report, test workers) instead of failing on its lock file.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=tpu.topology_name,
        chip_config_name="megacore" if tpu.chip.megacore else "default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=tpu.wrap)
  except Exception as e:  # libtpu missing or too old: one line, with the fix.
    raise RuntimeError(f"cannot describe TPU topology {tpu.topology_name} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); install libtpu with "
                       f"pip install -e '.[tpu]'") from None
  devices = list(desc.devices)
  if len(devices) != tpu.num_chips:
    raise RuntimeError(f"libtpu described {len(devices)} devices for {tpu.name}, expected {tpu.num_chips}")
  return devices


def libtpu_available() -> bool:
  """Whether libtpu can describe a TPU slice here (the tests' condition for compiling)."""
  try:
    return bool(slice_devices(parse_topology("v4-8")))
  except RuntimeError:
    return False
