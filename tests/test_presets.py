"""Preset shapes against the published parameter counts and against transformers (meta device)."""
import pytest
import torch
import transformers

from laser_jax.models import hf, presets

PUBLISHED = {  # from the model cards / safetensors metadata, written out here independently
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_param_count_matches_transformers(name):
  """Count the parameters of the transformers model built from the preset's HF config on the meta
  device (no memory), independently of our analytic formula."""
  cfg = presets.get_preset(name)
  hf_config = hf.hf_config_for(cfg)
  with torch.device("meta"):
    torch_model = transformers.AutoModelForCausalLM.from_config(hf_config)
  counted = sum(p.numel() for p in torch_model.parameters())
  assert presets.num_params(cfg) == counted == presets.PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_counts(name):
  assert presets.num_params(presets.get_preset(name)) == PUBLISHED[name]


def test_get_preset_aliases_overrides_and_errors():
  assert presets.get_preset("OctoThinker-3B") == presets.get_preset("llama-3.2-3b")
  assert presets.get_preset("open-reasoner-zero-7b").hidden_size == 3584
  cfg = presets.get_preset("qwen2.5-7b", dtype="bfloat16", remat=True)
  assert (cfg.dtype, cfg.remat, cfg.tie_word_embeddings) == ("bfloat16", True, False)
  with pytest.raises(ValueError, match="unknown model preset 'gpt-4'; known presets: .*qwen2.5-0.5b") as e:
    presets.get_preset("gpt-4")
  assert "\n" not in str(e.value)
