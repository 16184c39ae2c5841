"""Shared helpers of the benchmarks: machine info, matmul peak, timing, tables, JSON results.

Every benchmark writes `bench/results/<name>.json` with the machine it ran on (CPU model, core
count, jax version, device kind, load average) next to its numbers, so results from different
machines or loads are never compared blindly.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info() -> dict:
  """CPU model, core count, jax/jaxlib versions, device kind and count, load average, python."""
  import jax
  import jaxlib
  devices = jax.devices()
  return {
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "device_kind": devices[0].device_kind,
      "platform": devices[0].platform,
      "num_devices": len(devices),
      "python": platform.python_version(),
      "os": platform.platform(),
      "loadavg": list(os.getloadavg()),
  }


def peak_rss_mib() -> float:
  """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
  """Wall times of `repeats` calls of fn() after `warmup` untimed calls (compilation)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def summarize(times: list[float]) -> dict:
  """Best and median of a list of wall times (best is the least disturbed by background load)."""
  return {"best_s": min(times), "median_s": statistics.median(times), "all_s": list(times)}


def matmul_peak(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> dict:
  """Measured matmul throughput of this machine: best of `repeats` jitted [size, size] @ [size, size].

  FLOP = 2 * M * N * K. The best (not the median) is the peak: on a shared machine it is the run
  least disturbed by other processes.
  """
  import jax
  import jax.numpy as jnp
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (size, size), dtype)
  b = jax.random.normal(k2, (size, size), dtype)
  f = jax.jit(jnp.matmul)
  times = timed(lambda: f(a, b).block_until_ready(), repeats)
  flops = 2.0 * size ** 3
  return {"size": size, "dtype": dtype, "flop": flops, "best_s": min(times),
          "median_s": statistics.median(times), "gflop_s": flops / min(times) / 1e9,
          "median_gflop_s": flops / statistics.median(times) / 1e9}


def rl_config(workdir: str, *, batch: int, n: int, new_tokens: int, micro_batch: int, hidden: int,
              intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int = 0):
  """A training config for timing RL steps: the synthetic task, a random-init Qwen2-layout model
  of the given shape (`vocab` 0 = the task tokenizer's 42 ids), no warm start, no evaluation."""
  from laser_jax import default_config
  c = default_config.get_config()
  c.workdir = workdir
  c.seed = 0
  c.total_steps = 1000  # Only sets the LR schedule length; the scripts drive the steps.
  c.eval_every = 0
  c.sft.steps = 0  # Benchmarks time RL steps from a random init.
  c.async_checkpointing = False
  c.batch_size, c.rollout.n, c.rollout.max_new_tokens = batch, n, new_tokens
  c.micro_batch_size = micro_batch
  c.data.synthetic_train_size, c.data.synthetic_eval_size, c.data.eval_size = 512, 8, 8
  m = c.model
  m.family, m.tie_word_embeddings, m.vocab_size = "qwen2", True, vocab
  m.hidden_size, m.intermediate_size, m.num_layers = hidden, intermediate, layers
  m.num_heads, m.num_kv_heads, m.head_dim = heads, kv_heads, head_dim
  return c


def rl_steps(config, repeats: int):
  """Builds a one-device Trainer from random init and times `repeats` RL steps on one batch.

  The first step (which compiles the sampler and the update) is timed separately. Returns
  (trainer, state, prompts, warmup_s, [metrics of each timed step]).
  """
  import jax
  from laser_jax.models import model as model_lib
  from laser_jax.training import trainer as trainer_lib
  trainer = trainer_lib.Trainer(config, devices=jax.devices()[:1])
  state = trainer.init_state(model_lib.init_params(trainer.model_cfg, jax.random.key(0)))
  prompts = next(trainer.task.train_iterator())
  t0 = time.perf_counter()
  state, _ = trainer.train_step(state, prompts)
  warmup_s = time.perf_counter() - t0
  steps = []
  for _ in range(repeats):
    state, metrics = trainer.train_step(state, prompts)
    steps.append(metrics)
  return trainer, state, prompts, warmup_s, steps


def print_table(headers: list[str], rows: list[list], title: str = "") -> None:
  """Prints a Markdown table (numbers formatted to 4 significant digits)."""
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  if title:
    print(f"\n{title}")
  print("| " + " | ".join(headers) + " |")
  print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
  for row in rows:
    print("| " + " | ".join(fmt(v) for v in row) + " |")


def write_results(name: str, results: dict, out: str | None = None) -> str:
  """Writes `results` plus machine info and the command line to bench/results/<name>.json."""
  path = out or os.path.join(RESULTS_DIR, f"{name}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  payload = {"benchmark": name, "command": "python " + " ".join(sys.argv),
             "machine": machine_info(), **results}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=1, default=float)
  os.replace(tmp, path)
  print(f"wrote {path}")
  return path
