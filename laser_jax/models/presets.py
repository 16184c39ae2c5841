"""Shapes of the real models LaSeR trains, with their published parameter counts.

The shapes are those of the models' published `config.json` files; `PUBLISHED_PARAMS` are the
parameter counts the model cards / safetensors metadata report. Use a preset to size meshes and
memory before any checkpoint is downloaded; real runs load the config from the checkpoint itself.
"""
from __future__ import annotations

from laser_jax.models.config import ModelConfig

_LLAMA3_SCALING = (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                   ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))


def _qwen2(hidden, intermediate, layers, heads, kv_heads, tied, max_pos=32768, vocab=151936):
  return ModelConfig(family="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
                     rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, qkv_bias=True,
                     max_position_embeddings=max_pos)


def _llama32(hidden, layers, heads, head_dim):
  return ModelConfig(family="llama", vocab_size=128256, hidden_size=hidden, intermediate_size=8192,
                     num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=head_dim, rope_theta=500000.0,
                     rope_scaling=_LLAMA3_SCALING, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     max_position_embeddings=131072)


PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": _qwen2(896, 4864, 24, 14, 2, tied=True),
    "qwen2.5-1.5b": _qwen2(1536, 8960, 28, 12, 2, tied=True),
    "qwen2.5-7b": _qwen2(3584, 18944, 28, 28, 4, tied=False, max_pos=131072, vocab=152064),
    "llama-3.2-1b": _llama32(2048, 16, 32, 64),
    "llama-3.2-3b": _llama32(3072, 28, 24, 128),
    "qwen3-0.6b": ModelConfig(family="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                              num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
                              rms_norm_eps=1e-6, tie_word_embeddings=True, qk_norm=True,
                              max_position_embeddings=40960),
}
# Fine-tunes with the same shapes.
ALIASES = {
    "open-reasoner-zero-7b": "qwen2.5-7b",  # ORZ-7B is trained from Qwen2.5-7B
    "octothinker-3b": "llama-3.2-3b",  # OctoThinker-3B is mid-trained from Llama-3.2-3B
}

PUBLISHED_PARAMS = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "qwen3-0.6b": 596_049_920,
}


def num_params(cfg: ModelConfig) -> int:
  """Analytic parameter count of `cfg` (tied embeddings counted once); allocates nothing."""
  return cfg.num_params()


def get_preset(name: str, **overrides) -> ModelConfig:
  """The preset called `name` (case-insensitive; aliases accepted), with optional field overrides
  such as dtype="bfloat16" or remat=True."""
  key = name.lower()
  key = ALIASES.get(key, key)
  if key not in PRESETS:
    known = ", ".join(sorted(PRESETS) + sorted(ALIASES))
    raise ValueError(f"unknown model preset {name!r}; known presets: {known}")
  return PRESETS[key].replace(**overrides)
