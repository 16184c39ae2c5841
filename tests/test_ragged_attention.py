"""The per-row decode attention kernel (Pallas, run here in interpret mode) against the XLA
attention over the same cache chunks (`attention.attend_cached`), and in the continuous sampler."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laser_jax.generate import sampler as sampler_lib
from laser_jax.generate.sampling import SamplingParams
from laser_jax.models import attention
from laser_jax.models import ragged_attention

B, K, G, D = 5, 2, 3, 16
CHUNKS = (128, 256, 256)  # a prompt chunk, then two decode chunks of 2 blocks of 128


def _cache(seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, 1, K * G, D)), jnp.float32)
  k_chunks = tuple(jnp.asarray(rng.normal(size=(B, K, D, n)), jnp.float32) for n in CHUNKS)
  v_chunks = tuple(jnp.asarray(rng.normal(size=(B, K, n, D)), jnp.float32) for n in CHUNKS)
  # Left-padded prompts (a few prompt keys masked), every decode key written so far valid.
  cache_mask = jnp.asarray(rng.random((B, sum(CHUNKS))) > 0.3).at[:, CHUNKS[0]:].set(True)
  return q, k_chunks, v_chunks, cache_mask


# Keys each row reads: inside the prompt chunk, at a block edge (128 + 128), mid-block, the whole
# window, and none (a slot without a row: output 0).
LENGTHS = jnp.array([3, 256, 300, 640, 0], jnp.int32)


def _mask(cache_mask, lengths):
  return (cache_mask & (jnp.arange(cache_mask.shape[1])[None] < lengths[:, None]))[:, None, :]


def test_each_row_reading_its_own_prefix_equals_attention_over_every_chunk():
  q, k_chunks, v_chunks, cache_mask = _cache()
  mask = _mask(cache_mask, LENGTHS)
  out = ragged_attention.attend_cached_ragged(q, k_chunks, v_chunks, mask, LENGTHS, block=128, interpret=True)
  reference = attention.attend_cached(q, k_chunks, v_chunks, mask)
  np.testing.assert_allclose(out[:4], reference[:4], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[4], 0.0)


def test_whatever_lies_past_a_rows_length_never_reaches_its_output():
  """NaN in every cache slot at or past each row's length (an earlier row's leftovers, or
  anything) leaves the output as it was: the row's last block is masked past its length, keys and
  values alike (0 x NaN would be NaN), and the blocks after it are not in the row's loop."""
  q, k_chunks, v_chunks, cache_mask = _cache()
  mask = _mask(cache_mask, LENGTHS)
  past = jnp.arange(sum(CHUNKS))[None, :] >= LENGTHS[:, None]  # [B, window]
  split = lambda x, axis: tuple(jnp.split(x, np.cumsum(CHUNKS)[:-1], axis=axis))
  k_poisoned = split(jnp.where(past[:, None, None, :], jnp.nan, jnp.concatenate(k_chunks, axis=3)), 3)
  v_poisoned = split(jnp.where(past[:, None, :, None], jnp.nan, jnp.concatenate(v_chunks, axis=2)), 2)
  clean = ragged_attention.attend_cached_ragged(q, k_chunks, v_chunks, mask, LENGTHS, block=128, interpret=True)
  out = ragged_attention.attend_cached_ragged(q, k_poisoned, v_poisoned, mask, LENGTHS, block=128, interpret=True)
  np.testing.assert_array_equal(out, clean)


def test_sharded_over_the_mesh_equals_one_device():
  """Rows over the batch axes, kv heads over "tensor" (shard_map), on a 2 x 2 x 2 mesh."""
  from laser_jax.models import sharding as sharding_lib
  q, k_chunks, v_chunks, cache_mask = _cache(1)
  lengths = jnp.array([3, 256, 300, 640, 0, 129, 400, 1], jnp.int32)
  q = jnp.concatenate([q, q[:3]])
  k_chunks = tuple(jnp.concatenate([k, k[:3]]) for k in k_chunks)
  v_chunks = tuple(jnp.concatenate([v, v[:3]]) for v in v_chunks)
  mask = _mask(jnp.concatenate([cache_mask, cache_mask[:3]]), lengths)
  expected = ragged_attention.attend_cached_ragged(q, k_chunks, v_chunks, mask, lengths, block=128, interpret=True)
  mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda *a: ragged_attention.attend_cached_ragged(*a, block=128, interpret=True))(
        q, k_chunks, v_chunks, mask, lengths)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # ~15 s: the continuous loop with the kernel interpreted in every layer
def test_continuous_sampler_with_the_kernel_draws_the_static_samplers_rows():
  """The continuous sampler's step uses the kernel when the model's attention is the TPU kernel
  ("splash"; interpreted here): same tokens as the static sampler (XLA attention), log-probs
  and scores to float rounding."""
  from test_sampler import PROMPTS, TINY, Z_C, tiny_params
  sp = SamplingParams(n=3, temperature=0.8, top_p=0.95, top_k=60, max_new_tokens=10, eos_ids=tuple(range(10, 24)),
                      pad_id=0, self_reward_token_id=Z_C, decode_segments=3, min_segment_tokens=1)
  static = sampler_lib.sample(tiny_params(), TINY, PROMPTS, sp, jax.random.key(5))
  kernel_cfg = dataclasses.replace(TINY, attention="splash", interpret_kernels=True)
  cont = sampler_lib.sample(tiny_params(), kernel_cfg, PROMPTS, dataclasses.replace(sp, decode_slots=4),
                            jax.random.key(5))
  assert len(set(static.lengths.tolist())) >= 3
  np.testing.assert_array_equal(cont.tokens, static.tokens)
  np.testing.assert_array_equal(cont.lengths, static.lengths)
  np.testing.assert_allclose(cont.logprobs, static.logprobs, atol=1e-5)
  np.testing.assert_allclose(cont.self_reward_logprob, static.self_reward_logprob, atol=1e-5)
