"""The report's sections beside the compiled worst case (`report.compile_step`): the training
state resident during every program, the most decode slots that fit next to it, and one RL
step at real response lengths (`lengths`), scaled from the compiled programs by `estimate`.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from laser_jax.aot import cost_model
from laser_jax.aot import estimate as estimate_lib
from laser_jax.aot import lengths as lengths_lib
from laser_jax.aot import topology
from laser_jax.aot.topology import GiB
from laser_jax.training import run_setup as run_setup_lib


def set_resident_bytes(reports: list, setup: run_setup_lib.RunSetup,
                        sampler_holds_params: bool) -> float:
  """Sets each program's `resident_bytes`: the training state (and the reference weights when a
  term reads them) stays on the chip for the whole step, less what the program takes as
  arguments (the update: the state; the log-prob forward: the parameters; the sampler: the
  parameters unless it samples from a copy in the rollout layout)."""
  state = sum(cost_model.shard_bytes(x) for x in jax.tree.leaves(setup.abstract_state))
  params = sum(cost_model.shard_bytes(x) for x in jax.tree.leaves(setup.abstract_state.params))
  resident = state + (params if setup.needs_ref else 0.0)
  for r in reports:
    if r.name == "update":
      r.resident_bytes = resident - state
    elif r.name == "old/ref log-probs" or sampler_holds_params:
      r.resident_bytes = resident - params
    else:
      r.resident_bytes = resident
  return resident


SPARE = 0.1  # HBM kept free when sizing the decode slots (the 10% margin)


def expected(c, setup: run_setup_lib.RunSetup, tpu: topology.Slice, reports: list,
             decode: estimate_lib.DecodeProgram | None, lengths: lengths_lib.ResponseLengths) -> dict:
  """The step at real response lengths (`estimate.expected_step`): as configured
  (`rollout.decode_slots`, `micro_batch_tokens`), and with the issue-27 design: all the step's
  rows in one continuous-batching call (`rollout.prompts_per_chunk` = 0) on as many slots as a
  static call has rows (the KV cache compiled here) or on the slot count, of those that fit
  next to the resident state, with the shortest expected step, and packing (at `micro_batch_tokens`, else at the padded micro-batch's
  tokens per shard), beside the padded worst case by the same model (`worst_at_budget`: every row
  at the budget, the static sampler, padded rows). {} without the rollout, log-prob and update
  programs."""
  by_name = {r.name: r for r in reports}
  needed = ("rollout prefill", "rollout decode", "old/ref log-probs", "update")
  if decode is None or any(name not in by_name or by_name[name].error for name in needed):
    return {}
  step_total = lambda name: by_name[name].roofline_s * by_name[name].calls_per_step
  shape = estimate_lib.StepShape(
      rows=setup.rows_per_update * setup.updates_per_step, rows_per_call=decode.call_rows or decode.rows,
      prompt_tokens=setup.prompt_bucket, seq_len=setup.seq_len, update_shards=setup.pack_rows,
      num_params=setup.model_cfg.num_params(), logprob_forwards=setup.logprob_forwards,
      peak_flops=tpu.chip.peak_flops * tpu.num_chips)
  decode_report = by_name["rollout decode"]
  fixed = (decode_report.total_bytes + decode_report.resident_bytes
           - decode.rows / decode.data_parallel * decode.row_bytes)
  most = estimate_lib.max_slots(decode_report.capacity_bytes, fixed, decode.row_bytes, decode.data_parallel, SPARE)
  def at(shape, slots: int, micro_batch_tokens: int) -> dict:
    return estimate_lib.expected_step(shape, lengths.tokens, decode, slots, micro_batch_tokens,
                                      step_total("rollout prefill"), step_total("old/ref log-probs"),
                                      step_total("update"))
  one_call = dataclasses.replace(shape, rows_per_call=shape.rows)
  packed = setup.micro_batch_tokens or setup.seq_len * c.micro_batch_size // setup.pack_rows
  # More slots amortise the weights over more rows per step but read more KV cache, and a call
  # with as many slots as rows waits for its longest row: try every count that fits (slots
  # beyond the step's rows never fill).
  most_used = min(most, -(-shape.rows // decode.data_parallel) * decode.data_parallel)
  candidates = [at(one_call, k, packed) for k in range(decode.data_parallel, most_used + 1, decode.data_parallel)]
  # The padded worst case by the same model: every row at the budget, the static sampler, padded rows.
  budget = np.full_like(lengths.tokens, lengths.budget)
  worst = estimate_lib.expected_step(shape, budget, decode, 0, 0, step_total("rollout prefill"),
                                     step_total("old/ref log-probs"), step_total("update"))
  return {"decode_slots": {"configured": setup.sampling.decode_slots, "max_with_10pct_spare": most,
                           "row_bytes": decode.row_bytes, "fixed_bytes": fixed},
          "worst_at_budget": worst,
          "expected": at(shape, setup.sampling.decode_slots, setup.micro_batch_tokens),
          "expected_continuous_packed": at(one_call, decode.rows, packed),
          "expected_continuous_packed_best_slots": min(candidates, key=lambda e: e["step_s"]) if candidates else None}


def format_resident(report: dict) -> list[str]:
  """The fit line counting the resident training state."""
  worst = max(report["programs"], key=lambda r: r["hbm_fraction_with_resident"])
  return [f"With the training state resident beside every program ({report['resident_state_bytes'] / GiB:.2f} "
          f"GiB per chip: parameters, optimizer moments, reference weights if read): fits: "
          f"{'yes' if report['fits_with_resident'] else 'NO'}; with >= 10% HBM to spare: "
          f"{'yes' if report['fits_with_resident_10pct_spare'] else 'no'} (fullest: {worst['name']}, "
          f"{100 * worst['hbm_fraction_with_resident']:.1f}% of HBM)."]


def format_expected(report: dict) -> list[str]:
  """The step at real response lengths beside the padded worst case, both by `estimate`'s model
  (the worst case's useful tokens are every row's prompt bucket + budget)."""
  if not report.get("expected"):
    return []
  lengths, slots, worst = report["response_lengths"], report["decode_slots"], report["worst_at_budget"]
  lines = ["", f"### At real response lengths ({lengths['source']}: mean {lengths['mean']:.0f} of "
               f"{lengths['budget']} tokens, median {lengths['p50']:.0f}, {100 * lengths['truncated_fraction']:.1f}% "
               f"truncated; `laser_jax/aot/estimate.py` scales the compiled worst case)",
           "",
           "| estimate | decode slots | decode steps | rollout s | update s | step s | % of worst step | "
           "useful-token MFU | update useful-token MFU |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, e in (("worst case (every row at the budget, static, padded)", worst),
                  ("expected as configured", report["expected"]),
                  ("expected, one continuous call + packing", report.get("expected_continuous_packed")),
                  ("expected, one continuous call at the fastest slot count + packing",
                   report.get("expected_continuous_packed_best_slots"))):
    if e:
      lines.append(f"| {name} | {e['slots'] or 'static'} | {e['decode_steps']} | {e['rollout_s']:.1f} | "
                   f"{e['update_s']:.1f} | {e['step_s']:.1f} | {100 * e['step_s'] / worst['step_s']:.1f} | "
                   f"{100 * e['useful_mfu']:.1f} | {100 * e['update_useful_mfu']:.1f} |")
  e = report["expected"]
  lines += ["", f"Worst-case MFU counts padding as work; useful-token MFU counts the prompt + response tokens "
                f"({e['useful_tokens']:,} of {e['padded_tokens']:,} padded, "
                f"{report['expected_continuous_packed']['packed_tokens']:,} packed). "
                f"The static sampler at these lengths decodes {e['static_decode_steps']} steps "
                f"({e['static_decode_s']:.1f} s): each call waits for its longest row. Most decode slots "
                f"with >= 10% HBM spare next to the resident state: {slots['max_with_10pct_spare']} "
                f"({slots['row_bytes'] / 2**20:.0f} MiB per slot per chip)."]
  return lines
