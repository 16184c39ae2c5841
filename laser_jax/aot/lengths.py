r"""Response lengths that `laser_jax.aot` estimates a step at (`config.aot.response_lengths`).

One RL step's rows get one length each (`ResponseLengths.tokens`, EOS included, at most the
budget `rollout.max_new_tokens`; a row at the budget is truncated), from one of:

  * a named distribution (`DISTRIBUTIONS`). "rlvr_long_tail", the default: log-normal lengths
    with mean a third of the budget and 5% of the rows truncated at it. The shape is the
    long-tailed one RL rollout studies describe (most responses far below the budget, a few
    running into it: DARTS, Wang et al. 2026, arXiv:2605.30859, Sec. 1-2, characterise the
    rollout lengths of RLVR as long-tailed); the mean and truncated fraction are the issue's
    reading of published RLVR length curves (a third of the budget, a truncated tail), not a
    fit to one paper's figure. A run's own lengths (next two forms) replace it.
  * a JSON file holding a list of observed lengths (ints): its empirical distribution.
  * a run's metrics.jsonl: the same log-normal family, with the run's mean response length
    (`rollout/response_length/mean`, averaged over its steps) and truncated fraction
    (`rollout/truncated_frac`), read against this config's budget.

The rows are the distribution's quantiles at (i + 1/2) / rows (no sampling noise), in an order
shuffled with a fixed seed: which rows share a sampler call or a slot follows that order, as
rows arrive in a real batch in no length order.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics

import numpy as np

from laser_jax.config_check import ConfigError

KEY = "config.aot.response_lengths"
DISTRIBUTIONS = ("rlvr_long_tail",)
DEFAULT_MEAN_FRACTION = 1 / 3  # mean response length / budget of "rlvr_long_tail"
DEFAULT_TRUNCATED_FRACTION = 0.05  # rows at the budget in "rlvr_long_tail"
ORDER_SEED = 0  # the fixed shuffle of the rows' order
# metrics.jsonl keys (laser_jax.rl.rl_metrics.rollout_metrics) a run's distribution is read from.
MEAN_METRIC = "rollout/response_length/mean"
TRUNCATED_METRIC = "rollout/truncated_frac"


@dataclasses.dataclass(frozen=True)
class ResponseLengths:
  """One RL step's response lengths, in the order its rows are sampled."""
  tokens: np.ndarray  # [rows] int64 generated tokens per row, EOS included, 1 ... budget
  budget: int  # rollout.max_new_tokens: a row at the budget is truncated
  source: str  # the distribution's name or the file it was read from

  @property
  def mean(self) -> float:
    return float(np.mean(self.tokens))

  @property
  def truncated_fraction(self) -> float:
    return float(np.mean(self.tokens >= self.budget))

  def as_dict(self) -> dict:
    return {"source": self.source, "rows": int(self.tokens.size), "budget": self.budget,
            "mean": self.mean, "mean_fraction_of_budget": self.mean / self.budget,
            "truncated_fraction": self.truncated_fraction,
            "p50": float(np.percentile(self.tokens, 50)), "p90": float(np.percentile(self.tokens, 90))}


def _shuffled(tokens: np.ndarray) -> np.ndarray:
  return np.random.default_rng(ORDER_SEED).permutation(tokens)


def _clipped_lognormal_mean(mu: float, sigma: float, budget: int) -> float:
  """E[min(X, budget)] for ln X ~ N(mu, sigma^2)."""
  normal = statistics.NormalDist()
  z = (math.log(budget) - mu) / sigma
  return math.exp(mu + sigma ** 2 / 2) * normal.cdf(z - sigma) + budget * (1 - normal.cdf(z))


def long_tail(budget: int, rows: int, mean_fraction: float = DEFAULT_MEAN_FRACTION,
              truncated_fraction: float = DEFAULT_TRUNCATED_FRACTION, source: str = DISTRIBUTIONS[0]
              ) -> ResponseLengths:
  """Log-normal lengths clipped at `budget`: mean `mean_fraction * budget` after clipping, and
  `truncated_fraction` of the rows at the budget (P(X >= budget)). sigma is found by bisection
  (the clipped mean falls as sigma grows with the tail held fixed)."""
  if not (0 < mean_fraction < 1 and 0 < truncated_fraction < 1):
    raise ValueError(f"mean_fraction {mean_fraction} and truncated_fraction {truncated_fraction} must be in (0, 1)")
  z_tail = statistics.NormalDist().inv_cdf(1 - truncated_fraction)
  mu_of = lambda sigma: math.log(budget) - sigma * z_tail  # puts the tail mass at the budget
  target = mean_fraction * budget
  low, high = 1e-3, 10.0
  for _ in range(200):
    mid = (low + high) / 2
    if _clipped_lognormal_mean(mu_of(mid), mid, budget) > target:
      low = mid
    else:
      high = mid
  sigma = (low + high) / 2
  z = np.array([statistics.NormalDist().inv_cdf((i + 0.5) / rows) for i in range(rows)])
  tokens = np.clip(np.ceil(np.exp(mu_of(sigma) + sigma * z)), 1, budget).astype(np.int64)
  return ResponseLengths(_shuffled(tokens), budget, source)


def empirical(observed, budget: int, rows: int, source: str) -> ResponseLengths:
  """`rows` quantiles of observed lengths (clipped to the budget): observed values, each taking
  its share of the rows."""
  observed = np.clip(np.asarray(observed, np.float64), 1, budget)
  quantiles = np.quantile(observed, (np.arange(rows) + 0.5) / rows, method="inverted_cdf")
  tokens = np.ceil(quantiles).astype(np.int64)
  return ResponseLengths(_shuffled(tokens), budget, source)


def _read(path: str) -> tuple[str, object]:
  """("list", [lengths]) of a JSON list, or ("metrics", [records]) of a JSONL file."""
  with open(path) as f:
    text = f.read()
  try:
    return "list", json.loads(text)
  except json.JSONDecodeError:
    return "metrics", [json.loads(line) for line in text.splitlines() if line.strip()]


def from_file(path: str, budget: int, rows: int) -> ResponseLengths:
  """A JSON list of lengths, or a run's metrics.jsonl (module docstring); ConfigError naming
  the key and the file when it does not parse."""
  def bad(why: str):
    return ConfigError(f"{KEY}: {path!r} {why}; expected a JSON list of response lengths or a run's "
                       f"metrics.jsonl (with {MEAN_METRIC!r} and {TRUNCATED_METRIC!r})")
  if not os.path.isfile(path):
    raise bad(f"is not a file nor one of the named distributions {DISTRIBUTIONS}")
  try:
    kind, content = _read(path)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise bad(f"does not parse ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
  if kind == "list":
    if not (isinstance(content, list) and content and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 1 for x in content)):
      raise bad("is not a non-empty list of lengths >= 1")
    return empirical(content, budget, rows, source=path)
  steps = [r for r in content if isinstance(r, dict) and MEAN_METRIC in r and TRUNCATED_METRIC in r]
  if not steps:
    raise bad(f"has no record with {MEAN_METRIC!r} and {TRUNCATED_METRIC!r}")
  mean = float(np.mean([r[MEAN_METRIC] for r in steps]))
  truncated = float(np.mean([r[TRUNCATED_METRIC] for r in steps]))
  if not (1 <= mean < budget and 0 < truncated < 1):
    raise bad(f"gives mean length {mean:g} and truncated fraction {truncated:g}, which the log-normal "
              f"family cannot take at budget {budget} (need 1 <= mean < budget, 0 < fraction < 1)")
  return long_tail(budget, rows, mean / budget, truncated, source=path)


def response_lengths(value: str, budget: int, rows: int) -> ResponseLengths:
  """The lengths `config.aot.response_lengths` names, for `rows` rows and a `budget`."""
  if value in DISTRIBUTIONS:
    return long_tail(budget, rows)
  return from_file(value, budget, rows)
