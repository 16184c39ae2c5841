"""Mesh construction, partition specs, and sharded (8 fake devices) == single-device numerics."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from laser_jax.models import model, sharding
from laser_jax.models.config import ModelConfig

TINY = {
    "qwen2": ModelConfig("qwen2", vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=True),
    "llama": ModelConfig("llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=500000.0,
                               rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                             ("original_max_position_embeddings", 64), ("rope_type", "llama3"))),
    "qwen3": ModelConfig("qwen3", vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True),
}


def random_params(cfg, seed=0):
  """Flax init, then vectors (norm scales, biases) perturbed so they are not trivially ones/zeros."""
  params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(seed))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) if x.ndim == 1 else x
             for x, k in zip(leaves, keys)])


def left_padded_batch(batch=8, length=10, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 384, (batch, length)).astype(np.int32)
  lengths = rng.integers(1, length + 1, batch)
  mask = np.arange(length)[None, :] >= (length - lengths)[:, None]
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  return tokens, positions, mask


def test_make_mesh_sizes_and_rest():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh(data=2, fsdp=-1, tensor=1).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert dict(sharding.make_mesh(fsdp=1, tensor=-1, devices=jax.devices()[:2]).shape) == {"data": 1, "fsdp": 1,
                                                                                   "tensor": 2}


@pytest.mark.parametrize("kwargs, needle", [
    (dict(data=3, fsdp=1, tensor=1), "does not match the 8"),
    (dict(data=3, fsdp=-1, tensor=1), "not divisible"),
    (dict(data=-1, fsdp=-1), "at most one"),
    (dict(data=0), "positive"),
])
def test_make_mesh_errors_are_one_line(kwargs, needle):
  with pytest.raises(ValueError, match=needle) as e:
    sharding.make_mesh(**kwargs)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_weight_has_a_spec(family):
  cfg = TINY[family]
  shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  specs = sharding.param_partition_specs(shapes, cfg)
  flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  assert len(flat) == len(jax.tree_util.tree_leaves(shapes))
  by_name = {"/".join(str(k.key) for k in path): spec for path, spec in flat}
  assert by_name["embed/embedding"] == P("tensor", "fsdp")
  assert by_name["layers_1/attn/q_proj/kernel"] == P("fsdp", "tensor")
  assert by_name["layers_1/attn/o_proj/kernel"] == P("tensor", "fsdp")
  assert by_name["layers_0/mlp/down_proj/kernel"] == P("tensor", "fsdp")
  assert by_name["final_norm/scale"] == P()
  jax.tree_util.tree_map(lambda x, spec: len(spec) <= x.ndim or pytest.fail(f"{spec} vs {x.shape}"),
                         shapes, specs)
  with pytest.raises(ValueError, match="no partition spec for parameter extra/thing"):
    sharding.param_partition_specs({"extra": {"thing": jnp.zeros(3)}}, cfg)


def test_fit_spec_drops_axes_that_do_not_divide():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  assert sharding.fit_spec(P("tensor", "fsdp"), (6, 8), mesh) == P("tensor", "fsdp")
  assert sharding.fit_spec(P("tensor", "fsdp"), (7, 8), mesh) == P(None, "fsdp")
  assert sharding.fit_spec(P(("data", "fsdp"), None), (6, 3), mesh) == P()
  assert sharding.fit_spec(P(("data", "fsdp")), (8, 3), mesh) == P(("data", "fsdp"))


def test_shard_params_places_every_leaf():
  cfg = TINY["qwen2"]
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  params = sharding.shard_params(random_params(cfg), cfg, mesh)
  kernel = params["layers_0"]["mlp"]["up_proj"]["kernel"]  # [64, 128] over fsdp x tensor
  assert kernel.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
  assert kernel.addressable_shards[0].data.shape == (32, 64)
  assert params["layers_0"]["attn"]["q_proj"]["bias"].sharding.spec == P("tensor")
  assert params["final_norm"]["scale"].sharding.spec == P()


@pytest.mark.parametrize("family", sorted(TINY))
def test_sharded_forward_equals_single_device(family):
  """data=2 fsdp=2 tensor=2 with params and batch sharded gives the 1-device logits (f32, 1e-5)."""
  cfg = TINY[family]
  params = random_params(cfg)
  tokens, positions, mask = left_padded_batch()
  single = jax.jit(model.forward, static_argnums=1)(params, cfg, tokens, positions, mask)

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  p_shard = sharding.param_shardings(params, cfg, mesh)
  b2 = sharding.batch_sharding(mesh, 2)
  fwd = jax.jit(lambda p, t, pos, m: model.forward(p, cfg, t, pos, m),
                in_shardings=(p_shard, b2, b2, b2), out_shardings=sharding.batch_sharding(mesh, 3))
  sharded_params = sharding.shard_params(params, cfg, mesh)
  out = fwd(sharded_params, *(jax.device_put(x, b2) for x in (tokens, positions, mask)))
  assert out.sharding.spec == P(("data", "fsdp"), None, None)
  assert np.asarray(single).std() > 0.3, np.asarray(single).std()  # logits vary: a meaningful check
  np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-5, rtol=0)


def test_activation_constraints_under_set_mesh():
  """Under `jax.set_mesh` the model pins activations (batch over data+fsdp, vocab over tensor) and
  still gives the 1-device logits; a batch that does not divide the mesh falls back to replication."""
  cfg = TINY["qwen2"]
  params = random_params(cfg)
  tokens, positions, mask = left_padded_batch()
  single = np.asarray(jax.jit(model.forward, static_argnums=1)(params, cfg, tokens, positions, mask))
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  fwd = jax.jit(lambda p, t, pos, m: model.forward(p, cfg, t, pos, m))
  with jax.set_mesh(mesh):
    out = fwd(sharding.shard_params(params, cfg, mesh), tokens, positions, mask)
    odd = fwd(params, tokens[:3], positions[:3], mask[:3])
  assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(odd), single[:3], atol=1e-5, rtol=0)


def test_sharded_gradients_equal_single_device():
  cfg = TINY["llama"]
  params = random_params(cfg)
  tokens, positions, mask = left_padded_batch(seed=3)

  def loss(p, t, pos, m):
    logp = jax.nn.log_softmax(model.forward(p, cfg, t, pos, m))
    return -jnp.sum(jnp.take_along_axis(logp[:, :-1], t[:, 1:, None], -1)[..., 0] * m[:, 1:]) / m.sum()

  single = jax.jit(jax.grad(loss))(params, tokens, positions, mask)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  p_shard = sharding.param_shardings(params, cfg, mesh)
  b2 = sharding.batch_sharding(mesh, 2)
  grads = jax.jit(jax.grad(loss), in_shardings=(p_shard, b2, b2, b2), out_shardings=p_shard)(
      sharding.shard_params(params, cfg, mesh), tokens, positions, mask)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, single)


def test_splash_attention_sharded_gradients_equal_single_device_xla():
  """attention="splash" (Pallas interpreter) under a data=2 fsdp=2 tensor=2 mesh, where the kernel
  runs per shard in a shard_map, gives the single-device [T, T] attention's loss and gradients."""
  cfg = TINY["qwen2"]
  params = random_params(cfg)
  tokens, positions, mask = left_padded_batch(seed=4)

  def loss(p, cfg, t, pos, m):  # predictions made at valid positions only (a pad row's output is unspecified)
    logp = jax.nn.log_softmax(model.forward(p, cfg, t, pos, m))
    both = m[:, :-1] & m[:, 1:]
    return -jnp.sum(jnp.take_along_axis(logp[:, :-1], t[:, 1:, None], -1)[..., 0] * both) / both.sum()

  single = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg, tokens, positions, mask)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  splash_cfg = cfg.replace(attention="splash", interpret_kernels=True, scan_layers=True, remat=True)
  with jax.set_mesh(mesh):
    sharded = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
        sharding.shard_params(params, cfg, mesh), splash_cfg, tokens, positions, mask)
  np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), sharded[1], single[1])


def test_sharded_cached_decode_equals_single_device():
  cfg = TINY["qwen3"]
  params = random_params(cfg)
  tokens, positions, mask = left_padded_batch(seed=2)
  batch, length = tokens.shape
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  p_shard = sharding.param_shardings(params, cfg, mesh)
  c_shard = sharding.cache_shardings(cfg, mesh, batch, length)
  assert all(s.spec == P(("data", "fsdp"), "tensor") for s in jax.tree_util.tree_leaves((c_shard.k, c_shard.v)))
  b2 = sharding.batch_sharding(mesh, 2)
  step_sharded = jax.jit(lambda p, t, pos, m, c, i: model.forward_cached(p, cfg, t, pos, m, c, i),
                         in_shardings=(p_shard, b2, b2, b2, c_shard, None),
                         out_shardings=(sharding.batch_sharding(mesh, 3), c_shard), donate_argnums=4)
  step_single = jax.jit(lambda p, t, pos, m, c, i: model.forward_cached(p, cfg, t, pos, m, c, i))
  results = []
  with jax.set_mesh(mesh):  # also exercises the model's activation constraints on the cached path
    sharded_params = sharding.shard_params(params, cfg, mesh)
  for step, p in ((step_single, params), (step_sharded, sharded_params)):
    cache = model.init_cache(cfg, batch, length)
    if step is step_sharded:
      cache = jax.device_put(cache, c_shard)
    with jax.set_mesh(mesh) if step is step_sharded else contextlib.nullcontext():
      logits, cache = step(p, tokens[:, :6], positions[:, :6], mask[:, :6], cache, jnp.int32(0))
      outs = [logits]
      for s in range(6, length):
        logits, cache = step(p, tokens[:, s:s + 1], positions[:, s:s + 1], mask[:, s:s + 1], cache,
                             jnp.int32(s))
        outs.append(logits)
    results.append(np.concatenate([np.asarray(o) for o in outs], axis=1))
  np.testing.assert_allclose(results[1], results[0], atol=1e-5, rtol=0)
