r"""One RL step at real response lengths, from the worst-case compiled programs' roofline numbers.

`report.compile_step` compiles every program at its worst case (every row generates
`max_new_tokens`, every update row is `seq_len` tokens). `expected_step` scales those per-call
roofline times to a step whose responses have the lengths of `lengths.ResponseLengths`:

  * Rollout decode, static sampler (`rollout.decode_slots` = 0): a call of `rows_per_call`
    rows decodes until its longest row is done, so it runs max(lengths of its rows) steps;
    `static_decode_steps`.
  * Rollout decode, continuous batching (`rollout.decode_slots` > 0): each call of
    `rows_per_call` rows runs `slots` decode slots, a finished row's slot refilled with the
    call's next row every `refill_every` steps (`laser_jax.generate.continuous` refills on
    device before every step: 1); `continuous_decode_steps` replays that schedule, so a call's
    steps follow sum(lengths) / slots plus the tail of its last rows. The time of one step at
    `slots` slots: compute and interconnect scale with the slots (per-row work); HBM bytes are
    the static step's scaled by (weights + slots x row bytes) / (weights + rows x row bytes x
    fill), the static loop's KV reads being `fill` of the cache (its decode segments: the
    prompt plus half the response on average) and the continuous loop's the whole cache window
    of every slot (it attends over every chunk). `slot_step_s`. When the report compiled the
    continuous programs themselves (`DecodeProgram.continuous`: `rows` are the slots, fill 1),
    the step scaled from is the compiled one, and the static figures (`static_decode_s`) are
    that step scaled to the call's rows.
  * Prefill: the same prompts are prefilled either way: the worst case's time.
  * Old / reference log-probs and the update, packed (`config.micro_batch_tokens` > 0): the
    sequences (prompt bucket + response tokens; prompts are counted at their bucket, an upper
    bound) packed as the trainer packs them (`packing.plan_packing`) into rows of
    `micro_batch_tokens`, one per data-parallel shard per micro-batch (`packed_tokens`); time is
    the padded program's times the packed / padded tokens (attention's share grows with the
    sequence, so shorter sequences cost less than this per token: an upper bound). Unpacked
    (0), they cost the padded worst case.
  * MFU on useful tokens: `rl_metrics.step_model_flops` over the step's real tokens (prompt +
    response), over the expected time; the update's alone is 6 N tokens over its time.
"""
from __future__ import annotations

import dataclasses
import heapq
import math

import numpy as np

from laser_jax.rl import packing
from laser_jax.rl import rl_metrics


def static_decode_steps(tokens: np.ndarray, rows_per_call: int) -> int:
  """Decode steps of the static sampler: each call of `rows_per_call` rows (in order) runs
  until its longest row is done."""
  return int(sum(int(np.max(tokens[i:i + rows_per_call])) for i in range(0, len(tokens), rows_per_call)))


def continuous_decode_steps(tokens: np.ndarray, slots: int, refill_every: int = 1) -> int:
  """Decode steps of continuous batching: rows (in order) take the first free slot; a slot
  freed at step t takes its next row at the next multiple of `refill_every` (>= t); a row
  of length L holds its slot L steps. Returns the step the last row finishes."""
  free_at = [0] * min(slots, len(tokens))  # heap: the step each slot is free from
  heapq.heapify(free_at)
  end = 0
  for length in tokens:
    start = -(-heapq.heappop(free_at) // refill_every) * refill_every
    finish = start + int(length)
    end = max(end, finish)
    heapq.heappush(free_at, finish)
  return end


def packed_tokens(sequence_tokens: np.ndarray, micro_batch_tokens: int, shards: int) -> int:
  """Tokens the packed passes run: the trainer's packing plan (`packing.plan_packing`, first-fit
  decreasing into packed rows of `micro_batch_tokens`, one per data-parallel shard and
  micro-batch) times its micro-batches' tokens. Empty micro-batches of the power-of-two
  bucketing are skipped at run time, so they cost nothing here."""
  plan = packing.plan_packing(sequence_tokens, micro_batch_tokens, shards)
  return plan.num_micro * shards * micro_batch_tokens


@dataclasses.dataclass(frozen=True)
class DecodeProgram:
  """The worst-case decode loop of one sampler call, as compiled (per chip, per call)."""
  steps: int  # max_new_tokens: the steps it was counted at
  rows: int  # rows of the call
  data_parallel: int  # shards of the rows
  compute_s: float
  hbm_s: float
  ici_s: float
  weight_bytes: float  # this chip's rollout weights
  row_bytes: float  # this chip's bytes of one row's sampling state (KV cache + buffers)
  kv_fill: float  # mean fraction of the cache a static step reads (decode segments)
  call_rows: int = 0  # rows of the sampler call (0: `rows`); a continuous program's `rows` are its slots
  continuous: bool = False  # compiled as continuous batching: `rows` slots, every step reads the whole cache


def slot_step_s(decode: DecodeProgram, slots: int) -> float:
  """Roofline seconds of one continuous-batching decode step at `slots` slots (module docstring)."""
  per_step = lambda t: t / decode.steps
  scale = slots / decode.rows
  static_bytes = decode.weight_bytes + decode.rows / decode.data_parallel * decode.row_bytes * decode.kv_fill
  slot_bytes = decode.weight_bytes + slots / decode.data_parallel * decode.row_bytes
  return max(per_step(decode.compute_s) * scale, per_step(decode.ici_s) * scale,
             per_step(decode.hbm_s) * slot_bytes / static_bytes)


def max_slots(capacity: float, fixed_bytes: float, row_bytes: float, data_parallel: int,
              spare: float = 0.0) -> int:
  """The most decode slots (a multiple of `data_parallel`) whose state fits next to
  `fixed_bytes` (weights, resident training state, temporaries, code) in `capacity`, keeping
  `spare` of it free."""
  per_chip = math.floor((capacity * (1 - spare) - fixed_bytes) / row_bytes)
  return max(0, per_chip) * data_parallel


@dataclasses.dataclass(frozen=True)
class StepShape:
  """The step's counts the estimate scales by (from `run_setup.RunSetup`)."""
  rows: int  # responses per RL step
  rows_per_call: int  # rows of one static sampler call
  prompt_tokens: int  # the prompt bucket
  seq_len: int  # tokens of a padded update row
  update_shards: int  # data-parallel shards of the update (a packed micro-batch has a row on each)
  num_params: int
  logprob_forwards: int
  peak_flops: float  # of the whole slice


def expected_step(shape: StepShape, response_tokens: np.ndarray, decode: DecodeProgram, slots: int,
                  micro_batch_tokens: int, prefill_s: float, logprobs_s: float, update_s: float,
                  refill_every: int = 1) -> dict:
  """Expected seconds and useful-token MFU of one step (module docstring) with `slots` decode
  slots (0: the static sampler) and packed rows of `micro_batch_tokens` (0: padded rows).
  `prefill_s`, `logprobs_s`, `update_s`: the worst case's per-step seconds of those programs."""
  useful = int(np.sum(shape.prompt_tokens + response_tokens))
  padded = shape.rows * shape.seq_len
  packed = (packed_tokens(shape.prompt_tokens + response_tokens, micro_batch_tokens, shape.update_shards)
            if micro_batch_tokens else padded)
  static_steps = static_decode_steps(response_tokens, shape.rows_per_call)
  if decode.continuous:  # no static loop compiled: a step of all the call's rows, scaled from the slots'
    static_step_s = slot_step_s(decode, shape.rows_per_call)
  else:
    static_step_s = max(decode.compute_s, decode.hbm_s, decode.ici_s) / decode.steps
  if slots:
    calls = range(0, len(response_tokens), shape.rows_per_call)
    steps = sum(continuous_decode_steps(response_tokens[i:i + shape.rows_per_call], slots, refill_every)
                for i in calls)
    decode_s = steps * slot_step_s(decode, slots)
  else:
    steps, decode_s = static_steps, static_steps * static_step_s
  rollout_s = prefill_s + decode_s + logprobs_s * packed / padded
  update = update_s * packed / padded
  step_s = rollout_s + update
  mfu = rl_metrics.step_model_flops(shape.num_params, useful, shape.logprob_forwards) / (step_s * shape.peak_flops)
  update_mfu = 6 * shape.num_params * useful / (update * shape.peak_flops)
  return {
      "slots": slots, "micro_batch_tokens": micro_batch_tokens, "refill_every": refill_every,
      "static_decode_steps": static_steps, "static_decode_s": static_steps * static_step_s,
      "decode_steps": steps, "decode_s": decode_s,
      "useful_tokens": useful, "padded_tokens": padded, "packed_tokens": packed,
      "rollout_s": rollout_s, "update_s": update, "step_s": step_s,
      "useful_mfu": mfu, "update_useful_mfu": update_mfu,
  }
