"""Rollout on a long-tailed batch: the static sampler vs continuous batching, side by side.

A randomly initialised decoder whose EOS set holds about 1 / mean_fraction of max_new_tokens's
worth of the vocabulary, so response lengths are about geometric: most rows short, a few
truncated at max_new_tokens (the shape of RLVR length curves). Both modes sample the same rows
(same key: the per-row PRNG policy); each is compiled first, then timed. Reports time per useful
(generated) token. Each mode is timed `repeats` times, the modes alternating (a load spike on a
shared machine then hits both), and the best time counts; every time is kept in the JSON.
`bench/length_skew.py` calls `compare_rollout`.

  python bench/rollout_skew.py [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from laser_jax.generate import sampler as sampler_lib
from laser_jax.generate.sampling import SamplingParams
from laser_jax.models import model as model_lib
from laser_jax.models.config import ModelConfig


def bench_model(quick: bool) -> ModelConfig:
  width = 256 if quick else 512
  return ModelConfig(family="qwen2", vocab_size=1024, hidden_size=width, intermediate_size=4 * width,
                     num_layers=4, num_heads=8, num_kv_heads=4, head_dim=width // 8, qkv_bias=True,
                     tie_word_embeddings=False)


def _time_alternating(fns: dict, repeats: int) -> tuple[dict, dict]:
  """Each fn called once to compile, then `repeats` timed calls of every fn in turn; returns
  ({name: last output}, {name: [seconds of each timed call]})."""
  outs = {name: fn() for name, fn in fns.items()}  # compile
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      outs[name] = fn()
      times[name].append(time.perf_counter() - start)
  return outs, times


def compare_rollout(quick: bool = True, *, prompts: int | None = None, n: int = 8, max_new_tokens: int | None = None,
                    mean_fraction: float = 0.25, decode_slots: int | None = None, seed: int = 0,
                    model_cfg: ModelConfig | None = None, repeats: int = 3) -> dict:
  """Times one sampler call static vs continuous on the same long-tailed rows (a random-init
  `model_cfg`, default `bench_model(quick)`), the best of `repeats` alternating calls each.
  Returns a dict: lengths stats, seconds and seconds per useful token of each mode, and the
  speed-up."""
  cfg = model_cfg or bench_model(quick)
  prompts = prompts or (8 if quick else 32)
  max_new = max_new_tokens or (256 if quick else 1024)
  rows = prompts * n
  slots = decode_slots or max(2, rows // 4)
  params = model_lib.init_params(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  prompt_ids = [rng.integers(1, cfg.vocab_size, size=int(k)).tolist() for k in rng.integers(8, 60, size=prompts)]
  # Near-uniform next-token distributions: an EOS set of V / (mean length) ids ends a row with
  # probability about 1 / mean length per step.
  eos = tuple(range(1, 1 + max(1, round(cfg.vocab_size / (mean_fraction * max_new)))))
  sp = SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new, eos_ids=eos, pad_id=0,
                      self_reward_token_id=cfg.vocab_size - 1)
  key = jax.random.key(seed + 1)
  outs, times = _time_alternating(
      {"static": lambda: sampler_lib.sample(params, cfg, prompt_ids, sp, key),
       "continuous": lambda: sampler_lib.sample(params, cfg, prompt_ids, dataclasses.replace(sp, decode_slots=slots), key)},
      repeats)
  static, cont = outs["static"], outs["continuous"]
  static_s, cont_s = min(times["static"]), min(times["continuous"])
  # The two modes run the same per-row program, but XLA's CPU matmul rounds a batch of `slots`
  # rows differently from one of `rows` rows (log-probs agree to ~5e-6), so a draw on a bucket
  # edge can flip and the row then diverges: counted. Equal batches give equal rows bit for bit.
  same_rows = float(np.mean(np.all(static.tokens == cont.tokens, axis=1)))
  useful = int(static.response_lengths.sum())
  return {
      "rows": rows, "max_new_tokens": max_new, "decode_slots": slots, "useful_tokens": useful,
      "mean_length": float(static.response_lengths.mean()), "max_length": int(static.response_lengths.max()),
      "truncated_frac": float(static.truncated.mean()), "fill_fraction": useful / (rows * max_new),
      "static_s": static_s, "continuous_s": cont_s, "repeats": repeats,
      "static_times_s": times["static"], "continuous_times_s": times["continuous"],
      "static_us_per_token": 1e6 * static_s / useful, "continuous_us_per_token": 1e6 * cont_s / useful,
      "speedup": static_s / cont_s, "same_rows_frac": same_rows,
      "continuous_useful_tokens": int(cont.response_lengths.sum()),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a small model and batch (CPU, a few minutes)")
  parser.add_argument("--slots", type=int, default=None, help="decode slots (default rows / 4)")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls of each mode (the best counts)")
  parser.add_argument("--json", default=None, help="also write the result here")
  args = parser.parse_args()
  r = compare_rollout(args.quick, decode_slots=args.slots, repeats=args.repeats)
  print(f"rows {r['rows']}  max_new_tokens {r['max_new_tokens']}  slots {r['decode_slots']}  "
        f"mean length {r['mean_length']:.1f}  max {r['max_length']}  truncated {r['truncated_frac']:.1%}  "
        f"fill {r['fill_fraction']:.1%}  rows equal to static {r['same_rows_frac']:.1%}")
  print(f"{'mode':<12}{'seconds':>10}{'us / useful token':>20}")
  print(f"{'static':<12}{r['static_s']:>10.2f}{r['static_us_per_token']:>20.1f}")
  print(f"{'continuous':<12}{r['continuous_s']:>10.2f}{r['continuous_us_per_token']:>20.1f}")
  print(f"continuous is {r['speedup']:.2f}x faster")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(r, f, indent=1)


if __name__ == "__main__":
  main()
