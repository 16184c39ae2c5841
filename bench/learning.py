r"""Learning demonstration across seeds: LaSeR vs the GRPO baseline on the embedded default.

For each seed s (`--seeds`), trains `configs/tiny_cpu.py` with `--config.seed=s` twice, LaSeR and
GRPO (`laser.use_self_reward_loss=False`), then samples `--n` solutions for `--problems` held-out
problems from each final model (`notebook_utils.sample_solutions`: the evaluator's pipeline) for
the test-time-scaling columns. Writes
  bench/results/learning.json   every run's config overrides, metrics.jsonl eval records, wall
                                time and final scaling summary; the per-method mean and std
  bench/results/learning.png    held-out accuracy and self-verification F1 over steps: mean
                                curves over the seeds with a +-1 std band
and prints the table with mean +- std over seeds per column: held-out accuracy at the first and
last eval, self-verification F1 and AUROC at the last eval (the runs' eval records: the held-out
set x eval.n samples), and on the final models (`tts.summarize`, bootstrapped with a fixed seed)
what test-time use needs: within-problem AUROC of the score and its problem count; best-of-n by
score vs by the policy's mean token log-likelihood vs mean@n; score-weighted vs
likelihood-weighted vs plain maj@n; the reward variance explained by the problem and the distinct
shares of correct / incorrect responses. Then it checks the learning issue's bars.

  python bench/learning.py --seeds=3                      # 3 x 2 runs from scratch (~50 min on 2 cores)
  python bench/learning.py --seeds=3 --reuse              # reuse finished runs in --workdir
  python bench/learning.py --seeds=1 --set laser.kl_coef=0.3 --methods=laser   # one sweep point
"""
import argparse
import json
import math
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench import verifier_signals  # noqa: E402
from laser_jax import default_config  # noqa: E402
from laser_jax import notebook_utils  # noqa: E402
from laser_jax.evaluation import tts  # noqa: E402
from laser_jax.training import metrics_writer  # noqa: E402
from laser_jax.training import trainer  # noqa: E402

METHODS = {"laser": True, "grpo": False}  # name -> laser.use_self_reward_loss
# Columns of the table: (key in a run's summary, header), printed in rows of COLUMNS_PER_LINE.
COLUMNS = (("acc_first", "acc start"), ("acc_last", "acc end"), ("f1", "F1"), ("auroc", "AUROC"),
           ("within_auroc", "within AUROC"), ("within_auroc_problems", "within #problems"),
           ("best@n", "best@n score"), ("best_by_likelihood@n", "best@n likelihood"), ("mean@n", "mean@n"),
           ("self_weighted_maj@n", "wmaj@n score"), ("likelihood_weighted_maj@n", "wmaj@n likelihood"),
           ("maj@n", "maj@n"), ("variance_explained_by_problem", "var by problem"),
           ("distinct_frac/correct", "distinct correct"), ("distinct_frac/incorrect", "distinct incorrect"))
COLUMNS_PER_LINE = 8
# Summary keys of the final models' columns -> `tts.summarize`'s keys (@n: at k = n).
SCALING_KEYS = {"mean@n": "reward/mean", "within_auroc": "self_verification/within_auroc",
                "within_auroc_problems": "self_verification/within_auroc_problems",
                "variance_explained_by_problem": "reward/variance_explained_by_problem",
                "distinct_frac/correct": "distinct_frac/correct",
                "distinct_frac/incorrect": "distinct_frac/incorrect",
                **{f"{m}@n": f"{m}@{{n}}" for m in ("best", "best_by_likelihood", "self_weighted_maj",
                                                     "likelihood_weighted_maj", "maj")}}


def run_config(workdir: str, seed: int, laser: bool, overrides: dict, base: str):
  """`base` (a configs/*.py file) for one run: its seed, method and `--set` overrides."""
  c = default_config.load_config_file(base)
  c.workdir, c.seed = workdir, seed
  c.laser.use_self_reward_loss = laser
  return default_config.apply_overrides(c, overrides)


def eval_records(workdir: str) -> list[dict]:
  return [r for r in metrics_writer.read_metrics(workdir) if "eval/reward/mean" in r]


def final_scaling(config, n: int, num_problems: int) -> dict:
  """`tts.summarize` (mean@n, the within-problem measures, maj@k, weighted maj@k and best@k by
  score and by likelihood) of the run's last checkpoint on its first `num_problems` held-out
  problems, n samples each (eval sampling settings). The samples' per-response arrays are kept
  in <workdir>/final_solutions.npz (`verifier_signals.save`) for analyses of the same draws
  (bench/verifier_signals.py)."""
  import dataclasses
  t = trainer.Trainer(config)
  params = notebook_utils.restore_params(t, config.workdir)
  prompts = t.task.eval_prompts[:num_problems]
  sampling = dataclasses.replace(t.eval_sampling, n=n)
  with jax.set_mesh(t.mesh):
    with t.task.verifier as verifier:
      solutions = notebook_utils.sample_solutions(
          params, t.model_cfg, t.tokenizer, prompts, sampling, verifier, jax.random.key(123),
          kl_coef=config.laser.kl_coef, ref_constant=config.laser.ref_constant, mesh=t.mesh)
  verifier_signals.save(os.path.join(config.workdir, "final_solutions.npz"), solutions)
  return tts.summarize(solutions.answers, solutions.acc, solutions.scores,
                       likelihoods=solutions.likelihoods, responses=solutions.texts)


def summarize_run(evals: list[dict], scaling: dict, n: int) -> dict:
  """One row of the table from a run's eval records and final scaling summary."""
  nan = lambda v: math.nan if v is None else float(v)
  return {"acc_first": nan(evals[0]["eval/reward/mean"]), "acc_last": nan(evals[-1]["eval/reward/mean"]),
          "f1": nan(evals[-1].get("eval/self_verification/f1_finished")),
          "auroc": nan(evals[-1].get("eval/self_verification/auroc_finished")),
          **{key: nan(scaling[name.format(n=n)]) for key, name in SCALING_KEYS.items()}}


def mean_std(rows: list[dict]) -> dict:
  """{column: [mean, std (population)]} over the seeds' rows, NaN-aware (NaN if every seed's is)."""
  with warnings.catch_warnings():  # numpy warns of an all-NaN column (e.g. F1 with an empty class)
    warnings.simplefilter("ignore", RuntimeWarning)
    return {key: [float(np.nanmean([r[key] for r in rows])), float(np.nanstd([r[key] for r in rows]))]
            for key, _ in COLUMNS}


def bars(stats: dict) -> dict:
  """The learning issue's bars on the mean over seeds (None when GRPO was not run)."""
  laser, grpo = stats.get("laser"), stats.get("grpo")
  if laser is None:
    return {}
  m = {k: v[0] for k, v in laser.items()}
  out = {"f1 >= 0.80": m["f1"] >= 0.80,
         "score-weighted maj@n >= maj@n + 0.02": m["self_weighted_maj@n"] >= m["maj@n"] + 0.02,
         "best@n >= mean@n + 0.05": m["best@n"] >= m["mean@n"] + 0.05,
         "held-out accuracy rises >= 0.10": m["acc_last"] - m["acc_first"] >= 0.10}
  if grpo is not None:
    out["LaSeR final accuracy >= GRPO's"] = m["acc_last"] >= grpo["acc_last"][0]
  return out


def format_table(stats: dict, num_seeds: int, n: int) -> str:
  lines = [f"mean +- std over {num_seeds} seed(s)"]
  for start in range(0, len(COLUMNS), COLUMNS_PER_LINE):
    part = COLUMNS[start:start + COLUMNS_PER_LINE]
    lines.append(f"{'method':7}" + "".join(f"{title.replace('@n', f'@{n}'):>19}" for _, title in part))
    for method, columns in stats.items():
      lines.append(f"{method:7}" + "".join(f"{columns[k][0]:12.3f}+-{columns[k][1]:.3f}" for k, _ in part))
  return "\n".join(lines)


def plot(result: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for method in result["stats"]:
    runs = [r for r in result["runs"] if r["method"] == method]
    steps = [e["step"] for e in runs[0]["evals"]]
    for ax, key in zip(axes, ("eval/reward/mean", "eval/self_verification/f1_finished")):
      values = np.array([[np.nan if e.get(key) is None else e[key] for e in r["evals"]] for r in runs])
      mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
      line, = ax.plot(steps, mean, marker="o", label=f"{method} (mean of {len(runs)})")
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
  axes[0].set(xlabel="RL step", ylabel="held-out accuracy")
  axes[1].set(xlabel="RL step", ylabel="held-out self-verification F1", ylim=(-0.05, 1.05))
  axes[1].axhline(0.8, color="gray", lw=0.5, ls=":")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_overrides(pairs: list[str]) -> dict:
  out = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise SystemExit(f"error: --set {pair}: expected key=value")
    try:
      out[key] = json.loads(value)  # numbers, true / false
    except ValueError:
      out[key] = value  # a string
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, default=3, help="Seeds 0 .. seeds-1, each method on each.")
  p.add_argument("--methods", default="laser,grpo", help="Comma-separated: laser, grpo.")
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny_cpu.py"))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="Config override for every run (JSON value), e.g. --set laser.kl_coef=0.3.")
  p.add_argument("--workdir", default="/tmp/laser_jax/learning", help="Runs go to <workdir>/<method>_seed<s>.")
  p.add_argument("--reuse", action="store_true", help="Reuse finished runs in the workdirs.")
  p.add_argument("--n", type=int, default=8, help="Samples per problem for the scaling columns.")
  p.add_argument("--problems", type=int, default=128, help="Held-out problems for the scaling columns.")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
  p.add_argument("--name", default="learning", help="Output files <out>/<name>.{json,png}.")
  args = p.parse_args(argv)
  overrides = parse_overrides(args.set)
  methods = [m.strip() for m in args.methods.split(",")]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise SystemExit(f"error: --methods: unknown {unknown}; expected some of {list(METHODS)}")
  runs = []
  for seed in range(args.seeds):
    for method in methods:
      workdir = os.path.join(args.workdir, f"{method}_seed{seed}")
      config = run_config(workdir, seed, METHODS[method], overrides, args.config)
      wall = None  # A reused run's time is not measured here.
      finished = eval_records(workdir) and eval_records(workdir)[-1]["step"] == config.total_steps
      if not (args.reuse and finished):
        t0 = time.time()
        trainer.train(config)
        wall = time.time() - t0
      evals = eval_records(workdir)
      scaling = final_scaling(config, args.n, args.problems)
      runs.append({"method": method, "seed": seed, "workdir": workdir, "wall_time_s": wall,
                   "evals": evals, "scaling": scaling, "summary": summarize_run(evals, scaling, args.n)})
      print(f"{method} seed {seed}: " + " ".join(f"{k}={v:.3f}" for k, v in runs[-1]["summary"].items()),
            flush=True)
  stats = {m: mean_std([r["summary"] for r in runs if r["method"] == m]) for m in methods}
  result = {"command": " ".join(["python bench/learning.py"] + (sys.argv[1:] if argv is None else list(argv))),
            "machine": common.machine_info(), "config": args.config, "overrides": overrides,
            "seeds": args.seeds, "n": args.n, "problems": args.problems, "stats": stats, "bars": bars(stats), "runs": runs}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
    json.dump(result, f, indent=1, default=float)
  plot(result, os.path.join(args.out, f"{args.name}.png"))
  print(format_table(stats, args.seeds, args.n))
  for bar, ok in result["bars"].items():
    print(f"  {'PASS' if ok else 'FAIL'}  {bar}")
  return result


if __name__ == "__main__":
  main()
