r"""Evaluation: sample n solutions per problem, verify them, read their self-reward scores, report.

  python -m laser_jax.evaluate --config=configs/eval.py --config.model.hf_path=... \
      --config.eval.input_file=math500 --config.eval.output_file=/tmp/out.jsonl

From a notebook: `summary = evaluate.run(config)` (config from `configs/eval.py`).

Output, one JSON line per problem, field names as in the official LaSeR release's files:
  problem, answer, responses (decoded, special tokens skipped), pred_answers (last \boxed{} content
  or null), acc_list (verifier rewards), self_rewarding_scores (beta_v * (logprob - c_ref); null for
  truncated responses), plus prompt (text), prompt_token_ids, response_token_ids (EOS excluded) and
  self_rewarding_logprobs (log pi(z_c | x, y, EOS) read by the sampler during generation; null for
  truncated responses) and stop_token_ids (the EOS id each response emitted, null if truncated:
  models may have several). With the exact score (`config.laser.ref_hf_path`, or a checkpoint of a
  run trained with `laser.use_ref_model_score`), scores are beta_v * (logprob - ref_logprob) and
  the records add self_rewarding_ref_logprobs (log pi_ref(z_c | x, y, EOS), one reference-model
  forward per batch). JSON never holds NaN: a missing value is null.
The summary (`summary_path(output_file)`: `foo.jsonl` -> `foo.summary.json`) holds the metrics of
`laser_jax.tts.summarize` (mean@n, self_verification/*, maj@k, self_weighted_maj@k, best@k), the run's
statistics and the config; the same numbers are printed as a table.

Voting canonicalises answers with `answers.canonical_answer` (the boxed text with whitespace, \left/\right
and \dfrac/\tfrac spellings removed), not with math-verify: equal canonical strings are always the
same answer, while e.g. "0.5" and "\frac12" stay separate votes (slightly conservative maj@k).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from ml_collections import config_flags
from tqdm.auto import tqdm

from laser_jax.data import answers as answers_lib
from laser_jax.training import checkpoint as ckpt_lib
from laser_jax import cli
from laser_jax import config_check
from laser_jax.data import records as data_lib
from laser_jax import default_config
from laser_jax.models import hf
from laser_jax.models import model as model_lib
from laser_jax.rl import policy
from laser_jax.rl import rl_metrics
from laser_jax.rl import rollout as rollout_lib
from laser_jax.generate import sampler as sampler_lib
from laser_jax.rl import scoring
from laser_jax.models import sharding as sharding_lib
from laser_jax.data import sources
from laser_jax.data import synthetic
from laser_jax.training import tasks
from laser_jax.evaluation import tts
from laser_jax.data import verifier as verifier_lib
from laser_jax.config_check import ConfigError

# ----------------------------------------------------------------------------------------------
# Model.


@dataclasses.dataclass
class LoadedModel:
  """Everything sampling needs: model config, (sharded) params, tokenizer and special ids."""
  cfg: model_lib.ModelConfig
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
  exact = bool(tc.laser.get("use_self_reward_loss") and tc.laser.get("use_ref_model_score"))
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


def _load_reference_hf(path: str, cfg: model_lib.ModelConfig, mesh) -> Any:
  """pi_ref's params from an HF directory, which must have the evaluated model's architecture."""
  path = sources.model_dir(path, "config.laser.ref_hf_path")  # local dir, gs:// or hub id
  try:
    ref_cfg = hf.load_hf_config(path, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
  except hf.HFCheckpointError as e:
    raise ConfigError(f"config.laser.ref_hf_path: {e}") from None
  # Numerics (dtype, attention kernel, layer scan, ...) follow the evaluated model's config.
  ref_cfg = dataclasses.replace(ref_cfg, **{f: getattr(cfg, f) for f in model_lib.NUMERICS_FIELDS})
  for field in dataclasses.fields(cfg):
    want, got = getattr(cfg, field.name), getattr(ref_cfg, field.name)
    if want != got:
      raise ConfigError(f"config.laser.ref_hf_path: {path} is not the evaluated model's architecture: "
                        f"{field.name} is {got!r} there, {want!r} in the evaluated model")
  return hf.load_hf_params(path, cfg, mesh=mesh)


def _run_reference(tc, train_config_path: str, run_dir: str, cfg: model_lib.ModelConfig, mesh
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


# ----------------------------------------------------------------------------------------------
# Problems and sampling.


def load_problems(input_file: str, limit: int = 0, data_dir: str = "") -> list[dict]:
  """Records of a named eval set (in `data_dir`, else where `data.data_dir` says), "synthetic" (the
  held-out split), or the JSONL/parquet files `input_file` names (local path or glob, gs://, hf://)."""
  if not input_file:
    raise ConfigError("config.eval.input_file: empty; give a JSONL/parquet file or an eval-set name")
  if input_file == "synthetic":
    records = synthetic.make_split("heldout", limit or 256)
  elif "://" in input_file or glob.has_magic(input_file) or input_file.lower() in data_lib.EVAL_SETS \
      or os.path.exists(input_file):
    records = data_lib.load_eval_records(input_file, data_dir, ("eval.input_file", "eval.data_dir"))
  else:
    raise ConfigError(f"config.eval.input_file: file not found: {input_file} (or an eval set: "
                      f"{', '.join(sorted(data_lib.EVAL_SETS))}, synthetic)")
  if not records:
    raise ConfigError(f"config.eval.input_file: {input_file} holds no problems")
  return records[:limit] if limit > 0 else records


def sampling_params(config: ml_collections.ConfigDict, model: LoadedModel) -> sampler_lib.SamplingParams:
  """The sampler's settings from `config.eval` (validated by `config_check.validate_eval`)."""
  e = config.eval
  return sampler_lib.SamplingParams(
      n=e.n, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
      max_new_tokens=e.max_new_tokens, eos_ids=tuple(model.eos_ids), pad_id=model.pad_id,
      self_reward_token_id=model.zc_id, greedy=e.greedy, decode_segments=e.decode_segments)


def generate(model: LoadedModel, items: Sequence[dict], sampling: sampler_lib.SamplingParams,
             batch_size: int, seed: int = 0, progress: bool = True):
  """Samples every item's prompt (`item["prompt_ids"]`); yields (batch items, SampleOutput).

  The last batch is padded to `batch_size` prompts with copies of its last prompt (their rows are
  dropped) so that all calls share one compiled shape per prompt bucket.
  """
  key = jax.random.key(seed)
  num_batches = -(-len(items) // batch_size)
  bar = tqdm(total=len(items), desc="sampling", unit="problem", disable=not progress,
             file=sys.stderr, dynamic_ncols=True)
  try:
    for b in range(num_batches):
      batch = list(items[b * batch_size:(b + 1) * batch_size])
      prompts = [it["prompt_ids"] for it in batch]
      prompts += [prompts[-1]] * (batch_size - len(prompts))
      out = sampler_lib.sample(model.params, model.cfg, prompts, sampling,
                               jax.random.fold_in(key, b), mesh=model.mesh)
      yield batch, _take_rows(out, len(batch) * sampling.n)
      bar.update(len(batch))
  finally:
    bar.close()


def _take_rows(out: sampler_lib.SampleOutput, num_rows: int) -> sampler_lib.SampleOutput:
  return dataclasses.replace(out, **{
      f.name: getattr(out, f.name)[:num_rows] for f in dataclasses.fields(out)
      if isinstance(getattr(out, f.name), np.ndarray)})


def reference_logprobs(model: LoadedModel, out: sampler_lib.SampleOutput) -> np.ndarray:
  """log pi_ref(z_c | x, y, EOS) [N] of every row of `out` (NaN for truncated rows): one forward
  of the reference model over `prompt + response + EOS`, read at the EOS position."""
  batch = rollout_lib.build_training_batch(out.prompt_tokens, out.prompt_mask, out.response_tokens,
                                           out.response_lengths, out.finished, model.pad_id)
  fn = _reference_logprob_fn(model.cfg, model.zc_id)
  logprobs = jax.device_get(fn(model.ref_params, batch["tokens"], batch["positions"],
                               batch["attention_mask"], batch["eos_index"]))
  return np.where(out.finished, np.asarray(logprobs, np.float64), np.nan)


@functools.lru_cache(maxsize=None)
def _reference_logprob_fn(cfg: model_lib.ModelConfig, zc_id: int):
  def fn(params, tokens, positions, attention_mask, eos_index):
    hidden = model_lib.forward(params, cfg, tokens, positions, attention_mask, return_hidden=True)
    return policy.self_reward_logprob(params, cfg, hidden, eos_index, zc_id)
  return jax.jit(fn)


def prepare_items(config, model: LoadedModel, records) -> data_lib.PreparedPrompts:
  e = config.eval
  try:
    return data_lib.prepare_prompts(records, model.tokenizer, model.template, e.max_prompt_len or None)
  except ValueError as e_:
    raise ConfigError(f"config.eval.template: {e_}") from None


# ----------------------------------------------------------------------------------------------
# Answers, rows, metrics.

def _nullable(x: float) -> float | None:
  return None if not math.isfinite(x) else float(x)


def build_rows(items, scored: scoring.ScoredSamples) -> list[dict]:
  """One output record per problem (the n rows of a problem are contiguous in `scored`).

  With the exact variant (`scored.ref_z_logprob`, log pi_ref(z_c | x, y, EOS)) the scores
  subtract them instead of c_ref, and the records hold them as `self_rewarding_ref_logprobs`.
  """
  out, texts = scored.sample, scored.texts
  n = len(texts) // len(items)
  rows = []
  for i, item in enumerate(items):
    sl = slice(i * n, (i + 1) * n)
    logprobs = [_nullable(float(x)) for x in scored.z_logprob[sl]]
    rows.append({
        "problem": item["problem"],
        "answer": item["answer"],
        "responses": texts[sl],
        "pred_answers": [answers_lib.extract_last_boxed(t) for t in texts[sl]],
        "acc_list": [float(r) for r in scored.rewards[sl]],
        "self_rewarding_scores": [_nullable(float(x)) for x in scored.scores[sl]],
        "self_rewarding_logprobs": logprobs,
        "prompt": item["prompt"],
        "prompt_token_ids": [int(t) for t in item["prompt_ids"]],
        "response_token_ids": [out.tokens[r, :out.lengths[r]].tolist() for r in range(sl.start, sl.stop)],
        "stop_token_ids": [int(out.eos_token[r]) if out.finished[r] else None
                           for r in range(sl.start, sl.stop)],
    })
    if scored.ref_z_logprob is not None:
      rows[-1]["self_rewarding_ref_logprobs"] = [_nullable(float(x)) for x in scored.ref_z_logprob[sl]]
  return rows


def metrics_from_rows(rows: Sequence[dict], threshold: float = 0.5, num_bootstrap: int = 1000,
                      seed: int = 0) -> dict[str, float]:
  """`tts.summarize` on output records (null scores = truncated), plus length/score statistics."""
  acc = np.array([r["acc_list"] for r in rows], np.float64)
  scores = np.array([[np.nan if s is None else s for s in r["self_rewarding_scores"]] for r in rows],
                    np.float64)
  answers = [[answers_lib.canonical_answer(a) for a in r["pred_answers"]] for r in rows]
  out = tts.summarize(answers, acc, scores, threshold=threshold, num_bootstrap=num_bootstrap, seed=seed)
  logprobs = np.array([[np.nan if x is None else x for x in r["self_rewarding_logprobs"]]
                       for r in rows], np.float64)
  lengths = np.array([[len(t) for t in r["response_token_ids"]] for r in rows], np.float64)
  finished = ~np.isnan(logprobs)
  out.update({
      "num_problems": len(rows), "n": int(acc.shape[1]),
      "truncated_frac": float(1 - finished.mean()),
      "response_length/mean": float(lengths.mean()),
      "z_logprob/mean": float(logprobs[finished].mean()) if finished.any() else math.nan,
      "z_logprob/std": float(logprobs[finished].std()) if finished.any() else math.nan,
  })
  return out


def json_safe(x):
  """NaN/inf -> None, NumPy scalars -> Python, recursively (strict JSON)."""
  if isinstance(x, dict):
    return {str(k): json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return _nullable(float(x))
  if isinstance(x, np.integer):
    return int(x)
  return x


def summary_path(output_file: str) -> str:
  """`foo.jsonl` -> `foo.summary.json` (other names get `.summary.json` appended)."""
  stem = output_file[:-len(".jsonl")] if output_file.endswith(".jsonl") else output_file
  return stem + ".summary.json"


def format_table(summary: dict) -> str:
  """The human-readable report of a summary dict."""
  def f(key):
    v = summary.get(key)
    return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"
  lines = [f"problems {summary['num_problems']}  n {summary['n']}  truncated "
           f"{100 * summary['truncated_frac']:.1f}%  mean length {summary['response_length/mean']:.1f}",
           f"mean@{summary['n']} accuracy                  {f('mean@n')}",
           f"self-verification (score > {summary.get('threshold', 0.5)}):",
           f"  acc on correct   ({summary['self_verification/num_correct']:5d})       "
           f"{f('self_verification/acc_correct')}",
           f"  acc on incorrect ({summary['self_verification/num_incorrect']:5d})       "
           f"{f('self_verification/acc_incorrect')}",
           f"  overall                          {f('self_verification/acc')}",
           f"  F1                               {f('self_verification/f1')}",
           f"  AUROC of the score               {f('self_verification/auroc')}",
           f"  calibration error (ECE, 10 bins) {f('self_verification/ece')}",
           "   k    maj@k  self_weighted_maj@k  best@k"]
  for k in tts.scaling_ks(summary["n"]):
    lines.append(f"{k:4d}   {f(f'maj@{k}')}               {f(f'self_weighted_maj@{k}')}  "
                 f"{f(f'best@{k}')}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry point.


def run(config: ml_collections.ConfigDict, *, progress: bool = True, print_table: bool = True,
        model: LoadedModel | None = None) -> dict:
  """Evaluates as configured; writes the JSONL and the summary JSON; returns the summary dict."""
  e = config.eval
  config_check.validate_eval(config)
  records = load_problems(e.input_file, e.limit, e.data_dir)  # Bad input fails before the model loads.
  model = load_model(config) if model is None else model
  sampling = sampling_params(config, model)
  prepared = prepare_items(config, model, records)
  if not prepared.items:
    raise ConfigError(f"config.eval.max_prompt_len: all {prepared.num_filtered} prompts are longer "
                    f"than {e.max_prompt_len} tokens")
  try:
    verifier = verifier_lib.Verifier(e.reward_fn, num_workers=e.num_workers, timeout_s=e.timeout_s)
  except ValueError as err:
    raise ConfigError(f"config.eval.reward_fn: {err}") from None
  os.makedirs(os.path.dirname(os.path.abspath(e.output_file)), exist_ok=True)
  start, num_tokens, timeouts = time.time(), 0, 0
  rows = []
  with verifier as verify, open(e.output_file + ".tmp", "w") as f:
    decode = lambda tokens, lengths: [model.tokenizer.decode(row[:k].tolist(), skip_special_tokens=True)
                                      for row, k in zip(tokens, lengths)]
    ref_fn = (lambda out: reference_logprobs(model, out)) if model.ref_params is not None else None
    for items, out in generate(model, prepared.items, sampling, e.batch_size, e.seed, progress):
      scored = scoring.score_samples(out, [item["answer"] for item in items], decode=decode, verifier=verify,
                                     kl_coef=model.kl_coef, ref_constant=model.ref_constant,
                                     ref_z_logprob_fn=ref_fn)
      timeouts += scored.num_timeouts
      num_tokens += int(out.response_lengths.sum())
      for row in build_rows(items, scored):
        f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        rows.append(row)
  os.replace(e.output_file + ".tmp", e.output_file)
  elapsed = time.time() - start
  summary = metrics_from_rows(rows, e.threshold, e.num_bootstrap, e.bootstrap_seed)
  summary.update({"threshold": e.threshold, "num_filtered_prompts": prepared.num_filtered,
                  "verifier_timeouts": timeouts, "elapsed_s": elapsed,
                  "tokens_per_s": num_tokens / max(elapsed, 1e-9), "model": model.source,
                  "self_reward_token_id": model.zc_id, "kl_coef": model.kl_coef,
                  "ref_constant": model.ref_constant if model.ref_params is None else None,
                  "reference_model": model.ref_source if model.ref_params is not None else None,
                  "template": model.template, "constants_source": model.constants_source,
                  "overridden_constants": list(model.overrides),
                  "output_file": e.output_file,
                  "config": config.to_dict()})
  summary["self_verification/reliability"] = reliability(rows)
  summary["reliability_plot"] = plot_reliability(summary["self_verification/reliability"], e.output_file)
  summary = json_safe(summary)
  with open(summary_path(e.output_file), "w") as f:
    json.dump(summary, f, indent=2, allow_nan=False)
  if print_table:
    print(format_table(summary), flush=True)
  return summary


def reliability(rows: Sequence[dict]) -> list[dict]:
  """The reliability diagram of the finished responses' scores (r_s read as P(correct), 10 bins):
  per non-empty bin its range, count, mean score and accuracy (`rl_metrics.calibration`)."""
  pairs = [(s, a) for r in rows for s, a in zip(r["self_rewarding_scores"], r["acc_list"]) if s is not None]
  scores = np.array([s for s, _ in pairs], np.float64)
  correct = np.array([a for _, a in pairs], np.float64) > 0.5
  return rl_metrics.calibration(scores, correct)[1]


def plot_reliability(bins: list[dict], output_file: str) -> str | None:
  """Writes the reliability plot next to the summary (`foo.reliability.png`) and returns its
  path; None when matplotlib is not installed (the bins stay in the summary either way)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    logging.info("matplotlib is not installed: no reliability plot (the bins are in the summary)")
    return None
  path = summary_path(output_file)[:-len(".summary.json")] + ".reliability.png"
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
  if bins:
    ax.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=0.1, align="edge",
           alpha=0.6, edgecolor="black", label="accuracy per bin")
    ax.plot([b["mean_probability"] for b in bins], [b["accuracy"] for b in bins], "o", color="C1",
            label="mean score")
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="self-reward score r_s (clipped to [0, 1])",
         ylabel="verified accuracy", title="Reliability of r_s")
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


if __name__ == "__main__":
  # Defined here, not at import: calibrate and export import this module and define their own.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Eval config file (configs/eval.py).",
                                            lock_config=True)

  def main(argv):
    del argv
    run(cli.required_config(_CONFIG, "configs/eval.py"))  # absl would exit with a returned value

  cli.run(main)
