"""RL training metrics, as pure functions over arrays.

Two kinds of metric live here:
  * Per-token statistics that are accumulated over micro-batches and data-parallel shards
    (clip fractions, approximate KL). These are returned as `SumCount` pairs so that
    summing the pieces and dividing once gives exactly the full-batch value.
  * Rollout-batch statistics computed once on the whole batch (self-verification accuracy,
    response length, truncation rate, zero-std groups). These return plain scalars.

Self-verification follows the official LaSeR evaluation: over *finished* responses only, the
model predicts "correct" iff its score r_s > 0.5; we report the accuracy on verified-correct
responses, on verified-incorrect responses, overall, and F1 = the harmonic mean of the two class
accuracies. An undefined accuracy (empty class) is NaN, and then F1 is NaN too: an honest "no data"
rather than a misleading 0.
"""
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
  """Fractions of response tokens where each PPO clip is active (SumCounts over tokens).

  upper: A > 0 and rho > 1 + eps_high (the gradient is cut by the upper clip);
  lower: A < 0 and rho < 1 - eps_low (cut by the lower clip);
  dual:  A < 0 and rho > clip_ratio_c (cut by the dual clip; 0 when dual clip is off).
  `upper + lower` equals verl's `pg_clipfrac`; `dual` equals its `pg_clipfrac_lower`.
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
      "clipfrac_upper": masked_token_mean(upper.astype(jnp.float32), mask),
      "clipfrac_lower": masked_token_mean(lower.astype(jnp.float32), mask),
      "clipfrac_dual": masked_token_mean(dual.astype(jnp.float32), mask),
  }


def approx_kl(log_ratio: jax.Array, mask: jax.Array) -> SumCount:
  """Token-mean of old_logp - logp (verl's `ppo_kl`), a k1 estimate of KL(pi_old || pi)."""
  return masked_token_mean(-log_ratio, mask)


def _safe_div(num, den):
  num = jnp.asarray(num, jnp.float32)
  den = jnp.asarray(den, jnp.float32)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def self_verification_metrics(scores: jax.Array, rewards: jax.Array, finished: jax.Array,
                              threshold: float = 0.5) -> dict:
  """Self-verification accuracy of the last-token score, as the official evaluation reports it.

  Args:
    scores: [B] self-reward scores r_s (NaN allowed on truncated rows).
    rewards: [B] verifier rewards r_v; a row is verified-correct iff r_v > 0.5.
    finished: [B] bool; truncated rows are excluded from every count.
    threshold: predict "correct" iff r_s > threshold (0.5 in the paper).

  Returns:
    {self_reward_acc_correct, self_reward_acc_incorrect, self_reward_acc, self_reward_f1,
     self_reward_n_correct, self_reward_n_incorrect, self_reward_n_finished}; accuracies on an
    empty set are NaN.
  """
  finished = jnp.asarray(finished, bool)
  scores = jnp.where(finished, scores, 0.0)
  correct = jnp.asarray(rewards) > 0.5
  pred = scores > threshold
  pos = finished & correct
  neg = finished & ~correct
  n_pos = jnp.sum(pos)
  n_neg = jnp.sum(neg)
  acc_pos = _safe_div(jnp.sum(pos & pred), n_pos)
  acc_neg = _safe_div(jnp.sum(neg & ~pred), n_neg)
  acc = _safe_div(jnp.sum(pos & pred) + jnp.sum(neg & ~pred), n_pos + n_neg)
  # Harmonic mean of the two class accuracies; 0 when both are 0, NaN when either is undefined.
  f1 = jnp.where(acc_pos + acc_neg > 0, 2 * acc_pos * acc_neg / jnp.where(
      acc_pos + acc_neg > 0, acc_pos + acc_neg, 1.0), 0.0)
  f1 = jnp.where(jnp.isnan(acc_pos) | jnp.isnan(acc_neg), jnp.nan, f1)
  return {
      "self_reward_acc_correct": acc_pos,
      "self_reward_acc_incorrect": acc_neg,
      "self_reward_acc": acc,
      "self_reward_f1": f1,
      "self_reward_n_correct": n_pos,
      "self_reward_n_incorrect": n_neg,
      "self_reward_n_finished": n_pos + n_neg,
  }


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
  """Whole-rollout-batch statistics: reward mean, response length, truncation, zero-std groups.

  response_lengths: [B] generated tokens per row, EOS included (the response mask's row sums).
  """
  lengths = jnp.asarray(response_lengths, jnp.float32)
  finished = jnp.asarray(finished, bool)
  return {
      "reward_mean": jnp.mean(jnp.asarray(rewards, jnp.float32)),
      "response_length_mean": jnp.mean(lengths),
      "response_length_max": jnp.max(lengths),
      "truncation_rate": 1.0 - jnp.mean(finished.astype(jnp.float32)),
      "zero_std_group_frac": zero_std_group_fraction(rewards, group_ids, num_groups),
  }
