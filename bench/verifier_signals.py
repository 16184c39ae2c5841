r"""Which signal ranks a model's own solutions: the self-reward score, the likelihood, or both.

Reads the per-response arrays `bench/learning.py` keeps for each run's final model
(<workdir>/<run>/final_solutions.npz: acc, scores r_s, likelihoods = mean token log-prob, answers)
and reports, per run, for each signal: AUROC over all responses, within-problem AUROC (and its
problem count), best@8 and weighted maj@8 (`laser_jax.evaluation.tts`, bootstrapped as there),
beside mean@8 and maj@8. Signals (`measure`):
  score               r_s; vote weight max(r_s, 0) (`tts.self_reward_weights`)
  likelihood          l = mean token log-prob; vote weight exp(l) (`tts.likelihood_weights`)
  score + likelihood  r_s + l; vote weight exp(r_s + l) (non-negative, same order)
Issue 28 item 4 ("using the score and likelihood together") measured on the same draws.
Prints a table and writes bench/results/verifier_signals.json.

  python bench/verifier_signals.py --workdir=/tmp/laser_jax/learning
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from laser_jax.evaluation import tts  # noqa: E402
from laser_jax.rl import rl_metrics  # noqa: E402


def measure(acc, scores, likelihoods, answers, k: int = 8, num_bootstrap: int = 1000, seed: int = 0) -> dict:
  """One run's figures: {"mean@k", "maj@k", signal: {auroc, within_auroc, within_problems,
  best@k, weighted_maj@k}}. The @k figures are `tts.scaling_metrics`' on the same bootstrap draws
  for every signal: the score's own columns, its likelihood columns (best by l, weights exp(l)),
  and those columns again with r_s + l in place of l. A NaN score (no EOS) leaves its response
  out of the score's AUROCs and ranks it last, weight 0, in the @k figures."""
  acc, scores, likelihoods = (np.asarray(x, np.float64) for x in (acc, scores, likelihoods))
  both = scores + likelihoods
  by_score = tts.scaling_metrics(answers, acc, scores, ks=[k], num_bootstrap=num_bootstrap, seed=seed,
                                 likelihoods=likelihoods)
  by_both = tts.scaling_metrics(answers, acc, scores, ks=[k], num_bootstrap=num_bootstrap, seed=seed,
                                likelihoods=np.where(np.isnan(both), -np.inf, both))
  columns = {"score": (scores, by_score[f"best@{k}"], by_score[f"self_weighted_maj@{k}"]),
             "likelihood": (likelihoods, by_score[f"best_by_likelihood@{k}"],
                            by_score[f"likelihood_weighted_maj@{k}"]),
             "score + likelihood": (both, by_both[f"best_by_likelihood@{k}"], by_both[f"likelihood_weighted_maj@{k}"])}
  out = {f"mean@{k}": float(acc.mean()), f"maj@{k}": by_score[f"maj@{k}"]}
  for name, (values, best, voted) in columns.items():
    within, problems = rl_metrics.within_problem_auroc(acc, values)
    ranked = np.where(np.isnan(values), -np.inf, values)
    out[name] = {"auroc": rl_metrics.auroc(ranked.ravel(), acc.ravel() > 0.5), "within_auroc": within,
                 "within_problems": problems, f"best@{k}": best, f"weighted_maj@{k}": voted}
  return out


def save(path: str, solutions) -> None:
  """A `notebook_utils.Solutions`' per-response arrays ([P, n]: acc, scores, likelihoods,
  finished, answers ("" and has_answer False where none), texts) as the .npz `load` reads."""
  np.savez(path, acc=solutions.acc, scores=solutions.scores, likelihoods=solutions.likelihoods,
           finished=solutions.finished,
           answers=np.array([[a if a is not None else "" for a in row] for row in solutions.answers]),
           has_answer=np.array([[a is not None for a in row] for row in solutions.answers]),
           texts=np.array(solutions.texts))


def load(path: str):
  """(acc, scores, likelihoods, answers) of a `save`d .npz; answers None where none."""
  d = np.load(path)
  answers = [[a if has else None for a, has in zip(row, has_row)]
             for row, has_row in zip(d["answers"].tolist(), d["has_answer"].tolist())]
  return d["acc"], d["scores"], d["likelihoods"], answers


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="/tmp/laser_jax/learning", help="bench/learning.py's --workdir")
  p.add_argument("--out", default=None, help="JSON path (default bench/results/verifier_signals.json)")
  args = p.parse_args(argv)
  paths = sorted(glob.glob(os.path.join(args.workdir, "*", "final_solutions.npz")))
  if not paths:
    raise SystemExit(f"error: no */final_solutions.npz under {args.workdir} (run bench/learning.py first)")
  runs, rows = {}, []
  for path in paths:
    run = os.path.basename(os.path.dirname(path))
    runs[run] = measure(*load(path))
    for name, m in runs[run].items():
      if isinstance(m, dict):
        rows.append([run, name, m["auroc"], m["within_auroc"], m["within_problems"], m["best@8"],
                     runs[run]["mean@8"], m["weighted_maj@8"], runs[run]["maj@8"]])
  common.print_table(["run", "signal", "AUROC", "within AUROC", "problems", "best@8", "mean@8", "wmaj@8", "maj@8"],
                     rows, title="ranking a model's own solutions (128 held-out problems x 8)")
  common.write_results("verifier_signals", {"workdir": args.workdir, "runs": runs}, args.out)


if __name__ == "__main__":
  main()
