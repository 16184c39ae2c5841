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
The cache's slots are split into chunks: the prompt's, then one per decode segment
(`SamplingParams.decode_segments`); `chunk` (static) is the chunk that holds the slots written,
and a step only needs to attend over chunks 0..chunk. Only the last position's logits
(`logits[:, -1]`) are read, so a decode_fn may return T' = 1.
`sample(params, cfg, prompts, sampling, rng, mesh=None)` is the convenience entry point for
the Transformer in `laser_jax.model`; the trainer and the evaluator both use it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from laser_jax.models import hosts as hosts_lib
from laser_jax.models import model as model_lib
from laser_jax.models import sharding as sharding_lib
from laser_jax.models.model import BATCH

BATCH_AXES = BATCH  # Mesh axes the batch dimension is sharded over.
MIN_BUCKET = 16  # Smallest prompt bucket; buckets are powers of two from here.


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample. Frozen (hashable): a static argument of the jitted functions.

  Attributes:
    n: responses per prompt; the n rows of one prompt are contiguous in the output.
    temperature: softmax temperature (> 0); 0 means greedy (as vLLM and the official evaluation
      read it); ignored when `greedy`.
    top_p: nucleus threshold in (0, 1]; 1.0 = off. Keeps the smallest set of most likely
      tokens whose probability (after temperature and top-k) sums to >= top_p.
    top_k: keep the k most likely tokens; 0 = off. Tokens tied with the k-th are kept too.
    max_new_tokens: response length limit, counting the EOS token.
    eos_ids: a row stops when it emits any of these ids.
    pad_id: fills token slots after a row's end and padding rows/columns.
    self_reward_token_id: z_c; None = no self-reward score (the loop then never runs the
      extra step for rows finishing on the last allowed step).
    greedy: argmax decoding (log-probs are then taken at temperature 1).
    decode_segments: at most this many decode loops, each over its own chunk of the KV cache
      and attending only over the chunks written so far, so attention reads about half of the
      cache on average instead of all of it every step. Execution only: results are equal up
      to float rounding. Each loop is compiled separately (1 = one loop over the whole cache).
    min_segment_tokens: each decode loop covers at least this many tokens: shorter ones save
      less attention reading than their extra per-chunk matmuls cost (measured on CPU).
  """
  n: int = 1
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 256
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  self_reward_token_id: int | None = None
  greedy: bool = False
  decode_segments: int = 4
  min_segment_tokens: int = 64

  def __post_init__(self):
    if self.n < 1:
      raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature == 0 and not self.greedy:
      object.__setattr__(self, "greedy", True)
      object.__setattr__(self, "temperature", 1.0)  # one hashable form of greedy sampling
    if not self.greedy and not self.temperature > 0:
      raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
    if self.decode_segments < 1:
      raise ValueError(f"SamplingParams.decode_segments must be >= 1, got {self.decode_segments}")
    if self.min_segment_tokens < 1:
      raise ValueError(f"SamplingParams.min_segment_tokens must be >= 1, got {self.min_segment_tokens}")
    if not isinstance(self.eos_ids, tuple):
      raise TypeError(f"SamplingParams.eos_ids must be a tuple of ints, got {type(self.eos_ids).__name__}")

  @property
  def decode_chunk_lengths(self) -> tuple[int, ...]:
    """Cache slots of each decode segment: max_new_tokens split into near-equal parts."""
    n = max(1, min(self.decode_segments, self.max_new_tokens // self.min_segment_tokens))
    base, extra = divmod(self.max_new_tokens, n)
    return tuple(base + (i < extra) for i in range(n))

  @property
  def logprob_temperature(self) -> float:
    """Temperature of the distribution the reported per-token log-probs come from."""
    return 1.0 if self.greedy else float(self.temperature)


@dataclasses.dataclass
class SampleOutput:
  """Sampled responses, NumPy on host. N = len(prompts) * n rows, R = max_new_tokens.

  Attributes:
    prompt_tokens: [N, P] int32, left-padded with pad_id (P = the prompt bucket length).
    prompt_mask: [N, P] bool, True at real prompt tokens.
    tokens: [N, R] int32 generated ids, EOS EXCLUDED, pad_id after the end.
    lengths: [N] int32 number of generated tokens, EOS excluded.
    logprobs: [N, R] float32 log_softmax(logits / T) at `tokens` (T = 1 when greedy); 0 after
      the end.
    eos_token: [N] int32 the EOS id the row emitted (pad_id for truncated rows).
    eos_logprob: [N] float32 log-prob of that EOS token (same convention; NaN if truncated).
    finished: [N] bool, the row emitted an EOS within max_new_tokens.
    truncated: [N] bool, == ~finished.
    self_reward_logprob: [N] float32 log pi(z_c | x, y, EOS), unscaled (T = 1); NaN for
      truncated rows and when no self_reward_token_id was given.
    group_ids: [N] int32 index of the prompt each row answers.
  """
  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  tokens: np.ndarray
  lengths: np.ndarray
  logprobs: np.ndarray
  eos_token: np.ndarray
  eos_logprob: np.ndarray
  finished: np.ndarray
  truncated: np.ndarray
  self_reward_logprob: np.ndarray
  group_ids: np.ndarray
  pad_id: int = 0

  @property
  def response_lengths(self) -> np.ndarray:
    """[N] response length including the EOS of finished rows (what training scores)."""
    return self.lengths + self.finished.astype(np.int32)

  def _with_eos(self, per_token: np.ndarray, at_eos: np.ndarray) -> np.ndarray:
    """`per_token` [N, R] with `at_eos` [N] written after each finished row's last token."""
    out = per_token.copy()
    rows = np.nonzero(self.finished)[0]
    out[rows, self.lengths[rows]] = at_eos[rows]
    return out

  @property
  def response_tokens(self) -> np.ndarray:
    """[N, R] generated ids INCLUDING the EOS of finished rows, pad_id after."""
    return self._with_eos(self.tokens, self.eos_token)

  @property
  def response_logprobs(self) -> np.ndarray:
    """[N, R] log-probs of `response_tokens` (EOS included), 0 after the end."""
    return self._with_eos(self.logprobs, self.eos_logprob)


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
  rng: jax.Array          # PRNG key (fixed; each step folds in its index).
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


def filter_logits(logits: jax.Array, sampling: SamplingParams) -> jax.Array:
  """Temperature-scaled logits [B, V] with tokens outside top-k / top-p set to -inf."""
  scaled = logits / sampling.temperature
  if 0 < sampling.top_k < scaled.shape[-1]:
    kth = jax.lax.top_k(scaled, sampling.top_k)[0][..., -1:]
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  if sampling.top_p < 1.0:
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    num_kept = jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(sorted_desc, num_kept - 1, axis=-1)
    scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
  return scaled


def first_argmax(x: jax.Array) -> jax.Array:
  """argmax over the last axis (first index among ties) as two plain reductions.

  Same result as jnp.argmax; XLA:CPU runs argmax's variadic reduce several times slower.
  """
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  is_max = x == jnp.max(x, axis=-1, keepdims=True)
  return jnp.min(jnp.where(is_max, iota, x.shape[-1]), axis=-1)


def _draw_block_size(vocab: int) -> int:
  """Block length of the two-level inverse-CDF draw: about sqrt(V), a multiple of 128 lanes."""
  return 128 * max(1, math.ceil(math.sqrt(vocab) / 128))


def inverse_cdf_draw(logits: jax.Array, row_max: jax.Array, u: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws from softmax(logits) by inverse CDF, in two levels over blocks of the vocabulary.

  Args:
    logits: [B, V] float32 (-inf = excluded).
    row_max: [B] max of each row of `logits` (finite).
    u: [B] uniform numbers in (0, 1).
  Returns:
    (tokens [B] int32: the first index i with cumsum(w)[i] >= u * sum(w), w = exp(logits - row_max),
     sums [B] float32: sum(w), so logsumexp(logits) = row_max + log(sums),
     drawn_ok [B] bool: the drawn token has non-zero weight).

  A single prefix sum over the vocabulary costs about as much as the model's decode step on CPU.
  Here the weights are summed per block of about sqrt(V) tokens (fused with the exp, never
  materialised), the block is found from the block sums' prefix sum, and only that block's
  weights are recomputed and prefix-summed: O(V) exp and add, O(sqrt(V)) scans. Float rounding
  can only move a draw at a block or row end onto a zero-weight token; `drawn_ok` flags that.
  """
  b, v = logits.shape
  c = _draw_block_size(v)
  nb = -(-v // c)
  if nb * c != v:
    logits = jnp.pad(logits, ((0, 0), (0, nb * c - v)), constant_values=-jnp.inf)
  blocks = logits.reshape(b, nb, c)
  block_sums = jnp.sum(jnp.exp(blocks - row_max[:, None, None]), axis=-1)  # [B, nb]
  block_cdf = jax.lax.associative_scan(jnp.add, block_sums, axis=-1)
  sums = block_cdf[:, -1]
  target = u * sums
  block = jnp.minimum(jnp.sum(block_cdf < target[:, None], axis=-1), nb - 1).astype(jnp.int32)
  before = jnp.take_along_axis(block_cdf - block_sums, block[:, None], axis=-1)[:, 0]
  inner = jnp.exp(jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0] - row_max[:, None])  # [B, c]
  inner_cdf = jax.lax.associative_scan(jnp.add, inner, axis=-1)
  offset = jnp.minimum(jnp.sum(inner_cdf < (target - before)[:, None], axis=-1), c - 1).astype(jnp.int32)
  drawn_ok = jnp.take_along_axis(inner, offset[:, None], axis=-1)[:, 0] > 0
  return block * c + offset, sums, drawn_ok


def choose_tokens(logits: jax.Array, rng: jax.Array, sampling: SamplingParams
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws one token per row from float32 logits [B, V].

  Returns (tokens [B] int32, log-probs [B] float32 of those tokens under the untruncated
  log_softmax(logits / T), T = 1 for greedy, and that distribution's log-normaliser
  logsumexp(logits / T) [B], which the caller reuses for the self-reward score when T = 1).

  Sampling is by inverse CDF (`inverse_cdf_draw`): one uniform number per row instead of the
  B * V of Gumbel-max (`jax.random.categorical`), whose random bits dominated the decode step of
  small models on CPU. Without top-k / top-p the draw's exp-sums also give the log-normaliser,
  so the whole draw is two passes over the logits (max, then exp-sum). A draw that lands on a
  zero-probability token (only through float rounding) is replaced by the most likely token, so
  top-k / top-p supports are respected exactly.
  """
  scaled = logits if sampling.greedy else logits / sampling.temperature
  row_max = jnp.max(scaled, axis=-1)
  if sampling.greedy:
    tokens = first_argmax(scaled)
    lse = row_max + jnp.log(jnp.sum(jnp.exp(scaled - row_max[:, None]), axis=-1))
  else:
    filtering = 0 < sampling.top_k < scaled.shape[-1] or sampling.top_p < 1.0
    filtered = filter_logits(logits, sampling) if filtering else scaled
    u = jax.random.uniform(rng, (logits.shape[0],), jnp.float32, minval=jnp.finfo(jnp.float32).tiny)
    # The row max is never filtered out, so it is also the filtered logits' max.
    tokens, sums, drawn_ok = inverse_cdf_draw(filtered, row_max, u)
    if filtering:
      lse = row_max + jnp.log(jnp.sum(jnp.exp(scaled - row_max[:, None]), axis=-1))
    else:
      lse = row_max + jnp.log(sums)
    tokens = jax.lax.cond(jnp.all(drawn_ok), lambda: tokens,
                          lambda: jnp.where(drawn_ok, tokens, first_argmax(filtered)))
  picked = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
  return tokens, picked - lse, lse


def token_logprob_t1(logits: jax.Array, token_id: int) -> jax.Array:
  """log_softmax(logits)[..., token_id] at temperature 1: the self-reward read-out."""
  return logits[..., token_id] - jax.nn.logsumexp(logits, axis=-1)


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  if not eos_ids:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


class Sampler:
  """Batched sampler around a step function; holds the jitted prefill/decode.

  jax.jit caches compilations by input shapes and static arguments, so one Sampler compiles
  once per (prompt bucket, batch size, SamplingParams, parameter shapes/shardings).
  `num_traces` counts traces (for tests and for noticing recompilation).
  """

  def __init__(self, decode_fn: Callable, init_cache_fn: Callable, *, mesh: Mesh | None = None,
               cache_sharding_fn: Callable | None = None, min_bucket: int = MIN_BUCKET):
    """Args:
      decode_fn: (params, tokens, positions, token_mask, cache, write_index, chunk) -> (logits, cache).
      init_cache_fn: (batch, chunk_lengths) -> empty cache pytree (called inside jit) whose
        leaves all have the batch as their leading axis (a prefilled prompt's cache rows are
        repeated for its n responses).
      mesh: when given, the batch is sharded over its ("data", "fsdp") axes.
      cache_sharding_fn: cache -> NamedSharding pytree for it on `mesh` (None = XLA chooses).
      min_bucket: smallest prompt bucket length.
    """
    self.decode_fn = decode_fn
    self.init_cache_fn = init_cache_fn
    self.mesh = mesh
    self.cache_sharding_fn = cache_sharding_fn
    self.min_bucket = min_bucket
    self.num_traces = 0
    # The two compiled programs of a call; public so that laser_jax.aot compiles exactly these
    # (`.trace(...)` on the abstract inputs of `abstract_prefill_args`).
    self.prefill = jax.jit(self._prefill_impl, static_argnames=("sampling",))
    self.decode = jax.jit(self._decode_impl, static_argnames=("sampling", "prompt_len"), donate_argnames=("state",))

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
    """This host's rows `x` as its block of the global batch (`laser_jax.hosts.put_rows`)."""
    if self.mesh is None:
      return jnp.asarray(x)
    return hosts_lib.put_rows(x, NamedSharding(self.mesh, self._batch_spec(x.ndim)))

  # ---- jitted pieces ----------------------------------------------------------------------
  def _prefill_impl(self, params, prompt_tokens, prompt_mask, row_valid, rng, *, sampling: SamplingParams):
    """Runs the prompts through the model and samples every row's first token. Returns the state.

    `prompt_tokens`/`prompt_mask` hold either one row per sampled response or, when the batch
    divides evenly, each distinct prompt once: then the prompt is prefilled once and its cache
    and last logits are repeated for its n rows (`row_valid` [rows] gives the row count).
    """
    self.num_traces += 1
    num_prompts, prompt_len = prompt_tokens.shape
    batch = row_valid.shape[0]
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
    first, first_lp, _ = choose_tokens(logits.astype(jnp.float32), jax.random.fold_in(rng, 0), sampling)
    first = jnp.where(row_valid, first, sampling.pad_id)
    is_eos = _is_eos(first, sampling.eos_ids) & row_valid
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
      logits, cache = self.decode_fn(params, s.last_token[:, None], s.next_pos[:, None], consumes[:, None],
                                     s.cache, s.write_index, chunk)
      logits = logits[:, 0].astype(jnp.float32)
      new, new_lp, lse = choose_tokens(logits, jax.random.fold_in(s.rng, s.step), sampling)
      self_reward = s.self_reward
      if z_c is not None:
        if sampling.logprob_temperature == 1.0:  # the draw's normaliser is the T = 1 one
          score = logits[:, z_c] - lse
        else:  # a separate logsumexp, computed only in steps that read a score
          score = jax.lax.cond(jnp.any(s.pending), lambda: token_logprob_t1(logits, z_c),
                               lambda: jnp.full_like(self_reward, jnp.nan))
        self_reward = jnp.where(s.pending, score, self_reward)
      new = jnp.where(s.active, new, sampling.pad_id)
      is_eos = _is_eos(new, sampling.eos_ids) & s.active
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
            batch((rows,), jnp.bool_), rng)

  def __call__(self, params, prompts: Sequence[Sequence[int]], sampling: SamplingParams, rng: jax.Array) -> SampleOutput:
    """Samples `sampling.n` responses for every prompt (lists of token ids).

    In a multi-host run each process passes its own prompts (as many on every host) and gets its
    own rows back: the global batch is the hosts' row blocks in process order (`laser_jax.hosts`),
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
    row_valid = np.arange(batch) < num_rows

    state = self.prefill(params, self._put_batch(prompt_tokens), self._put_batch(prompt_mask),
                          self._put_batch(row_valid), rng, sampling=sampling)
    state = self.decode(params, state, sampling=sampling, prompt_len=bucket)
    return _to_output(state, np.repeat(prompt_tokens, repeats, axis=0), np.repeat(prompt_mask, repeats, axis=0),
                      num_rows, sampling)


def _to_output(state: SamplingState, prompt_tokens, prompt_mask, num_rows: int, sampling: SamplingParams) -> SampleOutput:
  """Host post-processing of this host's rows: strip padding rows, split the EOS out of the
  token buffer."""
  max_new = sampling.max_new_tokens
  buf = hosts_lib.local_rows(state.tokens)[:num_rows, :max_new]
  lps = hosts_lib.local_rows(state.logprobs)[:num_rows, :max_new]
  finished = hosts_lib.local_rows(state.finished)[:num_rows].astype(bool)
  self_reward = hosts_lib.local_rows(state.self_reward)[:num_rows].astype(np.float32)
  is_eos = np.isin(buf, np.asarray(sampling.eos_ids, np.int32)) if sampling.eos_ids else np.zeros(buf.shape, bool)
  lengths = np.where(finished, np.argmax(is_eos, axis=1), max_new).astype(np.int32)
  rows = np.arange(num_rows)
  eos_col = np.minimum(lengths, max_new - 1)
  eos_token = np.where(finished, buf[rows, eos_col], sampling.pad_id).astype(np.int32)
  eos_logprob = np.where(finished, lps[rows, eos_col], np.nan).astype(np.float32)
  after_end = np.arange(max_new)[None, :] >= lengths[:, None]
  tokens = np.where(after_end, sampling.pad_id, buf).astype(np.int32)
  logprobs = np.where(after_end, 0.0, lps).astype(np.float32)
  self_reward = np.where(finished, self_reward, np.nan).astype(np.float32)
  return SampleOutput(
      prompt_tokens=prompt_tokens[:num_rows], prompt_mask=prompt_mask[:num_rows], tokens=tokens,
      lengths=lengths, logprobs=logprobs, eos_token=eos_token, eos_logprob=eos_logprob,
      finished=finished, truncated=~finished, self_reward_logprob=self_reward,
      group_ids=(rows // sampling.n).astype(np.int32), pad_id=sampling.pad_id)


# ---- the Transformer entry point --------------------------------------------------------------
_SAMPLERS: dict = {}


def model_sampler(cfg, mesh: Mesh | None = None) -> Sampler:
  """The (cached) Sampler for `laser_jax.model` with config `cfg` on `mesh`."""
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

    _SAMPLERS[key] = Sampler(decode_fn, init_cache_fn, mesh=mesh, cache_sharding_fn=cache_sharding_fn)
  return _SAMPLERS[key]


def sample(params, cfg, prompts: Sequence[Sequence[int]], sampling: SamplingParams, rng: jax.Array,
           mesh: Mesh | None = None) -> SampleOutput:
  """Samples responses (and their self-reward scores) from the Transformer.

  Args:
    params: model parameters (already sharded with `sharding.shard_params` when `mesh` is set).
    cfg: the `model.ModelConfig`.
    prompts: token-id lists, one per prompt (any lengths >= 1).
    sampling: `SamplingParams`.
    rng: a PRNG key; the same key gives the same samples.
    mesh: optional device mesh; the batch is sharded over its ("data", "fsdp") axes.
  Returns:
    `SampleOutput` (NumPy), len(prompts) * sampling.n rows, each prompt's rows contiguous.
  """
  return model_sampler(cfg, mesh)(params, prompts, sampling, rng)
