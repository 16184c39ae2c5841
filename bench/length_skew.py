r"""Issue 27 measured here, side by side: what a long-tailed batch costs per useful token.

  python bench/length_skew.py [--quick | --tiny] [--out=PATH]

One process, one machine, two comparisons (each variant compiled first, then timed a few times,
its calls alternating with the other variants'; the best time counts, all are in the JSON):
  * rollout, static sampler vs continuous batching (`bench/rollout_skew.compare_rollout`): the
    same rows (same per-row keys) of a random-init model whose EOS set ends a row after about
    a third of the budget on average (its lengths are the model's draws, about geometric);
  * update, padded vs packed vs full rows (`bench/update_skew.measure`): a batch whose response
    lengths are `laser_jax.aot.lengths`' default ("rlvr_long_tail": log-normal, mean a third of
    the budget, 5% truncated), padded and packed, against the same number of real tokens in
    rows that fill the whole budget.
Time per useful (real, non-pad) token is the figure of merit. The issue's targets (--quick, CPU):
continuous rollout >= 1.8x faster than static; packed update within 1.3x of the full rows' time
per useful token. Prints a table and writes bench/results/length_skew.json. `--tiny` is a smoke
run (batches too small for the targets to mean anything) that tests/test_bench.py runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench import rollout_skew  # noqa: E402
from bench import update_skew  # noqa: E402
from laser_jax.aot import lengths as lengths_lib  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Size:
  """One size of the run: the rollout comparison's arguments and the update batch."""
  rollout: dict  # compare_rollout's keyword arguments
  rows: int  # responses of the update batch
  max_new_tokens: int  # their length budget
  prompt_len: int
  micro_batch_size: int  # rows of a padded micro-batch
  repeats: int  # timed updates per variant (the best counts)
  update_model: update_skew.model_lib.ModelConfig = update_skew.MODEL


SIZES = {
    "full": Size({"quick": False}, rows=64, max_new_tokens=512, prompt_len=32, micro_batch_size=8, repeats=3),
    "quick": Size({"quick": True}, rows=32, max_new_tokens=256, prompt_len=32, micro_batch_size=8, repeats=3),
    # The test's smoke run (compiles dominate): one-layer models, 16 rows of 64 tokens in each stage.
    "tiny": Size({"quick": True, "prompts": 4, "n": 4, "max_new_tokens": 64, "repeats": 1,
                  "model_cfg": dataclasses.replace(rollout_skew.bench_model(True), vocab_size=256, hidden_size=64,
                                                   intermediate_size=128, num_layers=1, head_dim=8)},
                 rows=16, max_new_tokens=64, prompt_len=16, micro_batch_size=4, repeats=1,
                 update_model=dataclasses.replace(update_skew.MODEL, hidden_size=64, intermediate_size=128,
                                                  num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32)),
}


def run(quick: bool, size: str | None = None) -> dict:
  """Both comparisons at `size` (default "quick" or "full" after `quick`); returns
  {"rollout": compare_rollout's dict, "update": measure's rows, ...}."""
  size = size or ("quick" if quick else "full")
  sz = SIZES[size]
  rows, max_new, prompt_len, micro, repeats = sz.rows, sz.max_new_tokens, sz.prompt_len, sz.micro_batch_size, sz.repeats
  rollout = rollout_skew.compare_rollout(**sz.rollout, mean_fraction=lengths_lib.DEFAULT_MEAN_FRACTION)
  lengths = lengths_lib.response_lengths("rlvr_long_tail", budget=max_new, rows=rows)
  seq_len = prompt_len + max_new + 1
  update = update_skew.measure(lengths.tokens, prompt_len=prompt_len, max_new_tokens=max_new,
                               micro_batch_size=micro, micro_batch_tokens=2 * seq_len, repeats=repeats,
                               model_cfg=sz.update_model)
  return {"quick": quick, "size": size, "rollout": rollout, "update_lengths": lengths.as_dict(),
          "update_batch": {"rows": rows, "max_new_tokens": max_new, "prompt_len": prompt_len,
                           "micro_batch_size": micro, "micro_batch_tokens": 2 * seq_len, "repeats": repeats},
          "update": update}


def table_rows(result: dict) -> list[list]:
  """[stage, variant, useful tokens, seconds, us per useful token, vs the reference] rows."""
  r = result["rollout"]
  rows = [["rollout", "static", r["useful_tokens"], r["static_s"], r["static_us_per_token"], 1.0],
          ["rollout", f"continuous ({r['decode_slots']} slots)", r["useful_tokens"], r["continuous_s"],
           r["continuous_us_per_token"], r["continuous_s"] / r["static_s"]]]
  for u in result["update"]:
    rows.append(["update", u["update"], u["useful_tokens"], u["best_s"], u["us_per_useful_token"], u["vs_full_rows"]])
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="small model and batches: a CPU run under 5 minutes")
  parser.add_argument("--tiny", action="store_true",
                      help="smaller still: a smoke run of both comparisons in well under a minute (the test's)")
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/length_skew.json)")
  args = parser.parse_args()
  result = run(args.quick, "tiny" if args.tiny else None)
  r = result["rollout"]
  common.print_table(["stage", "variant", "useful tokens", "seconds", "us / useful token",
                      "time vs static (rollout) / per token vs full rows (update)"], table_rows(result),
                     title=f"long-tailed batches: rollout {r['rows']} rows, mean {r['mean_length']:.0f} of "
                           f"{r['max_new_tokens']} tokens (continuous {r['speedup']:.2f}x faster); update "
                           f"{result['update_lengths']['rows']} rows, mean {result['update_lengths']['mean']:.0f} "
                           f"of {result['update_lengths']['budget']}")
  common.write_results("length_skew", result, args.out)


if __name__ == "__main__":
  main()
