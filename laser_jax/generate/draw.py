"""One token per row from float32 logits: temperature, top-k / top-p, greedy, and the inverse-CDF
draw the decode loop uses (`choose_tokens`), with the log-probs the sampler reports.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from laser_jax.generate.sampling import SamplingParams


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


def row_keys(rng: jax.Array, rows: jax.Array) -> jax.Array:
  """The key of each row of a sampler call: fold_in(call key, row), row = the row's index in the
  call's (global) batch. A row's draws depend on the row, never on the batch or decode slot that
  runs it, so the static and the continuous-batching sampler draw the same tokens."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows)


def step_keys(keys: jax.Array, tokens_so_far: jax.Array) -> jax.Array:
  """Per-row keys [B] of the draw of each row's token number `tokens_so_far` [B] (0 = the first):
  fold_in(row key, t)."""
  return jax.vmap(jax.random.fold_in)(keys, tokens_so_far)


def choose_tokens(logits: jax.Array, keys: jax.Array, sampling: SamplingParams
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws one token per row from float32 logits [B, V], row b with its own key `keys[b]`
  (`step_keys`).

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
    u = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32, minval=jnp.finfo(jnp.float32).tiny))(keys)
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


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  if not eos_ids:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))
