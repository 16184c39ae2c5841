r"""Evaluation: sample n solutions per problem, verify them, read their self-reward scores, report.

  python -m laser_jax.evaluate --config=configs/eval.py --config.model.hf_path=... \
      --config.eval.input_file=math500 --config.eval.output_file=/tmp/out.jsonl

From a notebook: `summary = evaluator.run(config)` (config from `configs/eval.py`). The model and
the constants of its score come from `loading.load_model`; the output records, the summary and the
printed table from `report` (whose docstring gives the format).
"""
from __future__ import annotations

import functools
import glob
import json
import os
import sys
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from laser_jax import config_check
from laser_jax.config_check import ConfigError
from laser_jax.data import eval_sets
from laser_jax.data import prompts as prompts_lib
from laser_jax.data import synthetic
from laser_jax.data import verifier as verifier_lib
from laser_jax.evaluation import loading
from laser_jax.evaluation import report
from laser_jax.generate import calls
from laser_jax.generate import sampler as sampler_lib
from laser_jax.generate import sampling as sampling_lib
from laser_jax.models import model as model_lib
from laser_jax.models.config import ModelConfig
from laser_jax.rl import policy
from laser_jax.rl import records
from laser_jax.rl import scoring


def load_problems(input_file: str, limit: int = 0, data_dir: str = "") -> list[dict]:
  """Records of a named eval set (in `data_dir`, else where `eval_sets.data_dir` says), "synthetic" (the
  held-out split), or the JSONL/parquet files `input_file` names (local path or glob, gs://, hf://)."""
  if not input_file:
    raise ConfigError("config.eval.input_file: empty; give a JSONL/parquet file or an eval-set name")
  if input_file == "synthetic":
    records = synthetic.make_split("heldout", limit or 256)
  elif "://" in input_file or glob.has_magic(input_file) or input_file.lower() in eval_sets.EVAL_SETS \
      or os.path.exists(input_file):
    records = eval_sets.load_eval_records(input_file, data_dir, ("eval.input_file", "eval.data_dir"))
  else:
    raise ConfigError(f"config.eval.input_file: file not found: {input_file} (or an eval set: "
                      f"{', '.join(sorted(eval_sets.EVAL_SETS))}, synthetic)")
  if not records:
    raise ConfigError(f"config.eval.input_file: {input_file} holds no problems")
  return records[:limit] if limit > 0 else records


def sampling_params(config: ml_collections.ConfigDict, model: loading.LoadedModel
                    ) -> sampling_lib.SamplingParams:
  """The sampler's settings from `config.eval` (validated by `config_check.validate_eval`)."""
  return sampling_lib.sampling_params(config.eval, eos_ids=model.eos_ids, pad_id=model.pad_id,
                                      self_reward_token_id=model.zc_id)


def sample_call(model: loading.LoadedModel, sampling: sampling_lib.SamplingParams) -> calls.SampleCall:
  """The loaded model's sampler as the pipeline calls it (`calls.SampleCall`)."""
  return lambda token_ids, key: sampler_lib.sample(model.params, model.cfg, token_ids, sampling, key,
                                                   mesh=model.mesh)


def score_of(model: loading.LoadedModel, score_truncated: bool = True, rows_per_forward: int = 0) -> scoring.Score:
  """The loaded model's self-reward score: its beta_v, and c_ref or its pi_ref's forward; with
  `score_truncated`, truncated responses are scored as the official evaluation does (EOS
  appended, `scoring.TruncatedScore`; the EOS is the model's first EOS id, `eos_ids[0]`). These
  forwards take at most `rows_per_forward` rows at a time (0 = a sampler call's rows at once)."""
  exact = model.ref_params is not None
  ref_fn = (lambda out: reference_logprobs(model, out, rows_per_forward)) if exact else None
  truncated = None
  if score_truncated:
    at_eos = lambda params: lambda sequences: z_logprobs_at_eos(model, params, sequences, rows_per_forward)
    truncated = scoring.TruncatedScore(eos_id=int(model.eos_ids[0]), z_logprob_fn=at_eos(model.params),
                                       ref_z_logprob_fn=at_eos(model.ref_params) if exact else None)
  return scoring.Score(kl_coef=model.kl_coef, ref_constant=model.ref_constant, ref_z_logprob_fn=ref_fn,
                       truncated=truncated)


def generate(model: loading.LoadedModel, prompts: Sequence, sampling: sampling_lib.SamplingParams, *,
             batch_size: int, seed: int, verifier, score: scoring.Score | None, progress: bool = True):
  """The pipeline (`scoring.generate`) over `prompts` in calls of `batch_size` prompts, call b
  with key fold_in(key(seed), b); yields (the call's first prompt index, its records) with a
  progress bar over problems."""
  bar = tqdm(total=len(prompts), desc="sampling", unit="problem", disable=not progress,
             file=sys.stderr, dynamic_ncols=True)
  decode = functools.partial(sampling_lib.decode_responses, model.tokenizer)
  try:
    for start, part in scoring.generate(sample_call(model, sampling), prompts, jax.random.key(seed),
                                        prompts_per_call=batch_size, decode=decode, verifier=verifier,
                                        score=score):
      yield start, part
      bar.update(int(part.sample.group_ids.max()) + 1)
  finally:
    bar.close()


def reference_logprobs(model: loading.LoadedModel, out: sampling_lib.SampleOutput, rows_per_forward: int = 0
                       ) -> np.ndarray:
  """log pi_ref(z_c | x, y, EOS) [N] of every row of `out` (NaN for truncated rows): a forward
  of the reference model over `prompt + response + EOS`, read at the EOS position."""
  sequences, _ = records.build_sequences(out)
  return np.where(out.finished, z_logprobs_at_eos(model, model.ref_params, sequences, rows_per_forward), np.nan)


def z_logprobs_at_eos(model: loading.LoadedModel, params, sequences: records.Sequences,
                      rows_per_forward: int = 0) -> np.ndarray:
  """log pi(z_c | x, y, EOS) [K] (float64) of the rows of `sequences` for `params` (the policy's
  or pi_ref's, of `model`'s architecture): a forward over each row, read at its `eos_index`, at
  most `rows_per_forward` rows at a time (0 = all; a forward's activations over 8k-token rows
  outweigh the sampler's KV cache). Each forward's rows are padded to a power of two (copies of
  its last row, dropped) so that it compiles once per size bucket, not once per row count."""
  num_rows = len(sequences.eos_index)
  step = rows_per_forward if rows_per_forward > 0 else num_rows
  fn = _z_logprob_fn(model.cfg, model.zc_id)
  out = []
  for start in range(0, num_rows, step):
    rows = jax.tree.map(lambda v: v[start:start + step], sequences)
    count = len(rows.eos_index)
    bucket = 1 << max(count - 1, 0).bit_length()
    rows = jax.tree.map(lambda v: np.concatenate([v, np.repeat(v[-1:], bucket - count, axis=0)]), rows)
    logprobs = fn(params, rows.tokens, rows.positions, rows.attention_mask, rows.eos_index)
    out.append(np.asarray(jax.device_get(logprobs), np.float64)[:count])
  return np.concatenate(out)


@functools.lru_cache(maxsize=None)
def _z_logprob_fn(cfg: ModelConfig, zc_id: int):
  def fn(params, tokens, positions, attention_mask, eos_index):
    hidden = model_lib.forward(params, cfg, tokens, positions, attention_mask, return_hidden=True)
    return policy.self_reward_logprob(params, cfg, hidden, eos_index, zc_id)
  return jax.jit(fn)


def make_verifier(config: ml_collections.ConfigDict) -> verifier_lib.Verifier:
  """The verifier `config.eval` names (reward function, worker processes, time limit)."""
  e = config.eval
  try:
    return verifier_lib.Verifier(e.reward_fn, num_workers=e.num_workers, timeout_s=e.timeout_s)
  except ValueError as err:
    raise ConfigError(f"config.eval.reward_fn: {err}") from None


def prepare_items(config, model: loading.LoadedModel, records) -> prompts_lib.PreparedPrompts:
  e = config.eval
  try:
    return prompts_lib.prepare_prompts(records, model.tokenizer, model.template, e.max_prompt_len or None)
  except ValueError as e_:
    raise ConfigError(f"config.eval.template: {e_}") from None


def run(config: ml_collections.ConfigDict, *, progress: bool = True, print_table: bool = True,
        model: loading.LoadedModel | None = None) -> dict:
  """Evaluates as configured; writes the JSONL and the summary JSON; returns the summary dict."""
  e = config.eval
  config_check.validate_eval(config)
  records = load_problems(e.input_file, e.limit, e.data_dir)  # Bad input fails before the model loads.
  model = loading.load_model(config) if model is None else model
  sampling = sampling_params(config, model)
  prepared = prepare_items(config, model, records)
  if not prepared.items:
    raise ConfigError(f"config.eval.max_prompt_len: all {prepared.num_filtered} prompts are longer "
                    f"than {e.max_prompt_len} tokens")
  verifier = make_verifier(config)
  os.makedirs(os.path.dirname(os.path.abspath(e.output_file)), exist_ok=True)
  start, num_tokens, timeouts = time.time(), 0, 0
  rows = []
  with verifier as verify, open(e.output_file + ".tmp", "w") as f:
    for start, scored in generate(model, prepared.prompts, sampling, batch_size=e.batch_size, seed=e.seed,
                                  verifier=verify, score=score_of(model, e.score_truncated, e.batch_size),
                                  progress=progress):
      timeouts += scored.num_timeouts
      num_tokens += int(scored.sample.response_lengths.sum())
      items = prepared.items[start:start + int(scored.sample.group_ids.max()) + 1]
      for row in report.build_rows(items, scored):
        f.write(json.dumps(report.json_safe(row), allow_nan=False) + "\n")
        rows.append(row)
  os.replace(e.output_file + ".tmp", e.output_file)
  elapsed = time.time() - start
  summary = report.metrics_from_rows(rows, e.threshold, e.num_bootstrap, e.bootstrap_seed)
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
  summary["self_verification/reliability"] = report.reliability(rows)
  summary["reliability_plot"] = report.plot_reliability(summary["self_verification/reliability"], e.output_file)
  summary = report.json_safe(summary)
  with open(report.summary_path(e.output_file), "w") as f:
    json.dump(summary, f, indent=2, allow_nan=False)
  if print_table:
    print(report.format_table(summary), flush=True)
  return summary
