"""Token-budget packing of training rows: the forward pays for real tokens, not for padding.

A padded micro-batch runs every row at the full length S = P + R + 1 (`records`), whatever its
response length. With `config.micro_batch_tokens` = L > 0 the log-prob passes and the update
instead pack the real tokens of whole sequences side by side into packed rows of L tokens, one
packed row per data-parallel shard per micro-batch (as verl's `ppo_max_token_len_per_gpu`):

    packed row:  [ seq a (segment 1) | seq b (segment 2) | ... | pad (segment 0) ]

Segment ids keep attention inside a sequence (`attention.attend_causal`) and positions restart
at each sequence's start (they are the padded row's positions, copied), so every token sees what
it saw in its padded row. Only the model forward runs on the packed rows: its per-token
log-probs and z_c log-prob are gathered back to the per-sequence [M, S] / [M] layout of
`records.UpdateBatch` (`sequence_logprobs`), where `objective.total_loss` runs unchanged, so its
normalisers (token-mean, seq-mean-*, Dr. GRPO's, L_sr's rows and class weights) stay exact.

Static shapes for jit: a micro-batch holds `rows` packed rows of L tokens and `rows x slots`
sequence slots (empty slots: length 0, zero mask, never finished); the number of micro-batches
and the slots per packed row are rounded up to powers of two (`bucket`), so a run compiles at
most log2(rows) x log2(L / 2) shapes of each program, whatever the length distribution. Empty
micro-batches (from the rounding) are skipped inside the update (`programs.update_step`).

The plan is a pure function of the per-row lengths (first-fit decreasing, ties by row index):
the same lengths give the same packing on every host.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from laser_jax.rl import records


def bucket(n: int) -> int:
  """The static size a count `n` >= 1 is compiled at: the next power of two."""
  return 1 << max(int(n) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class PackingPlan:
  """Where each of N sequences goes (`plan_packing`); every array is int32 [N]."""
  micro: np.ndarray  # the micro-batch
  row: np.ndarray  # the packed row within that micro-batch
  slot: np.ndarray  # the sequence slot within that packed row (the order of its segments)
  offset: np.ndarray  # the packed column of the sequence's first token
  num_micro: int  # micro-batches holding a sequence
  max_slots: int  # most sequences in one packed row

  def shape(self, num_micro: int | None = None, slots: int | None = None) -> tuple[int, int]:
    """(micro-batches, slots per packed row) to compile: this plan's, bucketed; pass larger
    counts (the largest over hosts) to give every host the same shape."""
    return bucket(num_micro or self.num_micro), bucket(slots or self.max_slots)


def plan_packing(lengths: np.ndarray, row_tokens: int, rows: int) -> PackingPlan:
  """First-fit decreasing: the sequences, longest first (ties: lower index first), each into the
  first packed row of `row_tokens` with room for it; packed row b is row b % `rows` of
  micro-batch b // `rows`. lengths: int [N] real tokens per sequence, each in [1, row_tokens]."""
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and (lengths.min() < 1 or lengths.max() > row_tokens):
    raise ValueError(f"plan_packing: sequence lengths must lie in [1, {row_tokens}] "
                     f"(got {lengths.min()}..{lengths.max()})")
  n = len(lengths)
  order = np.lexsort((np.arange(n), -lengths))
  used = np.zeros(n, np.int64)  # tokens per packed row (at most one row per sequence)
  count = np.zeros(n, np.int64)  # sequences per packed row
  num_rows = 0
  packed_row = np.zeros(n, np.int64)
  offset = np.zeros(n, np.int64)
  slot = np.zeros(n, np.int64)
  for i in order:
    fits = np.flatnonzero(used[:num_rows] + lengths[i] <= row_tokens)
    b = int(fits[0]) if fits.size else num_rows
    num_rows += b == num_rows
    packed_row[i], offset[i], slot[i] = b, used[b], count[b]
    used[b] += lengths[i]
    count[b] += 1
  as32 = lambda x: x.astype(np.int32)
  return PackingPlan(micro=as32(packed_row // rows), row=as32(packed_row % rows), slot=as32(slot),
                     offset=as32(offset), num_micro=-(-num_rows // rows),
                     max_slots=int(count.max()) if n else 1)


@flax.struct.dataclass
class PackedSequences:
  """What a packed log-prob forward reads: `rows` packed rows of L tokens and `rows x slots`
  sequence slots, slot j = r * slots + k the k-th segment of packed row r. Leaves [rows, L] and
  [rows * slots]; [num_micro, ...] in front inside an update."""
  tokens: Any  # int32 [rows, L]
  positions: Any  # int32 [rows, L]: each sequence's own positions (restarting per sequence)
  segment_ids: Any  # int32 [rows, L]: slot k of the row is segment k + 1, padding 0
  targets: Any  # int32 [rows, L]: the token each position predicts (its padded row's target)
  offset: Any  # int32 [rows * slots]: packed column of the slot's first token
  start: Any  # int32 [rows * slots]: index of that token in the padded row of length S
  length: Any  # int32 [rows * slots]: real tokens (0 = empty slot)
  eos_index: Any  # int32 [rows * slots]: the padded row's eos_index (where z_c is read)
  seq_len: int = flax.struct.field(pytree_node=False, default=0)  # S of the padded rows

  @property
  def slots_per_row(self) -> int:
    return self.offset.shape[-1] // self.tokens.shape[-2]


def pack_sequences(seqs: records.Sequences, plan: PackingPlan, num_micro: int, rows: int,
                   row_tokens: int, slots: int) -> tuple[PackedSequences, np.ndarray]:
  """The [num_micro, ...] PackedSequences of `seqs` [N, S] (host NumPy) under `plan`, and
  source [num_micro, rows * slots]: the row of `seqs` in each slot (-1 = empty)."""
  tokens, positions, mask, targets = (np.asarray(x) for x in (seqs.tokens, seqs.positions,
                                                               seqs.attention_mask, seqs.targets))
  n, seq_len = tokens.shape
  packed = {name: np.zeros((num_micro, rows, row_tokens), np.int32)
            for name in ("tokens", "positions", "segment_ids", "targets")}
  per_slot = {name: np.zeros((num_micro, rows * slots), np.int32)
              for name in ("offset", "start", "length", "eos_index")}
  source = np.full((num_micro, rows * slots), -1, np.int64)
  lengths = mask.sum(axis=1)
  starts = np.argmax(mask, axis=1)  # each row's real tokens are one run (left-padded prompt)
  eos_index = np.asarray(seqs.eos_index)
  for i in range(n):
    m, r, k, o = plan.micro[i], plan.row[i], plan.slot[i], plan.offset[i]
    s, length = starts[i], lengths[i]
    cols = slice(o, o + length)
    for name, values in (("tokens", tokens), ("positions", positions), ("targets", targets)):
      packed[name][m, r, cols] = values[i, s:s + length]
    packed["segment_ids"][m, r, cols] = k + 1
    j = r * slots + k
    for name, value in (("offset", o), ("start", s), ("length", length), ("eos_index", eos_index[i])):
      per_slot[name][m, j] = value
    source[m, j] = i
  return PackedSequences(**packed, **per_slot, seq_len=seq_len), source


def slot_values(values: np.ndarray | None, source: np.ndarray, fill=0) -> np.ndarray | None:
  """values [N, ...] laid out by slot: [*source.shape, ...], `fill` in the empty slots."""
  if values is None:
    return None
  values = np.asarray(values)
  out = values[np.maximum(source, 0)]
  empty = (source < 0).reshape(source.shape + (1,) * (values.ndim - 1))
  return np.where(empty, np.asarray(fill, values.dtype), out)


def pack_update_batch(batch: records.UpdateBatch, plan: PackingPlan, num_micro: int, rows: int,
                      row_tokens: int, slots: int) -> records.UpdateBatch:
  """`batch` [N, ...] as [num_micro, rows * slots, ...] slots around PackedSequences: an empty
  slot has no response token, is not finished and weighs 0, so it adds nothing to any loss."""
  packed, source = pack_sequences(batch.sequences, plan, num_micro, rows, row_tokens, slots)
  take = lambda x: slot_values(x, source)
  return records.UpdateBatch(
      sequences=packed, response_mask=take(batch.response_mask), old_logp=take(batch.old_logp),
      advantages=take(batch.advantages), rewards=take(batch.rewards), finished=take(batch.finished),
      self_reward_weights=take(batch.self_reward_weights), ref_logp=take(batch.ref_logp),
      ref_z_logprob=take(batch.ref_z_logprob))


def row_values(per_slot: np.ndarray, source: np.ndarray, num_rows: int) -> np.ndarray:
  """The inverse of `slot_values`: per-slot values [*source.shape, ...] back to [num_rows, ...]."""
  per_slot = np.asarray(per_slot)
  flat = per_slot.reshape((-1,) + per_slot.shape[source.ndim:])
  keep = source.reshape(-1) >= 0
  out = np.zeros((num_rows,) + flat.shape[1:], flat.dtype)
  out[source.reshape(-1)[keep]] = flat[keep]
  return out


# ---- in the jitted programs -----------------------------------------------------------------
def unpack_tokens(values: jax.Array, packed: PackedSequences) -> jax.Array:
  """Per-token values of the packed rows [rows, L] -> each slot's padded row [rows * slots, S]
  (0 off its real tokens). A gather along each packed row: shard-local under data parallelism."""
  rows, row_tokens = values.shape
  slots = packed.slots_per_row
  offset, start, length = (x.reshape(rows, slots, 1) for x in (packed.offset, packed.start, packed.length))
  index = jnp.arange(packed.seq_len)
  column = jnp.clip(offset + index - start, 0, row_tokens - 1)  # [rows, slots, S]
  picked = jnp.take_along_axis(values, column.reshape(rows, -1), axis=1).reshape(column.shape)
  real = (index >= start) & (index < start + length)
  return jnp.where(real, picked, 0).reshape(rows * slots, packed.seq_len)


def eos_hidden(hidden: jax.Array, packed: PackedSequences) -> jax.Array:
  """The hidden state at each slot's eos_index: hidden [rows, L, H] -> [rows * slots, 1, H]."""
  rows, row_tokens, width = hidden.shape
  column = packed.offset + packed.eos_index - packed.start
  column = jnp.clip(column, 0, row_tokens - 1).reshape(rows, -1, 1)
  return jnp.take_along_axis(hidden, column, axis=1).reshape(-1, 1, width)
