r"""Train-step throughput on this machine: tokens/s and achieved FLOP/s vs the measured matmul peak.

For each model (a tiny one and a >= 50M-parameter one) the `laser_jax.training.trainer.Trainer` runs real
RL steps on the synthetic task (rollout with the in-XLA sampler, verifier, advantages, update),
and three things are timed:
  * update: `Trainer.update` alone (forward + backward + AdamW over one mini-batch, all
    micro-batches), on a batch made by a real rollout; best and median of --repeats calls;
  * rollout: the sampler + decode + verifier part of `Trainer.train_step` (its `rollout_time_s`);
  * full RL step: `Trainer.train_step` end to end (`perf/step_time_s`), after one warm-up step.
The matmul peak is measured in the same process, before and after the model runs and right before
each timed update: the best of several jitted f32 [M, M] @ [M, M] products, FLOP = 2 M^3 (the
best one is the peak: the run least disturbed by other processes on a shared machine).
"update % peak" is the best update's FLOP/s over the best peak of the whole run (conservative);
"update % adjacent peak" is the best over calls of (FLOP/s of the call) / (peak measured just
before it), which cancels load changes during the run on a shared machine.

FLOP formulas (N = parameters, L layers, d = num_heads * head_dim, S = padded sequence length,
T = B * S tokens processed, padding included because it is computed):
  update  = 6 N T + 12 L d S T          (PaLM appendix B: 6 N per token for forward + backward of
                                         the weights, 12 L d S per token for QK^T and AV, counted
                                         over the full S x S scores as the kernel computes them)
  rollout = 2 N T + 4 L d S T           (one forward per token; decode is memory bound, so this
                                         fraction of peak is expected to be low)
With tied embeddings N counts the embedding once; its lookup is free and its use as the output
head is the V x H matmul, so 6 N T is the matmul work. The LaSeR score adds one H x V product per
row at the EOS index (< 1% here) and is not counted.

The large model: Qwen2 layout, vocab 32000, hidden 768, 8 layers, 12 heads (4 KV heads, head dim
64), MLP 2048, tied embeddings: 74.93M parameters; update batch 4 prompts x n 4 = 16 rows of
129 tokens (prompt bucket 32 + 96 new + EOS), one micro-batch of 16. The synthetic task's tokenizer only uses its
first 42 ids; the 32000-entry embedding/head make the vocabulary cost realistic (the random model
samples any id; ids beyond the tokenizer decode to nothing and are rewarded 0).

Each model runs in its own child process so that peak RSS (resource.getrusage) is per model.

Usage:
  python bench/train_step.py            # tiny + large, writes bench/results/train_step.json
  python bench/train_step.py --quick    # small shapes, 2 repeats: a smoke run (~1 minute)
  python bench/train_step.py --models large --micro-batch 8 --remat   # one variant
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import common  # noqa: E402

# name -> (shape overrides, batch prompts, n, max_new_tokens, micro-batch, vocab or None = tokenizer's)
MODELS = {
    "tiny": dict(hidden=128, intermediate=384, layers=3, heads=4, kv_heads=2, head_dim=32, vocab=None,
                 batch=32, n=8, new_tokens=32, micro=64),
    "large": dict(hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=4, head_dim=64, vocab=32000,
                  batch=4, n=4, new_tokens=96, micro=16),
}
QUICK = {
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, head_dim=32, vocab=None,
                 batch=4, n=4, new_tokens=16, micro=16),
    "large": dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, head_dim=64, vocab=8192,
                  batch=2, n=4, new_tokens=16, micro=8),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="tiny,large", help="comma-separated subset of: " + ",".join(MODELS))
  p.add_argument("--repeats", type=int, default=3, help="timed update calls and RL steps per model")
  p.add_argument("--peak-size", type=int, default=2048, help="M of the [M, M] @ [M, M] peak matmul")
  p.add_argument("--peak-repeats", type=int, default=5)
  p.add_argument("--micro-batch", type=int, default=0, help="override the model's micro-batch size")
  p.add_argument("--batch", type=int, default=0, help="override the number of prompts per step")
  p.add_argument("--remat", action="store_true", help="config.model.remat = True")
  p.add_argument("--logprob-chunk", type=int, default=0, help="config.model.logprob_chunk")
  p.add_argument("--quick", action="store_true", help="small shapes and 2 repeats: a smoke run")
  p.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "train_step.json"))
  p.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: run one model, print JSON
  args = p.parse_args(argv)
  if args.quick:
    args.repeats, args.peak_size, args.peak_repeats = 2, 1024, 3
  return args


def make_config(spec: dict, args, workdir: str):
  c = common.rl_config(
      workdir, batch=args.batch or spec["batch"], n=spec["n"], new_tokens=spec["new_tokens"],
      micro_batch=args.micro_batch or spec["micro"], hidden=spec["hidden"],
      intermediate=spec["intermediate"], layers=spec["layers"], heads=spec["heads"],
      kv_heads=spec["kv_heads"], head_dim=spec["head_dim"], vocab=spec["vocab"] or 0)
  c.model.remat = args.remat
  c.model.logprob_chunk = args.logprob_chunk
  c.laser.ref_constant = -10.0  # Random model: keeps the self-reward scores in a sane range.
  return c


def update_flops(cfg, tokens: float, seq_len: int) -> float:
  """6 N T + 12 L d S T (see the module docstring)."""
  d = cfg.num_heads * cfg.head_dim
  return 6.0 * cfg.num_params() * tokens + 12.0 * cfg.num_layers * d * seq_len * tokens


def forward_flops(cfg, tokens: float, seq_len: int) -> float:
  """2 N T + 4 L d S T (see the module docstring)."""
  d = cfg.num_heads * cfg.head_dim
  return 2.0 * cfg.num_params() * tokens + 4.0 * cfg.num_layers * d * seq_len * tokens


def run_model(name: str, args) -> dict:
  """Runs one model's measurements in this process; returns its result dict."""
  import jax
  import numpy as np
  from laser_jax.training import trainer as trainer_lib

  spec = (QUICK if args.quick else MODELS)[name]
  peak_before = common.matmul_peak(args.peak_size, args.peak_repeats)
  with tempfile.TemporaryDirectory() as workdir:
    config = make_config(spec, args, workdir)  # vocab: see the module docstring.
    # Full RL steps: the first one compiles the sampler and the update.
    trainer, state, prompts, warmup_s, timed_steps = common.rl_steps(config, args.repeats)
    cfg = trainer.model_cfg
    steps = [{"rollout_time_s": m["perf/rollout_time_s"], "update_time_s": m["perf/update_time_s"],
              "step_time_s": m["perf/step_time_s"], "tokens_per_s": m["perf/tokens_per_s"],
              "response_length": m["rollout/response_length/mean"]} for m in timed_steps]

    # The update alone, on the batch of a real rollout.
    sr_on, _ = trainer_lib.warmup_flags(int(state.step) + 1, config.laser)
    roll = trainer.rollout(state.params, prompts, trainer.step_key(state, salt=0))
    assert trainer.updates_per_step == 1
    vectors, _ = trainer.batch_vectors(roll, int(state.step) + 1)
    (rows,) = trainer.update_rows(roll)
    mini, normalisers = trainer.update_batch(roll, vectors, rows)  # [num_micro, micro, ...]
    num_micro, micro, seq_len = mini.sequences.tokens.shape
    rows = num_micro * micro
    holder = {"state": state}

    def one_update():
      new_state, out = trainer.update(holder["state"], mini, normalisers, sr_on)
      jax.block_until_ready((new_state, out))
      holder["state"] = new_state

    # Each timed update is preceded by its own short peak measurement: on a shared machine the
    # load changes within a run, and the fraction of peak is only meaningful against a peak
    # measured under the same load.
    one_update()  # warm-up (compilation)
    update_times, adjacent_peaks = [], []
    for _ in range(args.repeats):
      adjacent_peaks.append(common.matmul_peak(args.peak_size, 3)["gflop_s"])
      t0 = time.perf_counter()
      one_update()
      update_times.append(time.perf_counter() - t0)
    state = holder["state"]
  peak_after = common.matmul_peak(args.peak_size, args.peak_repeats)

  peak = max(peak_before["gflop_s"], peak_after["gflop_s"], *adjacent_peaks) * 1e9
  tokens = float(rows * seq_len)  # processed (padded) tokens per update
  valid_tokens = float(np.sum(mini.sequences.attention_mask))
  upd_flops = update_flops(cfg, tokens, seq_len)
  fwd_flops = forward_flops(cfg, tokens, seq_len)
  best_update = min(update_times)
  # Per call: achieved FLOP/s over the peak measured just before it (same load).
  fracs_adjacent = [upd_flops / t / (p * 1e9) for t, p in zip(update_times, adjacent_peaks)]
  step_best = min(steps, key=lambda s: s["step_time_s"])
  rollout_best = min(s["rollout_time_s"] for s in steps)
  step_time_best = step_best["step_time_s"]
  return {
      "model": name,
      "shape": {"family": cfg.family, "vocab": cfg.vocab_size, "hidden": cfg.hidden_size,
                "intermediate": cfg.intermediate_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
                "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "tied": cfg.tie_word_embeddings,
                "dtype": cfg.dtype, "remat": cfg.remat},
      "num_params": cfg.num_params(),
      "batch": {"prompts": config.batch_size, "n": config.rollout.n, "rows": rows,
                "max_new_tokens": config.rollout.max_new_tokens, "seq_len": seq_len,
                "micro_batch": micro, "num_micro": rows // micro,
                "logprob_chunk": config.model.logprob_chunk},
      "tokens_per_update": tokens,
      "valid_tokens_per_update": valid_tokens,
      "matmul_peak_before": peak_before,
      "matmul_peak_after": peak_after,
      "matmul_peak_gflop_s": peak / 1e9,
      "update": {**common.summarize(update_times), "flop": upd_flops,
                 "gflop_s": upd_flops / best_update / 1e9, "frac_of_peak": upd_flops / best_update / peak,
                 "tokens_per_s": tokens / best_update,
                 "adjacent_peaks_gflop_s": adjacent_peaks,
                 "frac_of_adjacent_peak": fracs_adjacent,
                 "frac_of_adjacent_peak_best": max(fracs_adjacent)},
      "rollout": {"best_s": rollout_best, "flop": fwd_flops,
                  "gflop_s": fwd_flops / rollout_best / 1e9,
                  "frac_of_peak": fwd_flops / rollout_best / peak,
                  "generated_tokens_per_s": rows * step_best["response_length"] / rollout_best},
      "rl_step": {"best_s": step_time_best, "steps": steps, "warmup_step_s": warmup_s,
                  "tokens_per_s": valid_tokens / step_time_best,
                  "gflop_s": (upd_flops + fwd_flops) / step_time_best / 1e9,
                  "frac_of_peak": (upd_flops + fwd_flops) / step_time_best / peak},
      "peak_rss_mib": common.peak_rss_mib(),
      "loadavg_end": list(os.getloadavg()),
  }


def main(argv=None):
  args = parse_args(argv)
  argv = sys.argv[1:] if argv is None else argv
  if args.child:
    print("RESULT " + json.dumps(run_model(args.child, args)), flush=True)
    return
  loadavg_start = list(os.getloadavg())
  results = []
  for name in args.models.split(","):
    if name not in MODELS:
      raise SystemExit(f"--models: unknown model {name!r}; known: {', '.join(MODELS)}")
    print(f"== {name} (load average {os.getloadavg()[0]:.2f})", flush=True)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", name],
                          stdout=subprocess.PIPE, text=True, cwd=REPO)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
      raise SystemExit(f"child run for model {name!r} failed with exit code {proc.returncode}")
    results.append(json.loads(lines[-1][len("RESULT "):]))

  rows = []
  for r in results:
    s, b = r["shape"], r["batch"]
    shape = (f"V{s['vocab']} H{s['hidden']} L{s['layers']} I{s['intermediate']} "
             f"heads {s['heads']}/{s['kv_heads']}x{s['head_dim']}")
    rows.append([r["model"], shape, f"{r['num_params'] / 1e6:.2f}M",
                 f"{b['rows']}x{b['seq_len']} (micro {b['micro_batch']})",
                 r["matmul_peak_gflop_s"], r["update"]["best_s"], r["update"]["tokens_per_s"],
                 r["update"]["gflop_s"], f"{100 * r['update']['frac_of_peak']:.1f}%",
                 f"{100 * r['update']['frac_of_adjacent_peak_best']:.1f}%",
                 r["rollout"]["best_s"], r["rl_step"]["best_s"], r["rl_step"]["tokens_per_s"],
                 f"{100 * r['rl_step']['frac_of_peak']:.1f}%", f"{r['peak_rss_mib']:.0f}"])
  common.print_table(
      ["model", "shape", "params", "update batch", "matmul peak GFLOP/s", "update s", "update tok/s",
       "update GFLOP/s", "update % peak", "update % adjacent peak", "rollout s", "RL step s", "RL step tok/s", "RL step % peak",
       "peak RSS MiB"], rows, title="Train-step throughput (f32, best of repeats)")
  common.write_results("train_step", {"args": vars(args), "loadavg_start": loadavg_start,
                                      "loadavg_end": list(os.getloadavg()), "models": results},
                       out=args.out)


if __name__ == "__main__":
  main()
