r"""One RL step at real response lengths, from the worst-case compiled programs' roofline numbers.

`report.compile_step` compiles every program at its worst case (every row generates
`max_new_tokens`, every update row is `seq_len` tokens). `expected_step` scales those per-call
roofline times to a step whose responses have the lengths of `lengths.ResponseLengths`:

  * Rollout decode, replayed step by step for each sampler call of `rows_per_call` rows
    (`DecodeReplay`): which rows run at each step, hence the deepest cache slot a consuming row
    writes. A row's t-th generated token (t >= 1) is consumed at cache slot prompt_len + t - 1,
    and the cache is the prompt chunk then `SamplingParams.decode_chunk_lengths`: a step reads
    the chunks up to the one holding the deepest write, the fraction f(t) = (end of that chunk)
    / window of every row's KV cache (`visible_fraction`).
      - Static sampler (`rollout.decode_slots` = 0, `static_replay`): a call decodes until its
        longest row is done; at step t every row writes offset t (segment j of its loop attends
        over chunks 0..j).
      - Continuous batching (`rollout.decode_slots` > 0, `continuous_replay`): each data
        shard's rows (a block of the call's) take the first free slot of that shard's slots in
        order, a finished row's slot refilled with the shard's next row every `refill_every`
        steps (`laser_jax.generate.continuous` refills on device before every step: 1); the
        step attends over the chunks up to the one holding the deepest write of its consuming
        slots (a `lax.switch` over the chunk count in every layer), or, with the TPU decode
        kernel (`DecodeProgram.ragged`, `laser_jax.models.ragged_attention`), each running slot
        reads its prompt chunk and its own decode keys (`DecodeReplay.running`,
        `decode_keys`), the step waiting for the data shard that reads the most.
    A step's seconds: max(compute, HBM, ICI), compute and interconnect the compiled step's
    scaled by the rows (per-row work), HBM the compiled step's scaled by the bytes read,
    weights + rows x (KV bytes x f(t) + the rest of a row's state), against the compiled
    count's (its mean fraction `kv_fill`: the static loop's segments at the budget,
    `mean_visible_fraction`; the continuous loop counted with every chunk visible, 1), plus,
    in a step where free slots take rows, one refill's bytes (`hlo_costs` counts the refill
    apart: `optional_hbm_bytes`). `decode_seconds`. When the report compiled the continuous
    programs (`DecodeProgram.continuous`: `rows` are the slots), the static figures
    (`static_decode_s`) are the same replay of the static calls scaled from that step.
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


def continuous_starts(tokens: np.ndarray, slots: int, refill_every: int = 1) -> np.ndarray:
  """The step each row starts decoding at under continuous batching: rows (in order) take the
  first free slot; a slot freed at step t takes its next row at the next multiple of
  `refill_every` (>= t); a row of length L holds its slot L steps."""
  free_at = [0] * min(slots, len(tokens))  # heap: the step each slot is free from
  heapq.heapify(free_at)
  starts = np.zeros(len(tokens), np.int64)
  for i, length in enumerate(tokens):
    starts[i] = -(-heapq.heappop(free_at) // refill_every) * refill_every
    heapq.heappush(free_at, int(starts[i] + length))
  return starts


def continuous_decode_steps(tokens: np.ndarray, slots: int, refill_every: int = 1, shards: int = 1) -> int:
  """Decode steps of continuous batching (`continuous_replay`): the step the last row finishes."""
  return continuous_replay(tokens, slots, refill_every, shards).steps if len(tokens) else 0


@dataclasses.dataclass(frozen=True)
class DecodeReplay:
  """One sampler call's decode loop, step by step."""
  deepest: np.ndarray  # [steps] the largest decode offset (tokens generated - 1) a consuming row
  #   writes at that step; -1 when no row consumes (the step then attends over the prompt chunk)
  refills: np.ndarray  # [steps] bool: free slots take rows before the step (continuous only)
  # Per data shard and step (continuous only): the rows running and the cache keys their decode
  # tokens add up to (offset + 1 each): what a step reads when each row reads its own prefix.
  running: np.ndarray | None = None  # [shards, steps]
  decode_keys: np.ndarray | None = None  # [shards, steps]

  @property
  def steps(self) -> int:
    return int(self.deepest.size)


def static_replay(tokens: np.ndarray) -> DecodeReplay:
  """A static call: every row writes offset t at step t, until its longest row is done."""
  steps = int(np.max(tokens))
  return DecodeReplay(np.arange(steps), np.zeros(steps, bool))


def continuous_replay(tokens: np.ndarray, slots: int, refill_every: int = 1, shards: int = 1) -> DecodeReplay:
  """A continuous call (`continuous_starts`): a row started at step s writes offset t - s at
  step t, so the deepest write is t - (the earliest start among the rows running at t). With
  `shards` data shards (`laser_jax.generate.continuous`), shard b's slots / shards slots take only
  shard b's block of the rows: each shard is replayed alone, and a step's deepest write and
  refill are the shards' deepest and any; the call lasts until the last shard is done."""
  if shards > 1:
    parts = [continuous_replay(block, slots // shards, refill_every) for block in np.array_split(tokens, shards)
             if len(block)]
    steps = max(p.steps for p in parts)
    deepest = np.full((len(parts), steps), -1, np.int64)
    refills = np.zeros((len(parts), steps), bool)
    running, decode_keys = np.zeros((2, len(parts), steps), np.int64)
    for i, p in enumerate(parts):
      deepest[i, :p.steps], refills[i, :p.steps] = p.deepest, p.refills
      running[i, :p.steps], decode_keys[i, :p.steps] = p.running[0], p.decode_keys[0]
    return DecodeReplay(deepest.max(axis=0), refills.any(axis=0), running, decode_keys)
  starts = continuous_starts(tokens, slots, refill_every)
  ends = starts + tokens
  steps = int(np.max(ends))
  earliest = np.full(steps, steps, np.int64)  # `steps`: no row running
  for start, end in zip(starts, ends):  # rows in start order hold their slot in [start, end)
    view = earliest[start:end]
    np.minimum(view, start, out=view)
  t = np.arange(steps)
  refills = np.zeros(steps, bool)
  refills[starts] = True
  # A row running over [start, end) adds t - start + 1 keys at step t: sum (t + 1) - start over
  # the rows running, from running counts and sums of starts (difference arrays).
  running = np.cumsum(np.bincount(starts, minlength=steps + 1) - np.bincount(ends, minlength=steps + 1))[:steps]
  start_sum = np.cumsum(np.bincount(starts, starts, minlength=steps + 1)
                        - np.bincount(ends, starts, minlength=steps + 1))[:steps]
  decode_keys = np.rint((t + 1) * running - start_sum).astype(np.int64)
  return DecodeReplay(np.where(earliest < steps, t - earliest, -1), refills, running[None], decode_keys[None])


def visible_fraction(deepest: np.ndarray, prompt_len: int, chunk_lengths: tuple[int, ...]) -> np.ndarray:
  """Per step, the share of a row's cache window (prompt chunk + decode chunks) attention
  reads: up to the end of the chunk holding cache slot prompt_len + deepest (the prompt chunk
  alone when no row consumes)."""
  ends = np.cumsum((prompt_len,) + tuple(chunk_lengths))
  written = np.where(deepest < 0, 0, prompt_len + deepest)
  chunk = np.minimum(np.searchsorted(ends, written, side="right"), len(ends) - 1)
  return ends[chunk] / ends[-1]


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
  steps: int  # the steps it was counted at (static: max_new_tokens)
  rows: int  # rows of the call; a continuous program's: its slots
  data_parallel: int  # shards of the rows
  compute_s: float
  hbm_s: float
  ici_s: float
  weight_bytes: float  # this chip's rollout weights
  row_bytes: float  # this chip's bytes of one row's sampling state (KV cache + buffers)
  kv_row_bytes: float  # the KV cache's part of row_bytes (keys, values, mask): read up to the chunk in use
  prompt_len: int  # the prompt chunk of the cache
  chunk_lengths: tuple[int, ...]  # the decode chunks of the cache (`SamplingParams.decode_chunk_lengths`)
  kv_fill: float  # mean share of the cache window a compiled step was counted reading
  call_rows: int = 0  # rows of the sampler call (0: `rows`); a continuous program's `rows` are its slots
  continuous: bool = False  # compiled as continuous batching, counted with every chunk visible
  ragged: bool = False  # continuous, each slot reading its own cache prefix (`ragged_attention`)
  refill_hbm_s: float = 0.0  # HBM seconds of one refill of the compiled slots (continuous)
  refill_ici_s: float = 0.0  # interconnect seconds of one refill (continuous)


def mean_visible_fraction(prompt_len: int, chunk_lengths: tuple[int, ...]) -> float:
  """The static loop's mean `visible_fraction` when every row runs to the budget: its compiled
  count (segment j's loop reads chunks 0..j)."""
  return float(np.mean(visible_fraction(np.arange(sum(chunk_lengths)), prompt_len, chunk_lengths)))


def decode_seconds(decode: DecodeProgram, rows: int, replay: DecodeReplay) -> float:
  """Roofline seconds of a decode loop of `rows` rows (or slots) run as `replay` (module
  docstring): per step max(compute, HBM, ICI), compute and ICI the compiled step's scaled by
  rows, HBM the compiled step's scaled by the bytes read: weights + rows x (KV bytes x the
  visible fraction + the rest of a row's state), plus a refill's bytes (HBM and interconnect)
  where one happens."""
  per_row = rows / decode.rows
  compute, ici = decode.compute_s / decode.steps * per_row, decode.ici_s / decode.steps * per_row
  read = lambda rows_, fill: decode.weight_bytes + rows_ / decode.data_parallel * (
      decode.kv_row_bytes * fill + decode.row_bytes - decode.kv_row_bytes)
  if decode.ragged and replay.running is not None:
    # Each running slot reads the prompt chunk and its own decode keys; the step waits for the
    # data shard that reads the most (a free slot reads one block per chunk: not counted).
    window = decode.prompt_len + sum(decode.chunk_lengths)
    keys = replay.running * decode.prompt_len + replay.decode_keys  # [shards, steps]
    state = decode.weight_bytes + replay.running * (decode.row_bytes - decode.kv_row_bytes)
    bytes_read = np.max(state + keys * (decode.kv_row_bytes / window), axis=0)
  else:
    bytes_read = read(rows, visible_fraction(replay.deepest, decode.prompt_len, decode.chunk_lengths))
  hbm = decode.hbm_s / decode.steps * bytes_read / read(decode.rows, decode.kv_fill)
  hbm = hbm + replay.refills * decode.refill_hbm_s * per_row
  ici = ici + replay.refills * decode.refill_ici_s * per_row
  return float(np.sum(np.maximum(np.maximum(compute, ici), hbm)))


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
  calls = [response_tokens[i:i + shape.rows_per_call] for i in range(0, len(response_tokens), shape.rows_per_call)]
  static = [static_replay(call) for call in calls]
  static_steps = sum(r.steps for r in static)
  static_s = sum(decode_seconds(decode, shape.rows_per_call, r) for r in static)
  if slots:
    replays = [continuous_replay(call, slots, refill_every, decode.data_parallel) for call in calls]
    steps, decode_s = sum(r.steps for r in replays), sum(decode_seconds(decode, slots, r) for r in replays)
  else:
    steps, decode_s = static_steps, static_s
  rollout_s = prefill_s + decode_s + logprobs_s * packed / padded
  update = update_s * packed / padded
  step_s = rollout_s + update
  mfu = rl_metrics.step_model_flops(shape.num_params, useful, shape.logprob_forwards) / (step_s * shape.peak_flops)
  update_mfu = 6 * shape.num_params * useful / (update * shape.peak_flops)
  return {
      "slots": slots, "micro_batch_tokens": micro_batch_tokens, "refill_every": refill_every,
      "static_decode_steps": static_steps, "static_decode_s": static_s,
      "decode_steps": steps, "decode_s": decode_s,
      "useful_tokens": useful, "padded_tokens": padded, "packed_tokens": packed,
      "rollout_s": rollout_s, "update_s": update, "step_s": step_s,
      "useful_mfu": mfu, "update_useful_mfu": update_mfu,
  }
