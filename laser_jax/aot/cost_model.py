"""Loop-aware cost counts of a program, which XLA's `cost_analysis()` counts once per loop body.

  * `jaxpr_flops`: matmul FLOPs (2*M*N*K of every dot_general) of a jaxpr, scans multiplied by
    their length, while loops by the trip counts given, Pallas kernels by their grid.
  * `hlo_costs`: HBM bytes and collective bytes per chip of a compiled, SPMD-partitioned HLO
    module: operands + results in HBM of every top-level instruction (fusions count what they
    read and write; buffers in on-chip memory are not HBM traffic), slices and gathers what they
    read, an in-place dynamic-update-slice or scatter only what it writes, a collective its data twice;
    loops multiplied by XLA's known trip count, a `counter < constant` condition, or the counts given;
    a conditional its costliest branch (the worst case), unless another branch does next to
    nothing (a `lax.cond(p, work, lambda: x)`, taken only when needed; XLA may leave a convert of
    a flag in it): then it is counted as not taken and its bytes reported apart
    (`HloCosts.optional_hbm_bytes`, `optional_collective_bytes`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import jax
import jax.extend
import numpy as np


def shard_bytes(x) -> float:
  """Bytes of one device's shard of an abstract array."""
  shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
  return float(math.prod(shape) * np.dtype(x.dtype).itemsize)


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
  # HBM and collective bytes of conditionals counted as not taken (one branch does next to
  # nothing; `hlo_costs`), loops multiplied out as if taken on every trip.
  optional_hbm_bytes: float = 0.0
  optional_collective_bytes: float = 0.0


# A conditional's branch that moves at most this share of its costliest branch's bytes "does
# nothing": the cond is work taken only when needed (the continuous sampler's refill, whose idle
# branch keeps a convert of a [slots] flag), not alternatives of one step (a `lax.switch` over the
# chunks in use reads at least the prompt chunk in every branch).
IDLE_BRANCH_SHARE = 1e-3


def hlo_costs(hlo_text: str, while_trip_counts: Sequence[int] = (), breakdown: dict | None = None) -> HloCosts:
  """HBM and collective bytes per chip of a compiled (per-chip, SPMD-partitioned) HLO module.

  Loops whose trip count XLA knows or whose condition is `i < constant` are multiplied by it;
  the others (the sampler's decode loops) take the entries of `while_trip_counts` in program
  order, or count once (`loops_without_trip_count`). A conditional counts its costliest branch,
  or nothing when one branch does next to nothing (`optional_hbm_bytes` /
  `optional_collective_bytes` then hold the other's bytes). `breakdown`, when given, receives
  each instruction's HBM bytes as walked, {(computation, name, opcode, fused root): bytes}, every
  branch of a conditional included (so it can sum to more than `hbm_bytes`): for reading a report.
  """
  computations, entry = _parse_hlo(hlo_text)
  counts = list(while_trip_counts)
  out = HloCosts()

  def charge(acc: HloCosts, comp: str, ins, op: str, fused_root: str, hbm_bytes: float):
    acc.hbm_bytes += hbm_bytes
    if breakdown is not None:  # (computation, instruction, opcode, fused root) -> HBM bytes, summed
      key = (comp, ins.name, op, fused_root)
      breakdown[key] = breakdown.get(key, 0.0) + hbm_bytes

  def _conditional(branches: list[str], times: float, in_loop: bool, acc: HloCosts):
    """Branches are alternatives: count the costliest (a `lax.switch` over how much to read, e.g.
    the continuous decode step's chunks in use, is counted at its worst case). A conditional
    with a branch that does nothing (`lax.cond(p, work, lambda: x)`, e.g. the continuous
    sampler's refill) counts as not taken, its work going to `optional_hbm_bytes`: the caller
    knows how often it is taken."""
    left = list(counts)
    options = []
    for b in branches:
      counts[:] = left
      branch = HloCosts()
      walk(b, times, in_loop, branch)
      options.append((branch, list(counts)))
    moved = [o[0].hbm_bytes + o[0].collective_bytes + o[0].optional_hbm_bytes for o in options]
    costliest, counts[:] = options[moved.index(max(moved))]
    if len(options) > 1 and min(moved) <= IDLE_BRANCH_SHARE * max(moved):
      acc.optional_hbm_bytes += costliest.hbm_bytes + costliest.optional_hbm_bytes
      acc.optional_collective_bytes += costliest.collective_bytes + costliest.optional_collective_bytes
      return
    for field in dataclasses.fields(HloCosts):
      setattr(acc, field.name, getattr(acc, field.name) + getattr(costliest, field.name))

  def walk(comp: str, times: float, in_loop: bool, acc: HloCosts):
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
            acc.loops_without_trip_count += 1
        walk(_attr(ins.attrs, "body"), times * trips, True, acc)
        walk(_attr(ins.attrs, "condition"), times * trips, True, acc)
        continue
      if op == "conditional":
        branches = re.findall(r"%([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                                               or re.search(r"(true_computation=.*)", ins.attrs)).group(1))
        _conditional(branches, times, in_loop, acc)
        continue
      if op == "call":
        walk(_attr(ins.attrs, "to_apply"), times, in_loop, acc)
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
          charge(acc, comp, ins, op, "", times * (read + _type_bytes(result, hbm_only=True)))
        continue
      if base in _COLLECTIVES:
        moved = _type_bytes(ins.type_str, largest_only=op.endswith("-start"))
        if base in ("all-reduce", "reduce-scatter", "all-to-all", "collective-permute"):
          moved = max(moved, sum(_type_bytes(types.get(o, "")) for o in ins.operands))
        acc.collective_bytes += times * moved
        if in_loop:
          acc.collective_bytes_in_loops += times * moved
        charge(acc, comp, ins, op, "", times * 2 * moved)
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
        charge(acc, comp, ins, op, fused_root, times * 2 * sum(operand_bytes[1:]))
        continue
      if (op == "scatter" or fused_root == "scatter") and result_bytes in operand_bytes:
        # Also in place (XLA shares a scatter's operand buffer with its result, e.g. a decode
        # step's per-row cache writes): the indices and updates, not the buffer they land in.
        updated = list(operand_bytes)
        updated.remove(result_bytes)
        charge(acc, comp, ins, op, fused_root, times * 2 * sum(updated))
        continue
      charge(acc, comp, ins, op, fused_root, times * (sum(operand_bytes) + result_bytes))

  walk(entry, 1.0, False, out)
  return out
