r"""Issue 27 measured here, side by side: what a long-tailed batch costs per useful token.

  python bench/length_skew.py [--quick] [--out=PATH]

One process, one machine, two comparisons (each variant timed after its compile, its calls
alternating with the others' where the callee does so):
  * rollout, static sampler vs continuous batching (`bench/rollout_skew.compare_rollout`): the
    same rows (same per-row keys) of a random-init model whose EOS set ends a row after about
    a third of the budget on average (its lengths are the model's draws, about geometric);
  * update, padded vs packed vs full rows (`bench/update_skew.measure`): a batch whose response
    lengths are `laser_jax.aot.lengths`' default ("rlvr_long_tail": log-normal, mean a third of
    the budget, 5% truncated), padded and packed, against the same number of real tokens in
    rows that fill the whole budget.
Time per useful (real, non-pad) token is the figure of merit. The issue's targets (--quick, CPU):
continuous rollout >= 1.8x faster than static; packed update within 1.3x of the full rows' time
per useful token. Prints a table and writes bench/results/length_skew.json.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench import rollout_skew  # noqa: E402
from bench import update_skew  # noqa: E402
from laser_jax.aot import lengths as lengths_lib  # noqa: E402


def run(quick: bool) -> dict:
  """Both comparisons; returns {"rollout": compare_rollout's dict, "update": measure's rows, ...}."""
  rollout = rollout_skew.compare_rollout(quick, mean_fraction=lengths_lib.DEFAULT_MEAN_FRACTION)
  rows, max_new, prompt_len, micro = (32, 256, 32, 8) if quick else (64, 512, 32, 8)
  lengths = lengths_lib.response_lengths("rlvr_long_tail", budget=max_new, rows=rows)
  seq_len = prompt_len + max_new + 1
  update = update_skew.measure(lengths.tokens, prompt_len=prompt_len, max_new_tokens=max_new,
                               micro_batch_size=micro, micro_batch_tokens=2 * seq_len, repeats=3)
  return {"quick": quick, "rollout": rollout, "update_lengths": lengths.as_dict(), "update": update}


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
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/length_skew.json)")
  args = parser.parse_args()
  result = run(args.quick)
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
