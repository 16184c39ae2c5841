r"""c_ref calibration: statistics of log pi_ref(z_c | x, y) over sampled solutions, and z_c checks.

LaSeR replaces log pi_ref(z_c | x, y) by a constant c_ref (-23 for Qwen2.5, -25 for OctoThinker).
For a new model (run this on the *initial* model, the reference policy) and token z_c:

  python -m laser_jax.calibrate --config=configs/eval.py --config.model.hf_path=/path/to/model \
      --config.laser.self_reward_token_id=151652 --config.eval.input_file=math500

samples `eval.n` solutions for the first `calibrate.num_problems` problems of `eval.input_file`, reads
log pi(z_c | x, y, EOS) for every finished response (in the sampler's loop), and reports its mean,
std (population, ddof=0), min/max and quantiles; the mean is the value to use for c_ref. The report
is printed as a table and written as JSON (`calibrate.output_file`).

z_c must never occur in normal text. Three checks, each a clear `WARNING:` line on stderr (and in the
JSON's "warnings") when it fails:
  * encoding ordinary text -- the problems, the sampled responses and a fixed sample of prose, digits
    and LaTeX -- never produces z_c;
  * z_c is a special / added token of the tokenizer (not a piece the BPE merges can produce);
  * along the sampled text (every position that generated a response token or its EOS), the model
    gives z_c at most `calibrate.warn_logprob` log-probability. This takes one extra full forward
    over the samples; its value right after each EOS is also compared with the sampler's read-out
    (`forward_check_max_abs_diff`).
"""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


from laser_jax import config_check
from laser_jax.config_check import ConfigError
from laser_jax.evaluation import evaluator
from laser_jax.evaluation import loading
from laser_jax.evaluation import report as report_lib
from laser_jax.models import model as model_lib
from laser_jax.models.config import ModelConfig

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)

# Ordinary text every tokenizer must encode without z_c: prose, digits, punctuation, LaTeX.
ORDINARY_TEXT = (
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = < > ( ) [ ] { } , . ; : ! ?",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Let $x$ be a real number with $x^2 = 4$. Then $x = \\pm 2$, so the answer is $\\boxed{2}$.",
    "We compute \\frac{1}{2} + \\sqrt{3} \\cdot \\pi \\approx 5.94 and 10% of 250 is 25.",
)


def calibration_path(config: ml_collections.ConfigDict) -> str:
  """`calibrate.output_file`, or eval.output_file with its extension replaced by .calibration.json."""
  if config.calibrate.output_file:
    return config.calibrate.output_file
  stem = os.path.splitext(config.eval.output_file)[0]
  return stem + ".calibration.json"


@functools.partial(jax.jit, static_argnames=("cfg", "token_id", "chunk"))
def token_logprob_along(params, cfg: ModelConfig, tokens, mask, token_id: int, chunk: int):
  """[B, T] log pi(token_id | tokens[:, :t+1]) (temperature 1) by a full forward.

  The vocabulary projection runs over `chunk` positions at a time, so memory stays
  O(B * chunk * V) instead of O(B * T * V). T must be a multiple of `chunk`.
  """
  positions = model_lib.default_positions(mask)
  hidden = model_lib.forward(params, cfg, tokens, positions, mask, return_hidden=True)
  b, t, h = hidden.shape
  chunks = hidden.reshape(b, t // chunk, chunk, h).swapaxes(0, 1)  # [T/chunk, B, chunk, H]

  def one(hc):
    logits = model_lib.unembed(params, cfg, hc)
    return logits[..., token_id] - jax.nn.logsumexp(logits, axis=-1)

  return jax.lax.map(one, chunks).swapaxes(0, 1).reshape(b, t)


def scan_samples(model: loading.LoadedModel, out, chunk: int) -> tuple[np.ndarray, np.ndarray]:
  """Per row: (max log pi(z_c) over positions that generated response tokens incl. EOS,
  log pi(z_c) right after the EOS (NaN if truncated)) from one full forward."""
  prompt_len = out.prompt_tokens.shape[1]
  resp = out.response_tokens
  resp_len = out.response_lengths
  resp_mask = np.arange(resp.shape[1])[None] < resp_len[:, None]
  tokens = np.concatenate([out.prompt_tokens, resp], axis=1)
  mask = np.concatenate([out.prompt_mask, resp_mask], axis=1)
  total = -(-tokens.shape[1] // chunk) * chunk
  tokens = np.pad(tokens, ((0, 0), (0, total - tokens.shape[1])), constant_values=out.pad_id)
  mask = np.pad(mask, ((0, 0), (0, total - mask.shape[1])))
  if model.mesh is not None:
    put = lambda x: jax.device_put(x, NamedSharding(model.mesh, PartitionSpec()))
    tokens, mask = put(tokens), put(mask)
  lp = np.asarray(token_logprob_along(model.params, model.cfg, tokens, mask, model.zc_id, chunk))
  rows = np.arange(len(resp_len))
  # Position prompt_len - 1 + j predicts response token j (j = 0..len-1 incl. the EOS).
  col = np.arange(lp.shape[1])[None]
  in_text = (col >= prompt_len - 1) & (col < prompt_len - 1 + resp_len[:, None])
  text_max = np.where(in_text, lp, -np.inf).max(axis=1)
  after_eos = np.where(out.finished, lp[rows, np.minimum(prompt_len + out.lengths, lp.shape[1] - 1)],
                       np.nan)
  return text_max, after_eos


def token_checks(tokenizer, token_id: int, texts) -> dict[str, Any]:
  """Whether z_c is special/added, and how often encoding `texts` (plus ORDINARY_TEXT) yields it."""
  added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
  special = set(tokenizer.all_special_ids) | added
  occurrences, texts_with = 0, 0
  for text in list(ORDINARY_TEXT) + list(texts):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = sum(1 for i in ids if i == token_id)
    occurrences += count
    texts_with += count > 0
  return {"token": tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None,
          "is_special_or_added": token_id in special, "in_tokenizer": token_id < len(tokenizer),
          "num_texts_encoded": len(ORDINARY_TEXT) + len(texts),
          "texts_encoding_to_token": texts_with, "occurrences_in_encoded_text": occurrences}


# The untrained verifier should call pi_ref's own solutions "incorrect": two standard deviations
# of the initial scores beta_v * (log pi_ref - c_ref) stay within the 0.5 threshold.
INITIAL_SCORE_SPREAD = 0.25


def kl_coef_range(ref_constant: float, logprob_std: float) -> tuple[float, float]:
  """The beta_v (config.laser.kl_coef) range that keeps both L_sr targets reachable and apart:
  at least MIN_SCORE_RANGE / -c_ref, so the correct class's target log p(z_c) = c_ref + 1 / beta_v
  stays below 0 with margin (config_check warns below it); at most INITIAL_SCORE_SPREAD / std of
  log pi_ref(z_c), so pi_ref's scores start near 0, the incorrect class's target. The range is
  empty (low > high) when log pi_ref(z_c) varies too much for a constant c_ref."""
  low = config_check.MIN_SCORE_RANGE / -ref_constant if ref_constant < 0 else float("inf")
  high = INITIAL_SCORE_SPREAD / logprob_std if logprob_std > 0 else float("inf")
  return low, high


def warnings_for(report: dict, warn_logprob: float) -> list[str]:
  """The z_c warnings of a report (empty when z_c looks like a dedicated unused token)."""
  z, tok = report["token_id"], report["token"]
  out = []
  if report["texts_encoding_to_token"]:
    out.append(f"z_c={z} ({tok!r}) occurs in normal text: encoding {report['texts_encoding_to_token']} "
               f"of {report['num_texts_encoded']} ordinary texts produced it "
               f"{report['occurrences_in_encoded_text']} times; choose a token that text never encodes to")
  if report["in_tokenizer"] and not report["is_special_or_added"]:
    out.append(f"z_c={z} ({tok!r}) is a regular vocabulary piece, not a special/added token; "
               "ordinary text can produce it")
  low, high = report["kl_coef_range"]
  if low > high:
    out.append(f"no beta_v keeps both targets reachable: log pi_ref(z_c) has std {report['std']:.3g} "
               f"around c_ref {report['mean']:.3g}, so beta_v >= {low:.3g} (correct target below log p = 0) "
               f"spreads pi_ref's own scores beyond the threshold (beta_v <= {high:.3g}); consider the exact "
               "score (config.laser.use_ref_model_score)")
  max_lp = report["max_logprob_in_text"]
  if max_lp is not None and max_lp > warn_logprob:
    out.append(f"z_c={z} ({tok!r}) has log-prob {max_lp:.2f} > {warn_logprob} inside sampled text: "
               "the model already uses this token in normal text")
  return out


def format_table(report: dict) -> str:
  q = report["quantiles"]
  lines = [f"z_c = {report['token_id']} ({report['token']!r})  finished responses "
           f"{report['num_finished']}/{report['num_responses']}  accuracy {report['accuracy']:.3f}",
           f"log pi_ref(z_c | x, y):  mean {report['mean']:.4f}  std {report['std']:.4f}  "
           f"min {report['min']:.4f}  max {report['max']:.4f}",
           "  quantiles " + "  ".join(f"p{round(100 * float(k)):02d} {v:.3f}" for k, v in q.items()),
           f"suggested c_ref (config.laser.ref_constant): {report['mean']:.2f}",
           f"beta_v (config.laser.kl_coef) keeping both targets reachable: "
           f"[{report['kl_coef_range'][0]:.3g}, {report['kl_coef_range'][1]:.3g}]",
           f"max log pi(z_c) inside sampled text: {report['max_logprob_in_text']:.3f}; "
           f"special/added token: {report['is_special_or_added']}; ordinary texts encoding to it: "
           f"{report['texts_encoding_to_token']}/{report['num_texts_encoded']}"]
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, *, progress: bool = True, print_table: bool = True,
        model: loading.LoadedModel | None = None) -> dict:
  """Samples, reports log pi(z_c | x, y) statistics and z_c checks; writes and returns the report."""
  e, cal = config.eval, config.calibrate
  config_check.validate_eval(config)
  records = evaluator.load_problems(e.input_file, cal.num_problems, e.data_dir)
  model = loading.load_model(config, score=False) if model is None else model  # needs z_c only
  sampling = evaluator.sampling_params(config, model)
  prepared = evaluator.prepare_items(config, model, records)
  if not prepared.items:
    raise ConfigError(f"config.eval.max_prompt_len: all {prepared.num_filtered} prompts are "
                      f"longer than {e.max_prompt_len} tokens")
  logprobs, text_max, after_eos, texts, rewards = [], [], [], [], []
  with evaluator.make_verifier(config) as verify:
    for _, verified in evaluator.generate(model, prepared.prompts, sampling, batch_size=e.batch_size,
                                          seed=e.seed, verifier=verify, score=None, progress=progress):
      out = verified.sample
      logprobs.append(out.self_reward_logprob)
      tm, ae = scan_samples(model, out, cal.scan_chunk)
      text_max.append(tm)
      after_eos.append(ae)
      texts += verified.texts
      rewards.append(verified.rewards)
  logprobs, text_max, after_eos = map(np.concatenate, (logprobs, text_max, after_eos))
  finished = ~np.isnan(logprobs)
  if not finished.any():
    raise ConfigError(f"config.eval.max_new_tokens: no response finished within "
                      f"{e.max_new_tokens} tokens ({len(logprobs)} sampled): raise it")
  values = logprobs[finished].astype(np.float64)
  report = {
      "token_id": model.zc_id, "model": model.source, "num_problems": len(prepared.items),
      "num_responses": int(len(logprobs)), "num_finished": int(finished.sum()),
      # The sampled solutions' verifier accuracy: c_ref is the mean over all of them, right or wrong.
      "accuracy": float(np.mean(np.concatenate(rewards))),
      "mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
      "max": float(values.max()),
      "quantiles": {f"{q:g}": float(np.quantile(values, q)) for q in QUANTILES},
      "max_logprob_in_text": float(text_max.max()),
      "forward_check_max_abs_diff": float(np.max(np.abs(after_eos[finished] - logprobs[finished]))),
      "logprobs": [float(v) for v in values],
  }
  report.update(token_checks(model.tokenizer, model.zc_id,
                             [it["problem"] for it in prepared.items] + texts))
  report["suggested_ref_constant"] = report["mean"]
  report["kl_coef_range"] = list(kl_coef_range(report["mean"], report["std"]))
  report["warnings"] = warnings_for(report, cal.warn_logprob)
  path = calibration_path(config)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report_lib.json_safe({**report, "config": config.to_dict()}), f, indent=2, allow_nan=False)
  for w in report["warnings"]:
    print(f"WARNING: {w}", file=sys.stderr, flush=True)
  if print_table:
    print(format_table(report), flush=True)
    print(f"report: {path}", flush=True)
  return report

