"""Continuous batching: a fixed number of decode slots, a finished row's slot taking the next row.

The static sampler decodes every row of a call until the longest one is done, so one long
response keeps every finished row decoding padding. Here one compiled decode program runs
`SamplingParams.decode_slots` slots; each step first refills the slots whose row is done with the
next queued rows (on device, inside the `lax.while_loop`, only in steps where a slot is free),
then runs one decode step for every slot. A call's cost follows the sum of response lengths over
the slot count, not rows x longest. The design is JetStream's prefill / insert / generate over
decode slots, with the insert done in the loop (no host round trip per refill), and its
per-replica slots: each data shard keeps its own queue of its own rows and refills its own slots
from the prompt cache it holds, so a refill moves nothing between shards.

Per-row results equal the static sampler's: the prefill is the static one (every distinct prompt
once, its first tokens drawn for all its rows), a row keeps the static cache layout in its slot
(prompt in slots [0, P), its t-th token's key/value in slot P + t - 1: per-slot positions and a
per-slot cache write index), the step is the static step's program (per-row write indices in
both) attending over the cache chunks up to the deepest consuming slot's (a chunk no query sees adds
exact zeros: `attention.attend_cached`), and row r draws token t with key
fold_in(fold_in(call key, r), t) whatever slot runs it. So every field of every row is the same bit
for bit (tests/test_continuous.py, on the Transformer too) wherever the matmuls round a batch of S
slots as they round the static call's batch of rows. Not every backend does: XLA's CPU GEMM rounds
a 16-row and a 64-row batch differently in the last bit (log-probs ~5e-6 apart), and a draw on a
bucket edge then flips and its row diverges (bench/rollout_skew.py counts such rows). A step
reads the chunks in use, not the whole window: while every slot is early in its response, the
later chunks are not read. On TPU (the model's attention "splash") the step's attention is a
Pallas kernel in which each slot reads only its own cache prefix (`models.ragged_attention`);
it equals the XLA attention to float rounding, so there the two samplers' rows agree to rounding,
not bit for bit.

Programs (public on `Sampler`, so that `laser_jax.aot` compiles exactly these):
  `continuous_prefill(params, prompt_tokens, prompt_mask, row_ids, rng, *, sampling)` -> state
  `continuous_decode(params, state, *, sampling, prompt_len)` -> state (donated)
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from laser_jax.generate import draw
from laser_jax.generate.sampling import SamplingParams
from laser_jax.models import model as model_lib


class ContinuousState(NamedTuple):
  """The while_loop carry. S slots, N rows of the call, P distinct prompts, R = max_new_tokens."""
  # Per row: the outputs, in the static sampler's [N, R+1] layout (see `sampler.SamplingState`).
  tokens: jax.Array        # [N, R+1] int32
  logprobs: jax.Array      # [N, R+1] float32
  finished: jax.Array      # [N] bool
  self_reward: jax.Array   # [N] float32, NaN until read
  # The queues, one per data shard D (its block of N / D rows, of S / D slots and of the prompt
  # cache): block d of `queue` holds shard d's rows that need decode steps, in row order;
  # entries [next_row[d], num_queued[d]) of it wait.
  queue: jax.Array         # [N] int32 row ids
  num_queued: jax.Array    # [D] int32
  next_row: jax.Array      # [D] int32
  # Per slot: its row (N = none yet) and that row's decode state.
  slot_row: jax.Array      # [S] int32
  slot_step: jax.Array     # [S] int32 tokens the row has generated = column its next step writes
  last_token: jax.Array    # [S] int32
  next_pos: jax.Array      # [S] int32
  active: jax.Array        # [S] bool
  pending: jax.Array       # [S] bool EOS emitted, score read in the next step
  steps: jax.Array         # int32 decode steps run (one step = all slots)
  rng: jax.Array           # the call's key
  row_ids: jax.Array       # [N] int32 each row's index among the call's real rows (-1: padding): its key
  prompt_length: jax.Array  # [P] int32 real tokens of each prompt (the first decode position)
  prompt_cache: Any        # the prefilled prompts' cache, P rows, chunk lengths (prompt_len,)
  cache: Any               # the slots' cache, S rows, chunk lengths (prompt_len,) + decode chunks


def check_slots(sampler, sampling: SamplingParams) -> None:
  """Continuous batching needs an insert_fn and a slot count that divides over the batch axes."""
  if sampling.decode_slots and sampler.insert_fn is None:
    raise ValueError("decode_slots > 0 needs a Sampler built with insert_fn (continuous batching)")
  if sampling.decode_slots % sampler.data_parallel_size:
    raise ValueError(f"decode_slots={sampling.decode_slots} does not divide over the mesh's batch axes "
                     f"(data x fsdp = {sampler.data_parallel_size})")


def constrain(sampler, state: ContinuousState) -> ContinuousState:
  """Slots, rows and both caches sharded over the sampler mesh's batch axes."""
  if sampler.mesh is None:
    return state
  def batch(x):
    return jax.lax.with_sharding_constraint(x, NamedSharding(sampler.mesh, sampler._batch_spec(x.ndim)))
  caches = {}
  if sampler.cache_sharding_fn is not None:
    caches = {f: jax.lax.with_sharding_constraint(getattr(state, f), sampler.cache_sharding_fn(getattr(state, f)))
              for f in ("cache", "prompt_cache")}
  scalars = ("steps", "rng", "cache", "prompt_cache")
  fields = {f: batch(getattr(state, f)) for f in ContinuousState._fields if f not in scalars}
  return state._replace(**caches, **fields)


def take_in_shards(x: jax.Array, index: jax.Array, shards: int) -> jax.Array:
  """x[index] ([S] rows of x [P, ...]) where block b of `index` (S / shards entries) points into
  block b of x's rows (P / shards): a gather within each block, so with the blocks on their data
  shards no shard reads another's rows (a plain x[index] all-gathers x)."""
  rows = x.shape[0] // shards
  blocks = x.reshape((shards, rows) + x.shape[1:])
  local = index.reshape(shards, -1) - (jnp.arange(shards, dtype=index.dtype) * rows)[:, None]
  out = jax.vmap(lambda block, i: jnp.take(block, i, axis=0))(blocks, local)
  return out.reshape(index.shape + x.shape[1:])


def insert_kv_cache(slots: model_lib.KVCache, prompts: model_lib.KVCache, take: jax.Array,
                    prompt_of_slot: jax.Array, shards: int = 1) -> model_lib.KVCache:
  """The slots' cache with slot s (where take[s]) holding prompt prompt_of_slot[s]'s prefill in
  its prompt chunk and no valid decode slot (the previous row's keys stay but are masked). Every
  slot's prompt lies in the slot's block of `shards` (`take_in_shards`)."""
  def put(slot_leaf, prompt_leaf):
    new = take_in_shards(prompt_leaf, prompt_of_slot, shards)
    return jnp.where(take.reshape((-1,) + (1,) * (new.ndim - 1)), new, slot_leaf)
  k = tuple((put(s[0], p[0]),) + tuple(s[1:]) for s, p in zip(slots.k, prompts.k))
  v = tuple((put(s[0], p[0]),) + tuple(s[1:]) for s, p in zip(slots.v, prompts.v))
  decode_len = slots.mask.shape[1] - prompts.mask.shape[1]
  fresh = jnp.concatenate([take_in_shards(prompts.mask, prompt_of_slot, shards),
                           jnp.zeros((take.shape[0], decode_len), bool)], axis=1)
  return model_lib.KVCache(k, v, jnp.where(take[:, None], fresh, slots.mask))


def prefill(sampler, params, prompt_tokens, prompt_mask, row_ids, rng, *, sampling: SamplingParams
            ) -> ContinuousState:
  """The static prefill (each distinct prompt once, first tokens of all rows), into a prompt
  cache; the slots start empty."""
  sampler.num_traces += 1
  num_prompts, prompt_len = prompt_tokens.shape
  rows = row_ids.shape[0]
  row_valid = row_ids >= 0
  slots, max_new = sampling.decode_slots, sampling.max_new_tokens
  prompt_cache = sampler.init_cache_fn(num_prompts, (prompt_len,))
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0).astype(jnp.int32)
  logits, prompt_cache = sampler.decode_fn(params, prompt_tokens, positions, prompt_mask, prompt_cache,
                                           jnp.int32(0), 0)
  logits = jnp.repeat(logits[:, -1], rows // num_prompts, axis=0).astype(jnp.float32)
  keys = draw.step_keys(draw.row_keys(rng, row_ids), jnp.zeros((rows,), jnp.int32))
  first, first_lp, _ = draw.choose_tokens(logits, keys, sampling)
  first = jnp.where(row_valid, first, sampling.pad_id)
  is_eos = draw.is_eos(first, sampling.eos_ids) & row_valid
  needs_decode = (row_valid & ~is_eos & (max_new > 1)) | (is_eos & (sampling.self_reward_token_id is not None))
  # Each data shard queues its own rows (stable: in row order).
  shards = sampler.data_parallel_size
  needs_by_shard = needs_decode.reshape(shards, rows // shards)
  queue = (jnp.argsort(~needs_by_shard, axis=1, stable=True)
           + (jnp.arange(shards) * (rows // shards))[:, None]).astype(jnp.int32)
  pad_col = jnp.full((rows, max_new + 1), sampling.pad_id, jnp.int32)
  state = ContinuousState(
      tokens=pad_col.at[:, 0].set(first),
      logprobs=jnp.zeros((rows, max_new + 1), jnp.float32).at[:, 0].set(jnp.where(row_valid, first_lp, 0.0)),
      finished=is_eos,
      self_reward=jnp.full((rows,), jnp.nan, jnp.float32),
      queue=queue.reshape(rows),
      num_queued=jnp.sum(needs_by_shard, axis=1).astype(jnp.int32),
      next_row=jnp.zeros((shards,), jnp.int32),
      slot_row=jnp.full((slots,), rows, jnp.int32),
      slot_step=jnp.zeros((slots,), jnp.int32),
      last_token=jnp.full((slots,), sampling.pad_id, jnp.int32),
      next_pos=jnp.zeros((slots,), jnp.int32),
      active=jnp.zeros((slots,), bool),
      pending=jnp.zeros((slots,), bool),
      steps=jnp.int32(0),
      rng=rng,
      row_ids=row_ids,
      prompt_length=jnp.sum(prompt_mask, axis=-1).astype(jnp.int32),
      prompt_cache=prompt_cache,
      cache=sampler.init_cache_fn(slots, (prompt_len,) + sampling.decode_chunk_lengths),
  )
  return constrain(sampler, state)


def _free_by_shard(s: ContinuousState) -> jax.Array:
  """[D, S / D] the slots free to take a row, by data shard."""
  return ~(s.active | s.pending).reshape(s.next_row.shape[0], -1)


def _refill(sampler, s: ContinuousState, sampling: SamplingParams) -> ContinuousState:
  """Gives each free slot (in slot order) the next row of its data shard's queue (in row order):
  a shard's slots take its own rows, whose prompts' prefill it holds, so a refill moves no
  cache between shards (JetStream's per-replica slots)."""
  rows, slots, shards = s.tokens.shape[0], s.slot_row.shape[0], s.next_row.shape[0]
  repeats = rows // s.prompt_length.shape[0]
  free = _free_by_shard(s)
  index = s.next_row[:, None] + jnp.cumsum(free, axis=1) - 1  # [D, S / D] place in the shard's queue
  take = free & (index < s.num_queued[:, None])
  queued = jnp.take_along_axis(s.queue.reshape(shards, -1), jnp.minimum(index, rows // shards - 1), axis=1)
  # A slot that takes nothing looks up its shard's first row (the result is not used).
  own = jnp.repeat(jnp.arange(shards, dtype=jnp.int32) * (rows // shards), slots // shards)
  lookup = jnp.where(take, queued, own.reshape(shards, -1)).reshape(slots)
  take = take.reshape(slots)
  row = jnp.where(take, lookup, s.slot_row)
  prompt = lookup // repeats
  first = take_in_shards(s.tokens[:, 0], lookup, shards)
  is_eos = draw.is_eos(first, sampling.eos_ids)
  return s._replace(
      next_row=s.next_row + jnp.sum(take.reshape(shards, -1), axis=1).astype(jnp.int32),
      slot_row=row,
      slot_step=jnp.where(take, 1, s.slot_step),
      last_token=jnp.where(take, first, s.last_token),
      next_pos=jnp.where(take, take_in_shards(s.prompt_length, prompt, shards), s.next_pos),
      active=jnp.where(take, ~is_eos & (sampling.max_new_tokens > 1), s.active),
      pending=jnp.where(take, is_eos & (sampling.self_reward_token_id is not None), s.pending),
      cache=sampler.insert_fn(s.cache, s.prompt_cache, take, prompt, shards))


def _step(sampler, params, s: ContinuousState, sampling: SamplingParams, prompt_len: int) -> ContinuousState:
  """One decode step of every slot: the static sampler's step, per slot, written to its row."""
  rows = s.tokens.shape[0]
  max_new, z_c = sampling.max_new_tokens, sampling.self_reward_token_id
  consumes = s.active | s.pending
  write_index = prompt_len + jnp.clip(s.slot_step - 1, 0, max_new - 1)  # each slot's own cache slot
  # chunk None: the step attends over the chunks up to the deepest consuming slot's (model.Decoder.cached).
  logits, cache = sampler.decode_fn(params, s.last_token[:, None], s.next_pos[:, None], consumes[:, None],
                                    s.cache, write_index, None)
  logits = logits[:, 0].astype(jnp.float32)
  keys = draw.step_keys(draw.row_keys(s.rng, s.row_ids[jnp.minimum(s.slot_row, rows - 1)]), s.slot_step)
  new, new_lp, lse = draw.choose_tokens(logits, keys, sampling)
  self_reward = s.self_reward
  if z_c is not None:
    if sampling.logprob_temperature == 1.0:
      score = logits[:, z_c] - lse
    else:
      score = jax.lax.cond(jnp.any(s.pending), lambda: draw.token_logprob_t1(logits, z_c),
                           lambda: jnp.full(s.pending.shape, jnp.nan, jnp.float32))
    self_reward = self_reward.at[jnp.where(s.pending, s.slot_row, rows)].set(score, mode="drop")
  new = jnp.where(s.active, new, sampling.pad_id)
  is_eos = draw.is_eos(new, sampling.eos_ids) & s.active
  writes = jnp.where(s.active, s.slot_row, rows)  # row N: dropped
  return s._replace(
      tokens=s.tokens.at[writes, s.slot_step].set(new, mode="drop"),
      logprobs=s.logprobs.at[writes, s.slot_step].set(new_lp, mode="drop"),
      finished=s.finished.at[jnp.where(is_eos, s.slot_row, rows)].set(True, mode="drop"),
      self_reward=self_reward,
      slot_step=s.slot_step + 1,
      last_token=new,
      next_pos=s.next_pos + 1,
      active=s.active & ~is_eos & (s.slot_step + 1 < max_new),
      pending=is_eos & (z_c is not None),
      steps=s.steps + 1,
      cache=cache)


def decode(sampler, params, state: ContinuousState, *, sampling: SamplingParams, prompt_len: int
           ) -> ContinuousState:
  """Refill and step until the queue is empty and every slot is done (one while_loop)."""
  sampler.num_traces += 1

  def cond(s: ContinuousState):
    return jnp.any(s.next_row < s.num_queued) | jnp.any(s.active | s.pending)

  def body(s: ContinuousState):
    refill = jnp.any(jnp.any(_free_by_shard(s), axis=1) & (s.next_row < s.num_queued))
    s = jax.lax.cond(refill, lambda: _refill(sampler, s, sampling), lambda: s)
    return constrain(sampler, _step(sampler, params, s, sampling, prompt_len))

  return jax.lax.while_loop(cond, body, state)
