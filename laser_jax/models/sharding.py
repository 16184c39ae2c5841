"""Device mesh and partition specs for the decoder's weights, activations and KV cache.

Mesh axes:
  data   - pure data parallelism (weights replicated),
  fsdp   - data parallelism with weights sharded (ZeRO-3 style; gathered per layer by XLA),
  tensor - Megatron-style tensor parallelism over heads / MLP features / vocabulary.
The batch dimension of activations is sharded over ("data", "fsdp").

Specs are written for the full mesh; `param_shardings` drops any mesh axis that does not divide
the corresponding dimension (e.g. a tiny vocab on a large tensor axis) so every spec is placeable.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from laser_jax.models import attention
from laser_jax.models import model as model_lib
from laser_jax.models.config import ModelConfig
from laser_jax.models.model import KVCache, cache_shapes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = attention.BATCH  # mesh axes of the batch dimension


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all, ordered by process, then id,
  so that each host's devices hold one block of the batch rows: see laser_jax.models.hosts). One size
  may be -1 = the rest."""
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  devices = list(devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"make_mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"make_mesh: axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"make_mesh: {len(devices)} devices are not divisible by data*fsdp*tensor={known} "
                       f"(data={data} fsdp={fsdp} tensor={tensor})")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"make_mesh: data*fsdp*tensor={math.prod(sizes)} (data={sizes[0]} fsdp={sizes[1]} "
                     f"tensor={sizes[2]}) does not match the {len(devices)} available devices")
  return Mesh(np.array(devices).reshape(sizes), MESH_AXES)


# Spec of each weight by the last two names of its path (module name, parameter name).
_WEIGHT_SPECS = {
    ("embed", "embedding"): P("tensor", "fsdp"),  # [V, H]
    ("lm_head", "kernel"): P("fsdp", "tensor"),  # [H, V]
    ("q_proj", "kernel"): P("fsdp", "tensor"),  # [H, heads*D]: column parallel over heads
    ("k_proj", "kernel"): P("fsdp", "tensor"),
    ("v_proj", "kernel"): P("fsdp", "tensor"),
    ("q_proj", "bias"): P("tensor"),
    ("k_proj", "bias"): P("tensor"),
    ("v_proj", "bias"): P("tensor"),
    ("o_proj", "kernel"): P("tensor", "fsdp"),  # [heads*D, H]: row parallel
    ("gate_proj", "kernel"): P("fsdp", "tensor"),  # [H, I]
    ("up_proj", "kernel"): P("fsdp", "tensor"),
    ("down_proj", "kernel"): P("tensor", "fsdp"),  # [I, H]
}
_REPLICATED_MODULES = ("input_norm", "post_attn_norm", "final_norm", "q_norm", "k_norm")


def weight_spec(path: tuple[str, ...]) -> P:
  """Partition spec of one weight given its path in the params tree, e.g. ("layers_3", "mlp", "up_proj", "kernel")."""
  key = tuple(path[-2:])
  if key in _WEIGHT_SPECS:
    return _WEIGHT_SPECS[key]
  if len(path) >= 2 and path[-2] in _REPLICATED_MODULES:
    return P()
  raise ValueError(f"no partition spec for parameter {'/'.join(path)}")


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_partition_specs(params, cfg: ModelConfig):
  """Pytree of PartitionSpec matching `params` (arrays or ShapeDtypeStructs)."""
  del cfg  # the layout is the same for every family; kept for API symmetry
  return jax.tree_util.tree_map_with_path(lambda path, _: weight_spec(_path_names(path)), params)


def fit_spec(spec: P, shape, mesh: Mesh) -> P:
  """Drops mesh axes that do not evenly divide their dimension (replicating that dimension instead)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if names and dim % size == 0 else None)
  while fitted and fitted[-1] is None:
    fitted.pop()
  return P(*fitted)


def param_shardings(params, cfg: ModelConfig, mesh: Mesh):
  """Pytree of NamedSharding for `params` on `mesh`."""
  specs = param_partition_specs(params, cfg)
  return jax.tree_util.tree_map(lambda x, s: NamedSharding(mesh, fit_spec(s, x.shape, mesh)), params, specs)


def abstract_params(cfg: ModelConfig, mesh: Mesh):
  """ShapeDtypeStructs of the model's parameters with their shardings on `mesh` (a restore
  target); allocates nothing."""
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, param_shardings(shapes, cfg, mesh))


def cache_partition_spec(cfg: ModelConfig, num_chunks: int = 1) -> KVCache:
  """KV cache specs: batch over BATCH_AXES, kv heads over "tensor" (per layer and chunk,
  [B, K, D, S_c] keys and [B, K, S_c, D] values, see `model.KVCache`)."""
  kv = ((P(BATCH_AXES, "tensor", None, None),) * num_chunks,) * cfg.num_layers
  return KVCache(k=kv, v=kv, mask=P(BATCH_AXES, None))


def cache_shardings(cfg: ModelConfig, mesh: Mesh, batch: int, max_len: int, chunk_lengths=None) -> KVCache:
  """NamedShardings for a cache of the given size and chunks (axes that do not divide are dropped)."""
  chunk_lengths = (max_len,) if chunk_lengths is None else tuple(chunk_lengths)
  specs = cache_partition_spec(cfg, len(chunk_lengths))
  def layer(chunk_specs, which):
    return tuple(NamedSharding(mesh, fit_spec(s, cache_shapes(cfg, batch, n)[which], mesh))
                 for s, n in zip(chunk_specs, chunk_lengths))
  return KVCache(k=tuple(layer(s, 0) for s in specs.k), v=tuple(layer(s, 1) for s in specs.v),
                 mask=NamedSharding(mesh, fit_spec(specs.mask, (batch, max_len), mesh)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension over BATCH_AXES, the other ndim - 1 dimensions replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_params(params, cfg: ModelConfig, mesh: Mesh):
  """device_put every weight onto its NamedSharding."""
  return jax.device_put(params, param_shardings(params, cfg, mesh))
