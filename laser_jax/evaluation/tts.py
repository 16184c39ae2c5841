"""Test-time metrics: accuracy, self-verification, and test-time scaling with self-reward scores.

Inputs, for P problems with n sampled responses each:
- `acc` [P, n]: verifier reward (0/1) of each response.
- `scores` [P, n]: self-reward score r_s of each response; NaN for a response without a score
  (`laser_jax.evaluate` scores truncated responses too, as the official evaluation does; without
  that, a truncated response has no EOS, hence no score).
- `finished` [P, n] (optional): the response ended with an EOS; default: it has a score.
- `answers` (P lists of n): the extracted answer of each response (e.g. its last boxed string),
  or None when there is none. Answers vote together iff the strings are equal, so callers should
  pass a canonical form.
- `likelihoods` [P, n] (optional): the policy's mean token log-likelihood of each response (the
  sampler's token log-probs, EOS included for a finished response): the cheapest ranking signal,
  reported beside the score's as a baseline.
- `responses` (P lists of n, optional): the response texts, for the distinct-response shares.

Conventions (documented because they change numbers):
- Self-verification (the model predicts "correct" iff score > threshold), twice:
  `self_verification/...` with the official evaluation's conventions (SPEC "Test time"): every
  response counts, one without a score counts as predicted "incorrect", an empty class has
  accuracy 0 and F1 is 0 when both class accuracies are; `self_verification/..._finished` over
  the finished responses only (the training metrics' convention: an empty class gives NaN).
  Both are `rl_metrics`' (`self_verification`, `self_verification_finished`).
- Voting ignores responses whose answer is None; a subset with no answer at all scores 0.
  Self-reward-weighted voting adds each response's score clipped at 0, max(r_s, 0), to its answer
  (NaN scores add 0; `self_reward_weights`): a vote weight must be non-negative (SPEC "Test
  time"), or a response with a negative score would subtract from the answer it votes for, and a
  right answer's extra, low-scored solutions could make it lose to a less supported wrong one;
  clipping keeps r_s's scale and order above 0, where the score predicts "correct". Likelihood-weighted voting weighs a response by exp(mean token
  log-likelihood), in (0, 1]. Picks are among the answers present in the subset (all weights 0:
  the first-appearing answer). Ties go to the answer that appears first
  among the problem's n responses. A voted answer is correct iff its responses are (all
  responses with the same answer string share one verdict; the first one's is used).
- Best-of-k picks the response with the highest score (NaN = -inf; best_by_likelihood@k: the
  highest mean token log-likelihood); ties and an all-NaN subset
  go to the first drawn response. A truncated response scored with EOS appended weighs and
  competes like any other (as in the official evaluation).
- @k metrics are bootstrapped as verl reports maj@k / best@k: per problem, `num_bootstrap`
  subsets of k responses drawn with replacement (seeded), averaged, then averaged over problems.
- Within-problem measures (what best-of-n and weighted voting rely on: ranking the solutions of
  one problem; `rl_metrics`', which the trainer's eval reports too): `within_problem_auroc` (mean
  over the problems whose scored responses include both a correct and an incorrect one, and
  their count), `distinct_fractions` (distinct response texts over responses, per class, pooled
  over problems) and `reward_variance_explained_by_problem` (between-problem variance of the
  reward over its total).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from laser_jax.rl import rl_metrics


def _as_2d(x, name: str, dtype) -> np.ndarray:
  arr = np.asarray(x, dtype)
  if arr.ndim != 2:
    raise ValueError(f"{name} must be [num_problems, n], got shape {arr.shape}")
  return arr


def mean_at_n(acc) -> float:
  """mean@n: the accuracy averaged over all responses of all problems."""
  return float(_as_2d(acc, "acc", np.float64).mean())


def self_verification(acc, scores, threshold: float = 0.5, finished=None) -> dict[str, float]:
  """Self-verification on [P, n] arrays under both conventions (module docstring):
  `rl_metrics.self_verification` (official, every response) and
  `rl_metrics.self_verification_finished` (`finished` rows only; default: the scored ones)."""
  acc = _as_2d(acc, "acc", np.float64).ravel()
  scores = _as_2d(scores, "scores", np.float64).ravel()
  finished = ~np.isnan(scores) if finished is None else _as_2d(finished, "finished", bool).ravel()
  if acc.shape != scores.shape or finished.shape != scores.shape:
    raise ValueError(f"acc, scores and finished have {acc.size}, {scores.size} and {finished.size} entries")
  return {**rl_metrics.self_verification(scores, acc, threshold),
          **rl_metrics.self_verification_finished(scores, acc, finished, threshold)}


def self_reward_weights(scores) -> np.ndarray:
  """Vote weights from self-reward scores: max(r_s, 0), NaN (no score) -> 0 (module docstring)."""
  return np.maximum(np.nan_to_num(np.asarray(scores, np.float64), nan=0.0), 0.0)


def likelihood_weights(likelihoods) -> np.ndarray:
  """Vote weights from mean token log-likelihoods: exp(mean log-prob), the geometric-mean token
  probability, in (0, 1]."""
  return np.exp(np.asarray(likelihoods, np.float64))


def _group_ids(answers: Sequence[str | None]) -> tuple[np.ndarray, int]:
  """Answer strings -> ids in order of first appearance; None -> -1."""
  ids, table = [], {}
  for a in answers:
    ids.append(-1 if a is None else table.setdefault(a, len(table)))
  return np.array(ids, np.int64), len(table)


def vote(answers: Sequence[str | None], acc, weights=None) -> float:
  """Correctness of the (weighted) majority answer of one set of responses.

  `weights=None` is plain majority voting; otherwise each response adds its weight (NaN -> 0),
  which must be non-negative (`self_reward_weights` makes them from scores).
  """
  gid, num_groups = _group_ids(answers)
  acc = np.asarray(acc, np.float64)
  w = np.ones(len(gid)) if weights is None else np.nan_to_num(np.asarray(weights, np.float64))
  if (w < 0).any():
    raise ValueError(f"vote weights must be non-negative, got {w.min()}")
  return float(_vote(gid[None], acc[None], w[None], num_groups)[0])


def _vote(gid: np.ndarray, acc: np.ndarray, w: np.ndarray, num_groups: int) -> np.ndarray:
  """Batched vote over rows of [B, k] group ids / verdicts / weights -> [B] correctness."""
  if num_groups == 0:
    return np.zeros(gid.shape[0])
  onehot = (gid[..., None] == np.arange(num_groups)).astype(np.float64)  # [B, k, G]
  present = onehot.sum(1) > 0  # [B, G]
  totals = np.where(present, np.einsum("bkg,bk->bg", onehot, w), -np.inf)
  winner = np.argmax(totals, axis=1)  # first max: the earliest-appearing answer wins ties
  # Verdict of the winning answer: any of its responses in the row (they share one verdict).
  first = np.argmax(gid == winner[:, None], axis=1)
  return np.where(present.any(1), acc[np.arange(len(gid)), first], 0.0)


def best_of(acc, scores) -> float:
  """Correctness of the highest-scoring response (NaN scores never win unless all are NaN)."""
  acc = np.asarray(acc, np.float64)
  return float(_best_of(acc[None], np.asarray(scores, np.float64)[None])[0])


def _best_of(acc: np.ndarray, scores: np.ndarray) -> np.ndarray:
  best = np.argmax(np.where(np.isnan(scores), -np.inf, scores), axis=1)
  return acc[np.arange(len(acc)), best]


def scaling_ks(n: int) -> list[int]:
  """k = 1, 2, 4, ... <= n."""
  return [2**i for i in range(int(np.log2(n)) + 1)] if n >= 1 else []


def scaling_metrics(answers: Sequence[Sequence[str | None]], acc, scores,
                    ks: Sequence[int] | None = None, num_bootstrap: int = 1000,
                    seed: int = 0, likelihoods=None) -> dict[str, float]:
  """Bootstrapped maj@k, self_weighted_maj@k and best@k for each k (default 1, 2, 4, ... <= n);
  with `likelihoods` (no NaN), also the baselines best_by_likelihood@k and
  likelihood_weighted_maj@k on the same draws."""
  acc = _as_2d(acc, "acc", np.float64)
  scores = _as_2d(scores, "scores", np.float64)
  num_problems, n = acc.shape
  if scores.shape != acc.shape or len(answers) != num_problems or \
      any(len(a) != n for a in answers):
    raise ValueError(f"answers, acc {acc.shape} and scores {scores.shape} must all be "
                     "[num_problems, n]")
  names = ["maj", "self_weighted_maj", "best"]
  if likelihoods is not None:
    likelihoods = _as_2d(likelihoods, "likelihoods", np.float64)
    if likelihoods.shape != acc.shape or np.isnan(likelihoods).any():
      raise ValueError(f"likelihoods {likelihoods.shape} must be [num_problems, n] {acc.shape}, without NaN")
    names += ["likelihood_weighted_maj", "best_by_likelihood"]
  ks = scaling_ks(n) if ks is None else list(ks)
  rng = np.random.default_rng(seed)
  sums = {f"{name}@{k}": 0.0 for k in ks for name in names}
  for p in range(num_problems):
    gid, num_groups = _group_ids(answers[p])
    weights = self_reward_weights(scores[p])
    for k in ks:
      idx = rng.integers(n, size=(num_bootstrap, k))  # with replacement, as verl
      sums[f"maj@{k}"] += _vote(gid[idx], acc[p][idx], np.ones(idx.shape), num_groups).mean()
      sums[f"self_weighted_maj@{k}"] += _vote(gid[idx], acc[p][idx], weights[idx],
                                              num_groups).mean()
      sums[f"best@{k}"] += _best_of(acc[p][idx], scores[p][idx]).mean()
      if likelihoods is not None:
        sums[f"likelihood_weighted_maj@{k}"] += _vote(
            gid[idx], acc[p][idx], likelihood_weights(likelihoods[p])[idx], num_groups).mean()
        sums[f"best_by_likelihood@{k}"] += _best_of(acc[p][idx], likelihoods[p][idx]).mean()
  return {key: float(v / num_problems) for key, v in sums.items()}


def summarize(answers: Sequence[Sequence[str | None]], acc, scores, threshold: float = 0.5,
              num_bootstrap: int = 1000, seed: int = 0, finished=None, likelihoods=None,
              responses: Sequence[Sequence[str]] | None = None) -> dict[str, float]:
  """All evaluation metrics: mean@n (`reward/mean`), self-verification (`self_verification/...` and
  `..._finished`, `finished` as in `self_verification`), the within-problem measures and
  scaling@k. Without `likelihoods` the likelihood baselines are NaN, without `responses` the
  distinct shares are (records written before they existed): the keys are always the same."""
  out = {"reward/mean": mean_at_n(acc)}  # mean@n, under the trainer's name for it
  out.update(self_verification(acc, scores, threshold, finished))
  out.update(rl_metrics.within_problem_measures(acc, scores, responses))
  scaling = scaling_metrics(answers, acc, scores, num_bootstrap=num_bootstrap, seed=seed,
                            likelihoods=likelihoods)
  if likelihoods is None:
    scaling.update({f"{name}@{k}": float("nan") for k in scaling_ks(np.shape(acc)[1])
                    for name in ("likelihood_weighted_maj", "best_by_likelihood")})
  out.update(scaling)
  return out
