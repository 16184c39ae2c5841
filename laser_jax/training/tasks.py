"""What the trainer trains on: model + tokenizer + prompts + reward, resolved from a config.

`build_task(config)` returns a `Task` for either the built-in synthetic arithmetic task (the
embedded default: a tiny random-init model with the task's own tokenizer and a supervised warm
start) or user files with a Hugging Face checkpoint (`data.task = "files"`).

The pieces are resolved here once, for the trainer, the evaluator (which rebuilds a run's model from
its training config) and the AOT report: `load_task_tokenizer`, `model_config` (an HF config.json,
a preset or the random-init shape, with `config.model`'s numerics) and `special_tokens` (EOS, pad
and z_c ids). The policy RL starts from (`Task.initial_policy`: init + supervised warm start) and
the frozen reference pi_ref (`Task.reference_policy`) are defined here too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from laser_jax.config_check import ConfigError
from laser_jax.data import eval_sets
from laser_jax.data import iterator as iterator_lib
from laser_jax.data import prompts as prompts_lib
from laser_jax.data import records as records_lib
from laser_jax.data import sources
from laser_jax.data import synthetic
from laser_jax.data import verifier as verifier_lib
from laser_jax.generate import sampling as sampling_lib
from laser_jax.models import hf
from laser_jax.models import model as model_lib
from laser_jax.models import presets
from laser_jax.models import sharding as sharding_lib
from laser_jax.models.config import ModelConfig, resolve_attention, resolve_dtype
from laser_jax.training import checkpoint as ckpt_lib
from laser_jax.training import sft


Prompt = prompts_lib.Prompt  # defined with the prompt templates (data.prompts)


@dataclasses.dataclass
class Task:
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  tokenizer: Any
  train_prompts: list[Prompt]
  eval_prompts: list[Prompt]
  verifier: verifier_lib.Verifier
  init_params_fn: Callable[..., Any]  # (reference: bool, mesh) -> params
  sft_records: list[dict] = dataclasses.field(default_factory=list)
  num_filtered_prompts: int = 0

  @property
  def special_tokens(self) -> "SpecialTokens":
    laser = self.config.laser
    return special_tokens(self.tokenizer, self.model_cfg.vocab_size, self.config.model.hf_path,
                          laser.self_reward_token_id, laser.self_reward_token)

  @property
  def pad_id(self) -> int:
    return self.special_tokens.pad_id

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return self.special_tokens.eos_ids

  @property
  def self_reward_token_id(self) -> int:
    return self.special_tokens.self_reward_token_id

  def init_params(self, reference: bool = False, mesh=None):
    """Initial (or reference-policy) parameters; HF weights go straight to their shardings on `mesh`."""
    return self.init_params_fn(reference, mesh)

  def initial_policy(self, mesh, param_shardings):
    """The policy RL starts from, placed in `param_shardings`: the initial parameters, after the
    supervised warm start when `sft.steps > 0`."""
    c = self.config
    params = jax.device_put(self.init_params(mesh=mesh), param_shardings)
    if c.sft.steps > 0:
      corpus = sft.build_sft_corpus(self.sft_records, self.tokenizer, c.data.template)
      log = lambda i, loss: logging.info("sft step %d: loss %.4f", i, loss)
      params = sft.warm_start(params, self.model_cfg, corpus, steps=c.sft.steps,
                              batch_size=c.sft.batch_size, lr=c.sft.lr, seed=c.seed,
                              mesh=mesh, param_shardings=param_shardings, log_fn=log)
    return params

  def reference_policy(self, mesh, param_shardings, initial=None, workdir: str | None = None):
    """pi_ref, the frozen initial policy of the RL run (KL loss, exact self-reward variant).

    That is the policy *after* the supervised warm start when `sft.steps > 0`, the policy RL
    starts from (not the random init). `initial` (what `initial_policy` just returned for a fresh
    run) is copied, since the train state's buffers are donated. With a warm start and a
    `workdir`, a fresh run saves that copy there (`checkpoint.save_reference`) and a resumed run
    or the evaluator (no `initial`) restores it; without a saved copy (a workdir from before it
    was saved) the warm start is recomputed (deterministic for a given seed and mesh). The other
    references (an HF checkpoint, the random init) are loaded again.
    """
    warm_started = self.config.sft.steps > 0
    if initial is not None:
      ref = jax.tree.map(jnp.copy, initial)
      if warm_started and workdir:
        ckpt_lib.save_reference(workdir, ref)
      return ref
    if warm_started:
      abstract = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                              sharding_lib.abstract_params(self.model_cfg, mesh), param_shardings)
      saved = ckpt_lib.restore_reference(workdir, abstract) if workdir else None
      if saved is not None:
        logging.info("Restored the reference policy (after the warm start) from %s",
                     ckpt_lib.reference_directory(workdir))
        return saved
      logging.info("Recomputing the supervised warm start (%d steps) for the reference policy",
                   self.config.sft.steps)
      return self.initial_policy(mesh, param_shardings)
    return jax.device_put(self.init_params(reference=True, mesh=mesh), param_shardings)

  def train_iterator(self) -> iterator_lib.PromptIterator:
    c = self.config
    hosts = jax.process_count()
    if c.batch_size % hosts:
      raise ConfigError(f"config.batch_size: {c.batch_size} prompts cannot be split over {hosts} hosts")
    # Each host reads its block of batch_size / hosts prompts of every global batch (hosts.py).
    return iterator_lib.PromptIterator(self.train_prompts, c.batch_size // hosts, seed=c.seed, num_epochs=None,
                                   process_index=jax.process_index(), process_count=hosts)

  def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    return sampling_lib.decode_responses(self.tokenizer, tokens, lengths)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """The token ids sampling and scoring need."""
  eos_ids: tuple[int, ...]  # every id that ends a response
  pad_id: int
  self_reward_token_id: int  # z_c


def special_tokens(tokenizer, vocab_size: int, hf_path: str, token_id: int, token: str,
                   key: str = "") -> SpecialTokens:
  """EOS ids (the tokenizer's plus the checkpoint's generation_config.json), pad id and z_c
  (`token_id` >= 0, else the token string `token`; `key` as in `resolve_token_id`)."""
  eos_ids = eos_token_ids(tokenizer, hf_path)
  return SpecialTokens(eos_ids, pad_token_id(tokenizer, eos_ids),
                       resolve_token_id(tokenizer, vocab_size, token_id, token, key))


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
  hf_path = sources.model_dir(hf_path, "config.model.hf_path", sources.CONFIG_FILES)
  gen = os.path.join(hf_path, "generation_config.json") if hf_path else ""
  if gen and os.path.exists(gen):
    with open(gen) as f:
      extra = json.load(f).get("eos_token_id")
    ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
  if not ids:
    raise ConfigError("config.model.tokenizer_path: the tokenizer defines no eos_token")
  return tuple(sorted(ids))


def _prompts(records, tokenizer, c) -> tuple[list[Prompt], int]:
  prepared = prompts_lib.prepare_prompts(records, tokenizer, c.data.template, c.data.max_prompt_len)
  prompts = prepared.prompts
  return prompts, prepared.num_filtered


def _random_init(model_cfg, seed):
  def init(reference: bool, mesh=None):
    del reference, mesh  # The reference policy of a random-init run is its initial policy.
    return jax.device_get(model_lib.init_params(model_cfg, jax.random.key(seed)))
  return init


def model_settings(m: ml_collections.ConfigDict, platform=None) -> dict:
  """The `ModelConfig` fields `config.model` sets on top of any shape (numerics, memory), with
  model.dtype and model.attention "auto" resolved for `platform` (a platform name such as "tpu",
  or a jax Device; default: this process's first device, e.g. a T4 gets float32 + chunked)."""
  device = platform or jax.devices()[0]
  dtype = resolve_dtype(m.dtype, device)
  try:
    attention = resolve_attention(m.attention, device, dtype)
  except ValueError as e:
    raise ConfigError(f"config.model.attention: {e}") from None
  return dict(dtype=dtype, param_dtype=m.param_dtype, remat=m.remat, attention=attention,
              attention_block=m.attention_block, scan_layers=m.scan_layers)


def model_cfg_from_shape(c, vocab_size: int, platform: str | None = None) -> ModelConfig:
  """The random-init model of `config.model` for a tokenizer of `vocab_size` tokens."""
  m = c.model
  if m.get("vocab_size", 0):
    if m.vocab_size < vocab_size:
      raise ConfigError(f"config.model.vocab_size: {m.vocab_size} is smaller than the tokenizer's "
                        f"{vocab_size} tokens")
    vocab_size = m.vocab_size
  return ModelConfig(
      family=m.family, vocab_size=vocab_size, hidden_size=m.hidden_size,
      intermediate_size=m.intermediate_size, num_layers=m.num_layers, num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, rope_theta=m.rope_theta,
      tie_word_embeddings=m.tie_word_embeddings, qkv_bias=m.family == "qwen2",
      qk_norm=m.family == "qwen3", **model_settings(m, platform))


def model_config(c: ml_collections.ConfigDict, tokenizer_size: int | None,
                 platform: str | None = None) -> ModelConfig:
  """The ModelConfig a training config trains, with `config.model`'s numerics for `platform`:
  `model.hf_path`'s config.json, else `model.preset`, else the random-init shape for a tokenizer
  of `tokenizer_size` tokens."""
  m = c.model
  settings = model_settings(m, platform)
  if m.hf_path:
    path = sources.model_dir(m.hf_path, "config.model.hf_path", sources.CONFIG_FILES)
    with _naming_key("model.hf_path"):
      return dataclasses.replace(hf.load_hf_config(path), **settings)
  if m.preset:
    return dataclasses.replace(presets.get_preset(m.preset), **settings)
  if tokenizer_size is None:
    raise ConfigError("config.model.hf_path: the model's shape needs its tokenizer; set "
                      "config.model.hf_path or config.model.preset")
  return model_cfg_from_shape(c, tokenizer_size, platform)


def load_task_tokenizer(c: ml_collections.ConfigDict):
  """The tokenizer of a training config: the synthetic task's own unless model.tokenizer_path is
  set, else model.tokenizer_path or model.hf_path."""
  if c.data.task == "synthetic" and not c.model.tokenizer_path:
    return synthetic.build_tokenizer()
  if not (c.model.tokenizer_path or c.model.hf_path):
    raise ConfigError("config.model.hf_path: data.task='files' needs a Hugging Face model "
                      "directory (or config.model.tokenizer_path)")
  if c.model.tokenizer_path:
    return load_tokenizer(c.model.tokenizer_path, "model.tokenizer_path")
  return load_tokenizer(c.model.hf_path, "model.hf_path")


def build_task(c: ml_collections.ConfigDict) -> Task:
  """Resolves model, tokenizer, prompts and verifier from the config."""
  verifier = verifier_lib.Verifier(c.reward.fn, num_workers=c.reward.num_workers,
                                   timeout_s=c.reward.timeout_s)
  tokenizer = load_task_tokenizer(c)
  if c.data.task == "synthetic":
    train_records = synthetic.make_split("train", c.data.synthetic_train_size, seed=c.seed)
    eval_records = synthetic.make_split("heldout", c.data.synthetic_eval_size, seed=c.seed)
  else:
    train_records = _train_records(c)
    eval_records = _eval_records(c)
  if c.data.eval_size > 0:
    eval_records = eval_records[:c.data.eval_size]
  train_prompts, num_filtered = _prompts(train_records, tokenizer, c)
  eval_prompts, _ = _prompts(eval_records, tokenizer, c)
  if not train_prompts:
    raise ConfigError(f"config.data.max_prompt_len: all {num_filtered} training prompts are longer "
                      f"than {c.data.max_prompt_len} tokens")

  model_cfg = model_config(c, len(tokenizer))
  if c.model.hf_path:
    def init_fn(reference, mesh=None):
      del reference  # An HF run's reference policy is the checkpoint itself.
      path = sources.model_dir(c.model.hf_path, "config.model.hf_path")
      with _naming_key("model.hf_path"):
        return hf.load_hf_params(path, model_cfg, mesh=mesh)
  else:
    init_fn = _random_init(model_cfg, c.seed)
  return Task(config=c, model_cfg=model_cfg, tokenizer=tokenizer, train_prompts=train_prompts,
              eval_prompts=eval_prompts, verifier=verifier, init_params_fn=init_fn,
              sft_records=train_records if c.data.task == "synthetic" else [],
              num_filtered_prompts=num_filtered)


def load_tokenizer(path: str, key: str = "model.tokenizer_path"):
  """The tokenizer at an address (local dir, gs://, hub id: `sources.model_dir`), as
  `hf.load_hf_tokenizer` loads it; errors name config.<key>, the key the address came from."""
  if not path:
    raise ConfigError(f"config.{key}: empty; give a tokenizer directory, gs:// path or hub id")
  path = sources.model_dir(path, f"config.{key}", sources.TOKENIZER_FILES)
  with _naming_key(key):
    return hf.load_hf_tokenizer(path)


@contextlib.contextmanager
def _naming_key(key: str):
  """Re-raises a broken checkpoint (hf.HFCheckpointError) as a ConfigError naming config.<key>."""
  try:
    yield
  except hf.HFCheckpointError as e:
    raise ConfigError(f"config.{key}: {e}") from None


def _train_records(c) -> list[dict]:
  """The records of data.train_files (`sources.data_files`), read with data.problem_key /
  data.answer_key whatever the file type."""
  fields = (c.data.problem_key, c.data.answer_key)
  records = []
  for path in sources.data_files(c.data.train_files, "config.data.train_files"):
    try:
      records += records_lib.read_records(path, fields)
    except records_lib.MissingFieldError as e:
      raise records_lib.DataError(f"config.data.problem_key / config.data.answer_key = {fields}: {e}") from None
  return records


def _eval_records(c) -> list[dict]:
  # .get: training configs saved before data.eval_data_dir existed (evaluate rebuilds their task).
  return eval_sets.load_eval_records(c.data.eval_set, c.data.get("eval_data_dir", ""),
                                    ("data.eval_set", "data.eval_data_dir"))
