r"""What an evaluation writes: the per-problem records, the summary and its table.

Output, one JSON line per problem, field names as in the official LaSeR release's files:
  problem, answer, responses (decoded, special tokens skipped), pred_answers (last \boxed{} content
  or null), acc_list (verifier rewards), self_rewarding_scores (beta_v * (logprob - c_ref)), plus
  prompt (text), prompt_token_ids, response_token_ids (EOS excluded), self_rewarding_logprobs
  (log pi(z_c | x, y, EOS): read by the sampler during generation, or for a truncated response as
  the official evaluation reads it, after an appended EOS), score_after_truncation (per response:
  true where the score is that of a truncated response with EOS appended, `eval.score_truncated`;
  with it off, a truncated response's score and log-prob are null) and stop_token_ids (the EOS id
  each response emitted, null if truncated: models may have several) and mean_token_logprobs (the
  policy's mean token log-likelihood of each response, from the sampler's token log-probs, the
  EOS included for a finished response: the likelihood baselines' signal). With the exact score
  (`config.laser.ref_hf_path`, or a checkpoint of a run trained with `laser.use_ref_model_score`),
  scores are beta_v * (logprob - ref_logprob) and the records add self_rewarding_ref_logprobs
  (log pi_ref(z_c | x, y, EOS), one reference-model forward per batch). JSON never holds NaN: a
  missing value is null.
The summary (`summary_path(output_file)`: `foo.jsonl` -> `foo.summary.json`) holds the metrics of
`tts.summarize` (mean@n as reward/mean; self_verification/* with the official conventions over
every response and self_verification/*_finished over finished ones; the within-problem measures;
maj@k, self_weighted_maj@k, best@k and the likelihood baselines likelihood_weighted_maj@k,
best_by_likelihood@k), the run's statistics (truncated_frac, response_length/mean with the EOS counted as
training counts it, z_logprob/mean and /std over the scored responses, verifier_timeouts, ...)
and the config; the same numbers are printed as a table. README.md's table lists every key.

Voting canonicalises answers with `answers.canonical_answer` (the boxed text with whitespace, \left/\right
and \dfrac/\tfrac spellings removed), not with math-verify: equal canonical strings are always the
same answer, while e.g. "0.5" and "\frac12" stay separate votes (slightly conservative maj@k).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from absl import logging

from laser_jax.data import answers as answers_lib
from laser_jax.evaluation import tts
from laser_jax.rl import rl_metrics
from laser_jax.rl import scoring


def _nullable(x: float) -> float | None:
  return None if not math.isfinite(x) else float(x)


def mean_token_logprobs(out) -> np.ndarray:
  """[N] the policy's mean token log-likelihood of each response of a `SampleOutput`: the mean of
  its token log-probs, the EOS included for a finished response (the tokens training scores)."""
  lengths = out.response_lengths
  mask = np.arange(out.logprobs.shape[1])[None, :] < lengths[:, None]
  return np.where(mask, out.response_logprobs, 0.0).sum(1) / np.maximum(lengths, 1)


def build_rows(items, scored: scoring.ScoredSamples) -> list[dict]:
  """One output record per problem (the n rows of a problem are contiguous in `scored`).

  With the exact variant (`scored.ref_z_logprob`, log pi_ref(z_c | x, y, EOS)) the scores
  subtract them instead of c_ref, and the records hold them as `self_rewarding_ref_logprobs`.
  """
  out, texts = scored.sample, scored.texts
  n = len(texts) // len(items)
  likelihoods = mean_token_logprobs(out)
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
        "mean_token_logprobs": [float(x) for x in likelihoods[sl]],
        "score_after_truncation": [bool(x) for x in scored.scored_after_truncation[sl]],
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
  """`tts.summarize` on output records (a null score: a response without one; a null stop token:
  a truncated response), plus length/score statistics."""
  acc = np.array([r["acc_list"] for r in rows], np.float64)
  scores = np.array([[np.nan if s is None else s for s in r["self_rewarding_scores"]] for r in rows],
                    np.float64)
  finished = np.array([[t is not None for t in r["stop_token_ids"]] for r in rows], bool)
  answers = [[answers_lib.canonical_answer(a) for a in r["pred_answers"]] for r in rows]
  # Records written before these fields existed (e.g. a resumed paper table) lack them: NaN figures.
  likelihoods = (np.array([r["mean_token_logprobs"] for r in rows], np.float64)
                 if all("mean_token_logprobs" in r for r in rows) else None)
  responses = [r["responses"] for r in rows] if all("responses" in r for r in rows) else None
  out = tts.summarize(answers, acc, scores, threshold=threshold, num_bootstrap=num_bootstrap, seed=seed,
                      finished=finished, likelihoods=likelihoods, responses=responses)
  logprobs = np.array([[np.nan if x is None else x for x in r["self_rewarding_logprobs"]]
                       for r in rows], np.float64)
  # EOS included, as the trainer's rollout/response_length/* count it (the response mask's tokens).
  lengths = np.array([[len(t) for t in r["response_token_ids"]] for r in rows], np.float64) + finished
  scored = ~np.isnan(logprobs)
  out.update({
      "num_problems": len(rows), "n": int(acc.shape[1]),
      "truncated_frac": float(1 - finished.mean()),
      "response_length/mean": float(lengths.mean()),
      "z_logprob/mean": float(logprobs[scored].mean()) if scored.any() else math.nan,
      "z_logprob/std": float(logprobs[scored].std()) if scored.any() else math.nan,
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
           f"mean@{summary['n']} accuracy                  {f('reward/mean')}",
           f"self-verification (score > {summary.get('threshold', 0.5)}; every response, "
           f"{summary['self_verification/num_unscored']} unscored counted as \"incorrect\"):",
           f"  acc on correct   ({summary['self_verification/num_correct']:5d})       "
           f"{f('self_verification/acc_correct')}",
           f"  acc on incorrect ({summary['self_verification/num_incorrect']:5d})       "
           f"{f('self_verification/acc_incorrect')}",
           f"  overall                          {f('self_verification/acc')}",
           f"  F1                               {f('self_verification/f1')}",
           f"  F1 of the finished responses     {f('self_verification/f1_finished')}",
           f"  AUROC of the score               {f('self_verification/auroc')}",
           f"  AUROC within a problem ({summary['self_verification/within_auroc_problems']:4d})    "
           f"{f('self_verification/within_auroc')}",
           f"  calibration error (ECE, 10 bins) {f('self_verification/ece')}",
           f"distinct responses: correct {f('distinct_frac/correct')}  incorrect "
           f"{f('distinct_frac/incorrect')}; reward variance explained by the problem "
           f"{f('reward/variance_explained_by_problem')}",
           "   k    maj@k  self_weighted_maj@k  best@k  likelihood_weighted_maj@k  best_by_likelihood@k"]
  for k in tts.scaling_ks(summary["n"]):
    lines.append(f"{k:4d}   {f(f'maj@{k}')}               {f(f'self_weighted_maj@{k}')}  "
                 f"{f(f'best@{k}')}                     {f(f'likelihood_weighted_maj@{k}')}                "
                 f"{f(f'best_by_likelihood@{k}')}")
  return "\n".join(lines)


def reliability(rows: Sequence[dict]) -> list[dict]:
  """The reliability diagram behind `self_verification/ece` (r_s read as P(correct), 10 bins, every
  response, an unscored one at P = 0): per non-empty bin its range, count, mean score and accuracy
  (`rl_metrics.calibration`)."""
  scores = np.array([-np.inf if s is None else s for r in rows for s in r["self_rewarding_scores"]], np.float64)
  correct = np.array([a for r in rows for a in r["acc_list"]], np.float64) > 0.5
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
