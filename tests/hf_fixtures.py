"""Tiny random Hugging Face checkpoints for tests (no hub access needed).

`make_tiny_hf_checkpoint(path, family)` writes a complete HF directory -- config.json,
model.safetensors and tokenizer files -- for a 2-layer, hidden-64 model of the given family, with
weights drawn large enough that logits differ meaningfully between tokens. The tokenizer is a
byte-level BPE trained with `tokenizers` on a few hundred short math strings, so any text encodes.

Special tokens (ids are fixed, in this order): <|endoftext|> = 0 (eos and pad), <|im_start|> = 1,
<|im_end|> = 2, <|vision_start|> = 3 (a token that never appears in normal text, usable as z_c).
"""
from __future__ import annotations

import functools
import os

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>")
EOS_ID, IM_START_ID, IM_END_ID, ZC_ID = 0, 1, 2, 3
PAD_ID = EOS_ID
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FAMILIES = ("qwen2", "llama", "qwen3")


def _corpus() -> list[str]:
  lines = []
  for a in range(20):
    for b in range(0, 20, 3):
      lines.append(f"What is {a} + {b}? The answer is \\boxed{{{a + b}}}.")
      lines.append(f"Compute {a} * {b}. We multiply to get {a * b}, so the answer is \\boxed{{{a * b}}}.")
  lines += ["Let x be a real number such that x^2 = 4. Then x = 2 or x = -2.",
            "Please reason step by step, and put your final answer within \\boxed{}."]
  return lines


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json(vocab_size: int) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(_corpus(), trainer=trainer)
  return tok.to_str()


def make_tiny_tokenizer(path: str, vocab_size: int = 320):
  """Trains (cached) and saves a PreTrainedTokenizerFast into `path`; returns the tokenizer."""
  from tokenizers import Tokenizer
  from transformers import PreTrainedTokenizerFast
  tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
                                eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                additional_special_tokens=list(SPECIAL_TOKENS[1:]))
  tok.chat_template = CHAT_TEMPLATE
  os.makedirs(path, exist_ok=True)
  tok.save_pretrained(path)
  return tok


def tiny_hf_config(family: str = "qwen2", vocab_size: int = 384, tie_word_embeddings: bool | None = None,
                   num_layers: int = 2, hidden_size: int = 64):
  """The transformers config of a tiny model (4 heads, 2 kv heads, head_dim 16)."""
  import transformers
  common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=EOS_ID,
                pad_token_id=PAD_ID)
  if family == "qwen2":
    return transformers.Qwen2Config(**common, rope_theta=10000.0,
                                    tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings)
  if family == "llama":
    # Short original context so that every branch of llama3 scaling (kept / smoothed / scaled
    # frequencies) matters at test sequence lengths.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    return transformers.LlamaConfig(**common, rope_theta=500000.0, rope_scaling=scaling,
                                    tie_word_embeddings=bool(tie_word_embeddings))
  if family == "qwen3":
    return transformers.Qwen3Config(**common, head_dim=hidden_size // 4, rope_theta=1000000.0,
                                    tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings)
  raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")


def make_tiny_hf_model(family: str = "qwen2", vocab_size: int = 384, seed: int = 0, **config_kwargs):
  """A random torch model (float32, eval mode) with non-trivial weights, including norms and biases."""
  import torch
  import transformers
  config = tiny_hf_config(family, vocab_size, **config_kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.2 * noise)
      else:
        p.copy_(noise / p.shape[-1] ** 0.5 * (2.0 if "embed" in name or "lm_head" in name else 1.0))
  return model


def make_tiny_hf_checkpoint(path: str, family: str = "qwen2", vocab_size: int = 384, seed: int = 0,
                            **config_kwargs) -> str:
  """Writes config.json, model.safetensors and tokenizer files of a tiny random model to `path`."""
  model = make_tiny_hf_model(family, vocab_size, seed, **config_kwargs)
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path)
  make_tiny_tokenizer(path)
  return str(path)
