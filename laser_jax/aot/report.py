r"""Will it fit? Compiles every program of one RL step for a TPU slice, on any machine.

  python -m laser_jax.aot --config=configs/tpu_v4.py --topology=v4-64 [--out=aot.json] \
      [--config.rollout.max_new_tokens=4096 ...]

Needs libtpu (`pip install -e '.[tpu]'`), no TPU: `jax.experimental.topologies` describes the
slice's devices and XLA compiles for them, as MaxText's `train_compile.py` does. The programs
are the trainer's own (`laser_jax.programs.StepPrograms`: the sampler's prefill and decode
loop, the old / reference log-prob forward, the update with its micro-batch scan, and the eval
sampler), lowered with abstract inputs in the trainer's shardings: no weight is materialised.

For each program it prints the per-chip HBM the compiler allocates (arguments, outputs,
temporaries, total and share of the chip), the FLOPs, HBM bytes and collective bytes per chip
with every loop multiplied out (XLA's `cost_analysis()` counts a loop body once), and a roofline
time max(FLOPs / peak, HBM bytes / HBM bandwidth, collective bytes / ICI bandwidth) from the
chip's published figures (`CHIPS`). Then one RL step's estimated time, split into rollout and
update, and its MFU. Exit status 0 only if every program fits in the chip's HBM.

How the counts are made (see `jaxpr_flops` and `hlo_costs`):
  * FLOPs: 2*M*N*K of every dot_general in the program's jaxpr, scans multiplied by their length,
    divided by the chip count (the work is split over the slice).
  * HBM bytes: operands + results in HBM of every top-level instruction of the compiled per-chip
    HLO (fusions count what they read and write, not their insides; buffers the compiler placed
    in on-chip memory are not HBM traffic), loops multiplied by their trip count; a slice or
    gather counts what it reads, an in-place dynamic-update-slice only the slice written, a
    collective its data twice (read and written).
  * Collective bytes: the data moved by each all-gather / all-reduce / reduce-scatter /
    all-to-all / collective-permute per chip, loops multiplied out.
  * Decode loops end when every row is done; they are counted at their worst case, every row
    generating `max_new_tokens` tokens.
These are compile-time estimates: a real slice confirms them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from laser_jax import cli
from laser_jax import config_check
from laser_jax.rl import objective
from laser_jax.training import optim as optim_lib
from laser_jax.models import presets
from laser_jax.training import programs as programs_lib
from laser_jax.rl import rl_metrics
from laser_jax.generate import sampler as sampler_lib
from laser_jax.models import sharding as sharding_lib
from laser_jax.data import synthetic
from laser_jax.training import tasks

GiB = 1024 ** 3


# ---- chips and slices -----------------------------------------------------------------------
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


# ---- counting ------------------------------------------------------------------------------
def _subjaxprs(params: dict):
  for value in params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def jaxpr_flops(jaxpr, while_trip_counts: Sequence[int] = ()) -> float:
  """Matmul FLOPs (2*M*N*K per dot_general) of a jaxpr, every loop multiplied out.

  A scan counts `length` times its body; a while loop (whose trip count only the data decides)
  counts the next entry of `while_trip_counts` (consumed in program order) times its body, or
  once when none is left; a cond counts its most expensive branch; a Pallas kernel counts its
  body once per grid point (every tile, including those a causal mask skips at run time: an
  upper bound, about 2x for causal attention).
  """
  counts = list(while_trip_counts)

  def walk(jx) -> float:
    total = 0.0
    for eqn in jx.eqns:
      name = eqn.primitive.name
      if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
      elif name == "scan":
        total += eqn.params["length"] * walk(eqn.params["jaxpr"].jaxpr)
      elif name == "while":
        trips = counts.pop(0) if counts else 1
        total += trips * (walk(eqn.params["body_jaxpr"].jaxpr) + walk(eqn.params["cond_jaxpr"].jaxpr))
      elif name == "cond":
        total += max(walk(branch.jaxpr) for branch in eqn.params["branches"])
      elif name == "pallas_call":  # the kernel runs once per grid point
        total += math.prod(eqn.params["grid_mapping"].grid) * walk(eqn.params["jaxpr"])
      else:
        total += sum(walk(sub) for sub in _subjaxprs(eqn.params))
    return total

  return walk(jaxpr)


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
          "s4": 1, "u4": 1}
# dtype[dims] and its layout {...}, whose S(k), k > 0, places it in on-chip memory, not HBM.
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                "ragged-all-to-all")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "iota", "opt-barrier"}


def _type_bytes(type_str: str, largest_only: bool = False, hbm_only: bool = False) -> float:
  """Bytes of the arrays in an HLO type; with hbm_only, of those in HBM (memory space 0)."""
  sizes = [_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
           for dtype, dims, layout in _ARRAY.findall(type_str)
           if not (hbm_only and re.search(r"S\([1-9]", layout or ""))]
  if not sizes:
    return 0.0
  return float(max(sizes) if largest_only else sum(sizes))


@dataclasses.dataclass
class _Instr:
  name: str
  type_str: str
  opcode: str
  operands: list[str]
  args: str  # the text inside the parentheses (a constant's value)
  attrs: str


def _parse_hlo(text: str) -> tuple[dict[str, list[_Instr]], str]:
  computations: dict[str, list[_Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if current is None or line.strip() == "}":
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, type_str, opcode, rest = m.groups()
    depth, split = 1, len(rest)
    for i, ch in enumerate(rest):  # the operand list ends at the matching parenthesis
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        split = i
        break
    operands = re.findall(r"%([\w.\-]+)", rest[:split])
    computations[current].append(_Instr(name, type_str, opcode, operands, rest[:split], rest[split:]))
  return computations, entry


def _attr(attrs: str, key: str) -> str | None:
  m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
  return m.group(1) if m else None


def _trip_count(instr: _Instr, computations) -> int | None:
  """A while loop's trip count: XLA's known_trip_count, or a `counter < constant` condition."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
  if m:
    return int(m.group(1))
  cond = computations.get(_attr(instr.attrs, "condition") or "", [])
  if not cond:
    return None
  root = cond[-1]
  if root.opcode != "compare" or "direction=LT" not in root.attrs:
    return None
  constants = {i.name: i for i in cond if i.opcode == "constant"}
  if len(root.operands) == 2 and root.operands[1] in constants:
    value = constants[root.operands[1]].args.strip()
    if re.fullmatch(r"-?\d+", value):
      return int(value)
  return None


_SLICING = ("dynamic-slice", "slice", "gather")
# TPU custom calls that move no data (buffer allocation, concatenation by bitcast, index hints).
_NO_TRAFFIC_CALLS = {"AllocateBuffer", "ConcatBitcast", "AssumeGatherIndicesInBound"}


def _fusion_reads(fused: list[_Instr]) -> list[float]:
  """Bytes a fusion reads of each operand: a parameter used only as the sliced operand of
  (dynamic-)slices and gathers is read only where they read it; any other is read whole."""
  params = {}
  for ins in fused:
    if ins.opcode == "parameter" and ins.args.strip().isdigit():
      params[ins.name] = int(ins.args.strip())
  reads = [float("inf")] * (max(params.values()) + 1 if params else 0)
  for name, index in params.items():
    users = [i for i in fused if name in i.operands]
    if users and all(u.opcode in _SLICING and u.operands[0] == name for u in users):
      reads[index] = sum(_type_bytes(u.type_str) for u in users)
  return reads


@dataclasses.dataclass
class HloCosts:
  hbm_bytes: float = 0.0  # per chip, loops multiplied out
  collective_bytes: float = 0.0  # per chip, loops multiplied out
  collective_bytes_in_loops: float = 0.0  # the part of collective_bytes inside while loops
  loops_without_trip_count: int = 0  # loops counted once (no count known or given)


def hlo_costs(hlo_text: str, while_trip_counts: Sequence[int] = (), breakdown: dict | None = None) -> HloCosts:
  """HBM and collective bytes per chip of a compiled (per-chip, SPMD-partitioned) HLO module.

  Loops whose trip count XLA knows or whose condition is `i < constant` are multiplied by it;
  the others (the sampler's decode loops) take the entries of `while_trip_counts` in program
  order, or count once (`loops_without_trip_count`).
  """
  computations, entry = _parse_hlo(hlo_text)
  counts = list(while_trip_counts)
  out = HloCosts()

  def walk(comp: str, times: float, in_loop: bool):
    instrs = computations.get(comp, [])
    types = {i.name: i.type_str for i in instrs}
    for ins in instrs:
      op = ins.opcode
      if op in _FREE:
        continue
      if op == "while":
        trips = _trip_count(ins, computations)
        if trips is None:
          if counts:
            trips = counts.pop(0)
          else:
            trips = 1
            out.loops_without_trip_count += 1
        walk(_attr(ins.attrs, "body"), times * trips, True)
        walk(_attr(ins.attrs, "condition"), times * trips, True)
        continue
      if op == "conditional":
        branches = re.findall(r"%([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                                               or re.search(r"(true_computation=.*)", ins.attrs)).group(1))
        for b in branches[:1]:  # branches are alternatives: count the first
          walk(b, times, in_loop)
        continue
      if op == "call":
        walk(_attr(ins.attrs, "to_apply"), times, in_loop)
        continue
      base = op[:-len("-start")] if op.endswith("-start") else op
      if op.endswith("-done"):
        continue
      target = re.search(r'custom_call_target="([^"]*)"', ins.attrs) if op == "custom-call" else None
      if target and target.group(1) in _NO_TRAFFIC_CALLS:
        continue
      if op.endswith("-start") and base not in _COLLECTIVES:
        # An async copy or slice (TPU prefetches): (operand, result, context); it reads and
        # writes the result.
        arrays = _ARRAY.findall(ins.type_str)
        if len(arrays) >= 2:
          source, result = ("{}[{}]{}".format(*a) for a in arrays[:2])
          read = _type_bytes(result) if _type_bytes(source, hbm_only=True) else 0.0
          out.hbm_bytes += times * (read + _type_bytes(result, hbm_only=True))
        continue
      if base in _COLLECTIVES:
        moved = _type_bytes(ins.type_str, largest_only=op.endswith("-start"))
        if base in ("all-reduce", "reduce-scatter", "all-to-all", "collective-permute"):
          moved = max(moved, sum(_type_bytes(types.get(o, "")) for o in ins.operands))
        out.collective_bytes += times * moved
        if in_loop:
          out.collective_bytes_in_loops += times * moved
        out.hbm_bytes += times * 2 * moved
        continue
      operand_bytes = [_type_bytes(types.get(o, ""), hbm_only=True) for o in ins.operands]
      fused_root = ""
      if op in _SLICING:  # reads only what it returns
        operand_bytes = [_type_bytes(ins.type_str) if operand_bytes and operand_bytes[0] else 0.0]
      if op == "fusion":
        called = computations.get(_attr(ins.attrs, "calls") or "", [])
        fused_root = called[-1].opcode if called else ""
        operand_bytes = [min(full, read) for full, read in zip(operand_bytes, _fusion_reads(called))]
      result_bytes = _type_bytes(ins.type_str, hbm_only=True)
      if op == "dynamic-update-slice" or fused_root == "dynamic-update-slice":
        # Written in place: reads and writes the update, not the whole buffer.
        out.hbm_bytes += times * 2 * sum(operand_bytes[1:])
        continue
      out.hbm_bytes += times * (sum(operand_bytes) + result_bytes)
      if breakdown is not None:  # (computation, instruction) -> bytes, for reading a report
        breakdown[(comp, ins.name, op, fused_root)] = times * (sum(operand_bytes) + result_bytes)

  walk(entry, 1.0, False)
  return out


# ---- the programs of one RL step -----------------------------------------------------------
@dataclasses.dataclass
class ProgramReport:
  """One compiled program: per-chip memory from the compiler, counted costs, roofline time."""
  name: str
  calls_per_step: float  # Calls in one RL step (0: not part of the step, e.g. the eval sampler).
  argument_bytes: float
  output_bytes: float
  alias_bytes: float  # Outputs written into donated arguments (counted once).
  temp_bytes: float
  code_bytes: float
  flops: float  # Per chip per call.
  hbm_bytes: float  # Per chip per call.
  collective_bytes: float  # Per chip per call.
  collective_bytes_in_loops: float
  compute_s: float  # flops / peak FLOP/s, per call.
  hbm_s: float  # hbm_bytes / HBM bandwidth, per call.
  ici_s: float  # collective_bytes / ICI bandwidth, per call.
  compile_s: float
  capacity_bytes: float
  # Set when libtpu refused the program for its size: temp_bytes is then the temporaries it
  # asked for, output_bytes is not known (0) and the byte counts are NaN.
  error: str = ""
  # Decode loops: the HBM-bandwidth floor, every step reading the weights and the KV cache
  # written so far once (NaN for other programs).
  ideal_hbm_s: float = float("nan")

  def _times(self) -> dict:
    times = {"compute": self.compute_s, "HBM": self.hbm_s, "ICI": self.ici_s}
    return {k: v for k, v in times.items() if not math.isnan(v)}  # NaN: not compiled

  @property
  def roofline_s(self) -> float:
    return max(self._times().values())

  @property
  def bound(self) -> str:
    """What sets the roofline time: "compute", "HBM" or "ICI"."""
    times = self._times()
    return max(times, key=times.get)

  @property
  def total_bytes(self) -> float:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  @property
  def hbm_fraction(self) -> float:
    return self.total_bytes / self.capacity_bytes

  @property
  def fits(self) -> bool:
    return not self.error and self.total_bytes <= self.capacity_bytes

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(total_bytes=self.total_bytes, hbm_fraction=self.hbm_fraction, fits=self.fits,
             roofline_s=self.roofline_s, bound=self.bound)
    return d


def model_config(config):
  """The model shape a config trains, without its weights, with its numerics for a TPU
  (`tasks.model_config`): the checkpoint's config.json when `model.hf_path` is on this machine,
  else `model.preset`, else the random-init shape."""
  m = config.model
  if m.hf_path and not os.path.isfile(os.path.join(m.hf_path, "config.json")):
    if not m.preset:
      raise config_check.ConfigError(
          f"config.model.hf_path: {m.hf_path!r} is not on this machine; name the model's shape with "
          f"--config.model.preset (one of {', '.join(sorted(presets.PRESETS))})")
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model.hf_path = ""
  tokenizer_size = len(synthetic.build_tokenizer()) if config.data.task == "synthetic" else None
  return tasks.model_config(config, tokenizer_size, platform="tpu")  # for a TPU slice, whatever runs this


HLO_DUMP_DIR = ""  # When set (--hlo_dir), each compiled program's HLO text is written there.


def _report(name, traced, calls, chip: Chip, num_chips: int, loop_trips=()) -> tuple[ProgramReport, Any]:
  """(the report, the compiled program) of a traced program."""
  t0 = time.perf_counter()
  flops = jaxpr_flops(traced.jaxpr.jaxpr, loop_trips) / num_chips
  try:
    compiled = traced.lower().compile()
  except Exception as e:  # libtpu refuses a program that does not fit: report it, go on
    needed = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or not needed:
      raise
    arguments = sum(_shard_bytes(a) for a in jax.tree.leaves(traced.args_info) if hasattr(a, "sharding"))
    nan = float("nan")
    return ProgramReport(
        name=name, calls_per_step=calls, argument_bytes=arguments, output_bytes=0.0, alias_bytes=0.0,
        temp_bytes=float(needed.group(1)) * GiB, code_bytes=0.0, flops=flops, hbm_bytes=nan,
        collective_bytes=nan, collective_bytes_in_loops=nan, compute_s=flops / chip.peak_flops,
        hbm_s=nan, ici_s=nan, compile_s=time.perf_counter() - t0, capacity_bytes=chip.hbm_bytes,
        error=str(e).splitlines()[0][:300]), None
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  if HLO_DUMP_DIR:
    os.makedirs(HLO_DUMP_DIR, exist_ok=True)
    with open(os.path.join(HLO_DUMP_DIR, name.replace("/", "_").replace(" ", "_") + ".hlo.txt"), "w") as f:
      f.write(hlo)
  costs = hlo_costs(hlo, loop_trips)
  return ProgramReport(
      name=name, calls_per_step=calls, argument_bytes=mem.argument_size_in_bytes,
      output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
      temp_bytes=mem.temp_size_in_bytes, code_bytes=mem.generated_code_size_in_bytes,
      flops=flops, hbm_bytes=costs.hbm_bytes, collective_bytes=costs.collective_bytes,
      collective_bytes_in_loops=costs.collective_bytes_in_loops,
      compute_s=flops / chip.peak_flops, hbm_s=costs.hbm_bytes / chip.hbm_bandwidth,
      ici_s=costs.collective_bytes / chip.ici_bandwidth, compile_s=compile_s,
      capacity_bytes=chip.hbm_bytes), compiled


def _sampler_programs(programs, abstract_params, sampling, num_prompts: int, prompt_len: int,
                      prefix: str, calls: float, chip, num_chips, log) -> list[ProgramReport]:
  sampler = programs.sampler
  args = sampler.abstract_prefill_args(abstract_params, num_prompts, prompt_len, sampling)
  prefill = sampler.prefill.trace(*args, sampling=sampling)
  log(f"compiling {prefix} prefill ({num_prompts} prompts x n={sampling.n}, {prompt_len} prompt tokens)")
  report, compiled = _report(f"{prefix} prefill", prefill, calls, chip, num_chips)
  state_shapes = sampler.prefill.eval_shape(*args, sampling=sampling)
  if compiled is None:
    raise RuntimeError(f"{prefix} prefill does not fit: {report.error}")
  state_shardings = compiled.output_shardings
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       state_shapes, state_shardings)
  decode = sampler.decode.trace(abstract_params, state, sampling=sampling, prompt_len=prompt_len)
  log(f"compiling {prefix} decode ({sampling.max_new_tokens} tokens in "
      f"{len(sampling.decode_chunk_lengths)} loops)")
  decode_report = _report(f"{prefix} decode", decode, calls, chip, num_chips,
                          loop_trips=sampling.decode_chunk_lengths)[0]
  # Its HBM-bandwidth floor: every step reads this chip's weights and the KV cache written so
  # far (with decode segments, attention reads the chunks written so far: the prompt plus half
  # the response on average).
  weights = sum(_shard_bytes(p) for p in jax.tree.leaves(abstract_params))
  cache = sum(_shard_bytes(x) for x in jax.tree.leaves(state.cache))
  average_fill = (prompt_len + sampling.max_new_tokens / 2) / (prompt_len + sampling.max_new_tokens)
  decode_report.ideal_hbm_s = sampling.max_new_tokens * (weights + cache * average_fill) / chip.hbm_bandwidth
  return [report, decode_report]


def _shard_bytes(x) -> float:
  """Bytes of one device's shard of an abstract array."""
  shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
  return float(math.prod(shape) * np.dtype(x.dtype).itemsize)


PROGRAM_GROUPS = ("rollout", "eval", "logprobs", "update")


def compile_step(config, tpu: Slice, devices=None, log=print, groups: Sequence[str] = PROGRAM_GROUPS) -> dict:
  """Compiles one RL step's programs of `config` for the slice `tpu`; returns the report dict.

  `groups` selects programs: "rollout" (prefill + decode), "eval" (the eval sampler's),
  "logprobs" (old / reference log-probs), "update". `devices` defaults to the slice's devices
  from libtpu.
  """
  devices = slice_devices(tpu) if devices is None else list(devices)
  config_check.validate(config, num_devices=len(devices))
  c = config
  model_cfg = model_config(c)
  zc_id = c.laser.self_reward_token_id if c.laser.self_reward_token_id >= 0 else model_cfg.vocab_size - 1
  statics = programs_lib.StepStatics.from_config(c, model_cfg, zc_id)
  prompts_per_update = c.mini_batch_size or c.batch_size
  updates_per_step = c.batch_size // prompts_per_update
  optimizer = optim_lib.make_optimizer(c.optim, c.total_steps * updates_per_step)
  data, fsdp, tensor = config_check.mesh_shape(c, len(devices))
  mesh = sharding_lib.make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=devices)
  state = programs_lib.abstract_state(model_cfg, optimizer, mesh)
  programs = programs_lib.StepPrograms(statics, optimizer, mesh, jax.tree.map(lambda s: s.sharding, state),
                                       c.rollout.tensor_parallel)
  rollout_params = programs.abstract_rollout_params(state.params)
  # Token ids change no shape: an EOS id and a pad id stand in for the tokenizer's.
  sampling, eval_sampling = programs_lib.sampling_params(c, eos_ids=(0,), pad_id=0, self_reward_token_id=zc_id)
  prompt_len = sampler_lib.bucket_length(c.data.max_prompt_len)
  seq_len = prompt_len + c.rollout.max_new_tokens + 1
  chunk = c.rollout.prompts_per_chunk or c.batch_size
  needs_ref = c.loss.kl_loss_coef > 0 or (c.laser.use_self_reward_loss and c.laser.use_ref_model_score)
  exact_score = bool(c.laser.use_self_reward_loss and c.laser.use_ref_model_score)
  rows = prompts_per_update * c.rollout.n
  num_micro = rows // c.micro_batch_size
  chip, n = tpu.chip, len(devices)

  reports = []
  unknown = set(groups) - set(PROGRAM_GROUPS)
  if unknown:
    raise ValueError(f"--programs: unknown {sorted(unknown)}; expected some of {PROGRAM_GROUPS}")
  with jax.set_mesh(programs.rollout_mesh):
    if "rollout" in groups:
      reports += _sampler_programs(programs, rollout_params, sampling, min(chunk, c.batch_size), prompt_len,
                                   "rollout", -(-c.batch_size // chunk), chip, n, log)
    if c.eval_every > 0 and "eval" in groups:
      eval_prompts = min(chunk, c.data.eval_size) if c.data.eval_size > 0 else chunk
      reports += _sampler_programs(programs, rollout_params, eval_sampling, eval_prompts, prompt_len,
                                   "eval", 0, chip, n, log)
  forwards = int(c.rollout.recompute_old_logprobs) + int(needs_ref)  # log-prob passes per row
  with jax.set_mesh(mesh):
    if "logprobs" in groups:
      batch = programs_lib.abstract_logprob_batch(mesh, c.micro_batch_size, seq_len)
      log(f"compiling old/ref log-probs ({c.micro_batch_size} x {seq_len} tokens)")
      reports.append(_report("old/ref log-probs", programs.logprobs.trace(state.params, batch),
                             c.batch_size * c.rollout.n // c.micro_batch_size * forwards, chip, n)[0])
    if "update" in groups:
      update_batch = programs_lib.abstract_update_batch(mesh, num_micro, c.micro_batch_size, seq_len,
                                                        with_ref_logp=c.loss.kl_loss_coef > 0,
                                                        with_ref_score=exact_score)
      normalisers = jax.eval_shape(lambda mask: objective.loss_normalisers(statics.loss_cfg, mask),
                                   jax.ShapeDtypeStruct((rows, seq_len), np.float32))
      log(f"compiling update ({num_micro} micro-batches of {c.micro_batch_size} x {seq_len} tokens)")
      reports.append(_report("update", programs.update.trace(state, update_batch, normalisers,
                                                             jax.ShapeDtypeStruct((), jnp.bool_)),
                             updates_per_step, chip, n)[0])
  report = _summary(c, tpu, model_cfg, reports, rows * updates_per_step, seq_len, forwards)
  report["program_groups"] = list(groups)
  return report


def _summary(c, tpu: Slice, model_cfg, reports: list[ProgramReport], rows_per_step: int,
             seq_len: int, logprob_forwards: int) -> dict:
  """One RL step's estimated time (rollout = sampler + old/ref log-probs, update) and its MFU."""
  def total(names):
    return sum(r.roofline_s * r.calls_per_step for r in reports if r.name in names)
  rollout_s = total({"rollout prefill", "rollout decode", "old/ref log-probs"})
  decode = [r for r in reports if r.name == "rollout decode"]
  decode_vs_floor = decode[0].roofline_s / decode[0].ideal_hbm_s if decode else float("nan")
  update_s = total({"update"})
  step_s = rollout_s + update_s
  # Model FLOPs over every token of the step's rows, padding included.
  model_flops = rl_metrics.step_model_flops(model_cfg.num_params(), rows_per_step * seq_len, logprob_forwards)
  mfu = model_flops / (step_s * tpu.chip.peak_flops * tpu.num_chips) if step_s > 0 else 0.0
  return {
      "topology": tpu.name, "libtpu_topology": tpu.topology_name, "num_chips": tpu.num_chips,
      "chip": dataclasses.asdict(tpu.chip), "model_params": model_cfg.num_params(),
      "programs": [r.as_dict() for r in reports],
      "step": {"rollout_s": rollout_s, "update_s": update_s, "step_s": step_s, "mfu": mfu,
               "model_flops": model_flops, "decode_vs_hbm_floor": decode_vs_floor},
      "fits": all(r.fits for r in reports),
      "fits_with_10pct_spare": all(r.hbm_fraction <= 0.9 for r in reports),
  }


def format_report(report: dict) -> str:
  """The Markdown tables `main` prints."""
  gib = lambda b: f"{b / GiB:.2f}"
  lines = [f"## {report['topology']} ({report['num_chips']} x TPU {report['chip']['name']}, "
           f"{report['chip']['hbm_bytes'] / GiB:.2f} GiB HBM per chip), "
           f"{report['model_params'] / 1e9:.2f}B parameters",
           "",
           "| program | calls/step | args GiB | out GiB | temp GiB | total GiB | % HBM | fits | TFLOP | "
           "HBM GB | coll. GB (in loops) | roofline s | bound | compile s |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|"]
  for r in report["programs"]:
    row = (f"| {r['name']} | {r['calls_per_step']:g} | {gib(r['argument_bytes'])} | "
           f"{gib(r['output_bytes'])} | {gib(r['temp_bytes'])} | {gib(r['total_bytes'])} | "
           f"{100 * r['hbm_fraction']:.1f} | {'yes' if r['fits'] else 'NO'} | {r['flops'] / 1e12:.2f} | "
           f"{r['hbm_bytes'] / 1e9:.2f} | {r['collective_bytes'] / 1e9:.2f} "
           f"({r['collective_bytes_in_loops'] / 1e9:.2f}) | {r['roofline_s']:.3g} | {r['bound']} | "
           f"{r['compile_s']:.0f} |")
    lines.append(row.replace("nan (nan)", "-").replace("| nan |", "| - |"))
  if any(r["error"] for r in report["programs"]):
    lines += ["", "Programs marked NO with '-' were refused by the compiler; temp GiB is what it asked for."]
  s = report["step"]
  partial = [g for g in PROGRAM_GROUPS if g not in report.get("program_groups", PROGRAM_GROUPS)]
  lines += ["", (f"Partial report: {', '.join(partial)} not compiled (--programs); the step "
                 f"estimate leaves them out. " if partial else "") +
            f"One RL step (compile-time roofline estimate): rollout {s['rollout_s']:.1f} s "
            f"(sampling + old/ref log-probs), update {s['update_s']:.1f} s, step {s['step_s']:.1f} s, "
            f"MFU {100 * s['mfu']:.1f}%. The rollout decode loop's estimate is "
            f"{s['decode_vs_hbm_floor']:.2f}x its HBM-bandwidth floor (weights + KV cache read once "
            f"per token).",
            f"Every program fits: {'yes' if report['fits'] else 'NO'}; with >= 10% HBM to spare: "
            f"{'yes' if report['fits_with_10pct_spare'] else 'no'}."]
  return "\n".join(lines)


def main(argv=None):
  if "topology" not in flags.FLAGS:  # defined on the first call only
    flags.DEFINE_string("topology", None, f"TPU slice to compile for: {TOPOLOGY_FORMS}")
    flags.DEFINE_string("out", "", "Write the report as JSON here.")
    flags.DEFINE_list("programs", list(PROGRAM_GROUPS), f"Which programs to compile: some of {PROGRAM_GROUPS}.")
    flags.DEFINE_string("hlo_dir", "", "Also write each compiled program's HLO text into this directory.")
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                    lock_config=True)

  def run(_):
    FLAGS = flags.FLAGS
    if not FLAGS.topology or FLAGS.config is None:
      raise app.UsageError("--config and --topology are required, e.g. "
                           "--config=configs/tpu_v4.py --topology=v4-64")
    programs_lib.apply_libtpu_init_args(FLAGS.config)  # compile with the run's TPU flags
    try:
      tpu = parse_topology(FLAGS.topology)
      log = lambda msg: print(msg, file=sys.stderr, flush=True)
      global HLO_DUMP_DIR
      HLO_DUMP_DIR = FLAGS.hlo_dir
      report = compile_step(FLAGS.config, tpu, log=log, groups=FLAGS.programs)
    except (ValueError, RuntimeError) as e:  # ConfigError is a ValueError
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    report["command"] = " ".join(["python -m laser_jax.aot"] + sys.argv[1:])
    print(format_report(report))
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump(report, f, indent=2)
    sys.exit(0 if report["fits"] else 1)

  cli.run(run, argv=argv)


if __name__ == "__main__":
  main()
