"""Decode attention that reads each row's own cache prefix: a Pallas kernel for TPU.

The continuous sampler's slots sit at different depths. `attention.attend_cached` (XLA) reads
every slot's cache up to the chunk of the deepest slot, so with hundreds of slots a step pays for
most of the window whatever the slots hold. Here a row reads the key/value blocks up to its own
last key and no further: one grid step per (row, kv head) loops over that row's blocks, copying
each in from HBM (double-buffered) as JAX's paged-attention kernel copies its pages, on this
cache's layout, one kernel call per cache chunk. Each call returns the online-softmax partials
(running max, denominator, unnormalised output) of its chunk, merged across chunks in XLA. A row
that reads no key of a chunk copies and computes nothing there.

Used by the continuous sampler's decode step when the model's attention is the TPU kernel
("splash", what "auto" picks on TPU); on CPU / GPU `attend_cached` runs, which is also the
reference (tests/test_ragged_attention.py, in Pallas interpret mode). The result equals
`attend_cached` to float rounding, not bit for bit.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from laser_jax.models.attention import kernel_shard_axes

_MASKED = -1e30  # a finite "minus infinity": exp(_MASKED - _MASKED) is 1, never NaN


def _chunk_kernel(used_ref, q_ref, k_hbm, v_hbm, mask_ref, m_ref, l_ref, acc_ref, k_buf, v_buf, sem, *,
                  block: int, scale: float):
  """The online softmax of row b, kv head h over one chunk: one grid step per (row, head), a loop
  over the row's own key blocks only (a grid over the blocks too would pay a grid step for each
  block of every row, used or not). Keys and values stay in HBM; block j + 1 is copied in while
  block j is computed on."""
  b, h = pl.program_id(0), pl.program_id(1)
  used = used_ref[b]
  q = q_ref[0, 0]  # [G, D]

  def copies(index, slot):
    rows = pl.ds(pl.multiple_of(index * block, block), block)
    return (pltpu.make_async_copy(k_hbm.at[h, b, rows], k_buf.at[slot], sem.at[0, slot]),
            pltpu.make_async_copy(v_hbm.at[h, b, rows], v_buf.at[slot], sem.at[1, slot]))

  m_ref[0, 0] = jnp.full(m_ref.shape[2:], _MASKED, jnp.float32)
  l_ref[0, 0] = jnp.zeros(l_ref.shape[2:], jnp.float32)
  acc_ref[0, 0] = jnp.zeros(acc_ref.shape[2:], jnp.float32)
  num_blocks = (used + block - 1) // block

  @pl.when(num_blocks > 0)
  def _first():
    for c in copies(0, 0):
      c.start()

  def one_block(j, carry):
    slot = j % 2
    for c in copies(j, slot):
      c.wait()

    @pl.when(j + 1 < num_blocks)
    def _next():
      for c in copies(j + 1, 1 - slot):
        c.start()

    s = jax.lax.dot_general(q, k_buf[slot], (((1,), (1,)), ((), ())),  # q k^T: [G, block]
                            preferred_element_type=jnp.float32) * scale
    column = j * block + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    if block == mask_ref.shape[-1]:  # the whole chunk: a traced lane offset, even 0, is not provably aligned
      mask = mask_ref[0]  # [1, block]
    else:
      mask = mask_ref[0, :, pl.ds(pl.multiple_of(j * block, block), block)]
    valid = (mask > 0) & (column < used)  # key validity, broadcast over G
    s = jnp.where(valid, s, _MASKED)
    m_prev = m_ref[0, 0]  # [G, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_ref[0, 0] = alpha * l_ref[0, 0] + jnp.sum(p, axis=1, keepdims=True)
    # Slots past the row's last key hold whatever an earlier row left there: zeroed, so that
    # not even a non-finite leftover reaches the sum (0 x NaN is NaN).
    row = j * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
    v = jnp.where(row < used, v_buf[slot], jnp.zeros((), v_buf.dtype))
    acc_ref[0, 0] = alpha * acc_ref[0, 0] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    m_ref[0, 0] = m_new
    return carry

  jax.lax.fori_loop(0, num_blocks, one_block, 0)


def _chunk_partials(q, k, v, mask, used, *, block: int, interpret: bool):
  """Online-softmax partials of q [B,K,G,D] over one chunk (k, v [K,B,S,D], mask [B,1,S]
  int32), row b reading its first used[b] keys only: (max [B,K,G,1], denominator [B,K,G,1],
  unnormalised output [B,K,G,D]), float32."""
  b, kv_heads, g, d = q.shape
  length = k.shape[2]
  # Blocks tile the chunk, and a lane-dimension slice of the mask must start at a multiple of
  # 128: otherwise the chunk is one block.
  block = block if length % block == 0 and block % 128 == 0 else length
  per_row_head = lambda b_, h, used_: (b_, h, 0, 0)
  hbm = pl.BlockSpec(memory_space=pltpu.MemorySpace.HBM)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b, kv_heads),
      in_specs=[pl.BlockSpec((1, 1, g, d), per_row_head), hbm, hbm,
                pl.BlockSpec((1, 1, length), lambda b_, h, used_: (b_, 0, 0))],
      out_specs=[pl.BlockSpec((1, 1, g, 1), per_row_head), pl.BlockSpec((1, 1, g, 1), per_row_head),
                 pl.BlockSpec((1, 1, g, d), per_row_head)],
      scratch_shapes=[pltpu.VMEM((2, block, d), k.dtype), pltpu.VMEM((2, block, d), v.dtype),
                      pltpu.SemaphoreType.DMA((2, 2))])
  itemsize = jnp.dtype(k.dtype).itemsize
  cost = pl.CostEstimate(  # the worst case: every row reads the whole chunk
      flops=4 * b * kv_heads * g * length * d, transcendentals=b * kv_heads * g * length,
      bytes_accessed=2 * b * kv_heads * length * d * itemsize + b * length * 4 + 2 * q.size * 4)
  return pl.pallas_call(
      functools.partial(_chunk_kernel, block=block, scale=1 / math.sqrt(d)),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, kv_heads, g, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, kv_heads, g, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, kv_heads, g, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      cost_estimate=cost, interpret=interpret,
  )(used, q, k, v, mask)


def attend_cached_ragged(q: jax.Array, k_chunks: tuple, v_chunks: tuple, mask: jax.Array, lengths: jax.Array,
                         block: int = 512, interpret: bool = False) -> jax.Array:
  """`attention.attend_cached` for one decode step (T = 1) where row b reads only its first
  lengths[b] keys of the window (0: none; its output is then 0): q [B,1,N,D], k_chunks
  [B,K,D,S_c], v_chunks [B,K,S_c,D], mask [B,1,sum(S_c)] -> [B,1,N,D]. Keys at or past
  lengths[b] must be masked in `mask` (their blocks are not read). Runs per shard under the
  laser_jax mesh (`attention.kernel_shard_axes`)."""
  mask = mask[:, :, :sum(k.shape[-1] for k in k_chunks)].astype(jnp.int32)

  def run(q, k_chunks, v_chunks, mask, lengths):
    b, _, n, d = q.shape
    kv_heads = k_chunks[0].shape[1]
    dtype = q.dtype
    q = q.reshape(b, kv_heads, n // kv_heads, d).astype(k_chunks[0].dtype)  # query head h uses kv head h // G
    parts, start = [], 0
    for k_t, v in zip(k_chunks, v_chunks):
      length = k_t.shape[-1]
      used = jnp.clip(lengths - start, 0, length).astype(jnp.int32)
      # Keys and values as [K, B, S, D]: the physical order XLA chose for the cache's [B, K, D, S]
      # keys and [B, K, S, D] values in the v4-64 decode loop, so the transposes are relabellings,
      # not copies there (a kernel reading them in their logical order made XLA convert every
      # chunk's layout at every step: `aot --hlo_dir` shows such copies).
      parts.append(_chunk_partials(q, k_t.transpose(1, 0, 3, 2), v.transpose(1, 0, 2, 3),
                                   mask[:, :, start:start + length], used, block=block, interpret=interpret))
      start += length
    peak = functools.reduce(jnp.maximum, [m for m, _, _ in parts])
    total = sum(l * jnp.exp(m - peak) for m, l, _ in parts)
    out = sum(acc * jnp.exp(m - peak) for m, _, acc in parts)
    out = jnp.where(total > 0, out / jnp.where(total > 0, total, 1.0), 0.0)
    return out.reshape(b, 1, n, d).astype(dtype)

  axes = kernel_shard_axes(q.shape[0], k_chunks[0].shape[1])
  if axes is None:
    return run(q, k_chunks, v_chunks, mask, lengths)
  P = jax.sharding.PartitionSpec
  batch, heads = axes
  cache = tuple(P(batch, heads, None, None) for _ in k_chunks)
  return jax.shard_map(run, in_specs=(P(batch, None, heads, None), cache, cache, P(batch, None, None), P(batch)),
                       out_specs=P(batch, None, heads, None), check_vma=False)(q, k_chunks, v_chunks, mask, lengths)
