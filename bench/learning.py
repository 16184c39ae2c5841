r"""Learning demonstration: LaSeR vs the GRPO baseline on the embedded default (tiny_cpu).

Runs (or reuses) both trainings with the same seed, then writes
  bench/results/learning.json   eval records of both runs + the test-time-scaling comparison
  bench/results/learning.png    reward and self-verification F1 over steps, both runs
and prints a table: first/last held-out accuracy, final self-verification F1, and on the final
LaSeR model maj@k vs self-reward-weighted maj@k.

  python bench/learning.py                       # both runs from scratch (~2 x 15 min on 2 cores)
  python bench/learning.py --laser_workdir=/tmp/laser_jax/tiny_cpu --grpo_workdir=/tmp/laser_jax/tiny_cpu_grpo --reuse
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _config(workdir, laser: bool):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny_cpu
  c = tiny_cpu.get_config()
  c.workdir = workdir
  c.laser.use_self_reward_loss = laser
  return c


def _eval_records(workdir):
  from laser_jax import metrics_writer
  return [r for r in metrics_writer.read_metrics(workdir) if "eval/accuracy" in r]


def _train_records(workdir):
  from laser_jax import metrics_writer
  return [r for r in metrics_writer.read_metrics(workdir) if "reward_mean" in r]


def _scaling(config, n: int, num_problems: int):
  """maj@k vs score-weighted maj@k vs best@k of the final model on held-out problems."""
  import dataclasses
  import jax
  import numpy as np
  from laser_jax import checkpoint, notebook_utils, objective, sampler, trainer, tts
  t = trainer.Trainer(config)
  ckpt = checkpoint.Checkpointer(config.workdir)
  state, _ = ckpt.restore(ckpt.latest_step(), t.abstract_state())
  ckpt.close()
  prompts = t.task.eval_prompts[:num_problems]
  sampling = dataclasses.replace(t.eval_sampling, n=n)
  out = sampler.sample(state.params, t.model_cfg, [p.token_ids for p in prompts], sampling,
                       jax.random.key(123), mesh=t.mesh)
  texts = t.task.decode(out.tokens, out.lengths)
  answers = [notebook_utils.canonical_answer(x) for x in texts]
  acc = np.asarray(t.task.verifier(texts, [prompts[g].answer for g in out.group_ids]).rewards)
  scores = np.asarray(objective.self_reward_score(out.self_reward_logprob, kl_coef=config.laser.kl_coef,
                                                  ref_constant=config.laser.ref_constant))
  shape = (len(prompts), n)
  answers = np.array(answers, dtype=object).reshape(shape).tolist()
  return tts.summarize(answers, acc.reshape(shape), scores.reshape(shape))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--laser_workdir", default="/tmp/laser_jax/learning_laser")
  p.add_argument("--grpo_workdir", default="/tmp/laser_jax/learning_grpo")
  p.add_argument("--reuse", action="store_true", help="Reuse finished runs in the workdirs.")
  p.add_argument("--n", type=int, default=8, help="Samples per problem for the scaling table.")
  p.add_argument("--problems", type=int, default=128)
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
  args = p.parse_args()
  from laser_jax import trainer
  runs = {"laser": (args.laser_workdir, True), "grpo": (args.grpo_workdir, False)}
  times = {}
  for name, (workdir, laser) in runs.items():
    config = _config(workdir, laser)
    times[name] = None  # Reused runs: their time is not measured here.
    if not args.reuse or not _eval_records(workdir):
      t0 = time.time()
      trainer.train(config)
      times[name] = time.time() - t0
  result = {"runs": {}, "command": " ".join(sys.argv)}
  for name, (workdir, laser) in runs.items():
    evals = _eval_records(workdir)
    result["runs"][name] = {
        "workdir": workdir, "wall_time_s": times[name], "evals": evals,
        "train": _train_records(workdir),
        "scaling": _scaling(_config(workdir, laser), args.n, args.problems)}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "learning.json"), "w") as f:
    json.dump(result, f, indent=1, default=float)
  _plot(result, os.path.join(args.out, "learning.png"))
  _table(result)


def _table(result):
  print(f"{'run':6} {'acc first':>9} {'acc last':>9} {'F1 last':>8} " + " ".join(
      f"{'maj@' + str(k):>7} {'wmaj@' + str(k):>7} {'best@' + str(k):>7}" for k in (2, 4, 8)))
  for name, run in result["runs"].items():
    ev = run["evals"]
    s = run["scaling"]
    cells = " ".join(" ".join(f"{s.get(f'{m}@{k}', float('nan')):7.3f}"
                              for m in ("maj", "self_weighted_maj", "best")) for k in (2, 4, 8))
    f1 = ev[-1].get("eval/self_verification_f1")
    print(f"{name:6} {ev[0]['eval/accuracy']:9.3f} {ev[-1]['eval/accuracy']:9.3f} "
          f"{(f1 if f1 is not None else float('nan')):8.3f} {cells}")


def _plot(result, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for name, run in result["runs"].items():
    steps = [r["step"] for r in run["train"]]
    axes[0].plot(steps, [r["reward_mean"] for r in run["train"]], label=f"{name} (train reward)", alpha=.8)
    axes[0].plot([r["step"] for r in run["evals"]], [r["eval/accuracy"] for r in run["evals"]], "o--",
                 label=f"{name} (held-out acc)")
    axes[1].plot(steps, [r["self_reward/f1"] if r["self_reward/f1"] is not None else float("nan")
                         for r in run["train"]], label=name)
  axes[0].set_xlabel("RL step"); axes[0].set_ylabel("accuracy"); axes[0].legend(fontsize=7)
  axes[1].set_xlabel("RL step"); axes[1].set_ylabel("self-verification F1 (train rollouts)")
  axes[1].axhline(0.7, color="gray", lw=.5, ls=":"); axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
