r"""One RL (GRPO-style) step, laser_jax vs Tunix (`google-tunix`), same shape, batch, n and lengths.

Both sides train a random-init Qwen2-layout decoder of the same shape on the same synthetic
arithmetic prompts (the same token ids: Tunix gets the prompt text, which its tokenizer maps back to
exactly our ids), with the same rollout batch (prompts x n), sampling temperature, response length,
AdamW + global-norm clipping, and one optimizer update per RL step over the same micro-batches.
No reference model on either side (KL coefficient 0) and one policy iteration per batch, so
neither side spends a forward on reference or old log-probs. laser_jax runs its full LaSeR step
(with the self-rewarding loss, which costs one extra H x V product per row); Tunix runs GRPO.

Timings per RL step (best and median over --repeats steps, after one warm-up step that compiles):
  rollout  laser_jax: `Trainer.train_step`'s `rollout_time_s` (sampler + decode + verifier);
           Tunix: `GRPOLearner._generate_and_compute_advantage` (sampler + decode + reward +
           advantages), timed around the call;
  update   laser_jax: `update_time_s` (host batch prep + jitted update, synchronised);
           Tunix: `RLCluster.update_actor` calls of the step, each synchronised on the model state;
  step     laser_jax: `perf/step_time_s`; Tunix: `RLLearner._run_global_step` (rollout + update).

The two halves run in separate processes: laser_jax in this interpreter, Tunix in the
`.venv-bench` interpreter (`python3 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]'`),
which keeps Tunix's dependencies (an older transformers, grain, qwix, ...) out of the main venv.
Each half prints its result as one JSON line; this script prints the side-by-side table and writes
bench/results/tunix_rl.json.

Usage:
  python bench/tunix_rl.py                 # the 75M shape of bench/train_step.py
  python bench/tunix_rl.py --quick         # a small shape: smoke run
  python bench/tunix_rl.py --tunix-python /path/to/python   # another interpreter with google-tunix
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import common  # noqa: E402

SHAPES = {
    # The >= 50M model of bench/train_step.py (74.93M parameters).
    "large": dict(vocab=32000, hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=4, head_dim=64,
                  batch=4, n=4, new_tokens=96, micro_prompts=4),
    "quick": dict(vocab=8192, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, head_dim=64,
                  batch=2, n=4, new_tokens=16, micro_prompts=1),
}
LR, B1, B2, EPS, WEIGHT_DECAY, GRAD_CLIP, TEMPERATURE = 2e-4, 0.9, 0.999, 1e-8, 0.01, 1.0, 1.0


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--repeats", type=int, default=3, help="timed RL steps per side")
  p.add_argument("--quick", action="store_true", help="small shape, 2 repeats: a smoke run")
  p.add_argument("--tunix-python", default=os.path.join(REPO, ".venv-bench", "bin", "python"),
                 help="interpreter with google-tunix installed")
  p.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "tunix_rl.json"))
  p.add_argument("--child", choices=("laser_jax", "tunix"), default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.shape = "quick" if args.quick else "large"
  if args.quick:
    args.repeats = 2
  return args


def laser_config(spec: dict, workdir: str):
  """The laser_jax config of the comparison (synthetic task, the shape in `spec`)."""
  # vocab: a realistic vocabulary; the synthetic task uses its first 42 ids.
  c = common.rl_config(
      workdir, batch=spec["batch"], n=spec["n"], new_tokens=spec["new_tokens"],
      micro_batch=spec["micro_prompts"] * spec["n"], hidden=spec["hidden"],
      intermediate=spec["intermediate"], layers=spec["layers"], heads=spec["heads"],
      kv_heads=spec["kv_heads"], head_dim=spec["head_dim"], vocab=spec["vocab"])
  c.rollout.temperature = TEMPERATURE
  c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps = LR, B1, B2, EPS
  c.optim.weight_decay, c.optim.grad_clip = WEIGHT_DECAY, GRAD_CLIP
  c.loss.kl_loss_coef = 0.0
  c.laser.ref_constant = -10.0
  return c


def shared_prompts(spec: dict):
  """(task, prompts): the first training batch of the synthetic task, as laser_jax builds it."""
  from laser_jax.training import tasks
  with tempfile.TemporaryDirectory() as workdir:
    config = laser_config(spec, workdir)
  task = tasks.build_task(config)
  return task, next(task.train_iterator())


def run_laser(args) -> dict:
  spec = SHAPES[args.shape]
  with tempfile.TemporaryDirectory() as workdir:
    trainer, _, prompts, warmup, timed_steps = common.rl_steps(laser_config(spec, workdir), args.repeats)
    steps = [{"rollout_s": m["perf/rollout_time_s"], "update_s": m["perf/update_time_s"],
              "step_s": m["perf/step_time_s"], "response_length": m["rollout/response_length/mean"]}
             for m in timed_steps]
  return {"framework": "laser_jax", "num_params": trainer.model_cfg.num_params(),
          "prompt_lengths": [len(p.token_ids) for p in prompts], "warmup_step_s": warmup,
          "steps": steps, "peak_rss_mib": common.peak_rss_mib(), "versions": _versions()}


def _versions() -> dict:
  import jax
  import flax
  import optax
  out = {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}
  try:
    from importlib import metadata
    out["google-tunix"] = metadata.version("google-tunix")
  except Exception:  # noqa: BLE001 -- only informational
    pass
  return out


def run_tunix(args) -> dict:
  """The Tunix half: GRPOLearner over RLCluster with the vanilla (in-JAX) rollout engine."""
  import jax
  import numpy as np
  import optax
  from flax import nnx
  from tunix.models.qwen2 import model as qwen2
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout
  from laser_jax.data import verifier as verifier_lib

  spec = SHAPES[args.shape]
  task, prompts = shared_prompts(spec)
  tokenizer = task.tokenizer
  texts = [tokenizer.decode(p.token_ids) for p in prompts]
  for text, p in zip(texts, prompts):  # Tunix re-tokenizes the text: it must give our exact ids.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids != list(p.token_ids):
      raise SystemExit(f"prompt round trip changed the token ids: {p.token_ids} -> {ids}")
  answers = [p.answer for p in prompts]
  max_prompt_len = max(len(p.token_ids) for p in prompts)

  model_cfg = qwen2.ModelConfig(
      num_layers=spec["layers"], vocab_size=spec["vocab"], embed_dim=spec["hidden"],
      hidden_dim=spec["intermediate"], num_heads=spec["heads"], head_dim=spec["head_dim"],
      num_kv_heads=spec["kv_heads"], rope_theta=10000, norm_eps=1e-6, use_tied_embedding=True)
  model = qwen2.Qwen2(model_cfg, rngs=nnx.Rngs(0))
  num_params = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
  # Auto axes: Tunix's models index their (sharding-annotated) embedding with plain gathers,
  # which Explicit mesh axes (jax.make_mesh's default) reject.
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)

  steps_total = 1 + args.repeats
  optimizer = optax.chain(optax.clip_by_global_norm(GRAD_CLIP),
                          optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WEIGHT_DECAY))
  training = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optimizer, eval_every_n_steps=10 ** 9, max_steps=steps_total,
      mini_batch_size=spec["batch"], train_micro_batch_size=spec["micro_prompts"],
      rollout_micro_batch_size=spec["batch"], compute_logps_micro_batch_size=spec["micro_prompts"])
  rollout = base_rollout.RolloutConfig(
      max_tokens_to_generate=spec["new_tokens"], max_prompt_length=max_prompt_len,
      kv_cache_size=max_prompt_len + spec["new_tokens"] + 8, temperature=TEMPERATURE, top_p=1.0,
      top_k=None, eos_tokens=list(task.eos_ids))
  cluster = rl_cluster_lib.RLCluster(
      actor=model, tokenizer=tokenizer,
      cluster_config=rl_cluster_lib.ClusterConfig(
          role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                        rl_cluster_lib.Role.ROLLOUT: mesh},
          rollout_engine="vanilla", offload_to_cpu=False, training_config=training,
          rollout_config=rollout))
  verifier = verifier_lib.Verifier("synthetic")

  def reward_fn(prompts, completions, answer, **_):
    return list(verifier(list(completions), list(answer)).rewards)

  algo = grpo_learner.GRPOConfig(num_generations=spec["n"], num_iterations=1, beta=0.0, epsilon=0.2)
  learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=[reward_fn])

  # Timing wrappers on the instance (not the classes): rollout, update, whole step.
  log = {"rollout": [], "update": [], "step": [], "lengths": []}
  generate_and_adv = learner._generate_and_compute_advantage
  update_actor = cluster.update_actor
  global_step = learner._run_global_step

  def timed_rollout(*a, **kw):
    t0 = time.perf_counter()
    example = generate_and_adv(*a, **kw)
    jax.block_until_ready(example.advantages)
    log["rollout"][-1] += time.perf_counter() - t0
    log["lengths"][-1].extend(np.asarray(example.completion_mask).sum(-1).tolist())
    return example

  def timed_update(*a, **kw):
    t0 = time.perf_counter()
    out = update_actor(*a, **kw)
    jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
    log["update"][-1] += time.perf_counter() - t0
    return out

  def timed_step(*a, **kw):
    log["rollout"].append(0.0)
    log["update"].append(0.0)
    log["lengths"].append([])
    t0 = time.perf_counter()
    out = global_step(*a, **kw)
    jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
    log["step"].append(time.perf_counter() - t0)
    return out

  learner._generate_and_compute_advantage = timed_rollout
  cluster.update_actor = timed_update
  learner._run_global_step = timed_step
  # Arrays, as Tunix's own micro-batch iterator makes them: the learner repeats each leaf n times
  # with np.repeat, which would split a list of strings into one leaf per string.
  batch = {"prompts": np.array(texts), "answer": np.array(answers)}
  learner.train([batch] * steps_total)
  if len(log["step"]) != steps_total:
    raise SystemExit(f"Tunix ran {len(log['step'])} RL steps, expected {steps_total}")
  steps = [{"rollout_s": r, "update_s": u, "step_s": s, "response_length": float(np.mean(l))}
           for r, u, s, l in zip(log["rollout"], log["update"], log["step"], log["lengths"])]
  return {"framework": "tunix", "num_params": num_params,
          "prompt_lengths": [len(p.token_ids) for p in prompts], "warmup_step_s": steps[0]["step_s"],
          "steps": steps[1:], "peak_rss_mib": common.peak_rss_mib(), "versions": _versions()}


def _child(python: str, which: str, argv: list[str]) -> dict:
  proc = subprocess.run([python, os.path.abspath(__file__), *argv, "--child", which],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
    return {"framework": which, "error": f"exit code {proc.returncode}", "stderr_tail": tail}
  return json.loads(lines[-1][len("RESULT "):])


def _stats(result: dict, key: str) -> tuple[float, float]:
  values = [s[key] for s in result["steps"]]
  return min(values), statistics.median(values)


def main(argv=None):
  args = parse_args(argv)
  argv = sys.argv[1:] if argv is None else argv
  if args.child == "laser_jax":
    print("RESULT " + json.dumps(run_laser(args)), flush=True)
    return
  if args.child == "tunix":
    print("RESULT " + json.dumps(run_tunix(args)), flush=True)
    return
  loadavg_start = list(os.getloadavg())
  spec = SHAPES[args.shape]
  print(f"shape {args.shape}: {spec}", flush=True)
  results = {}
  print(f"== laser_jax (load average {os.getloadavg()[0]:.2f})", flush=True)
  results["laser_jax"] = _child(sys.executable, "laser_jax", argv)
  print(f"== tunix via {args.tunix_python} (load average {os.getloadavg()[0]:.2f})", flush=True)
  if not os.path.exists(args.tunix_python):
    results["tunix"] = {"framework": "tunix", "error": f"no interpreter at {args.tunix_python}"}
  else:
    results["tunix"] = _child(args.tunix_python, "tunix", argv)

  rows = []
  for name, r in results.items():
    if "error" in r:
      print(f"{name} failed ({r['error']}):\n{r.get('stderr_tail', '')}")
      rows.append([name, "failed", "", "", "", "", ""])
      continue
    ro, up, st = _stats(r, "rollout_s"), _stats(r, "update_s"), _stats(r, "step_s")
    length = statistics.mean(s["response_length"] for s in r["steps"])
    rows.append([name, f"{r['num_params'] / 1e6:.2f}M", f"{ro[0]:.3f} / {ro[1]:.3f}",
                 f"{up[0]:.3f} / {up[1]:.3f}", f"{st[0]:.3f} / {st[1]:.3f}", f"{length:.1f}",
                 f"{r['peak_rss_mib']:.0f}"])
  common.print_table(
      ["framework", "params", "rollout s (best / median)", "update s (best / median)",
       "RL step s (best / median)", "mean response tokens", "peak RSS MiB"], rows,
      title=(f"RL step, {spec['batch']} prompts x n={spec['n']}, {spec['new_tokens']} new tokens, "
             f"micro-batch {spec['micro_prompts'] * spec['n']} rows, f32, 1 CPU device"))
  if all("error" not in r for r in results.values()):
    ours, theirs = results["laser_jax"], results["tunix"]
    for key in ("rollout_s", "update_s", "step_s"):
      print(f"Tunix / laser_jax {key[:-2]}: {_stats(theirs, key)[0] / _stats(ours, key)[0]:.2f}x (best)")
  common.write_results("tunix_rl", {"args": vars(args), "shape": spec, "loadavg_start": loadavg_start,
                                    "loadavg_end": list(os.getloadavg()), "results": results},
                       out=args.out)


if __name__ == "__main__":
  main()
