r"""The update on a long-tailed batch: padded vs packed (config.micro_batch_tokens), per useful token.

One optimizer update (`programs.update_step`: forward + backward over every micro-batch + SGD)
is timed side by side, in one process, on three batches of the same model:
  * padded: the long-tailed batch in micro-batches of `micro_batch_size` rows of S = P + R + 1
    tokens (today's layout: every row pays for the length budget);
  * packed: the same batch packed into rows of `micro_batch_tokens` (`laser_jax.rl.packing`);
  * full rows: the same number of real tokens in rows that fill the whole budget (every response
    truncated at R), padded layout: the cost of a useful token when there is no padding at all.
"useful tokens" are the real (non-pad) tokens of a batch; the figure of merit is seconds per
useful token, and "vs full rows" is that over the full-row batch's (the issue-27 target:
packed <= 1.3x; padded is about 1 / fill fraction). The three variants' calls alternate, so
load changes on a shared machine hit all of them alike. `measure` is what
bench/length_skew.py calls; `python bench/update_skew.py` prints the table and writes
bench/results/update_skew.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench import common  # noqa: E402
from laser_jax.models import model as model_lib  # noqa: E402
from laser_jax.rl import objective, packing, records  # noqa: E402
from laser_jax.training import programs  # noqa: E402

# A small Qwen2-layout model whose matmuls, not dispatch, dominate a CPU update.
MODEL = model_lib.ModelConfig(family="qwen2", vocab_size=2048, hidden_size=256, intermediate_size=768,
                              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                              tie_word_embeddings=True, qkv_bias=True, attention="chunked", attention_block=256)
ZC = 7


def long_tailed_lengths(num_rows: int, max_new_tokens: int, seed: int = 0, mean_fraction: float = 1 / 3,
                        truncated_fraction: float = 0.05) -> np.ndarray:
  """Response lengths (EOS included) in [1, max_new_tokens]: exponential with mean
  `mean_fraction` of the budget (most short, a long tail), about `truncated_fraction` at the
  budget (truncated). A stand-in until bench/length_skew.py passes its default distribution."""
  rng = np.random.default_rng(seed)
  lengths = np.ceil(rng.exponential(mean_fraction * max_new_tokens, size=num_rows)).astype(np.int64)
  lengths[rng.random(num_rows) < truncated_fraction] = max_new_tokens
  return np.clip(lengths, 1, max_new_tokens)


def update_batch(response_lengths: np.ndarray, prompt_len: int, max_new_tokens: int, seed: int = 0
                 ) -> records.UpdateBatch:
  """An UpdateBatch of rows laid out as `records.build_sequences` makes them: a full prompt of
  `prompt_len` tokens, the response (EOS included; a row at the budget is truncated), pad."""
  rng = np.random.default_rng(seed)
  n, s = len(response_lengths), prompt_len + max_new_tokens + 1
  lengths = np.asarray(response_lengths)
  real = np.arange(s)[None] < (prompt_len + lengths)[:, None]
  tokens = np.where(real, rng.integers(8, MODEL.vocab_size, size=(n, s)), 0).astype(np.int32)
  targets = np.concatenate([tokens[:, 1:], np.zeros((n, 1), np.int32)], axis=1)
  response_mask = (real & (np.arange(s)[None] >= prompt_len - 1)
                   & (np.arange(s)[None] < (prompt_len + lengths - 1)[:, None])).astype(np.float32)
  finished = lengths < max_new_tokens
  rewards = rng.integers(0, 2, size=n).astype(np.float32)
  return records.UpdateBatch(
      sequences=records.Sequences(tokens=tokens, positions=np.maximum(np.cumsum(real, 1) - 1, 0).astype(np.int32),
                                  attention_mask=real, targets=targets,
                                  eos_index=np.where(finished, prompt_len + lengths - 1, prompt_len - 1).astype(np.int32)),
      response_mask=response_mask, old_logp=(-7.0 * response_mask).astype(np.float32),
      advantages=rng.standard_normal(n).astype(np.float32), rewards=rewards, finished=finished,
      self_reward_weights=np.asarray(objective.self_reward_class_weights(rewards, finished)))


def measure(response_lengths: np.ndarray, *, prompt_len: int, max_new_tokens: int, micro_batch_size: int,
            micro_batch_tokens: int, repeats: int = 3, model_cfg: model_lib.ModelConfig = MODEL) -> list[dict]:
  """Seconds per useful token of one update: padded, packed and full rows (module docstring).
  Returns one dict per variant: update, rows, micro_batches, useful_tokens, computed_tokens
  (rows x length of what the forward runs), best_s, us_per_useful_token, vs_full_rows."""
  seq_len = prompt_len + max_new_tokens + 1
  lengths = np.asarray(response_lengths)
  rows = -(-len(lengths) // micro_batch_size) * micro_batch_size
  lengths = np.concatenate([lengths, lengths[:rows - len(lengths)]])  # whole micro-batches
  useful = int(np.sum(prompt_len + lengths))
  full_rows = max(micro_batch_size, round(useful / seq_len / micro_batch_size) * micro_batch_size)
  loss_cfg = objective.LossConfig(agg_mode="token-mean", max_response_length=max_new_tokens)
  statics = programs.StepStatics(model_cfg=model_cfg, loss_cfg=loss_cfg, temperature=1.0,
                                 self_reward_token_id=ZC, logprob_chunk=0)
  optimizer = optax.sgd(1e-3)
  params = model_lib.init_params(model_cfg, jax.random.key(0))
  state = programs.TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                              rng=jnp.zeros(2, jnp.uint32), skipped_updates=jnp.int32(0))
  step = jax.jit(lambda state, batch, norm: programs.update_step(state, batch, norm, True, statics=statics,
                                                                 optimizer=optimizer))

  variants = {}
  long_tail = update_batch(lengths, prompt_len, max_new_tokens)
  variants["padded"] = (records.micro_batches(long_tail, rows // micro_batch_size), long_tail, rows * seq_len)
  plan = packing.plan_packing(np.sum(long_tail.sequences.attention_mask, axis=1), micro_batch_tokens, 1)
  num_micro, slots = plan.shape()
  packed = packing.pack_update_batch(long_tail, plan, num_micro, 1, micro_batch_tokens, slots)
  variants["packed"] = (packed, long_tail, plan.num_micro * micro_batch_tokens)
  full = update_batch(np.full(full_rows, max_new_tokens), prompt_len, max_new_tokens, seed=1)
  variants["full rows"] = (records.micro_batches(full, full_rows // micro_batch_size), full, full_rows * seq_len)

  times = {name: [] for name in variants}
  inputs = {}
  for name, (batch, whole, _) in variants.items():
    inputs[name] = (jax.device_put(batch), objective.loss_normalisers(loss_cfg, whole.response_mask))
    jax.block_until_ready(step(state, *inputs[name]))  # compile
  for _ in range(repeats):
    for name in variants:  # alternate: a load change hits every variant
      t0 = time.perf_counter()
      jax.block_until_ready(step(state, *inputs[name]))
      times[name].append(time.perf_counter() - t0)

  out = []
  for name, (batch, whole, computed) in variants.items():
    tokens = int(np.sum(whole.sequences.attention_mask))
    micro = batch.response_mask.shape[0]
    out.append({"update": name, "rows": int(whole.response_mask.shape[0]), "micro_batches": int(micro),
                "useful_tokens": tokens, "computed_tokens": int(computed), "best_s": min(times[name]),
                "us_per_useful_token": 1e6 * min(times[name]) / tokens})
  full_cost = out[-1]["us_per_useful_token"]
  for row in out:
    row["vs_full_rows"] = row["us_per_useful_token"] / full_cost
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=32, help="responses of the update")
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--max-new-tokens", type=int, default=256)
  parser.add_argument("--micro-batch-size", type=int, default=8, help="rows of a padded micro-batch")
  parser.add_argument("--micro-batch-tokens", type=int, default=0,
                      help="tokens of a packed row (0: 2 x the row length)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/update_skew.json)")
  parser.add_argument("--quick", action="store_true", help="16 rows of 128 new tokens, 2 repeats")
  args = parser.parse_args()
  if args.quick:
    args.rows, args.max_new_tokens, args.repeats = 16, 128, 2
  seq_len = args.prompt_len + args.max_new_tokens + 1
  lengths = long_tailed_lengths(args.rows, args.max_new_tokens)
  results = measure(lengths, prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
                    micro_batch_size=args.micro_batch_size,
                    micro_batch_tokens=args.micro_batch_tokens or 2 * seq_len, repeats=args.repeats)
  columns = ["update", "rows", "micro_batches", "useful_tokens", "computed_tokens", "best_s",
             "us_per_useful_token", "vs_full_rows"]
  common.print_table(columns, [[r[c] for c in columns] for r in results],
                     title=f"update on a long-tailed batch (mean response {lengths.mean():.0f} of {args.max_new_tokens})")
  common.write_results("update_skew", {"args": vars(args), "response_lengths": lengths.tolist(),
                                       "results": results}, args.out)


if __name__ == "__main__":
  main()
