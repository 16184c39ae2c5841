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
Kernels are stored [in, out] (the transpose of torch's nn.Linear weight).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Any

FAMILIES = ("qwen2", "llama", "qwen3")
ATTENTION_IMPLS = ("xla", "chunked", "splash", "cudnn")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# The ModelConfig fields that set numerics and memory, not the architecture (and not the
# parameters' values): `config.model` sets them on top of any shape (tasks.model_settings).
NUMERICS_FIELDS = ("dtype", "param_dtype", "remat", "attention", "attention_block", "interpret_kernels",
                   "scan_layers")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture + numerics of a decoder. Frozen and hashable so it can be a static jit argument."""
  family: str  # "qwen2" | "llama" | "qwen3"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  # Llama-3 rope scaling as a sorted tuple of (key, value) pairs, e.g.
  # (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
  #  ("original_max_position_embeddings", 8192), ("rope_type", "llama3")).
  rope_scaling: tuple | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2: True
  qk_norm: bool = False  # Qwen3: True
  max_position_embeddings: int = 32768
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: bool = False  # per-layer rematerialisation in the full forward
  # Attention of the full forward (training, log-probs); all give the same values (`attend_causal`):
  # "xla" materialises the [T, T] scores; "chunked" computes them for `attention_block` queries at
  # a time, each block recomputed in the backward pass, so memory grows with attention_block * T;
  # "splash" is JAX's Pallas splash-attention kernel for TPU (blocks of attention_block, never
  # holds scores beyond a block); "cudnn" is jax.nn.dot_product_attention's cuDNN flash attention
  # (GPU, bf16/fp16 compute). `resolve_attention` picks one for a platform.
  attention: str = "xla"
  attention_block: int = 512
  # Run Pallas kernels ("splash") in the Pallas interpreter: any backend, slow; for tests on CPU.
  interpret_kernels: bool = False
  # Full forward as a lax.scan over the layers (weights stacked per call): one compiled layer
  # instead of num_layers, and with remat one layer's recomputation alive at a time.
  scan_layers: bool = False

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"ModelConfig.family={self.family!r}: expected one of {FAMILIES}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: expected one of {tuple(_DTYPES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention={self.attention!r}: expected one of {ATTENTION_IMPLS}")
    if self.attention_block < 1:
      raise ValueError(f"ModelConfig.attention_block must be >= 1, got {self.attention_block}")
    if self.attention == "cudnn" and self.dtype != "bfloat16":
      raise ValueError(f"ModelConfig.attention='cudnn' needs dtype='bfloat16' (cuDNN flash attention), "
                       f"got {self.dtype!r}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
    if self.rope_scaling is not None:
      scaling = dict(self.rope_scaling)
      if scaling.get("rope_type") != "llama3":
        raise ValueError(f"ModelConfig.rope_scaling: only rope_type 'llama3' is supported, got {scaling}")

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)

  def num_params(self) -> int:
    """Analytic parameter count (no allocation); equals the HF model's parameter count."""
    h, d = self.hidden_size, self.head_dim
    q, kv = self.num_heads * d, self.num_kv_heads * d
    attn = h * q + 2 * h * kv + q * h
    if self.qkv_bias:
      attn += q + 2 * kv
    if self.qk_norm:
      attn += 2 * d
    mlp = 3 * h * self.intermediate_size
    layer = attn + mlp + 2 * h
    head = 0 if self.tie_word_embeddings else h * self.vocab_size
    return self.vocab_size * h + self.num_layers * layer + h + head


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
# Activation sharding.

BATCH = ("data", "fsdp")  # mesh axes of the batch dimension (see laser_jax.sharding)


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


# ----------------------------------------------------------------------------------------------
# Pure math.

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


def causal_mask(query_positions: jax.Array, key_valid: jax.Array) -> jax.Array:
  """[B, Tq, S] bool: query at sequence index i sees the valid keys at indices <= i.
  query_positions [Tq] (sequence indices), key_valid [B, S]."""
  visible = jnp.arange(key_valid.shape[1])[None, :] <= query_positions[:, None]
  return visible[None] & key_valid[:, None, :]


# CUDA GPUs from compute capability 8.0 on (Ampere: A100, A10; Ada: L4; Hopper: H100) compute in
# bfloat16 on their tensor cores and run cuDNN's flash attention; older ones (T4: 7.5, V100: 7.0)
# have neither, so the "auto" numerics there are float32 with the chunked attention.
MIN_BF16_COMPUTE_CAPABILITY = (8, 0)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
  """What the "auto" numerics depend on: the platform and, for CUDA GPUs, the compute capability."""
  platform: str  # "tpu" | "gpu" | "cpu" | ...
  kind: str = ""  # jax's device_kind, e.g. "Tesla T4", "NVIDIA A100-SXM4-40GB", "TPU v4" (messages)
  compute_capability: tuple[int, int] | None = None  # CUDA GPUs: (major, minor); None = unknown

  @property
  def bf16(self) -> bool:
    """Whether bfloat16 compute is native: TPUs, and GPUs of compute capability >= 8.0 (a GPU
    without a CUDA capability, e.g. ROCm MI200+, is taken to have it); never the CPU."""
    if self.platform == "tpu":
      return True
    if self.platform == "gpu":
      return self.compute_capability is None or self.compute_capability >= MIN_BF16_COMPUTE_CAPABILITY
    return False


def device_info(device) -> DeviceInfo:
  """`DeviceInfo` of a jax Device (or any object with `platform`, `device_kind` and, on CUDA,
  `compute_capability` such as "7.5"), or of a bare platform name ("tpu", "cuda", "cpu", ...)."""
  if isinstance(device, DeviceInfo):
    return device
  if isinstance(device, str):
    platform, kind, capability = device, "", None
  else:
    platform, kind = device.platform, getattr(device, "device_kind", "")
    capability = _parse_capability(getattr(device, "compute_capability", None))
  return DeviceInfo("gpu" if platform in ("cuda", "rocm") else platform, kind, capability)


def _parse_capability(value) -> tuple[int, int] | None:
  try:
    major, minor = str(value).split(".")[:2]
    return int(major), int(minor)
  except ValueError:  # None, or not "major.minor" (ROCm's "gfx90a")
    return None


def resolve_dtype(name: str, device) -> str:
  """The compute dtype `name` ("auto", "float32" or "bfloat16") means on `device` (see
  `device_info`): "auto" is bfloat16 where it is native (TPU; GPU of compute capability >= 8.0:
  A100, L4, H100), float32 elsewhere (T4, V100, CPU)."""
  if name != "auto":
    return name
  return "bfloat16" if device_info(device).bf16 else "float32"


def resolve_attention(name: str, device, dtype: str) -> str:
  """The attention implementation `name` ("auto" or one of ATTENTION_IMPLS) means on `device` (a
  jax Device, a `DeviceInfo` or a platform name: "tpu", "gpu"/"cuda", "cpu", ...): "auto" is splash
  on TPU, cuDNN flash attention on a GPU with bf16 compute that runs it (compute capability >=
  8.0), else chunked. A kernel asked for on a device that cannot run it is a ValueError."""
  info = device_info(device)
  flash_gpu = info.platform == "gpu" and info.bf16
  if name == "auto":
    if info.platform == "tpu":
      return "splash"
    return "cudnn" if flash_gpu and dtype == "bfloat16" else "chunked"
  needs = {"splash": "tpu", "cudnn": "gpu"}.get(name)
  if needs and info.platform != needs:
    raise ValueError(f"attention {name!r} runs on {needs.upper()} only (this run's platform: "
                     f"{info.platform}); use 'auto' or 'chunked'")
  if name == "cudnn" and not flash_gpu:
    major, minor = info.compute_capability
    raise ValueError(f"attention 'cudnn' needs a GPU of compute capability >= 8.0 (this device: "
                     f"{info.kind or 'GPU'}, {major}.{minor}); use 'auto' or 'chunked'")
  return name


def attend_causal(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, impl: str = "xla",
                  block: int = 512, interpret: bool = False) -> jax.Array:
  """Causal self-attention of a full sequence over its valid keys: q [B,T,N,D], k/v [B,T,K,D],
  key_valid [B,T] bool -> [B,T,N,D]; equals `attend` with `causal_mask` on the valid query rows
  (a row's output at an invalid position is unspecified: nothing valid reads it).

  impl "xla" builds the [B, T, T] scores at once. impl "chunked" runs `attend` on `block` queries
  at a time (a lax.map; each block under jax.checkpoint, so the backward pass recomputes its
  scores instead of keeping them): the largest live buffer is [B, heads, block, T] scores.
  Every query row still normalises over all of its keys, so the values are the same.
  impl "splash" / "cudnn": `attend_splash` / `attend_cudnn`.
  """
  t = q.shape[1]
  if impl == "splash":
    return attend_splash(q, k, v, key_valid, block, interpret)
  if impl == "cudnn":
    return attend_cudnn(q, k, v, key_valid)
  if impl == "xla" or t <= block:
    return attend(q, k, v, causal_mask(jnp.arange(t), key_valid))
  num_blocks = -(-t // block)
  q_blocks = jnp.pad(q, ((0, 0), (0, num_blocks * block - t), (0, 0), (0, 0)))
  q_blocks = q_blocks.reshape(q.shape[0], num_blocks, block, *q.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def one_block(args):
    q_block, start = args
    return attend(q_block, k, v, causal_mask(start + jnp.arange(block), key_valid))

  out = jax.lax.map(one_block, (q_blocks, jnp.arange(num_blocks) * block))
  return out.swapaxes(0, 1).reshape(q.shape[0], num_blocks * block, *q.shape[2:])[:, :t]


def _per_shard(fn, q, k, v, key_valid):
  """Runs fn(q, k, v, key_valid) per shard under the laser_jax mesh (batch over BATCH, heads over
  "tensor" where they divide), since a Pallas / custom call cannot be partitioned by GSPMD; calls
  it directly without such a mesh. Query head h uses kv head h // (N // K) in every shard, because
  both head axes are split into the same number of contiguous pieces."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not {"data", "fsdp", "tensor"} <= set(mesh.axis_names):
    return fn(q, k, v, key_valid)
  batch = BATCH if q.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else None
  heads = "tensor" if k.shape[2] % mesh.shape["tensor"] == 0 else None
  qkv = jax.sharding.PartitionSpec(batch, None, heads, None)
  return jax.shard_map(fn, in_specs=(qkv, qkv, qkv, jax.sharding.PartitionSpec(batch, None)),
                       out_specs=qkv, check_vma=False)(q, k, v, key_valid)


def attend_splash(q, k, v, key_valid, block: int = 512, interpret: bool = False):
  """`attend_causal` through JAX's Pallas splash-attention kernel (TPU; any backend with
  interpret=True). Flash-style: scores exist one [block, block] tile at a time, forward and
  backward. Padding is a segment mask (valid tokens segment 1, pad 0), so valid queries see only
  valid keys; grouped-query heads run as the kernel's multi-query form, one call per kv head.
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


def attend_cudnn(q, k, v, key_valid, implementation: str | None = "cudnn"):
  """`attend_causal` through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).

  cuDNN's causal mask with per-row key lengths handles right padding only, so each row is first
  rolled left by its leading pads (RoPE is already applied, so a shift changes no score), attended
  with is_causal and key_value_seq_lengths, and rolled back. Needs each row's valid tokens to be
  one contiguous run, as every laser_jax batch is (left-padded prompt, right-padded response).
  implementation=None / "xla" runs the same wrapper through XLA (the CPU test of it)."""
  def run(q, k, v, key_valid):
    t = q.shape[1]
    lead = jnp.argmax(key_valid, axis=1).astype(jnp.int32)  # index of the first valid token
    index = (jnp.arange(t)[None, :] + lead[:, None]) % t
    roll = lambda x, i: jnp.take_along_axis(x, i[:, :, None, None], axis=1)
    out = jax.nn.dot_product_attention(
        roll(q, index), roll(k, index), roll(v, index), is_causal=True,
        key_value_seq_lengths=jnp.maximum(jnp.sum(key_valid, axis=1), 1).astype(jnp.int32),  # >= 1: finite
        implementation=implementation)
    return roll(out, (jnp.arange(t)[None, :] - lead[:, None]) % t)

  return _per_shard(run, q, k, v, key_valid)


def attend_cached(q: jax.Array, k_chunks: tuple, v_chunks: tuple, mask: jax.Array) -> jax.Array:
  """`attend` over cache chunks: q [B,T,N,D], k_chunks [B,K,D,S_c] (keys transposed), v_chunks
  [B,K,S_c,D], mask [B,T,sum(S_c)] -> [B,T,N,D].

  Both matmuls are batched (B, K) products in plain row-major form, (G*T, D) @ (D, S_c) and
  (G*T, S_c) @ (S_c, D), so XLA reads the cache buffers in place (with an einsum over a
  [B,S,K,D] cache XLA:CPU copied every layer's keys and values into a transposed layout on every
  decode step). Scores of all chunks share one softmax; the outputs of the chunks are summed.
  """
  b, t, n, d = q.shape
  kv_heads = k_chunks[0].shape[1]
  g = n // kv_heads  # query head h uses kv head h // g
  q = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
  batch_dims = ((0, 1), (0, 1))
  scores = [jax.lax.dot_general(q, k_t, (((3,), (2,)), batch_dims), preferred_element_type=jnp.float32)
            for k_t in k_chunks]
  scores = scores[0] if len(scores) == 1 else jnp.concatenate(scores, axis=-1)
  s = scores.shape[-1]
  scores = scores.reshape(b, kv_heads, g, t, s) / math.sqrt(d)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_chunks[0].dtype).reshape(b, kv_heads, g * t, s)
  out, start = None, 0
  for v in v_chunks:
    length = v.shape[2]
    part = jax.lax.dot_general(probs[..., start:start + length], v, (((3,), (2,)), batch_dims))  # [B,K,G*T,D]
    out, start = (part if out is None else out + part), start + length
  return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


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
  def __call__(self, x, rope, mask, kv_cache=None, write_offset=None):
    """x [B,T,H], rope = `rope_tables` at x's positions. Without a cache attends causally within
    x over its valid tokens (mask = key validity [B,T]). With kv_cache = (key chunks, value chunks), the chunks of this layer's cache
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
      out = attend_causal(q, k, v, mask, cfg.attention, cfg.attention_block, cfg.interpret_kernels)
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
  def __call__(self, x, rope, mask, kv_cache=None, write_offset=None):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype, name=name)
    attn_out, new_cache = Attention(cfg, name="attn")(norm("input_norm")(x), rope, mask,
                                                      kv_cache, write_offset)
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

  def __call__(self, tokens, positions, attention_mask):
    """Full sequence: causal attention restricted to real tokens. Returns normed hidden [B,T,H]."""
    key_valid = attention_mask.astype(bool)
    x = self.embed_tokens(tokens)
    rope = rope_tables(positions, rope_inv_freq(self.cfg))
    for layer in self.layers:
      x, _ = layer(x, rope, key_valid)
    return self.final_norm(x)

  def embed_tokens(self, tokens):
    return constrain(self.embed(tokens), BATCH, None, None)

  def finish(self, x):
    return self.final_norm(x)

  def cached(self, tokens, positions, token_mask, cache: KVCache, write_index, chunk: int):
    """Prefill / decode step into `cache` at slots [write_index, write_index + T), which lie in
    chunk `chunk` (static); attends over chunks 0..chunk."""
    t = tokens.shape[1]
    lengths = cache.chunk_lengths
    chunk_start, visible_len = sum(lengths[:chunk]), sum(lengths[:chunk + 1])
    cache_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, token_mask.astype(bool), write_index, axis=1)
    query_slot = write_index + jnp.arange(t)
    visible = jnp.arange(visible_len)[None, :] <= query_slot[:, None]  # [T, S_visible]
    mask = visible[None] & cache_mask[:, None, :visible_len]
    x = constrain(self.embed(tokens), BATCH, None, None)
    rope = rope_tables(positions, rope_inv_freq(self.cfg))
    keys, values = [], []
    for layer, k_chunks, v_chunks in zip(self.layers, cache.k, cache.v):
      x, (k_seen, v_seen) = layer(x, rope, mask, (k_chunks[:chunk + 1], v_chunks[:chunk + 1]),
                                  write_index - chunk_start)
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


def forward(params, cfg: ModelConfig, tokens, positions, attention_mask, *, return_hidden=False):
  """Full-sequence forward. tokens/positions int32 [B,T], attention_mask bool [B,T] (True = real).

  Returns float32 logits [B,T,V], or with return_hidden=True the final-normed hidden states [B,T,H]
  (compute dtype). Padding positions produce finite values that callers must ignore.
  """
  if cfg.scan_layers:
    hidden = _forward_scanned(params, cfg, tokens, positions, attention_mask)
  else:
    hidden = Decoder(cfg).apply({"params": params}, tokens, positions, attention_mask)
  return hidden if return_hidden else unembed(params, cfg, hidden)


def _forward_scanned(params, cfg: ModelConfig, tokens, positions, attention_mask):
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
    return layer.apply({"params": layer_params}, x, rope, key_valid)[0], None

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
  Returns (float32 logits [B,T,V], updated cache); with `last_logits_only`, logits [B,1,V] of the
  last position only (a sampler's prefill reads nothing else, and unembedding the whole prompt
  costs as much as many decode steps).

  With a chunked cache (`init_cache(..., chunk_lengths)`), `chunk` (static) names the chunk that
  holds slots [write_index, write_index + T): the step attends over chunks 0..chunk only. The
  caller guarantees the slots lie in that chunk (write_index is traced, so this is not checked).
  """
  num_chunks = len(cache.chunk_lengths)
  if chunk is None:
    if num_chunks > 1:
      raise ValueError(f"forward_cached: the cache has {num_chunks} chunks; pass chunk= (the chunk written)")
    chunk = 0
  if not 0 <= chunk < num_chunks:
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
