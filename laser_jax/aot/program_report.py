"""One compiled program of the RL step, as `laser_jax.aot` reports it (`compile_report`): the
per-chip memory the compiler allocates, the counted FLOPs / HBM / collective bytes
(`cost_model`), and the roofline time on the chip (`ProgramReport`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax

from laser_jax.aot import cost_model
from laser_jax.aot import topology
from laser_jax.aot.topology import GiB


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
  # The training state (f32 params + Adam moments, the reference weights when a term reads them)
  # resident on the chip while this program runs and not among its arguments.
  resident_bytes: float = 0.0
  # Sampler programs: the continuous-batching slots (0: the static sampler), and for a decode
  # loop the steps its costs are multiplied by (static: max_new_tokens; continuous:
  # `estimate.continuous_decode_steps` with every row at the budget).
  decode_slots: int = 0
  decode_steps: int = 0
  # Per chip per call: HBM bytes of conditionals counted as not taken (`cost_model.hlo_costs`:
  # one branch does nothing, e.g. the continuous sampler's refill), as if taken at every trip.
  optional_hbm_bytes: float = 0.0
  optional_collective_bytes: float = 0.0

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

  @property
  def hbm_fraction_with_resident(self) -> float:
    return (self.total_bytes + self.resident_bytes) / self.capacity_bytes

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(total_bytes=self.total_bytes, hbm_fraction=self.hbm_fraction, fits=self.fits,
             roofline_s=self.roofline_s, bound=self.bound,
             hbm_fraction_with_resident=self.hbm_fraction_with_resident)
    return d


HLO_DUMP_DIR = ""  # When set (--hlo_dir), each compiled program's HLO text is written there.


def compile_report(name, traced, calls, chip: topology.Chip, num_chips: int, loop_trips=()
            ) -> tuple[ProgramReport, Any]:
  """(the report, the compiled program) of a traced program."""
  t0 = time.perf_counter()
  flops = cost_model.jaxpr_flops(traced.jaxpr.jaxpr, loop_trips) / num_chips
  try:
    compiled = traced.lower().compile()
  except Exception as e:  # libtpu refuses a program that does not fit: report it, go on
    needed = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or not needed:
      raise
    arguments = sum(cost_model.shard_bytes(a) for a in jax.tree.leaves(traced.args_info) if hasattr(a, "sharding"))
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
  costs = cost_model.hlo_costs(hlo, loop_trips)
  return ProgramReport(
      name=name, calls_per_step=calls, argument_bytes=mem.argument_size_in_bytes,
      output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
      temp_bytes=mem.temp_size_in_bytes, code_bytes=mem.generated_code_size_in_bytes,
      flops=flops, hbm_bytes=costs.hbm_bytes, collective_bytes=costs.collective_bytes,
      collective_bytes_in_loops=costs.collective_bytes_in_loops,
      compute_s=flops / chip.peak_flops, hbm_s=costs.hbm_bytes / chip.hbm_bandwidth,
      ici_s=costs.collective_bytes / chip.ici_bandwidth, compile_s=compile_s,
      capacity_bytes=chip.hbm_bytes, optional_hbm_bytes=costs.optional_hbm_bytes,
      optional_collective_bytes=costs.optional_collective_bytes), compiled
