"""What the trainer trains on: model + tokenizer + prompts + reward, resolved from a config.

`build_task(config)` returns a `Task` for either the built-in synthetic arithmetic task (the
embedded default: a tiny random-init model with the task's own tokenizer and a supervised warm
start) or user files with a Hugging Face checkpoint (`data.task = "files"`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from laser_jax import data as data_lib
from laser_jax import model as model_lib
from laser_jax import verifier as verifier_lib
from laser_jax.config_check import ConfigError


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A tokenized prompt and the reference answer its responses are verified against."""
  token_ids: list[int]
  answer: str
  problem: str = ""


@dataclasses.dataclass
class Task:
  config: ml_collections.ConfigDict
  model_cfg: model_lib.ModelConfig
  tokenizer: Any
  train_prompts: list[Prompt]
  eval_prompts: list[Prompt]
  verifier: verifier_lib.Verifier
  init_params_fn: Callable[..., Any]  # (reference: bool, mesh) -> params
  sft_records: list[dict] = dataclasses.field(default_factory=list)
  num_filtered_prompts: int = 0

  @property
  def pad_id(self) -> int:
    return pad_token_id(self.tokenizer, self.eos_ids)

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return eos_token_ids(self.tokenizer, self.config.model.hf_path)

  @property
  def self_reward_token_id(self) -> int:
    laser = self.config.laser
    return resolve_token_id(self.tokenizer, self.model_cfg.vocab_size, laser.self_reward_token_id,
                            laser.self_reward_token, "")

  def init_params(self, reference: bool = False, mesh=None):
    """Initial (or reference-policy) parameters; HF weights go straight to their shardings on `mesh`."""
    return self.init_params_fn(reference, mesh)

  def train_iterator(self) -> data_lib.PromptIterator:
    c = self.config
    hosts = jax.process_count()
    if c.batch_size % hosts:
      raise ConfigError(f"config.batch_size: {c.batch_size} prompts cannot be split over {hosts} hosts")
    # Each host reads its block of batch_size / hosts prompts of every global batch (hosts.py).
    return data_lib.PromptIterator(self.train_prompts, c.batch_size // hosts, seed=c.seed, num_epochs=None,
                                   process_index=jax.process_index(), process_count=hosts)

  def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    return [self.tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
            for row, n in zip(tokens, lengths)]


def resolve_token_id(tokenizer, vocab_size: int, token_id: int, token: str, key: str) -> int:
  """z_c from an id (>= 0) or a token string; checked against the model's vocabulary.

  `key` is appended to the suggested config key in the error (e.g. " (or ...)").
  """
  if token_id < 0:
    resolved = tokenizer.convert_tokens_to_ids(token) if token else None
    if resolved is None or (resolved == tokenizer.unk_token_id and token != tokenizer.unk_token):
      raise ConfigError(f"config.laser.self_reward_token: {token!r} is not a token of the tokenizer; "
                        f"set config.laser.self_reward_token_id{key}")
    token_id = int(resolved)
  if not 0 <= token_id < vocab_size:
    raise ConfigError(f"config.laser.self_reward_token_id: {token_id} is outside the model's "
                      f"vocabulary [0, {vocab_size})")
  return int(token_id)


def pad_token_id(tokenizer, eos_ids) -> int:
  """The tokenizer's pad token, or its first EOS id when it has none (Llama-3 tokenizers)."""
  return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else int(eos_ids[0])


def eos_token_ids(tokenizer, hf_path: str = "") -> tuple[int, ...]:
  """The tokenizer's EOS plus any extra ones in the checkpoint's generation_config.json."""
  ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
  gen = os.path.join(hf_path, "generation_config.json") if hf_path else ""
  if gen and os.path.exists(gen):
    with open(gen) as f:
      extra = json.load(f).get("eos_token_id")
    ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
  if not ids:
    raise ConfigError("config.model.tokenizer_path: the tokenizer defines no eos_token")
  return tuple(sorted(ids))


def _prompts(records, tokenizer, c) -> tuple[list[Prompt], int]:
  prepared = data_lib.prepare_prompts(records, tokenizer, c.data.template, c.data.max_prompt_len)
  prompts = [Prompt(item["prompt_ids"], item["answer"], item["problem"]) for item in prepared.items]
  return prompts, prepared.num_filtered


def _random_init(model_cfg, seed):
  def init(reference: bool, mesh=None):
    del reference, mesh  # The reference policy of a random-init run is its initial policy.
    return jax.device_get(model_lib.init_params(model_cfg, jax.random.key(seed)))
  return init


def model_settings(m: ml_collections.ConfigDict, platform: str | None = None) -> dict:
  """The `ModelConfig` fields `config.model` sets on top of any shape (numerics, memory), with
  model.attention resolved for `platform` (default: this process's JAX backend)."""
  try:
    attention = model_lib.resolve_attention(m.attention, platform or jax.default_backend(), m.dtype)
  except ValueError as e:
    raise ConfigError(f"config.model.attention: {e}") from None
  return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=attention,
              attention_block=m.attention_block, scan_layers=m.scan_layers)


def model_cfg_from_shape(c, vocab_size: int) -> model_lib.ModelConfig:
  """The random-init model of `config.model` for a tokenizer of `vocab_size` tokens."""
  m = c.model
  if m.get("vocab_size", 0):
    if m.vocab_size < vocab_size:
      raise ConfigError(f"config.model.vocab_size: {m.vocab_size} is smaller than the tokenizer's "
                        f"{vocab_size} tokens")
    vocab_size = m.vocab_size
  return model_lib.ModelConfig(
      family=m.family, vocab_size=vocab_size, hidden_size=m.hidden_size,
      intermediate_size=m.intermediate_size, num_layers=m.num_layers, num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, rope_theta=m.rope_theta,
      tie_word_embeddings=m.tie_word_embeddings, qkv_bias=m.family == "qwen2",
      qk_norm=m.family == "qwen3", **model_settings(m))


def build_task(c: ml_collections.ConfigDict) -> Task:
  """Resolves model, tokenizer, prompts and verifier from the config."""
  from laser_jax import synthetic
  verifier = verifier_lib.Verifier(c.reward.fn, num_workers=c.reward.num_workers,
                                   timeout_s=c.reward.timeout_s)
  if c.data.task == "synthetic":
    tokenizer = (synthetic.build_tokenizer() if not c.model.tokenizer_path
                 else load_tokenizer(c.model.tokenizer_path))
    train_records = synthetic.make_split("train", c.data.synthetic_train_size, seed=c.seed)
    eval_records = synthetic.make_split("heldout", c.data.synthetic_eval_size, seed=c.seed)
  else:
    tok_path = c.model.tokenizer_path or c.model.hf_path
    if not tok_path:
      raise ConfigError("config.model.hf_path: data.task='files' needs a Hugging Face model "
                        "directory (or config.model.tokenizer_path)")
    tokenizer = load_tokenizer(tok_path, "model.tokenizer_path" if c.model.tokenizer_path else "model.hf_path")
    train_records = [r for f in c.data.train_files.split(",")
                     for r in data_lib.read_records(f.strip(), (c.data.problem_key, c.data.answer_key))]
    eval_records = _eval_records(c)
  if c.data.eval_size > 0:
    eval_records = eval_records[:c.data.eval_size]
  train_prompts, num_filtered = _prompts(train_records, tokenizer, c)
  eval_prompts, _ = _prompts(eval_records, tokenizer, c)
  if not train_prompts:
    raise ConfigError(f"config.data.max_prompt_len: all {num_filtered} training prompts are longer "
                      f"than {c.data.max_prompt_len} tokens")

  if c.model.hf_path:
    from laser_jax import hf
    with _naming_key("model.hf_path"):
      model_cfg = hf.load_hf_config(c.model.hf_path)
    model_cfg = dataclasses.replace(model_cfg, **model_settings(c.model))

    def init_fn(reference, mesh=None):
      del reference  # An HF run's reference policy is the checkpoint itself.
      with _naming_key("model.hf_path"):
        return hf.load_hf_params(c.model.hf_path, model_cfg, mesh=mesh)
  elif c.model.preset:
    from laser_jax import presets
    model_cfg = dataclasses.replace(presets.get_preset(c.model.preset), **model_settings(c.model))
    init_fn = _random_init(model_cfg, c.seed)
  else:
    model_cfg = model_cfg_from_shape(c, len(tokenizer))
    init_fn = _random_init(model_cfg, c.seed)
  return Task(config=c, model_cfg=model_cfg, tokenizer=tokenizer, train_prompts=train_prompts,
              eval_prompts=eval_prompts, verifier=verifier, init_params_fn=init_fn,
              sft_records=train_records if c.data.task == "synthetic" else [],
              num_filtered_prompts=num_filtered)


def load_tokenizer(path: str, key: str = "model.tokenizer_path"):
  """A tokenizer directory's tokenizer (as `hf.load_hf_tokenizer` loads it); errors name
  config.<key>, the key the path came from."""
  from laser_jax import hf
  if not os.path.isdir(path):
    raise ConfigError(f"config.{key}: {path!r} is not a directory")
  with _naming_key(key):
    return hf.load_hf_tokenizer(path)


@contextlib.contextmanager
def _naming_key(key: str):
  """Re-raises a broken checkpoint (hf.HFCheckpointError) as a ConfigError naming config.<key>."""
  from laser_jax import hf
  try:
    yield
  except hf.HFCheckpointError as e:
    raise ConfigError(f"config.{key}: {e}") from None


def _eval_records(c) -> list[dict]:
  name = c.data.eval_set
  if os.path.isfile(name):
    return data_lib.read_records(name)
  return data_lib.load_eval_set(name)
