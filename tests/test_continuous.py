"""Continuous batching (`SamplingParams.decode_slots` > 0) against the static sampler, row by row.

Reference: the static sampler on the same prompts and key (row r draws token t with
fold_in(fold_in(key, r), t) in both). A toy step function whose logits depend on the whole cache
(every consumed token, at its slot) makes any wrong slot, write index, position or refill show up
as different draws; there the two samplers agree exactly on every field, and so they do on the
Transformer (one decode step program for both; `attention.attend_cached`).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laser_jax.generate import sampler as sampler_lib
from laser_jax.generate.sampler import Sampler
from laser_jax.generate.sampling import SamplingParams

from test_sampler import PROMPTS, TINY, Z_C, tiny_params

V = 16


def history_decode(params, tokens, positions, token_mask, cache, write_index, chunk):
  """Logits = table row chosen by a hash of the cache (token + 1 at its slot, 0 = empty) and the
  position: every token consumed so far, where it sits, matters."""
  del chunk
  values = jnp.where(token_mask, tokens + 1, 0)
  if jnp.ndim(write_index) == 1:  # one slot per row (continuous batching)
    cache = cache.at[jnp.arange(tokens.shape[0]), write_index].set(values[:, 0])
  else:
    cache = jax.lax.dynamic_update_slice(cache, values, (0, write_index))
  weights = (jnp.arange(cache.shape[1]) % 5) + 1
  h = jnp.sum(cache * weights, axis=-1) + 3 * positions[:, -1]
  return params[h % V][:, None, :], cache


def history_cache(batch, chunk_lengths):
  return jnp.zeros((batch, sum(chunk_lengths)), jnp.int32)


def history_insert(slots, prompts, take, prompt_of_slot, shards):
  # A plain gather (across shards): the Transformer's insert gathers within them.
  del shards
  fresh = jnp.zeros_like(slots).at[:, :prompts.shape[1]].set(prompts[prompt_of_slot])
  return jnp.where(take[:, None], fresh, slots)


FIELDS = ("tokens", "lengths", "logprobs", "eos_token", "eos_logprob", "finished", "truncated",
          "self_reward_logprob", "group_ids", "prompt_tokens", "prompt_mask")


def assert_same_rows(a, b, fields=FIELDS):
  for f in fields:
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


TOY_PROMPTS = [[1, 2, 3], [5], [7, 7, 9, 2, 11, 3, 4, 1, 6, 6, 8, 12, 13, 2, 2, 5, 1], [4, 2], [9, 9, 9]]


@pytest.mark.parametrize("n,slots,temperature", [
    (3, 4, 1.0),
    pytest.param(1, 2, 1.0, marks=pytest.mark.slow), pytest.param(2, 3, 0.7, marks=pytest.mark.slow),
    pytest.param(4, 16, 1.3, marks=pytest.mark.slow), pytest.param(2, 24, 1.0, marks=pytest.mark.slow)])
def test_continuous_equals_static_exactly_on_a_history_model(n, slots, temperature):
  table = jnp.asarray(np.random.default_rng(7).normal(size=(V, V)).astype(np.float32))
  sampler = Sampler(history_decode, history_cache, insert_fn=history_insert)
  sp = SamplingParams(n=n, temperature=temperature, max_new_tokens=9, eos_ids=(3, 11), pad_id=0,
                      self_reward_token_id=5, decode_segments=3, min_segment_tokens=1)
  static = sampler(table, TOY_PROMPTS, sp, jax.random.key(n))
  cont = sampler(table, TOY_PROMPTS, dataclasses.replace(sp, decode_slots=slots), jax.random.key(n))
  # The case is not degenerate: rows end at different steps, some truncated, some right away.
  assert static.finished.any() and static.truncated.any()
  assert len(set(static.lengths[static.finished].tolist())) >= 2
  assert_same_rows(static, cont)


@pytest.mark.slow
def test_continuous_edge_rows():
  """Rows that need no decode step (max_new_tokens = 1, or no score to read) and rows whose first
  token is EOS: the same as static."""
  table = jnp.asarray(np.random.default_rng(3).normal(size=(V, V)).astype(np.float32))
  sampler = Sampler(history_decode, history_cache, insert_fn=history_insert)
  for sp in (SamplingParams(n=3, max_new_tokens=1, eos_ids=(3,), self_reward_token_id=5),
             SamplingParams(n=3, max_new_tokens=4, eos_ids=tuple(range(2, 10)), self_reward_token_id=None),
             SamplingParams(n=3, max_new_tokens=4, eos_ids=tuple(range(2, 10)), self_reward_token_id=5)):
    static = sampler(table, TOY_PROMPTS, sp, jax.random.key(1))
    assert_same_rows(static, sampler(table, TOY_PROMPTS, dataclasses.replace(sp, decode_slots=2), jax.random.key(1)))


@pytest.mark.slow
def test_slots_run_the_sum_of_lengths():
  """The decode loop runs about sum(lengths) / slots steps, not the longest row's count: here a
  table whose rows all end at once except those that never draw EOS."""
  table = jnp.asarray(np.random.default_rng(7).normal(size=(V, V)).astype(np.float32))
  sampler = Sampler(history_decode, history_cache, insert_fn=history_insert)
  sp = SamplingParams(n=8, max_new_tokens=9, eos_ids=(3, 11), self_reward_token_id=5, decode_slots=4)
  prompt_tokens, prompt_mask = sampler_lib.left_pad(TOY_PROMPTS, 32, 0)
  rows = len(TOY_PROMPTS) * 8
  state = sampler.continuous_prefill(table, prompt_tokens, prompt_mask, np.arange(rows, dtype=np.int32), jax.random.key(0),
                                     sampling=sp)
  state = sampler.continuous_decode(table, state, sampling=sp, prompt_len=32)
  out = sampler(table, TOY_PROMPTS, sp, jax.random.key(0))
  # Each row takes a slot for (its decode steps) = tokens after the first, + 1 to read a score.
  busy = np.maximum(out.response_lengths - 1, 0) + (out.finished & (out.response_lengths < 10))
  assert int(state.steps) >= -(-busy.sum() // 4) and int(state.steps) <= busy.sum() // 4 + 9
  assert int(state.steps) < out.response_lengths.max() * rows // 4  # what static would pay


def test_bad_slot_counts():
  sampler = Sampler(history_decode, history_cache)
  with pytest.raises(ValueError, match="insert_fn"):
    sampler(jnp.zeros((V, V)), [[1]], SamplingParams(decode_slots=2), jax.random.key(0))
  with pytest.raises(ValueError, match=r"decode_slots must be >= 0 \(0 = static\), got -1"):
    SamplingParams(decode_slots=-1)


def test_slot_count_is_validated_against_the_mesh():
  from laser_jax import config_check, default_config
  c = default_config.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  c.micro_batch_size = 4
  c.rollout.decode_slots = 6
  with pytest.raises(config_check.ConfigError, match=r"rollout.decode_slots: expected 0 \(static\) or a multiple "
                     r"of the sampler's data-parallel size 4, got 6"):
    config_check.validate(c, num_devices=8)
  c.rollout.decode_slots = 8
  config_check.validate(c, num_devices=8)


@pytest.mark.slow
def test_continuous_on_the_transformer():
  """Several slot counts on the tiny Transformer: every field of every row the same bit for bit
  (the decode step is one program for both samplers; attention adds exact zeros for the chunks
  the static step does not read)."""
  sp = SamplingParams(n=3, temperature=0.8, top_p=0.95, top_k=60, max_new_tokens=10,
                      eos_ids=tuple(range(10, 24)), pad_id=0, self_reward_token_id=Z_C,
                      decode_segments=3, min_segment_tokens=1)
  static = sampler_lib.sample(tiny_params(), TINY, PROMPTS, sp, jax.random.key(5))
  assert static.truncated.any() and len(set(static.lengths[static.finished].tolist())) >= 2
  for slots in (4, 7):
    cont = sampler_lib.sample(tiny_params(), TINY, PROMPTS, dataclasses.replace(sp, decode_slots=slots),
                              jax.random.key(5))
    assert_same_rows(static, cont)


@pytest.mark.slow
def test_sharded_continuous_equals_static():
  """On a (data 2, fsdp 2, tensor 2) mesh: 4 slots, one per data shard pair, rows refilled across
  shards; the same rows as the unsharded static sampler."""
  from laser_jax.models import sharding as sharding_lib
  table = jnp.asarray(np.random.default_rng(7).normal(size=(V, V)).astype(np.float32))
  sp = SamplingParams(n=2, max_new_tokens=7, eos_ids=(3, 11), self_reward_token_id=5, decode_segments=2,
                      min_segment_tokens=1)
  static = Sampler(history_decode, history_cache, insert_fn=history_insert)(table, TOY_PROMPTS, sp, jax.random.key(2))
  mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = Sampler(history_decode, history_cache, insert_fn=history_insert, mesh=mesh)
  assert_same_rows(static, sharded(table, TOY_PROMPTS, dataclasses.replace(sp, decode_slots=4), jax.random.key(2)))
  with pytest.raises(ValueError, match=r"decode_slots=6 does not divide over the mesh's batch axes"):
    sharded(table, TOY_PROMPTS, dataclasses.replace(sp, decode_slots=6), jax.random.key(2))


def test_take_in_shards_gathers_within_each_shard():
  """The refill's gather (each slot takes a prompt of its own data shard's block): x[index], and
  compiled on a mesh it moves nothing between devices, where a plain gather all-gathers x."""
  from jax.sharding import NamedSharding, PartitionSpec
  from laser_jax.generate import continuous
  from laser_jax.models import sharding as sharding_lib
  x = jnp.arange(8 * 3 * 5, dtype=jnp.float32).reshape(8, 3, 5)
  index = jnp.array([1, 0, 3, 3, 4, 5, 7, 6], jnp.int32)  # 4 shards: rows 2b, 2b + 1 are block b's
  np.testing.assert_array_equal(continuous.take_in_shards(x, index, 4), x[index])
  np.testing.assert_array_equal(continuous.take_in_shards(x, index[::2], 4), x[index[::2]])  # 1 slot per shard
  mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
  batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  x, index = jax.device_put(x, batch), jax.device_put(index, batch)
  local = jax.jit(lambda x, i: continuous.take_in_shards(x, i, 4), out_shardings=batch)
  plain = jax.jit(lambda x, i: x[i], out_shardings=batch)
  np.testing.assert_array_equal(local(x, index), plain(x, index))
  collectives = ("all-gather", "all-to-all", "collective-permute", "all-reduce")
  assert not any(c in local.lower(x, index).compile().as_text() for c in collectives)
  assert any(c in plain.lower(x, index).compile().as_text() for c in collectives)


@pytest.mark.slow
def test_sharded_continuous_on_the_transformer():
  """On a (data 2, fsdp 2, tensor 2) mesh, 4 slots (one per data shard): each shard refills its
  slots from its own rows and prompt cache; every field of every row equals the static sampler's."""
  from laser_jax.models import sharding as sharding_lib
  mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
  shardings = jax.tree.map(lambda s: s.sharding, sharding_lib.abstract_params(TINY, mesh))
  params = jax.device_put(tiny_params(), shardings)
  sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, eos_ids=tuple(range(10, 24)), pad_id=0,
                      self_reward_token_id=Z_C, decode_segments=2, min_segment_tokens=1)
  static = sampler_lib.sample(params, TINY, PROMPTS, sp, jax.random.key(5), mesh=mesh)
  assert len(set(static.lengths.tolist())) >= 3
  cont = sampler_lib.sample(params, TINY, PROMPTS, dataclasses.replace(sp, decode_slots=4), jax.random.key(5),
                            mesh=mesh)
  assert_same_rows(static, cont)
