"""The model an evaluation samples from, with the constants of its self-reward score.

`load_model(config)` loads an HF directory (`model.hf_path`: local, gs:// or a hub id) or a
training checkpoint (`model.checkpoint_dir`, rebuilt from the run's training config as the trainer
built it) into the eval mesh, and resolves z_c, beta_v, c_ref (or pi_ref for the exact score) and
the prompt format: an export's from its laser_jax.json, a checkpoint's from its training config,
set eval-config values overriding them (and noted). Used by the evaluator, calibration and export.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from laser_jax import config_check
from laser_jax import default_config
from laser_jax.config_check import ConfigError
from laser_jax.data import sources
from laser_jax.models import hf
from laser_jax.models import sharding as sharding_lib
from laser_jax.models.config import ModelConfig, NUMERICS_FIELDS
from laser_jax.training import checkpoint as ckpt_lib
from laser_jax.training import tasks


@dataclasses.dataclass
class LoadedModel:
  """Everything sampling needs: model config, (sharded) params, tokenizer and special ids."""
  cfg: ModelConfig
  params: Any
  tokenizer: Any
  tokens: tasks.SpecialTokens  # EOS, pad and z_c ids
  mesh: Any
  source: str  # where the weights came from (for the summary)
  # beta_v of the score r_s = beta_v * (log pi(z_c | x, y) - c_ref); None only where nothing scores
  # (load_model(score=False): calibration).
  kl_coef: float | None
  ref_constant: float | None  # c_ref; None where unused (exact score) or unknown (score=False).
  # The exact variant: pi_ref's params (same ModelConfig); scores subtract its log pi_ref(z_c | x, y)
  # instead of c_ref. None = the constant.
  ref_params: Any = None
  ref_source: str = ""  # Where pi_ref came from (for the summary).
  template: str = "chat"  # The prompt format the scores assume: "chat" | "base".
  # Whether the score is the exact one (log pi_ref instead of c_ref), and pi_ref's HF directory or
  # hub id where one is known ("" = none, e.g. the initial policy of a random-init run).
  use_ref_model_score: bool = False
  reference_model: str = ""
  constants_source: str = ""  # Where z_c, beta_v, c_ref and the template came from (summary).
  overrides: tuple[str, ...] = ()  # Eval-config values that replaced the model's own (summary).

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return self.tokens.eos_ids

  @property
  def pad_id(self) -> int:
    return self.tokens.pad_id

  @property
  def zc_id(self) -> int:
    return self.tokens.self_reward_token_id


def make_eval_mesh(config: ml_collections.ConfigDict):
  """The (data, fsdp, tensor) mesh of `config.mesh` over all devices."""
  data, fsdp, tensor = config_check.mesh_shape(config, jax.device_count())
  return sharding_lib.make_mesh(data=data, fsdp=fsdp, tensor=tensor)


def load_train_config(path: str) -> ml_collections.ConfigDict:
  """A training config from a configs/*.py file (its get_config()) or a JSON dump (to_json())."""
  if not epath.Path(path).is_file():  # local, or the config.json of a gs:// workdir
    raise ConfigError(f"config.model.train_config: file not found: {path}")
  if path.endswith(".json"):
    try:
      return ml_collections.ConfigDict(json.loads(epath.Path(path).read_text()))
    except ValueError as e:
      raise ConfigError(f"config.model.train_config: {path} is not valid JSON ({e})") from None
  try:
    return default_config.load_config_file(path)
  except ValueError as e:
    raise ConfigError(f"config.model.train_config: {e}") from None


def _from_checkpoint(config, mesh, reference: bool = True) -> LoadedModel:
  m = config.model
  if not epath.Path(m.checkpoint_dir).exists():  # a local or gs:// training workdir
    raise ConfigError(f"config.model.checkpoint_dir: {m.checkpoint_dir!r} does not exist")
  train_config_path = m.train_config or os.path.join(m.checkpoint_dir, "config.json")
  if not m.train_config and not epath.Path(train_config_path).is_file():
    raise ConfigError("config.model.train_config: needed with config.model.checkpoint_dir (the "
                      "training config file that produced the checkpoint)")
  tc = load_train_config(train_config_path)
  # The model, tokenizer and special tokens exactly as the trainer resolved them (tasks).
  tokenizer = tasks.load_task_tokenizer(tc)
  cfg = dataclasses.replace(tasks.model_config(tc, len(tokenizer)), remat=False)
  key = "model.checkpoint_step" if m.checkpoint_step >= 0 else "model.checkpoint_dir"
  try:
    state_dir, step = ckpt_lib.step_directory(m.checkpoint_dir, m.checkpoint_step)
    params = ckpt_lib.restore_params(state_dir, sharding_lib.abstract_params(cfg, mesh))
  except ckpt_lib.CheckpointError as e:
    raise ConfigError(f"config.{key}: {e} (config.model.train_config: {train_config_path})") from None
  laser = config.laser
  run_zc = tasks.special_tokens(tokenizer, cfg.vocab_size, tc.model.hf_path, tc.laser.self_reward_token_id,
                                tc.laser.self_reward_token, " (the training config's z_c)")
  special, overrides = run_zc, []
  if laser.self_reward_token_id >= 0 or laser.self_reward_token:
    special = tasks.special_tokens(tokenizer, cfg.vocab_size, tc.model.hf_path, laser.self_reward_token_id,
                                   laser.self_reward_token)
    _note_override(overrides, "self_reward_token_id", special.self_reward_token_id, run_zc.self_reward_token_id)
  # The score the run trained: its beta_v, c_ref and prompt format unless the eval config sets them.
  kl_coef = _override(overrides, "laser.kl_coef", laser.kl_coef, tc.laser.kl_coef)
  template = _override(overrides, "eval.template", config.eval.template or None, tc.data.template)
  # A run that trained the exact score is evaluated with it, against the run's own reference,
  # unless the eval config sets a reference model or c_ref.
  exact = config_check.trains_exact_score(tc)
  if exact and laser.ref_constant is not None and not laser.ref_hf_path:
    overrides.append(f"config.laser.ref_constant={laser.ref_constant!r} (the run trained the exact score)")
    exact, ref_constant = False, laser.ref_constant
  elif exact:
    ref_constant = None
  else:
    ref_constant = _override(overrides, "laser.ref_constant", laser.ref_constant, tc.laser.ref_constant)
  ref_params, ref_source = None, ""
  if laser.ref_hf_path:
    ref_source = laser.ref_hf_path
    ref_params = _load_reference_hf(laser.ref_hf_path, cfg, mesh) if reference else None
  elif exact and reference:
    # state_dir is <workdir>/checkpoints/<step>/state; the run saved its reference in <workdir>.
    run_dir = os.path.dirname(os.path.dirname(os.path.dirname(state_dir)))
    ref_params, ref_source = _run_reference(tc, train_config_path, run_dir, cfg, mesh)
  return LoadedModel(cfg, params, tokenizer, special, mesh, f"{state_dir} (step {step})", kl_coef,
                     ref_constant, ref_params, ref_source, template=template,
                     use_ref_model_score=exact or bool(laser.ref_hf_path),
                     reference_model=laser.ref_hf_path or (tc.model.hf_path if exact else ""),
                     constants_source=f"training config {train_config_path}", overrides=tuple(overrides))


def _override(overrides: list[str], key: str, eval_value, model_value):
  """`eval_value` where the eval config sets it (not None), noted in `overrides` when it differs
  from the model's own `model_value`; else `model_value`."""
  if eval_value is None:
    return model_value
  _note_override(overrides, key, eval_value, model_value)
  return eval_value


def _note_override(overrides: list[str], key: str, eval_value, model_value) -> None:
  if model_value is not None and eval_value != model_value:
    overrides.append(f"config.{key}={eval_value!r} (the model's own: {model_value!r})")


def _from_hf(config, mesh, score: bool = True, reference: bool = True) -> LoadedModel:
  # A local dir, gs:// (copied to the cache) or a hub id (downloaded): the local directory. Its
  # config files first: every constant is resolved (or reported missing) before any weight is
  # downloaded or read.
  path = sources.model_dir(config.model.hf_path, "config.model.hf_path", sources.CONFIG_FILES)
  dtype = config.model.dtype
  try:
    metadata = hf.read_laser_metadata(path)
  except hf.HFCheckpointError as e:
    raise ConfigError(f"config.model.hf_path: {e}") from None
  constants = _hf_constants(config, path, metadata, score)
  path = sources.model_dir(config.model.hf_path, "config.model.hf_path")  # + weights, tokenizer
  try:
    cfg = hf.load_hf_config(path, dtype=dtype, param_dtype=dtype)
    params = hf.load_hf_params(path, cfg, mesh=mesh)
  except hf.HFCheckpointError as e:
    raise ConfigError(f"config.model.hf_path: {e}") from None
  tokenizer = tasks.load_tokenizer(path, "model.hf_path")
  token_id, token = constants.pop("zc")
  special = tasks.special_tokens(tokenizer, cfg.vocab_size, path, token_id, token)
  if metadata is not None:
    _check_recorded_zc(tokenizer, metadata, path)
  ref_source = constants["reference_model"] if constants["use_ref_model_score"] else ""
  ref_params = _load_reference_hf(ref_source, cfg, mesh) if ref_source and reference and score else None
  return LoadedModel(cfg, params, tokenizer, special, mesh, path, ref_params=ref_params,
                     ref_source=ref_source, **constants)


def _hf_constants(config, path: str, metadata: dict | None, score: bool) -> dict:
  """z_c, beta_v, c_ref, the exact-score reference and the prompt format of an HF model: its
  laser_jax.json (a laser_jax export), each replaced by the eval config's value where that is set.
  Without the file, what the score needs must be set in the eval config: z_c always, beta_v and
  c_ref when `score` (c_ref not with a reference model) -- there are no defaults."""
  laser, overrides = config.laser, []
  meta = metadata or {}
  unset = lambda key, what: ConfigError(
      f"config.laser.{key}: {what} is not set, and {path} has no {hf.LASER_METADATA_FILE} (not written by "
      f"laser_jax.export); set it to the value the model was trained with")
  if laser.self_reward_token_id >= 0 or laser.self_reward_token:
    zc = (laser.self_reward_token_id, laser.self_reward_token)
    if metadata is not None and zc != (meta["self_reward_token_id"], "") and zc != (-1, meta["self_reward_token"]):
      overrides.append(f"config.laser.self_reward_token(_id)={zc[0] if zc[0] >= 0 else zc[1]!r} "
                       f"(the model's own: {meta['self_reward_token']!r}, id {meta['self_reward_token_id']})")
  elif metadata is not None:
    zc = (meta["self_reward_token_id"], "")
  else:
    raise unset("self_reward_token_id", "z_c (or config.laser.self_reward_token; Qwen2.5: 151652)")
  kl_coef = _override(overrides, "laser.kl_coef", laser.kl_coef, meta.get("kl_coef"))
  if kl_coef is None and score:
    raise unset("kl_coef", "beta_v (the score's scale)")
  # The score's offset: a reference model's log-prob (the exact score) or the constant c_ref.
  exact, reference_model = bool(meta.get("use_ref_model_score")), meta.get("reference_model", "")
  if laser.ref_hf_path:
    exact, reference_model = True, laser.ref_hf_path
    ref_constant = None
  elif laser.ref_constant is not None and exact:
    overrides.append(f"config.laser.ref_constant={laser.ref_constant!r} (the model was trained with the "
                     f"exact score, against {reference_model or 'its initial policy'})")
    exact, reference_model, ref_constant = False, "", laser.ref_constant
  else:
    ref_constant = _override(overrides, "laser.ref_constant", laser.ref_constant, meta.get("ref_constant"))
  if score and exact and not reference_model:
    raise ConfigError(f"config.laser.ref_hf_path: {path}/{hf.LASER_METADATA_FILE} says the model was trained "
                      f"with the exact score (log pi_ref instead of c_ref) against its initial policy, which "
                      f"the export does not hold; set config.laser.ref_hf_path to that policy (or "
                      f"config.laser.ref_constant to score with a constant)")
  if score and not exact and ref_constant is None:
    raise unset("ref_constant", "c_ref (Qwen2.5: -23.0; python -m laser_jax.calibrate measures it)")
  template = _override(overrides, "eval.template", config.eval.template or None,
                       meta["prompt"]["template"] if metadata is not None else None) or "chat"
  return dict(zc=zc, kl_coef=kl_coef, ref_constant=None if exact else ref_constant, template=template,
              use_ref_model_score=exact, reference_model=reference_model,
              constants_source=(os.path.join(path, hf.LASER_METADATA_FILE) if metadata is not None
                                else "eval config"), overrides=tuple(overrides))


def _check_recorded_zc(tokenizer, metadata: dict, path: str) -> None:
  """An export's recorded z_c must be the token its tokenizer has at the recorded id."""
  token_id, token = metadata["self_reward_token_id"], metadata["self_reward_token"]
  if tokenizer.convert_ids_to_tokens(token_id) != token:
    raise ConfigError(f"config.model.hf_path: {path}/{hf.LASER_METADATA_FILE} names z_c {token!r} with id "
                      f"{token_id}, but the tokenizer there has {tokenizer.convert_ids_to_tokens(token_id)!r} "
                      f"at that id")


def _load_reference_hf(path: str, cfg: ModelConfig, mesh) -> Any:
  """pi_ref's params from an HF directory, which must have the evaluated model's architecture."""
  path = sources.model_dir(path, "config.laser.ref_hf_path")  # local dir, gs:// or hub id
  try:
    ref_cfg = hf.load_hf_config(path, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
  except hf.HFCheckpointError as e:
    raise ConfigError(f"config.laser.ref_hf_path: {e}") from None
  # Numerics (dtype, attention kernel, layer scan, ...) follow the evaluated model's config.
  ref_cfg = dataclasses.replace(ref_cfg, **{f: getattr(cfg, f) for f in NUMERICS_FIELDS})
  for field in dataclasses.fields(cfg):
    want, got = getattr(cfg, field.name), getattr(ref_cfg, field.name)
    if want != got:
      raise ConfigError(f"config.laser.ref_hf_path: {path} is not the evaluated model's architecture: "
                        f"{field.name} is {got!r} there, {want!r} in the evaluated model")
  return hf.load_hf_params(path, cfg, mesh=mesh)


def _run_reference(tc, train_config_path: str, run_dir: str, cfg: ModelConfig, mesh
                   ) -> tuple[Any, str]:
  """The reference policy of a training run that used the exact score, as the trainer defines it
  (`tasks.Task.reference_policy`): its HF model, or its initial policy as the run saved it
  (`run_dir/reference`), or rebuilt (random init + the supervised warm start)."""
  if tc.model.hf_path:
    return _load_reference_hf(tc.model.hf_path, cfg, mesh), tc.model.hf_path
  logging.info("The run's reference policy: its initial policy, from %s and %s", train_config_path, run_dir)
  task = tasks.build_task(tc)  # its own numerics (remat), as the run computed the warm start
  shardings = jax.tree.map(lambda s: s.sharding, sharding_lib.abstract_params(cfg, mesh))
  return task.reference_policy(mesh, shardings, workdir=run_dir), f"initial policy of {train_config_path}"


def load_model(config: ml_collections.ConfigDict, mesh=None, *, score: bool = True,
               reference: bool = True) -> LoadedModel:
  """Loads the HF model (`model.hf_path`) or trainer checkpoint (`model.checkpoint_dir`) with the
  constants of its self-reward score (z_c, beta_v, c_ref, prompt format): a checkpoint's from its
  training config, an export's from its laser_jax.json, set eval-config values overriding them.
  score=False (calibration) needs z_c only; reference=False skips loading pi_ref's weights (export)."""
  config_check.validate_eval(config, sampling=False)
  mesh = make_eval_mesh(config) if mesh is None else mesh
  if config.model.hf_path:
    model = _from_hf(config, mesh, score=score, reference=reference)
  else:
    model = _from_checkpoint(config, mesh, reference=reference and score)
  for override in model.overrides:
    logging.warning("Self-reward constants from %s, except %s", model.constants_source, override)
  return model
