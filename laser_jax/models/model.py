"""Decoder-only transformer (Qwen2 / Qwen2.5, Llama 3.x, Qwen3) in Flax linen.

One module tree serves both paths:
  * `forward`: full-sequence forward for training (left- or right-padded batches, explicit positions);
  * `forward_cached`: prefill / one-token decode into a preallocated `KVCache` for sampling.

Parameters are the plain nested dict `variables["params"]` of the linen module, laid out as
  embed/embedding [V, H]
  layers_{i}/input_norm/scale [H]
  layers_{i}/attn/{q,k,v}_proj/{kernel [H, heads*D], bias [heads*D] (Qwen2 only)}
  layers_{i}/attn/o_proj/kernel [heads*D, H]
  layers_{i}/attn/{q,k}_norm/scale [D] (Qwen3 only)
  layers_{i}/post_attn_norm/scale [H]
  layers_{i}/mlp/{gate,up}_proj/kernel [H, I], layers_{i}/mlp/down_proj/kernel [I, H]
  final_norm/scale [H]
  lm_head/kernel [H, V] (untied heads only)
Kernels are stored [in, out] (the transpose of torch's nn.Linear weight). The decoder's config is
`config.ModelConfig`; its attention implementations are in `attention`.

Over 400 lines on purpose: the training forward (packed rows too), the cached decode (one write
index, or one per slot for continuous batching) and the layer-scanned forward are one module tree
over one parameter layout; splitting them would split the layers they share.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from laser_jax.models.attention import BATCH, attend_cached, attend_causal, constrain
from laser_jax.models import ragged_attention
from laser_jax.models.config import ModelConfig

Params = Any


class KVCache(NamedTuple):
  """Preallocated key/value cache (a pytree): per layer, the slot axis split into chunks.

  Layouts are the ones the attention matmuls read without a copy: q @ k needs the keys with
  head_dim before the slot axis, p @ v the values with the slot axis first (`attend_cached`).

  Every array is its own buffer, because XLA copies a slice of a buffer before a matmul reads
  it: one array per layer (not one stacked [L, ...] array), and the slot axis [0, max_len) split
  into consecutive chunks. A step that writes into chunk c attends over chunks 0..c only, so a
  sampler that decodes chunk by chunk reads only the part of the cache written so far instead
  of all max_len slots every step. One chunk (the default) is one buffer per layer.
  """
  k: tuple  # num_layers x num_chunks x [batch, num_kv_heads, head_dim, chunk_len] keys (transposed)
  v: tuple  # num_layers x num_chunks x [batch, num_kv_heads, chunk_len, head_dim] values
  mask: jax.Array  # [batch, max_len] bool: slot holds a valid (non-pad) token

  @property
  def chunk_lengths(self) -> tuple[int, ...]:
    return tuple(int(k.shape[-1]) for k in self.k[0])


# ----------------------------------------------------------------------------------------------
# Rotary position embedding.

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [head_dim // 2] (float32), with Llama-3 scaling when configured."""
  d = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
  inv_freq = inv_freq.astype(np.float32)
  if cfg.rope_scaling is None:
    return inv_freq
  s = dict(cfg.rope_scaling)
  factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
  old_len = float(s["original_max_position_embeddings"])
  wavelen = 2 * math.pi / inv_freq
  # Long wavelengths (low frequencies) are slowed down by `factor`, short ones are kept, and the band
  # in between interpolates smoothly between the two (Llama 3.1 rope scaling).
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) [B, T, 1, D] float32 of the rotary angles at `positions` [B, T] (int).

  Computed once per forward and shared by every layer's queries and keys.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotary embedding, half-split convention. x [B, T, N, D], rope = `rope_tables(...)`."""
  cos, sin = rope
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Modules.

class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * xf.astype(self.dtype)


def _dense(features, cfg, name, use_bias=False):
  return nn.Dense(features, use_bias=use_bias, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                  name=name)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, rope, mask, kv_cache=None, write_offset=None, segment_ids=None, chunks_in_use=None,
               row_lengths=None):
    """x [B,T,H], rope = `rope_tables` at x's positions. Without a cache attends causally within
    x over its valid tokens (mask = key validity [B,T]; with segment_ids [B,T], a packed row's,
    within each token's own segment: `attend_causal`). With kv_cache = (key chunks, value chunks), the chunks of this layer's cache
    that the step sees (see `KVCache`), writes this step's keys/values into the last of them at
    slots [write_offset, write_offset + T) and attends over all of them (mask [B,T,sum(S_c)])."""
    cfg = self.cfg
    b, t, _ = x.shape
    d = cfg.head_dim
    q = _dense(cfg.num_heads * d, cfg, "q_proj", cfg.qkv_bias)(x).reshape(b, t, cfg.num_heads, d)
    k = _dense(cfg.num_kv_heads * d, cfg, "k_proj", cfg.qkv_bias)(x).reshape(b, t, cfg.num_kv_heads, d)
    v = _dense(cfg.num_kv_heads * d, cfg, "v_proj", cfg.qkv_bias)(x).reshape(b, t, cfg.num_kv_heads, d)
    if cfg.qk_norm:
      q = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype, name="k_norm")(k)
    q = constrain(apply_rope(q, rope), BATCH, None, "tensor", None)
    k = constrain(apply_rope(k, rope), BATCH, None, "tensor", None)
    v = constrain(v, BATCH, None, "tensor", None)
    new_cache = None
    if kv_cache is None:
      out = attend_causal(q, k, v, mask, cfg.attention, cfg.attention_block, cfg.interpret_kernels,
                          segment_ids)
    elif jnp.ndim(write_offset) == 1:
      # One slot per row (continuous batching, T = 1): row b's key/value go to slot
      # write_offset[b] of the whole cache, scattered into whichever chunk holds it.
      new_cache = _scatter_rows(*kv_cache, k[:, 0], v[:, 0], write_offset)
      if row_lengths is not None and cfg.attention == "splash":
        # TPU: each row reads its own cache prefix (the continuous step; `ragged_attention`).
        out = ragged_attention.attend_cached_ragged(q, *new_cache, mask, row_lengths, cfg.attention_block,
                                                    cfg.interpret_kernels)
      else:
        out = attend_cached(q, *new_cache, mask, chunks_in_use)
    else:
      # In-place dynamic-update-slices of the (donated) cache buffers.
      k_chunks, v_chunks = kv_cache
      k_last = jax.lax.dynamic_update_slice(k_chunks[-1], k.transpose(0, 2, 3, 1).astype(k_chunks[-1].dtype),
                                            (0, 0, 0, write_offset))
      v_last = jax.lax.dynamic_update_slice(v_chunks[-1], v.transpose(0, 2, 1, 3).astype(v_chunks[-1].dtype),
                                            (0, 0, write_offset, 0))
      new_cache = tuple(tuple(constrain(c, BATCH, "tensor", None, None) for c in chunks)
                        for chunks in (k_chunks[:-1] + (k_last,), v_chunks[:-1] + (v_last,)))
      out = attend_cached(q, *new_cache, mask)
    out = out.reshape(b, t, cfg.num_heads * d)
    return _dense(cfg.hidden_size, cfg, "o_proj")(out), new_cache


def _scatter_rows(k_chunks, v_chunks, k, v, slots):
  """Writes k [B,K,D] / v [B,K,D] of row b into cache slot `slots[b]` (over all chunks): per chunk,
  a scatter whose rows outside the chunk are dropped (in place on a donated cache)."""
  rows = jnp.arange(k.shape[0])
  new_k, new_v, start = [], [], 0
  for kc, vc in zip(k_chunks, v_chunks):
    length = kc.shape[-1]
    offset = jnp.where((slots >= start) & (slots < start + length), slots - start, length)  # length: dropped
    new_k.append(constrain(kc.at[rows, :, :, offset].set(k.astype(kc.dtype), mode="drop"), BATCH, "tensor", None, None))
    new_v.append(constrain(vc.at[rows, :, offset, :].set(v.astype(vc.dtype), mode="drop"), BATCH, "tensor", None, None))
    start += length
  return tuple(new_k), tuple(new_v)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = _dense(cfg.intermediate_size, cfg, "gate_proj")(x)
    up = _dense(cfg.intermediate_size, cfg, "up_proj")(x)
    act = constrain(nn.silu(gate) * up, BATCH, None, "tensor")
    return _dense(cfg.hidden_size, cfg, "down_proj")(act)


class DecoderLayer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, rope, mask, kv_cache=None, write_offset=None, segment_ids=None, chunks_in_use=None,
               row_lengths=None):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype, name=name)
    attn_out, new_cache = Attention(cfg, name="attn")(norm("input_norm")(x), rope, mask,
                                                      kv_cache, write_offset, segment_ids, chunks_in_use,
                                                      row_lengths)
    x = x + attn_out
    x = x + MLP(cfg, name="mlp")(norm("post_attn_norm")(x))
    return constrain(x, BATCH, None, None), new_cache


class LMHead(nn.Module):
  """Untied output head; logits are accumulated in float32 even for bf16 compute."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, hidden):
    cfg = self.cfg
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (cfg.hidden_size, cfg.vocab_size),
                        cfg.weight_dtype)
    return _logits(hidden, kernel, cfg)


def _logits(hidden, w, cfg):
  logits = jnp.einsum("...h,hv->...v", hidden.astype(cfg.compute_dtype), w.astype(cfg.compute_dtype),
                      preferred_element_type=jnp.float32)
  if logits.ndim == 3:  # [B, T, V]: vocab stays sharded over "tensor" like the head
    logits = constrain(logits, BATCH, None, "tensor")
  return logits


class Decoder(nn.Module):
  """Embedding -> num_layers decoder layers -> final RMSNorm. Returns hidden states (not logits)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                          param_dtype=cfg.weight_dtype, name="embed")
    layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
    self.layers = [layer_cls(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype, name="final_norm")
    if not cfg.tie_word_embeddings:
      self.lm_head = LMHead(cfg, name="lm_head")

  def __call__(self, tokens, positions, attention_mask, segment_ids=None):
    """Full sequence: causal attention restricted to real tokens (and, with segment_ids, to the
    token's own segment of a packed row). Returns normed hidden [B,T,H]."""
    key_valid = attention_mask.astype(bool)
    x = self.embed_tokens(tokens)
    rope = rope_tables(positions, rope_inv_freq(self.cfg))
    for layer in self.layers:
      x, _ = layer(x, rope, key_valid, None, None, segment_ids)
    return self.final_norm(x)

  def embed_tokens(self, tokens):
    return constrain(self.embed(tokens), BATCH, None, None)

  def finish(self, x):
    return self.final_norm(x)

  def cached(self, tokens, positions, token_mask, cache: KVCache, write_index, chunk: int | None):
    """Prefill / decode step into `cache` at slots [write_index, write_index + T), which lie in
    chunk `chunk` (static); attends over chunks 0..chunk. A per-row write_index [B] (T = 1) with
    chunk None: attends over the chunks up to the one holding the largest write of a row with
    token_mask set (traced: a switch over the chunk count in every layer's attention)."""
    t = tokens.shape[1]
    lengths = cache.chunk_lengths
    in_use = row_lengths = None
    if chunk is None:  # per row, bounded by the rows that consume a token
      chunk = len(lengths) - 1
      ends = np.cumsum(lengths)
      in_use = jnp.searchsorted(jnp.asarray(ends), jnp.max(jnp.where(token_mask[:, 0], write_index, 0)), side="right")
      in_use = jnp.minimum(in_use, chunk).astype(jnp.int32)
      row_lengths = jnp.where(token_mask[:, 0], write_index + 1, 0)  # keys each row reads
    chunk_start, visible_len = sum(lengths[:chunk]), sum(lengths[:chunk + 1])
    if write_index.ndim == 1:
      rows = jnp.arange(tokens.shape[0])
      cache_mask = cache.mask.at[rows, write_index].set(token_mask[:, 0].astype(bool))
      visible = (jnp.arange(visible_len)[None, :] <= write_index[:, None])[:, None, :]  # [B, 1, S]
      offset = write_index  # absolute slots; the layer finds each row's chunk
    else:
      cache_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, token_mask.astype(bool), write_index, axis=1)
      query_slot = write_index + jnp.arange(t)
      visible = (jnp.arange(visible_len)[None, :] <= query_slot[:, None])[None]  # [1, T, S_visible]
      offset = write_index - chunk_start
    mask = visible & cache_mask[:, None, :visible_len]
    x = constrain(self.embed(tokens), BATCH, None, None)
    rope = rope_tables(positions, rope_inv_freq(self.cfg))
    keys, values = [], []
    for layer, k_chunks, v_chunks in zip(self.layers, cache.k, cache.v):
      x, (k_seen, v_seen) = layer(x, rope, mask, (k_chunks[:chunk + 1], v_chunks[:chunk + 1]), offset,
                                  chunks_in_use=in_use, row_lengths=row_lengths)
      keys.append(k_seen + k_chunks[chunk + 1:])
      values.append(v_seen + v_chunks[chunk + 1:])
    return self.final_norm(x), KVCache(tuple(keys), tuple(values), cache_mask)

  def unembed(self, hidden):
    if self.cfg.tie_word_embeddings:
      return _logits(hidden, self.embed.embedding.T, self.cfg)
    return self.lm_head(hidden)


# ----------------------------------------------------------------------------------------------
# Public functional API.

def _init_everything(module, tokens, positions, mask):
  return module.unembed(module(tokens, positions, mask))


def init_params(cfg: ModelConfig, rng) -> Params:
  """Random parameters (flax default initialisers). Returns the nested dict `variables["params"]`."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = Decoder(cfg).init(rng, tokens, tokens, jnp.ones((1, 1), bool), method=_init_everything)
  return variables["params"]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, chunk_lengths=None) -> KVCache:
  """An empty cache: zeros, every slot invalid. `chunk_lengths` (summing to max_len) splits the
  slot axis into chunks (see `KVCache`); default one chunk."""
  chunk_lengths = _check_chunks(max_len, chunk_lengths)
  def zeros(shape):
    return jnp.zeros(shape, cfg.compute_dtype)
  shapes = [cache_shapes(cfg, batch, length) for length in chunk_lengths]
  return KVCache(tuple(tuple(zeros(k) for k, _ in shapes) for _ in range(cfg.num_layers)),
                 tuple(tuple(zeros(v) for _, v in shapes) for _ in range(cfg.num_layers)),
                 jnp.zeros((batch, max_len), bool))


def _check_chunks(max_len: int, chunk_lengths) -> tuple[int, ...]:
  chunk_lengths = (max_len,) if chunk_lengths is None else tuple(int(c) for c in chunk_lengths)
  if sum(chunk_lengths) != max_len or min(chunk_lengths) < 1:
    raise ValueError(f"cache chunk_lengths={chunk_lengths} must be positive and sum to max_len={max_len}")
  return chunk_lengths


def cache_shapes(cfg: ModelConfig, batch: int, length: int) -> tuple[tuple, tuple]:
  """Shapes of one (keys, values) cache chunk of `length` slots (see `KVCache`)."""
  return ((batch, cfg.num_kv_heads, cfg.head_dim, length), (batch, cfg.num_kv_heads, length, cfg.head_dim))


def forward(params, cfg: ModelConfig, tokens, positions, attention_mask, *, return_hidden=False,
            segment_ids=None):
  """Full-sequence forward. tokens/positions int32 [B,T], attention_mask bool [B,T] (True = real).
  segment_ids int32 [B,T] (optional): rows packed with several sequences (`laser_jax.rl.packing`),
  sequence s of a row segment s + 1 and padding 0; attention stays within a segment, and
  `positions` restart at each sequence's start.

  Returns float32 logits [B,T,V], or with return_hidden=True the final-normed hidden states [B,T,H]
  (compute dtype). Padding positions produce finite values that callers must ignore.
  """
  if cfg.scan_layers:
    hidden = _forward_scanned(params, cfg, tokens, positions, attention_mask, segment_ids)
  else:
    hidden = Decoder(cfg).apply({"params": params}, tokens, positions, attention_mask, segment_ids)
  return hidden if return_hidden else unembed(params, cfg, hidden)


def _forward_scanned(params, cfg: ModelConfig, tokens, positions, attention_mask, segment_ids=None):
  """`Decoder.__call__` as a lax.scan over the layers' stacked weights (same values).

  The stacked copy lives for one forward; its gradient is unstacked back onto each layer's
  weights. With remat the scan body is checkpointed, so the backward pass recomputes one layer
  at a time (an unrolled Python loop leaves XLA free to schedule many layers' recomputations at
  once)."""
  decoder = Decoder(cfg)
  x = decoder.apply({"params": params}, tokens, method=Decoder.embed_tokens)
  rope = rope_tables(positions, rope_inv_freq(cfg))
  key_valid = attention_mask.astype(bool)
  stacked = jax.tree.map(lambda *ws: jnp.stack(ws), *[params[f"layers_{i}"] for i in range(cfg.num_layers)])
  layer = DecoderLayer(cfg)

  def body(x, layer_params):
    return layer.apply({"params": layer_params}, x, rope, key_valid, None, None, segment_ids)[0], None

  if cfg.remat:
    body = jax.checkpoint(body, prevent_cse=False)  # inside a scan CSE cannot merge the recompute
  x, _ = jax.lax.scan(body, x, stacked)
  return decoder.apply({"params": params}, x, method=Decoder.finish)


def unembed(params, cfg: ModelConfig, hidden) -> jax.Array:
  """hidden [..., H] -> float32 logits [..., V] through the (tied or untied) output head."""
  return Decoder(cfg).apply({"params": params}, hidden, method=Decoder.unembed)


def forward_cached(params, cfg: ModelConfig, tokens, positions, token_mask, cache: KVCache, write_index,
                   *, last_logits_only: bool = False, chunk: int | None = None):
  """Cached forward for prefill (T = prompt length) and decode (T = 1).

  Writes the new tokens' keys/values into cache slots [write_index, write_index + T), sets
  cache.mask there to token_mask, and lets the query in slot s attend to valid slots <= s.
  A write_index of shape [B] (decode, T = 1) gives each row its own slot (the sampler's decode
  steps: the same program for the static loop and continuous batching, so they agree bit for bit);
  with `chunk` None the step attends over the chunks up to the one holding the largest write of a
  row whose token_mask is set (found on device: a `lax.switch` in each layer's attention, so only
  the chunks in use are read).
  Returns (float32 logits [B,T,V], updated cache); with `last_logits_only`, logits [B,1,V] of the
  last position only (a sampler's prefill reads nothing else, and unembedding the whole prompt
  costs as much as many decode steps).

  With a chunked cache (`init_cache(..., chunk_lengths)`), `chunk` (static) names the chunk that
  holds slots [write_index, write_index + T): the step attends over chunks 0..chunk only. The
  caller guarantees the slots lie in that chunk (write_index is traced, so this is not checked).
  """
  num_chunks = len(cache.chunk_lengths)
  if chunk is None and jnp.ndim(write_index) == 0:
    if num_chunks > 1:
      raise ValueError(f"forward_cached: the cache has {num_chunks} chunks; pass chunk= (the chunk written)")
    chunk = 0
  if chunk is not None and not 0 <= chunk < num_chunks:
    raise ValueError(f"forward_cached: chunk={chunk} but the cache has {num_chunks} chunks")
  write_index = jnp.asarray(write_index, jnp.int32)
  hidden, cache = Decoder(cfg).apply({"params": params}, tokens, positions, token_mask, cache, write_index,
                                     chunk, method=Decoder.cached)
  if last_logits_only:
    hidden = hidden[:, -1:]
  return unembed(params, cfg, hidden), cache


def default_positions(attention_mask) -> jax.Array:
  """Positions counting real tokens only: cumsum(mask) - 1, clipped at 0 (works for left/right padding)."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
