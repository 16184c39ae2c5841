"""Attention of the decoder: the [T, T] reference, its blockwise "chunked" form, the splash (TPU)
and cuDNN (GPU) flash kernels behind one `attend_causal`, and `attend_cached` over a chunked KV
cache for sampling. Each equals the reference to float rounding (tests/test_model.py).

The activation sharding hint the decoder's layers apply (`constrain`, batch over `BATCH`) lives
here too: the Pallas / custom-call kernels run per shard of the same layout (`_per_shard`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BATCH = ("data", "fsdp")  # mesh axes of the batch dimension (see laser_jax.models.sharding)


def constrain(x: jax.Array, *spec) -> jax.Array:
  """Activation sharding hint, applied only under a mesh with the laser_jax axes (`jax.set_mesh`).

  Without such a mesh the layout is left to propagation from the jit's in_shardings, so the model
  also runs unsharded. Mesh axes that do not divide their dimension are dropped (replicated).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not {"data", "fsdp", "tensor"} <= set(mesh.axis_names):
    return x
  fitted = []
  for dim, axes in zip(x.shape, spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    fitted.append(axes if names and dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*fitted))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention. q [B,T,N,D], k/v [B,S,K,D], mask [B,T,S] bool -> [B,T,N,D].

  Scores and softmax are float32. Masked scores are *replaced* (not offset) by the lowest finite
  value, so a row with no visible key gives a uniform (finite) distribution instead of NaN.
  """
  b, t, n, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, d)  # query head h uses kv head h // (n // kv_heads)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(d)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, n, d)


def causal_mask(query_positions: jax.Array, key_valid: jax.Array, query_segments: jax.Array | None = None,
                key_segments: jax.Array | None = None) -> jax.Array:
  """[B, Tq, S] bool: query at sequence index i sees the valid keys at indices <= i, and with
  segment ids (a packed row: several sequences side by side) only those of its own segment.
  query_positions [Tq] (sequence indices), key_valid [B, S], query_segments [B, Tq], key_segments [B, S]."""
  visible = jnp.arange(key_valid.shape[1])[None, :] <= query_positions[:, None]
  mask = visible[None] & key_valid[:, None, :]
  if key_segments is not None:
    mask = mask & (query_segments[:, :, None] == key_segments[:, None, :])
  return mask


def attend_causal(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, impl: str = "xla",
                  block: int = 512, interpret: bool = False, segment_ids: jax.Array | None = None) -> jax.Array:
  """Causal self-attention of a full sequence over its valid keys: q [B,T,N,D], k/v [B,T,K,D],
  key_valid [B,T] bool -> [B,T,N,D]; equals `attend` with `causal_mask` on the valid query rows
  (a row's output at an invalid position is unspecified: nothing valid reads it).

  segment_ids [B,T] int32 (a packed row, `laser_jax.rl.packing`: sequence s of the row is segment
  s + 1, padding 0, key_valid = segment_ids > 0): a query sees only keys of its own segment, so
  attention never crosses sequences. Every impl takes them; "cudnn" runs them through "chunked"
  (`jax.nn.dot_product_attention` takes no segment ids, and its mask argument would be a dense
  [T, T] bias).

  impl "xla" builds the [B, T, T] scores at once. impl "chunked" runs `attend` on `block` queries
  at a time (a lax.map; each block under jax.checkpoint, so the backward pass recomputes its
  scores instead of keeping them): the largest live buffer is [B, heads, block, T] scores.
  Every query row still normalises over all of its keys, so the values are the same.
  impl "splash" / "cudnn": `attend_splash` / `attend_cudnn`.
  """
  t = q.shape[1]
  if impl == "splash":  # the kernel's segment mask: padding is segment 0 either way
    return attend_splash(q, k, v, key_valid if segment_ids is None else segment_ids, block, interpret)
  if impl == "cudnn" and segment_ids is None:
    return attend_cudnn(q, k, v, key_valid)
  if impl == "xla" or t <= block:
    return attend(q, k, v, causal_mask(jnp.arange(t), key_valid, segment_ids, segment_ids))
  num_blocks = -(-t // block)
  q_blocks = jnp.pad(q, ((0, 0), (0, num_blocks * block - t), (0, 0), (0, 0)))
  q_blocks = q_blocks.reshape(q.shape[0], num_blocks, block, *q.shape[2:]).swapaxes(0, 1)
  q_segments = None
  if segment_ids is not None:
    q_segments = jnp.pad(segment_ids, ((0, 0), (0, num_blocks * block - t)))
    q_segments = q_segments.reshape(q.shape[0], num_blocks, block).swapaxes(0, 1)

  @jax.checkpoint
  def one_block(args):
    q_block, start, seg_block = args
    return attend(q_block, k, v, causal_mask(start + jnp.arange(block), key_valid, seg_block, segment_ids))

  out = jax.lax.map(one_block, (q_blocks, jnp.arange(num_blocks) * block, q_segments))
  return out.swapaxes(0, 1).reshape(q.shape[0], num_blocks * block, *q.shape[2:])[:, :t]


def kernel_shard_axes(batch_size: int, kv_heads: int) -> tuple | None:
  """(batch axes, heads axis) a Pallas / custom-call kernel runs per shard over under the
  laser_jax mesh (batch over BATCH, heads over "tensor", each only where it divides; None for a
  replicated dimension), since GSPMD cannot partition such a call; None without such a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not {"data", "fsdp", "tensor"} <= set(mesh.axis_names):
    return None
  batch = BATCH if batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else None
  return batch, "tensor" if kv_heads % mesh.shape["tensor"] == 0 else None


def _per_shard(fn, q, k, v, key_valid):
  """Runs fn(q, k, v, key_valid) per shard (`kernel_shard_axes`); directly without the mesh.
  Query head h uses kv head h // (N // K) in every shard, because both head axes are split into
  the same number of contiguous pieces."""
  axes = kernel_shard_axes(q.shape[0], k.shape[2])
  if axes is None:
    return fn(q, k, v, key_valid)
  batch, heads = axes
  qkv = jax.sharding.PartitionSpec(batch, None, heads, None)
  return jax.shard_map(fn, in_specs=(qkv, qkv, qkv, jax.sharding.PartitionSpec(batch, None)),
                       out_specs=qkv, check_vma=False)(q, k, v, key_valid)


def attend_splash(q, k, v, key_valid, block: int = 512, interpret: bool = False):
  """`attend_causal` through JAX's Pallas splash-attention kernel (TPU; any backend with
  interpret=True). Flash-style: scores exist one [block, block] tile at a time, forward and
  backward. Padding is a segment mask (valid tokens segment 1, pad 0), so valid queries see only
  valid keys; `key_valid` may instead be a packed row's int32 segment ids (pad 0), which the
  kernel masks natively (`attend_causal`'s segment_ids); grouped-query heads run as the kernel's multi-query form, one call per kv head.
  The sequence is padded to a multiple of the block (pad = segment 0, never seen by valid rows)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  def run(q, k, v, key_valid):
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    blk = min(block, -(-t // 128) * 128)
    padded = -(-t // blk) * blk
    pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    q = jnp.pad(q * jnp.asarray(1 / math.sqrt(d), q.dtype), pad)
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    segments = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, padded - t)))
    sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                              block_kv_dkv=blk, block_kv_dkv_compute=blk, use_fused_bwd_kernel=True)
    kernel = splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([splash.CausalMask((padded, padded))] * g), block_sizes=sizes,
        interpret=interpret)

    def one_group(q_group, k_head, v_head, seg):  # [G, T, D], [T, D], [T, D], [T]
      return kernel(q_group, k_head, v_head, splash.SegmentIds(q=seg, kv=seg))

    per_example = jax.vmap(one_group, in_axes=(0, 0, 0, None))  # over kv heads
    out = jax.vmap(per_example)(q.reshape(b, padded, kv_heads, g, d).transpose(0, 2, 3, 1, 4),
                                k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segments)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, padded, n, d)[:, :t]

  return _per_shard(run, q, k, v, key_valid)


CUDNN_SEQ_MULTIPLE = 64  # attend_cudnn pads sequences to a multiple of this (see there)


def attend_cudnn(q, k, v, key_valid, implementation: str | None = "cudnn"):
  """`attend_causal` through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).

  cuDNN's causal mask with per-row key lengths handles right padding only, so each row is first
  rolled left by its leading pads (RoPE is already applied, so a shift changes no score), attended
  with is_causal and key_value_seq_lengths, and rolled back. Needs each row's valid tokens to be
  one contiguous run, as every laser_jax batch is (left-padded prompt, right-padded response).
  implementation=None / "xla" runs the same wrapper through XLA (the CPU test of it).

  cuDNN rejects a training (differentiated) call whose length is odd when it masks by lengths
  (measured on an H200: "Unsupported sequence length Q 545, KV 545"), and tiles by 64 anyway:
  rows are right-padded with invalid tokens to a multiple of CUDNN_SEQ_MULTIPLE first."""
  def run(q, k, v, key_valid):
    length = q.shape[1]
    pad = (-length) % CUDNN_SEQ_MULTIPLE
    if pad:
      q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
      key_valid = jnp.pad(key_valid, ((0, 0), (0, pad)))
    t = q.shape[1]
    lead = jnp.argmax(key_valid, axis=1).astype(jnp.int32)  # index of the first valid token
    index = (jnp.arange(t)[None, :] + lead[:, None]) % t
    roll = lambda x, i: jnp.take_along_axis(x, i[:, :, None, None], axis=1)
    out = jax.nn.dot_product_attention(
        roll(q, index), roll(k, index), roll(v, index), is_causal=True,
        key_value_seq_lengths=jnp.maximum(jnp.sum(key_valid, axis=1), 1).astype(jnp.int32),  # >= 1: finite
        implementation=implementation)
    return roll(out, (jnp.arange(t)[None, :] - lead[:, None]) % t)[:, :length]

  return _per_shard(run, q, k, v, key_valid)


def attend_cached(q: jax.Array, k_chunks: tuple, v_chunks: tuple, mask: jax.Array,
                  chunks_in_use: jax.Array | None = None) -> jax.Array:
  """`attend` over cache chunks: q [B,T,N,D], k_chunks [B,K,D,S_c] (keys transposed), v_chunks
  [B,K,S_c,D], mask [B,T,sum(S_c)] -> [B,T,N,D].

  chunks_in_use (traced int32, optional): attend over chunks 0..chunks_in_use only, the caller
  guaranteeing that no query sees a key in a later chunk; a `lax.switch` over the chunk count, so
  a step reads only the chunks in use (the continuous sampler's step, whose slots sit at
  different depths). The result is the same bit for bit as attending over every chunk (below).

  Both matmuls are batched (B, K) products in plain row-major form, (G*T, D) @ (D, S_c) and
  (G*T, S_c) @ (S_c, D), so XLA reads the cache buffers in place (with an einsum over a
  [B,S,K,D] cache XLA:CPU copied every layer's keys and values into a transposed layout on every
  decode step).
  """
  if chunks_in_use is None or len(k_chunks) == 1:
    return _attend_chunks(q, k_chunks, v_chunks, mask)
  ends = [sum(k.shape[-1] for k in k_chunks[:c + 1]) for c in range(len(k_chunks))]
  branches = [lambda q, m, c=c: _attend_chunks(q, k_chunks[:c + 1], v_chunks[:c + 1], m[..., :ends[c]])
              for c in range(len(k_chunks))]
  return jax.lax.switch(chunks_in_use, branches, q, mask)


def _attend_chunks(q, k_chunks, v_chunks, mask):
  b, t, n, d = q.shape
  kv_heads = k_chunks[0].shape[1]
  g = n // kv_heads  # query head h uses kv head h // g
  q = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
  batch_dims = ((0, 1), (0, 1))
  lowest = jnp.finfo(jnp.float32).min
  scores, start = [], 0
  for k_t in k_chunks:
    length = k_t.shape[-1]
    s = jax.lax.dot_general(q, k_t, (((3,), (2,)), batch_dims), preferred_element_type=jnp.float32)
    s = s.reshape(b, kv_heads, g, t, length) / math.sqrt(d)
    scores.append(jnp.where(mask[:, None, None, :, start:start + length], s, lowest))
    start += length
  # One softmax over all chunks, its max and denominator taken chunk by chunk in chunk order: a
  # chunk with no visible key adds exact zeros, so a row's values do not depend on how many
  # trailing chunks the step attends over (the continuous sampler's step attends over the chunks
  # its deepest slot uses, the static one over the chunks written so far: they agree bit for bit).
  peak = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1, keepdims=True) for s in scores])
  weights = [jnp.exp(s - peak) for s in scores]
  total = functools.reduce(jnp.add, [jnp.sum(w, axis=-1, keepdims=True) for w in weights])
  out = None
  for w, v in zip(weights, v_chunks):
    probs = (w / total).astype(v.dtype).reshape(b, kv_heads, g * t, v.shape[2])
    part = jax.lax.dot_general(probs, v, (((3,), (2,)), batch_dims))  # [B,K,G*T,D]
    out = part if out is None else out + part
  return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)
