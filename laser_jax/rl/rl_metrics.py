"""RL training metrics, as pure functions over arrays.

Two kinds of metric live here:
  * Per-token statistics that are accumulated over micro-batches and data-parallel shards
    (clip fractions, approximate KL). These are returned as `SumCount` pairs so that
    summing the pieces and dividing once gives exactly the full-batch value.
  * Rollout-batch statistics computed once on the whole batch (self-verification accuracy,
    response length, truncation rate, zero-std groups). These return plain scalars.
  * Within-problem measures over [problems, n] arrays (the score's AUROC within a problem, the
    distinct shares of correct / incorrect responses, the reward variance explained by the
    problem): what best-of-n and weighted voting rely on, reported by the evaluator and the
    trainer's periodic eval alike.

Self-verification (the model predicts "correct" iff its score r_s > 0.5; accuracy on
verified-correct responses, on verified-incorrect ones, overall, and F1 = the harmonic mean of the
two class accuracies) comes in two conventions, each under its own names:
  * `self_verification`: the official LaSeR evaluation's (SPEC "Test time"), what
    `laser_jax.evaluate` reports: every response counts, a response without a score counts as
    predicted "incorrect", a class with no responses has accuracy 0, F1 = 0 when both are 0.
  * `self_verification_finished`: finished responses only (`..._finished` names), what training
    logs (its truncated responses have no score): an empty class's accuracy is NaN, and then F1
    is NaN too -- an honest "no data" rather than a misleading 0.

Each metric is named where it is computed, verl-style: `actor/...` for the update's statistics
(here and in `objective`), `rollout/...` for the sampled batch, `self_verification/...` for the
score's verdicts, `advantage/...` in `objective.rollout_advantages`. The trainer, the evaluator and
the notebooks log these names unchanged; the trainer's periodic evaluation prefixes `eval/` to
the name `laser_jax.evaluate`'s summary gives the same quantity (`eval/reward/mean`,
`eval/truncated_frac`, `eval/self_verification/f1_finished`, ...). A statistic of a quantity is a
`/` suffix, as in verl (`rollout/response_length/mean`, `self_verification/score/mean`).
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SumCount(NamedTuple):
  """A (sum, count) pair; `.value` = sum / count (0 when count is 0).

  Adding the pieces of micro-batches (or shards) field by field and taking `.value` once gives
  exactly the full-batch mean; averaging the pieces' `.value`s does not.
  """
  sum: jax.Array
  count: jax.Array

  @property
  def value(self) -> jax.Array:
    count = jnp.asarray(self.count, jnp.float32)
    return jnp.where(count > 0, self.sum / jnp.where(count > 0, count, 1.0), 0.0)


def add_sum_counts(a: SumCount, b: SumCount) -> SumCount:
  """Field-wise sum of two SumCounts (tuple `+` would concatenate)."""
  return SumCount(a.sum + b.sum, a.count + b.count)


def accumulate_metrics(pieces: list[dict]) -> dict:
  """Sums a list of {name: SumCount} dicts (one per micro-batch) field by field."""
  if not pieces:
    raise ValueError("accumulate_metrics: got an empty list of metric dicts")
  return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *pieces)


def finalize_metrics(metrics: dict) -> dict:
  """{name: SumCount or scalar} -> {name: float}, dividing each SumCount once."""
  out = {}
  for name, m in metrics.items():
    out[name] = float(m.value) if isinstance(m, SumCount) else float(m)
  return out


def masked_token_mean(values: jax.Array, mask: jax.Array) -> SumCount:
  """Token mean of `values` [B, T] over `mask` as a SumCount; masked entries may be NaN."""
  mask = jnp.asarray(mask, jnp.float32)
  return SumCount(jnp.sum(jnp.where(mask > 0, values, 0.0) * mask), jnp.sum(mask))


# --------------------------------------------------------------------------------------------
# Per-token statistics of the policy update.
# --------------------------------------------------------------------------------------------


def clip_fractions(log_ratio: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                   clip_eps_low: float, clip_eps_high: float,
                   clip_ratio_c: float | None) -> dict:
  """Fractions of response tokens where each PPO clip is active (SumCounts over tokens), under
  verl's names where verl has one (`compute_policy_loss`):

  pg_clipfrac:          clipped by either PPO bound (the sum of the next two), as in verl;
  pg_clipfrac_eps_high: A > 0 and rho > 1 + eps_high (cut by the upper bound);
  pg_clipfrac_eps_low:  A < 0 and rho < 1 - eps_low (cut by the lower bound);
  pg_clipfrac_lower:    A < 0 and rho > clip_ratio_c (cut by the dual clip; 0 when it is off),
                        as in verl (the dual clip bounds the loss from below).
  """
  ratio = jnp.exp(log_ratio)
  adv = jnp.broadcast_to(advantages, ratio.shape)
  upper = (adv > 0) & (ratio > 1.0 + clip_eps_high)
  lower = (adv < 0) & (ratio < 1.0 - clip_eps_low)
  if clip_ratio_c is None:
    dual = jnp.zeros_like(upper)
  else:
    dual = (adv < 0) & (ratio > clip_ratio_c)
  return {
      "actor/pg_clipfrac": masked_token_mean((upper | lower).astype(jnp.float32), mask),
      "actor/pg_clipfrac_eps_high": masked_token_mean(upper.astype(jnp.float32), mask),
      "actor/pg_clipfrac_eps_low": masked_token_mean(lower.astype(jnp.float32), mask),
      "actor/pg_clipfrac_lower": masked_token_mean(dual.astype(jnp.float32), mask),
  }


def approx_kl(log_ratio: jax.Array, mask: jax.Array) -> SumCount:
  """Token-mean of old_logp - logp (verl's `ppo_kl`), a k1 estimate of KL(pi_old || pi)."""
  return masked_token_mean(-log_ratio, mask)


def self_verification(scores, rewards, threshold: float = 0.5) -> dict[str, float]:
  """Self-verification of the last-token score with the official evaluation's conventions (SPEC
  "Test time"; host NumPy): every response counts.

  Args:
    scores: [B] self-reward scores r_s; NaN = a response without a score, which counts as
      predicted "incorrect" (the official script scores truncated responses too, by appending
      EOS + z_c: `scoring.TruncatedScore`; what is still unscored is predicted "incorrect").
    rewards: [B] verifier rewards r_v; a row is verified-correct iff r_v > 0.5.
    threshold: predict "correct" iff r_s > threshold (0.5 in the paper).

  Returns, under `self_verification/`: acc_correct (accuracy on verified-correct rows; 0 when
  there are none), acc_incorrect (likewise), acc (all rows; 0 without rows), f1 (harmonic mean of
  the two class accuracies, 0 when both are 0), auroc and ece over every row, an unscored row
  taking the lowest score (below every score for AUROC, P(correct) = 0 for ECE; AUROC is NaN with
  a class empty, ECE NaN without rows), num_correct, num_incorrect, and `score_statistics`.
  """
  scores = np.asarray(scores, np.float64)
  correct = np.asarray(rewards, np.float64) > 0.5
  filled = np.where(np.isnan(scores), -np.inf, scores)  # unscored: the lowest score there is
  predicted = filled > threshold
  n_pos, n_neg = int(correct.sum()), int((~correct).sum())
  share = lambda hits, n: float(hits) / n if n else 0.0  # an empty class has accuracy 0
  acc_pos = share(np.sum(correct & predicted), n_pos)
  acc_neg = share(np.sum(~correct & ~predicted), n_neg)
  ece, _ = calibration(filled, correct)
  return {
      "self_verification/acc_correct": acc_pos,
      "self_verification/acc_incorrect": acc_neg,
      "self_verification/acc": share(np.sum(predicted == correct), n_pos + n_neg),
      "self_verification/f1": _harmonic_mean(acc_pos, acc_neg),
      "self_verification/auroc": auroc(filled, correct),
      "self_verification/ece": ece,
      "self_verification/num_correct": n_pos,
      "self_verification/num_incorrect": n_neg,
      **score_statistics(scores),
  }


def self_verification_finished(scores, rewards, finished, threshold: float = 0.5) -> dict[str, float]:
  """Self-verification over finished responses only (host NumPy): what training logs, its
  truncated responses having no score. Not the official evaluation's convention
  (`self_verification`), hence its own `..._finished` names.

  Args:
    scores: [B] self-reward scores r_s (NaN allowed on truncated rows).
    rewards: [B] verifier rewards r_v; a row is verified-correct iff r_v > 0.5.
    finished: [B] bool; truncated rows are excluded from every statistic but `score_statistics`
      (which reads the scores alone: in training a truncated row's is NaN).
    threshold: predict "correct" iff r_s > threshold (0.5 in the paper).

  Returns, under `self_verification/`: acc_correct_finished (accuracy on finished verified-correct
  rows), acc_incorrect_finished, acc_finished (both classes), f1_finished (harmonic mean of the two
  class accuracies: NaN when a class is empty, 0 when both accuracies are 0), auroc_finished and
  ece_finished (`score_separation`), num_correct_finished, num_incorrect_finished, and
  `score_statistics`. An accuracy over an empty set is NaN.
  """
  finished = np.asarray(finished, bool)
  scores = np.asarray(scores, np.float64)
  correct = np.asarray(rewards, np.float64) > 0.5
  predicted = np.where(finished, scores, -np.inf) > threshold
  pos, neg = finished & correct, finished & ~correct
  n_pos, n_neg = int(pos.sum()), int(neg.sum())
  mean = lambda hits, n: float(hits) / n if n else float("nan")
  acc_pos = mean(np.sum(pos & predicted), n_pos)
  acc_neg = mean(np.sum(neg & ~predicted), n_neg)
  separation = score_separation(scores, rewards, finished)
  return {
      "self_verification/acc_correct_finished": acc_pos,
      "self_verification/acc_incorrect_finished": acc_neg,
      "self_verification/acc_finished": mean(np.sum(pos & predicted) + np.sum(neg & ~predicted), n_pos + n_neg),
      "self_verification/f1_finished": _harmonic_mean(acc_pos, acc_neg),
      "self_verification/auroc_finished": separation["auroc"],
      "self_verification/ece_finished": separation["ece"],
      "self_verification/num_correct_finished": n_pos,
      "self_verification/num_incorrect_finished": n_neg,
      **score_statistics(scores),  # the same as `self_verification`'s on the same scores
  }


def score_statistics(scores) -> dict[str, float]:
  """The same under either convention: `self_verification/score/mean` (mean r_s of the responses
  that have a score; NaN if none) and `self_verification/num_unscored` (responses without one:
  in training the truncated ones)."""
  scores = np.asarray(scores, np.float64)
  scored = ~np.isnan(scores)
  return {"self_verification/score/mean": float(scores[scored].mean()) if scored.any() else float("nan"),
          "self_verification/num_unscored": int((~scored).sum())}


def _harmonic_mean(a: float, b: float) -> float:
  """F1 of two class accuracies: NaN if either is, 0 when both are 0."""
  if math.isnan(a) or math.isnan(b):
    return float("nan")
  return 2 * a * b / (a + b) if a + b > 0 else 0.0


def auroc(scores, labels) -> float:
  """Threshold-free separation of correct from incorrect by the score: the probability that a
  random correct row scores above a random incorrect one, ties counting 1/2 (the Mann-Whitney U
  statistic over n_pos * n_neg). NaN when a class is empty. Host NumPy, O(n log n)."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels, bool)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based, ties share their mean rank
  rank_sum = float(np.sum(average_rank[inverse][labels]))
  return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def calibration(probabilities, labels, num_bins: int = 10) -> tuple[float, list[dict]]:
  """Expected calibration error of `probabilities` (clipped to [0, 1]) as predictions of
  `labels`, over `num_bins` equal-width bins (the last one closed): sum over bins of
  (rows in bin / rows) * |accuracy - mean probability|. Returns (ECE, the non-empty bins as
  {"low", "high", "count", "mean_probability", "accuracy"}); NaN and no bins without rows."""
  p = np.clip(np.asarray(probabilities, np.float64), 0.0, 1.0)
  labels = np.asarray(labels, np.float64)
  if p.size == 0:
    return float("nan"), []
  index = np.minimum((p * num_bins).astype(int), num_bins - 1)
  ece, bins = 0.0, []
  for b in range(num_bins):
    inside = index == b
    if not inside.any():
      continue
    mean_p, accuracy = float(p[inside].mean()), float(labels[inside].mean())
    ece += inside.sum() / p.size * abs(accuracy - mean_p)
    bins.append({"low": b / num_bins, "high": (b + 1) / num_bins, "count": int(inside.sum()),
                 "mean_probability": mean_p, "accuracy": accuracy})
  return float(ece), bins


def score_separation(scores, rewards, finished) -> dict:
  """AUROC and calibration (ECE, 10 bins, r_s read as P(correct)) of the scores of finished rows
  against the verifier (correct iff r_v > 0.5): {"auroc", "ece", "reliability"}."""
  finished = np.asarray(finished, bool)
  scores = np.asarray(scores, np.float64)[finished]
  correct = np.asarray(rewards, np.float64)[finished] > 0.5
  ece, bins = calibration(scores, correct)
  return {"auroc": auroc(scores, correct), "ece": ece, "reliability": bins}


# ---- within-problem measures: what best-of-n and weighted voting rely on ----------------------
# Over [P, n] arrays (P problems, n responses each): the score's ranking of one problem's
# solutions, how repetitive each class is, how much of the reward is the problem's difficulty.
# `laser_jax.evaluate` (via `evaluation.tts`), the trainer's periodic eval and bench/learning.py
# all report them from here.


def _by_problem(x, name: str) -> np.ndarray:
  arr = np.asarray(x, np.float64)
  if arr.ndim != 2:
    raise ValueError(f"{name} must be [num_problems, n], got shape {arr.shape}")
  return arr


def within_problem_auroc(acc, scores) -> tuple[float, int]:
  """(mean AUROC of the score within a problem, number of problems it averages over).

  Only a problem's scored responses (score not NaN) are compared with each other; a problem
  counts iff they include both a correct and an incorrect response. NaN and 0 when no problem
  does."""
  acc, scores = _by_problem(acc, "acc"), _by_problem(scores, "scores")
  values = []
  for problem_acc, problem_scores in zip(acc, scores):
    scored = ~np.isnan(problem_scores)
    value = auroc(problem_scores[scored], problem_acc[scored] > 0.5)
    if not np.isnan(value):
      values.append(value)
  return (float(np.mean(values)) if values else float("nan")), len(values)


def distinct_fractions(responses, acc) -> dict[str, float]:
  """Share of distinct responses among the correct and among the incorrect responses (distinct
  within a problem, pooled over problems): `distinct_frac/correct`, `.../incorrect`; NaN for a
  class without responses. `responses`: P rows of n texts, or of any hashable standing for them
  (`problem_text_ids`). Few distinct correct texts let a noisy max pick a rare wrong outlier over
  the repeated right one."""
  acc = _by_problem(acc, "acc")
  out = {}
  for name, is_class in (("correct", acc > 0.5), ("incorrect", acc <= 0.5)):
    texts = [(p, t) for p, row in enumerate(responses) for t, c in zip(row, is_class[p]) if c]
    out[f"distinct_frac/{name}"] = len(set(texts)) / len(texts) if texts else float("nan")
  return out


def reward_variance_explained_by_problem(acc) -> float:
  """Between-problem variance of the reward (of the per-problem means) over its total variance:
  1 when every problem's responses agree, 0 when every problem has the same accuracy; NaN when
  the reward is constant."""
  acc = _by_problem(acc, "acc")
  total = acc.var()
  return float(acc.mean(axis=1).var() / total) if total > 0 else float("nan")


def within_problem_measures(acc, scores, responses=None) -> dict[str, float]:
  """The within-problem measures under their summary names; without `responses` the distinct
  shares are NaN (the keys are always the same)."""
  within, num_within = within_problem_auroc(acc, scores)
  out = {"self_verification/within_auroc": within,
         "self_verification/within_auroc_problems": num_within,
         "reward/variance_explained_by_problem": reward_variance_explained_by_problem(acc)}
  out.update(distinct_fractions(responses, acc) if responses is not None else
             {"distinct_frac/correct": float("nan"), "distinct_frac/incorrect": float("nan")})
  return out


def problem_text_ids(texts, group_ids) -> np.ndarray:
  """[N] for each response, the index (in `texts`) of the first response of its problem (same
  group id) with the same text: equal within a problem iff the texts are, so the distinct shares
  can be counted from integers, which `hosts.gather_rows` gathers and strings it does not."""
  first: dict = {}
  return np.array([first.setdefault((int(g), t), r) for r, (g, t) in enumerate(zip(group_ids, texts))],
                  np.int64)


def rows_by_problem(group_ids, *rows) -> list[np.ndarray]:
  """Per-response vectors [N] -> [P, n] arrays, row p = the responses of the p-th smallest group
  id in their order (a stable sort); every problem must have the same number of responses."""
  group_ids = np.asarray(group_ids)
  order = np.argsort(group_ids, kind="stable")
  counts = np.unique(group_ids, return_counts=True)[1]
  if counts.size == 0 or (counts != counts[0]).any():
    raise ValueError(f"rows_by_problem: problems have different numbers of responses: {sorted(set(counts.tolist()))}")
  return [np.asarray(r)[order].reshape(counts.size, counts[0]) for r in rows]


def step_model_flops(num_params: int, tokens: float, logprob_forwards: int) -> float:
  """Model FLOPs of one RL step over `tokens` (PaLM's convention: 2N per token for a forward, 6N
  with the backward): the sampler's forward, `logprob_forwards` log-prob passes (recomputed old
  log-probs, pi_ref) and the update. The one formula of `perf/mfu` and laser_jax.aot's MFU."""
  return (2 * (1 + logprob_forwards) + 6) * num_params * tokens


def zero_std_group_fraction(rewards: jax.Array, group_ids: jax.Array,
                            num_groups: int | None = None) -> jax.Array:
  """Fraction of (non-empty) groups whose rewards are all equal (zero std: no GRPO signal).

  group_ids: [B] ints in [0, num_groups); num_groups defaults to B. Rows need not be contiguous.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  num_groups = rewards.shape[0] if num_groups is None else num_groups
  size = jax.ops.segment_sum(jnp.ones_like(rewards), group_ids, num_groups)
  gmax = jax.ops.segment_max(rewards, group_ids, num_groups)
  gmin = jax.ops.segment_min(rewards, group_ids, num_groups)
  present = size > 0
  constant = present & (gmax == gmin)
  return jnp.sum(constant) / jnp.maximum(jnp.sum(present), 1)


def rollout_metrics(rewards: jax.Array, response_lengths: jax.Array, finished: jax.Array,
                    group_ids: jax.Array, num_groups: int | None = None) -> dict:
  """Whole-rollout-batch statistics: reward mean, response length, truncation, zero-std groups,
  under the stems `laser_jax.evaluate`'s summary uses for the same quantities (`response_length/mean`,
  `truncated_frac`; verl's `/mean`, `/max` style).

  response_lengths: [B] generated tokens per row, EOS included (the response mask's row sums).
  """
  lengths = jnp.asarray(response_lengths, jnp.float32)
  finished = jnp.asarray(finished, bool)
  return {
      "rollout/reward/mean": jnp.mean(jnp.asarray(rewards, jnp.float32)),
      "rollout/response_length/mean": jnp.mean(lengths),
      "rollout/response_length/max": jnp.max(lengths),
      "rollout/truncated_frac": 1.0 - jnp.mean(finished.astype(jnp.float32)),
      "rollout/zero_std_group_frac": zero_std_group_fraction(rewards, group_ids, num_groups),
  }
