"""In-XLA sampler that also reads the LaSeR last-token self-reward score.

One jitted prefill, then one jitted `jax.lax.while_loop` decode over a donated sampling
state. The loop exits as soon as every row is done.

The self-reward score of a finished response y is log pi(z_c | x, y, EOS): the unscaled
(temperature 1) log-softmax entry of z_c in the next-token distribution after the EOS. The
decode step that consumes a row's EOS produces exactly that distribution, and for a row that
finishes while other rows are still generating this step runs anyway; so the score is read in
the step right after the row's EOS, at no extra cost. Only a row that emits EOS on the last
allowed step (token number `max_new_tokens`) needs one extra step, which the loop runs.

Conventions (all documented on `SampleOutput`):
  * `max_new_tokens` counts the EOS, as in `transformers` `generate`.
  * Per-token log-probs are log_softmax(logits / temperature) at the sampled token: the full,
    untruncated temperature-scaled distribution (top-p/top-k only restrict which tokens may be
    drawn). This is what a training forward computes for the same policy. Greedy uses T = 1.
  * Truncated rows (no EOS within `max_new_tokens`) have `finished=False`, `truncated=True`
    and a NaN self-reward score.

The core (`Sampler`) is generic over the step function
    decode_fn(params, tokens[B,T], positions[B,T], token_mask[B,T], cache, write_index, chunk)
        -> (logits[B,T,V] float32, cache)
and `init_cache_fn(batch, chunk_lengths) -> cache`, so it can be tested with a toy logits table.
The prefill passes a scalar write_index (0) and T = the prompt bucket; a decode step passes
write_index [B] (each row's slot, T = 1: the static loop's rows share one, the continuous
sampler's slots each have their own). The cache's slots are split into chunks: the prompt's, then
one per decode segment (`SamplingParams.decode_segments`); `chunk` (static) is the chunk that
holds the slots written, and a step only needs to attend over chunks 0..chunk; chunk None (the
continuous sampler) leaves it to the decode_fn to find from the write indices. Only the last position's logits
(`logits[:, -1]`) are read, so a decode_fn may return T' = 1.
`sample(params, cfg, prompts, sampling, rng, mesh=None)` is the convenience entry point for
the Transformer in `laser_jax.models.model`; the trainer and the evaluator both use it.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from laser_jax.generate import continuous, draw
from laser_jax.generate import sampling as sampling_lib
from laser_jax.generate.sampling import SampleOutput, SamplingParams
from laser_jax.models import hosts as hosts_lib
from laser_jax.models import model as model_lib
from laser_jax.models import sharding as sharding_lib

BATCH_AXES = sharding_lib.BATCH_AXES  # Mesh axes the batch dimension is sharded over.
MIN_BUCKET = 16  # Smallest prompt bucket; buckets are powers of two from here.


class SamplingState(NamedTuple):
  """The while_loop carry. B rows, R = max_new_tokens (+1 spare column, see `decode`)."""
  tokens: jax.Array       # [B, R+1] int32 generated ids including EOS, pad elsewhere.
  logprobs: jax.Array     # [B, R+1] float32 log-probs of `tokens`.
  last_token: jax.Array   # [B] int32 the token the next decode step consumes.
  next_pos: jax.Array     # [B] int32 its position id.
  active: jax.Array       # [B] bool still generating.
  pending: jax.Array      # [B] bool emitted EOS, score to be read in the next step.
  finished: jax.Array     # [B] bool emitted EOS.
  self_reward: jax.Array  # [B] float32 log pi(z_c | x, y, EOS), NaN until read.
  step: jax.Array         # int32: tokens generated so far = column the next step writes.
  write_index: jax.Array  # int32: cache slot of `last_token`.
  rng: jax.Array          # the call's PRNG key: row r draws token t with fold_in(fold_in(rng, r), t).
  row_ids: jax.Array      # [B] int32 each row's r: its index in the call's unpadded rows (-1: padding).
  cache: Any              # decode_fn's cache pytree (a model.KVCache for the Transformer).


def bucket_length(length: int, min_bucket: int = MIN_BUCKET) -> int:
  """Smallest power of two >= length (and >= min_bucket): bounds recompilation."""
  return max(min_bucket, 1 << max(0, math.ceil(math.log2(max(1, length)))))


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists into ([N, length] int32 tokens, [N, length] bool mask)."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, length - len(p):] = np.asarray(p, np.int32)
      mask[i, length - len(p):] = True
  return tokens, mask

class Sampler:
  """Batched sampler around a step function; holds the jitted prefill/decode.

  jax.jit caches compilations by input shapes and static arguments, so one Sampler compiles
  once per (prompt bucket, batch size, SamplingParams, parameter shapes/shardings).
  `num_traces` counts traces (for tests and for noticing recompilation).
  """

  def __init__(self, decode_fn: Callable, init_cache_fn: Callable, *, mesh: Mesh | None = None,
               cache_sharding_fn: Callable | None = None, min_bucket: int = MIN_BUCKET,
               insert_fn: Callable | None = None):
    """Args:
      decode_fn: (params, tokens, positions, token_mask, cache, write_index, chunk) -> (logits, cache).
      init_cache_fn: (batch, chunk_lengths) -> empty cache pytree (called inside jit) whose
        leaves all have the batch as their leading axis (a prefilled prompt's cache rows are
        repeated for its n responses).
      mesh: when given, the batch is sharded over its ("data", "fsdp") axes.
      cache_sharding_fn: cache -> NamedSharding pytree for it on `mesh` (None = XLA chooses).
      min_bucket: smallest prompt bucket length.
      insert_fn: (slots' cache, prompts' cache, take [S] bool, prompt of each slot [S], shards)
        -> the slots' cache with the taken slots holding that prompt's prefill and no decode
        slot valid (`continuous.insert_kv_cache`); a slot's prompt lies in the slot's block of
        `shards` (the data shards: `continuous.take_in_shards`). Needed for continuous batching
        (`decode_slots` > 0).
    """
    self.decode_fn = decode_fn
    self.init_cache_fn = init_cache_fn
    self.mesh = mesh
    self.cache_sharding_fn = cache_sharding_fn
    self.min_bucket = min_bucket
    self.insert_fn = insert_fn
    self.num_traces = 0
    # The two compiled programs of a call; public so that laser_jax.aot compiles exactly these
    # (`.trace(...)` on the abstract inputs of `abstract_prefill_args`).
    self.prefill = jax.jit(self._prefill_impl, static_argnames=("sampling",))
    self.decode = jax.jit(self._decode_impl, static_argnames=("sampling", "prompt_len"), donate_argnames=("state",))
    # The continuous-batching programs (`decode_slots` > 0); same arguments as prefill / decode.
    self.continuous_prefill = jax.jit(functools.partial(continuous.prefill, self), static_argnames=("sampling",))
    self.continuous_decode = jax.jit(functools.partial(continuous.decode, self),
                                     static_argnames=("sampling", "prompt_len"), donate_argnames=("state",))

  # ---- sharding helpers -------------------------------------------------------------------
  @property
  def data_parallel_size(self) -> int:
    if self.mesh is None:
      return 1
    return int(np.prod([self.mesh.shape[a] for a in BATCH_AXES if a in self.mesh.shape]))

  def _batch_spec(self, ndim: int) -> PartitionSpec:
    axes = tuple(a for a in BATCH_AXES if a in self.mesh.shape)
    return PartitionSpec(axes, *([None] * (ndim - 1)))

  def _constrain_state(self, state: SamplingState) -> SamplingState:
    if self.mesh is None:
      return state
    def batch(x):
      return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self._batch_spec(x.ndim)))
    cache = state.cache
    if self.cache_sharding_fn is not None:
      cache = jax.lax.with_sharding_constraint(cache, self.cache_sharding_fn(cache))
    fields = {f: batch(getattr(state, f)) for f in SamplingState._fields
              if f not in ("step", "write_index", "rng", "cache")}
    return state._replace(cache=cache, **fields)

  def _put_batch(self, x: np.ndarray) -> jax.Array:
    """This host's rows `x` as its block of the global batch (`laser_jax.models.hosts.put_rows`)."""
    if self.mesh is None:
      return jnp.asarray(x)
    return hosts_lib.put_rows(x, NamedSharding(self.mesh, self._batch_spec(x.ndim)))

  # ---- jitted pieces ----------------------------------------------------------------------
  def _prefill_impl(self, params, prompt_tokens, prompt_mask, row_ids, rng, *, sampling: SamplingParams):
    """Runs the prompts through the model and samples every row's first token. Returns the state.

    `prompt_tokens`/`prompt_mask` hold either one row per sampled response or, when the batch
    divides evenly, each distinct prompt once: then the prompt is prefilled once and its cache
    and last logits are repeated for its n rows (`row_ids` [rows] gives the row count). row_ids:
    each row's index among the call's real rows in their global order, -1 for a padding row; the
    row's draws are keyed by it, so padding (which differs between one host and many) moves no draw.
    """
    self.num_traces += 1
    num_prompts, prompt_len = prompt_tokens.shape
    batch = row_ids.shape[0]
    row_valid = row_ids >= 0
    repeats = batch // num_prompts
    max_new = sampling.max_new_tokens
    # Slots: the prompt's chunk, then one chunk per decode segment. The last consumed token is
    # token number max_new_tokens (an EOS whose score is read), so there are max_new of those.
    cache = self.init_cache_fn(num_prompts, (prompt_len,) + sampling.decode_chunk_lengths)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0).astype(jnp.int32)
    logits, cache = self.decode_fn(params, prompt_tokens, positions, prompt_mask, cache, jnp.int32(0), 0)
    logits = logits[:, -1]
    if repeats > 1:
      # Row r is prompt r // n. A repeat of the (batch-sharded) leading axis stays on each device.
      expand = functools.partial(jnp.repeat, repeats=repeats, axis=0)
      logits, prompt_mask, cache = expand(logits), expand(prompt_mask), jax.tree.map(expand, cache)
    keys = draw.step_keys(draw.row_keys(rng, row_ids), jnp.zeros((batch,), jnp.int32))
    first, first_lp, _ = draw.choose_tokens(logits.astype(jnp.float32), keys, sampling)
    first = jnp.where(row_valid, first, sampling.pad_id)
    is_eos = draw.is_eos(first, sampling.eos_ids) & row_valid
    scored = sampling.self_reward_token_id is not None
    pad_col = jnp.full((batch, max_new + 1), sampling.pad_id, jnp.int32)
    state = SamplingState(
        tokens=pad_col.at[:, 0].set(first),
        logprobs=jnp.zeros((batch, max_new + 1), jnp.float32).at[:, 0].set(jnp.where(row_valid, first_lp, 0.0)),
        last_token=first,
        next_pos=jnp.sum(prompt_mask, axis=-1).astype(jnp.int32),
        active=row_valid & ~is_eos & (max_new > 1),
        pending=is_eos & scored,
        finished=is_eos,
        self_reward=jnp.full((batch,), jnp.nan, jnp.float32),
        step=jnp.int32(1),
        write_index=jnp.int32(prompt_len),
        rng=rng,
        row_ids=row_ids,
        cache=cache,
    )
    return self._constrain_state(state)

  def _decode_impl(self, params, state: SamplingState, *, sampling: SamplingParams, prompt_len: int):
    """Decodes until every row is done; `state` is donated (updated in place).

    One while_loop per decode segment: segment j writes cache chunk j and attends over chunks
    0..j, and ends when its chunk is full (or every row is done: later loops then exit at once).
    """
    self.num_traces += 1
    max_new = sampling.max_new_tokens
    z_c = sampling.self_reward_token_id

    def cond(s: SamplingState, chunk_end: int):
      return jnp.any(s.active | s.pending) & (s.step <= max_new) & (s.write_index < chunk_end)

    def body(s: SamplingState, chunk: int):
      consumes = s.active | s.pending
      # Every row writes the same slot, passed per row: the step is then the very program the
      # continuous sampler runs per slot (same writes, same fusions), so both agree bit for bit.
      write_index = jnp.full(consumes.shape, s.write_index, jnp.int32)
      logits, cache = self.decode_fn(params, s.last_token[:, None], s.next_pos[:, None], consumes[:, None],
                                     s.cache, write_index, chunk)
      logits = logits[:, 0].astype(jnp.float32)
      keys = draw.step_keys(draw.row_keys(s.rng, s.row_ids), jnp.full(s.row_ids.shape, s.step))
      new, new_lp, lse = draw.choose_tokens(logits, keys, sampling)
      self_reward = s.self_reward
      if z_c is not None:
        if sampling.logprob_temperature == 1.0:  # the draw's normaliser is the T = 1 one
          score = logits[:, z_c] - lse
        else:  # a separate logsumexp, computed only in steps that read a score
          score = jax.lax.cond(jnp.any(s.pending), lambda: draw.token_logprob_t1(logits, z_c),
                               lambda: jnp.full_like(self_reward, jnp.nan))
        self_reward = jnp.where(s.pending, score, self_reward)
      new = jnp.where(s.active, new, sampling.pad_id)
      is_eos = draw.is_eos(new, sampling.eos_ids) & s.active
      # Column `step` of the [B, R+1] buffers; at step == R only pending rows remain and the
      # spare column R receives pad for everyone.
      tokens = jax.lax.dynamic_update_slice(s.tokens, new[:, None], (0, s.step))
      logprobs = jax.lax.dynamic_update_slice(s.logprobs, jnp.where(s.active, new_lp, 0.0)[:, None], (0, s.step))
      out = SamplingState(
          tokens=tokens,
          logprobs=logprobs,
          last_token=new,
          next_pos=s.next_pos + 1,
          active=s.active & ~is_eos & (s.step + 1 < max_new),
          pending=is_eos & (z_c is not None),
          finished=s.finished | is_eos,
          self_reward=self_reward,
          step=s.step + 1,
          write_index=s.write_index + 1,
          rng=s.rng,
          row_ids=s.row_ids,
          cache=cache,
      )
      return self._constrain_state(out)

    chunk_end = prompt_len
    for chunk, length in enumerate(sampling.decode_chunk_lengths, start=1):
      chunk_end += length
      state = jax.lax.while_loop(functools.partial(cond, chunk_end=chunk_end), functools.partial(body, chunk=chunk),
                                 state)
    return state

  # ---- host API ---------------------------------------------------------------------------
  def batch_layout(self, num_prompts: int, n: int, data_parallel: int | None = None) -> tuple[int, int, int]:
    """(rows, prefill rows, repeats) of a call on `num_prompts` prompts x `n` responses.

    Rows are padded to a multiple of the data-parallel size (padding holds one pad token and
    starts done). Each distinct prompt is prefilled once (prefill costs 1/n) and the prefill
    repeats its cache `repeats` = n times, unless sharding pads prompts and rows unevenly; then
    every row is prefilled (`repeats` = 1). `data_parallel` defaults to the mesh's; a host of a
    multi-host run lays out its own prompts over its share of it.
    """
    dp = self.data_parallel_size if data_parallel is None else data_parallel
    rows = -(-num_prompts * n // dp) * dp
    prompts_padded = -(-num_prompts // dp) * dp
    if prompts_padded * n == rows:
      return rows, prompts_padded, n
    return rows, rows, 1

  def abstract_prefill_args(self, params, num_prompts: int, prompt_len: int, sampling: SamplingParams):
    """Abstract arguments of `prefill` for `num_prompts` prompts in a `prompt_len` bucket, laid
    out (and sharded) as `__call__` lays them out: `self.prefill.lower(*args, sampling=...)`."""
    rows, prefill_rows, _ = self.batch_layout(num_prompts, sampling.n)
    def batch(shape, dtype):
      sharding = None if self.mesh is None else NamedSharding(self.mesh, self._batch_spec(len(shape)))
      return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype,
                               sharding=None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec()))
    return (params, batch((prefill_rows, prompt_len), jnp.int32), batch((prefill_rows, prompt_len), jnp.bool_),
            batch((rows,), jnp.int32), rng)

  def abstract_continuous_args(self, params, num_prompts: int, prompt_len: int, sampling: SamplingParams):
    """(prefill args, decode state) of the continuous programs (`decode_slots` > 0): `.lower(*args,
    sampling=...)` and `.lower(params, state, sampling=..., prompt_len=...)` compile them."""
    continuous.check_slots(self, sampling)
    args = self.abstract_prefill_args(params, num_prompts, prompt_len, sampling)
    return args, jax.eval_shape(functools.partial(self.continuous_prefill, sampling=sampling), *args)

  def __call__(self, params, prompts: Sequence[Sequence[int]], sampling: SamplingParams, rng: jax.Array) -> SampleOutput:
    """Samples `sampling.n` responses for every prompt (lists of token ids).

    In a multi-host run each process passes its own prompts (as many on every host) and gets its
    own rows back: the global batch is the hosts' row blocks in process order (`laser_jax.models.hosts`),
    the same batch a single process given all the prompts in that order would sample.
    """
    if not isinstance(sampling, SamplingParams):
      raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    if len(prompts) == 0:
      raise ValueError("prompts is empty: need at least one prompt")
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
    n = sampling.n
    num_rows = len(prompts) * n
    hosts_lib.same_on_every_host(len(prompts), "the number of prompts per sampler call")
    if self.data_parallel_size % jax.process_count():
      raise ValueError(f"the sampler's data-parallel size {self.data_parallel_size} is not a multiple of "
                       f"the {jax.process_count()} processes")
    batch, num_prompts, repeats = self.batch_layout(len(prompts), n,
                                                    self.data_parallel_size // jax.process_count())
    bucket = bucket_length(hosts_lib.host_max(max(len(p) for p in prompts)), self.min_bucket)
    if repeats > 1:
      prefill_rows = [list(p) for p in prompts] + [[sampling.pad_id]] * (num_prompts - len(prompts))
    else:
      prefill_rows = [list(p) for p in prompts for _ in range(n)] + [[sampling.pad_id]] * (batch - num_rows)
    prompt_tokens, prompt_mask = left_pad(prefill_rows, bucket, sampling.pad_id)
    # This host's rows are rows [first, first + num_rows) of the call's real rows (every host has
    # as many); its padding rows (-1) come after them.
    first = jax.process_index() * num_rows
    row_ids = np.where(np.arange(batch) < num_rows, first + np.arange(batch), -1).astype(np.int32)

    args = (params, self._put_batch(prompt_tokens), self._put_batch(prompt_mask), self._put_batch(row_ids), rng)
    if sampling.decode_slots:
      continuous.check_slots(self, sampling)
      state = self.continuous_prefill(*args, sampling=sampling)
      state = self.continuous_decode(params, state, sampling=sampling, prompt_len=bucket)
    else:
      state = self.prefill(*args, sampling=sampling)
      state = self.decode(params, state, sampling=sampling, prompt_len=bucket)
    return sampling_lib.to_output(state, np.repeat(prompt_tokens, repeats, axis=0), np.repeat(prompt_mask, repeats, axis=0),
                      num_rows, sampling)


# ---- the Transformer entry point --------------------------------------------------------------
_SAMPLERS: dict = {}


def model_sampler(cfg, mesh: Mesh | None = None) -> Sampler:
  """The (cached) Sampler for `laser_jax.models.model` with config `cfg` on `mesh`."""
  key = (cfg, mesh)
  if key not in _SAMPLERS:
    cache_sharding_fn = None
    if mesh is not None:
      def cache_sharding_fn(cache):
        batch, max_len = cache.mask.shape
        return sharding_lib.cache_shardings(cfg, mesh, batch, max_len, cache.chunk_lengths)

    def decode_fn(params, tokens, positions, token_mask, cache, write_index, chunk):
      # The sampler reads only the last position's logits.
      return model_lib.forward_cached(params, cfg, tokens, positions, token_mask, cache, write_index,
                                      last_logits_only=True, chunk=chunk)

    def init_cache_fn(batch, chunk_lengths):
      return model_lib.init_cache(cfg, batch, sum(chunk_lengths), chunk_lengths)

    _SAMPLERS[key] = Sampler(decode_fn, init_cache_fn, mesh=mesh, cache_sharding_fn=cache_sharding_fn,
                             insert_fn=continuous.insert_kv_cache)
  return _SAMPLERS[key]


def sample(params, cfg, prompts: Sequence[Sequence[int]], sampling: SamplingParams, rng: jax.Array,
           mesh: Mesh | None = None) -> SampleOutput:
  """Samples responses (and their self-reward scores) from the Transformer.

  Args:
    params: model parameters (already sharded with `sharding.shard_params` when `mesh` is set).
    cfg: the `config.ModelConfig`.
    prompts: token-id lists, one per prompt (any lengths >= 1).
    sampling: `SamplingParams`.
    rng: a PRNG key; the same key gives the same samples.
    mesh: optional device mesh; the batch is sharded over its ("data", "fsdp") axes.
  Returns:
    `SampleOutput` (NumPy), len(prompts) * sampling.n rows, each prompt's rows contiguous.
  """
  return model_sampler(cfg, mesh)(params, prompts, sampling, rng)
