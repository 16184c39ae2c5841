"""`ModelConfig`: the architecture and numerics of a decoder (Qwen2 / Qwen2.5, Llama 3.x, Qwen3),
and the numerics "auto" means on a device (`resolve_dtype`, `resolve_attention`: float32 + chunked
attention on a T4 or CPU, bfloat16 + cuDNN flash attention on sm80+ GPUs, bfloat16 + splash on TPU).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

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
  # (GPU, bf16/fp16 compute). `resolve_attention` picks one for a platform. With "splash" the
  # continuous sampler's decode step also runs a Pallas kernel (`ragged_attention`: each slot reads
  # its own cache prefix); with the others it reads every slot's cache up to the deepest slot's chunk.
  attention: str = "xla"
  attention_block: int = 512
  # Run the Pallas kernels ("splash", the ragged decode) in the interpreter: any backend, slow; for tests on CPU.
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
