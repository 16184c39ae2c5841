"""Sampler benchmark: laser_jax.generate.sampler vs transformers `generate`, and the cost of the score.

One random Qwen2-shaped model is saved as a Hugging Face checkpoint in a temp dir and loaded by
both sides (same weights). Five measurements, side by side in one run:
  1. generated tokens/s at several batch sizes: ours (sampling, in-loop self-reward on) vs
     transformers generate (torch, CPU), both forced to produce exactly --new-tokens tokens
     (no EOS on our side; min_new_tokens = max_new_tokens on theirs);
  2. score overhead: our sampler with the in-loop self-reward vs without it, on a workload where
     rows stop at different steps (a set of EOS ids) and on the no-EOS workload;
  3. the official recipe -- sample without the score, then a separate jitted forward over every
     full sequence `prompt + response + EOS` to read log pi(z_c | x, y, EOS) -- vs ours.
     (Our version of the recipe only unembeds the EOS position, so it is the cheapest form of it.)
  4. long responses (--long-new-tokens at --long-batch, as in RL rollouts): ours with the default
     decode segments (each loop attends only over the KV cache written so far) vs one loop over
     the whole cache vs transformers generate.
  5. an RL-shaped batch, --rl-prompts prompts x --rl-n responses each: ours (each prompt
     prefilled once, its cache repeated for its n rows) vs ours prefilling every row vs
     transformers generate with num_return_sequences (which prefills every row).

Usage:
  python bench/sampler.py             # full run, writes bench/results/sampler.json
  python bench/sampler.py --quick     # small and fast smoke run
  JAX_PLATFORMS=cuda python bench/sampler.py --torch-device=cuda --out=bench/results/sampler_gpu.json
Times are the best of --repeats runs (--overhead-repeats for measurement 2, whose target is a
difference of 2%) after one warm-up (compilation) run (medians are stored in the JSON too); the
variants of each comparison are interleaved so that background load affects them alike, and
measurements 1 and 2 also report the paired median: the median over rounds of the ratio of the
two variants' times in the same round, which on a noisy shared machine is the steadier ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from laser_jax.generate import sampler as sampler_lib  # noqa: E402
from laser_jax.generate.sampling import SamplingParams  # noqa: E402
from laser_jax.models import hf, model as model_lib  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--vocab", type=int, default=16384)
  p.add_argument("--hidden", type=int, default=384)
  p.add_argument("--intermediate", type=int, default=1024)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=6)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--batches", type=str, default="1,16,64")
  p.add_argument("--score-batch", type=int, default=16, help="batch size for measurements 2 and 3")
  p.add_argument("--long-batch", type=int, default=16, help="batch size for measurement 4")
  p.add_argument("--long-new-tokens", type=int, default=512, help="response length for measurement 4")
  p.add_argument("--rl-prompts", type=int, default=8, help="distinct prompts in measurement 5")
  p.add_argument("--rl-n", type=int, default=8, help="responses per prompt in measurement 5")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--overhead-repeats", type=int, default=15,
                 help="repeats of measurement 2 (its target is a difference of at most 2%%)")
  p.add_argument("--measurements", type=str, default="1,2,3,4,5", help="which measurements to run")
  p.add_argument("--skip-torch", action="store_true", help="skip the transformers baseline")
  p.add_argument("--torch-device", type=str, default="cpu",
                 help="device of the transformers baseline: cpu, or cuda on a GPU machine (where JAX "
                      "runs on the GPU too: JAX_PLATFORMS=cuda)")
  p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
  p.add_argument("--out", type=str, default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       "results", "sampler.json"))
  args = p.parse_args(argv)
  if args.quick:
    args.vocab, args.hidden, args.intermediate, args.layers = 2048, 128, 256, 2
    args.heads, args.kv_heads, args.new_tokens, args.batches, args.score_batch, args.repeats = 4, 2, 16, "1,8", 8, 2
    args.overhead_repeats = 2
    args.long_batch, args.long_new_tokens, args.rl_prompts, args.rl_n = 4, 48, 2, 4
  return args


def make_checkpoint(args, path):
  """Random Qwen2 model saved with save_pretrained; returns the torch model."""
  import torch
  import transformers
  config = transformers.Qwen2Config(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
      max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
      pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  model.save_pretrained(path)
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def interleaved(fns: dict, repeats):
  """Best (min) wall time of several fns, run round-robin after one warm-up each.

  The minimum is the least load-sensitive estimate on a shared machine; medians go to `MEDIANS`.
  """
  for fn in fns.values():
    fn()
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  MEDIANS.update({k: statistics.median(v) for k, v in times.items()})
  TIMES.update(times)
  return {k: min(v) for k, v in times.items()}


MEDIANS: dict = {}
TIMES: dict = {}  # every wall time of the latest `interleaved` calls, by variant


def paired_ratio(a: str, b: str) -> float:
  """Median over repeats of time(a) / time(b) within each round of `interleaved`: adjacent runs
  share the machine's load, so this resolves small differences that the minima blur."""
  return statistics.median(x / y for x, y in zip(TIMES[a], TIMES[b]))


def official_recipe_scorer(cfg, z_c):
  """Jitted separate forward over `prompt + response + EOS` (right-padded) -> log pi(z_c | ...)."""
  @jax.jit
  def score(params, tokens, mask, last_index):
    positions = model_lib.default_positions(mask)
    hidden = model_lib.forward(params, cfg, tokens, positions, mask, return_hidden=True)
    at_eos = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]
    logits = model_lib.unembed(params, cfg, at_eos)
    return logits[:, z_c] - jax.nn.logsumexp(logits, axis=-1)
  return score


def recipe_batch(out, width):
  """Host-side packing of `prompt + response + EOS` rows, right-padded to `width`."""
  n = len(out.tokens)
  tokens = np.zeros((n, width), np.int32)
  mask = np.zeros((n, width), bool)
  last = np.zeros((n,), np.int32)
  for i in range(n):
    seq = np.concatenate([out.prompt_tokens[i][out.prompt_mask[i]], out.response_tokens[i, :out.response_lengths[i]]])
    tokens[i, :len(seq)], mask[i, :len(seq)], last[i] = seq, True, len(seq) - 1
  return tokens, mask, last


def main(argv=None):
  args = parse_args(argv)
  import torch
  torch.set_num_threads(os.cpu_count())
  with tempfile.TemporaryDirectory() as tmp:
    torch_model = make_checkpoint(args, tmp).to(args.torch_device)
    cfg = hf.load_hf_config(tmp)
    params = hf.load_hf_params(tmp, cfg)
  print(f"model: Qwen2-shaped, {cfg.num_params() / 1e6:.1f}M params (vocab {cfg.vocab_size}, hidden "
        f"{cfg.hidden_size}, {cfg.num_layers} layers); prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} on {args.torch_device}, {os.cpu_count()} CPU cores")
  todo = {int(m) for m in args.measurements.split(",")}
  z_c = cfg.vocab_size - 1
  key = jax.random.key(0)
  results = {"args": vars(args), "num_params": cfg.num_params(), "torch": torch.__version__,
             "loadavg_start": os.getloadavg(), "throughput": [], "score_overhead": [], "official_recipe": {},
             "long_responses": {}, "rl_batch": {}}

  # ---- 1. tokens/s vs transformers generate ----------------------------------------------
  def ours_fn(prompts, new_tokens, **sampling):
    """Our sampler forced to generate exactly new_tokens tokens per row."""
    forced = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, eos_ids=(), pad_id=0,
                            self_reward_token_id=z_c, **sampling)

    def ours():
      out = sampler_lib.sample(params, cfg, prompts, forced, key)
      assert (out.lengths == new_tokens).all()
    return ours

  def hf_fn(prompts, new_tokens, n=1):
    """transformers generate forced to generate exactly new_tokens tokens per row (n per prompt)."""
    ids = torch.tensor(prompts, device=args.torch_device)

    def theirs():
      with torch.no_grad():
        gen = torch_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                   temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, pad_token_id=0, num_return_sequences=n)
      gen = gen.cpu()  # Waits for a GPU to finish.
      assert gen.shape == (len(prompts) * n, args.prompt_len + new_tokens)
    return theirs

  if 1 in todo:
    for batch in [int(b) for b in args.batches.split(",")]:
      prompts = np.random.default_rng(batch).integers(4, cfg.vocab_size - 1,
                                                      size=(batch, args.prompt_len)).tolist()
      entry = {"batch": batch}
      fns = {"ours": ours_fn(prompts, args.new_tokens)}
      if not args.skip_torch:
        fns["hf"] = hf_fn(prompts, args.new_tokens)
      t = interleaved(fns, args.repeats)
      t_ours = t["ours"]
      entry.update(ours_s=t_ours, ours_tok_s=batch * args.new_tokens / t_ours, ours_median_s=MEDIANS["ours"])
      if "hf" in t:
        t_hf = t["hf"]
        entry.update(hf_s=t_hf, hf_tok_s=batch * args.new_tokens / t_hf, speedup=t_hf / t_ours,
                     hf_median_s=MEDIANS["hf"], paired_speedup=paired_ratio("hf", "ours"))
      results["throughput"].append(entry)
      print(f"[1] batch {batch:3d}: ours {entry['ours_tok_s']:9.1f} tok/s" +
            (f" | transformers {entry['hf_tok_s']:9.1f} tok/s | speedup {entry['speedup']:.2f}x"
             f" (paired median {entry['paired_speedup']:.2f}x)"
             if "hf_s" in entry else ""), flush=True)

  # ---- 2. score overhead ---------------------------------------------------------------------
  batch = args.score_batch
  prompts = np.random.default_rng(2).integers(4, cfg.vocab_size - 1, size=(batch, args.prompt_len)).tolist()
  # About one token in new_tokens is an EOS, so rows stop at spread-out steps.
  eos_ids = tuple(range(4, 4 + max(1, cfg.vocab_size // args.new_tokens)))
  workloads = {"rows stop at different steps": eos_ids, "no EOS (all rows run to the limit)": ()}
  if 2 in todo:
    for name, eos in workloads.items():
      with_score = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, eos_ids=eos, pad_id=0,
                                  self_reward_token_id=z_c)
      without = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, eos_ids=eos, pad_id=0,
                               self_reward_token_id=None)
      a = sampler_lib.sample(params, cfg, prompts, with_score, key)
      b = sampler_lib.sample(params, cfg, prompts, without, key)
      np.testing.assert_array_equal(a.tokens, b.tokens)  # the score does not change the samples
      t = interleaved({"with": lambda: sampler_lib.sample(params, cfg, prompts, with_score, key),
                       "without": lambda: sampler_lib.sample(params, cfg, prompts, without, key)},
                      args.overhead_repeats)
      entry = {"workload": name, "batch": batch, "with_score_s": t["with"], "without_score_s": t["without"],
               "with_score_median_s": MEDIANS["with"], "without_score_median_s": MEDIANS["without"],
               "overhead_pct": 100 * (t["with"] / t["without"] - 1),
               "median_overhead_pct": 100 * (MEDIANS["with"] / MEDIANS["without"] - 1),
               "paired_overhead_pct": 100 * (paired_ratio("with", "without") - 1),
               "finished_rows": int(a.finished.sum()), "mean_length": float(a.response_lengths.mean())}
      results["score_overhead"].append(entry)
      print(f"[2] {name}: with score {t['with'] * 1e3:8.1f} ms | without {t['without'] * 1e3:8.1f} ms | "
            f"overhead {entry['overhead_pct']:+.2f}% (medians: {entry['median_overhead_pct']:+.2f}%, "
            f"paired: {entry['paired_overhead_pct']:+.2f}%) "
            f"({entry['finished_rows']}/{batch} rows finished)", flush=True)

  # ---- 3. official recipe (separate forward) vs in-loop -------------------------------------
  if 3 in todo:
    eos = workloads["rows stop at different steps"]
    with_score = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, eos_ids=eos, pad_id=0,
                                self_reward_token_id=z_c)
    without = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, eos_ids=eos, pad_id=0)
    scorer = official_recipe_scorer(cfg, z_c)
    width = args.prompt_len + args.new_tokens

    def recipe():
      out = sampler_lib.sample(params, cfg, prompts, without, key)
      tokens, mask, last = recipe_batch(out, width)
      return np.asarray(scorer(params, tokens, mask, last)), out

    ours_out = sampler_lib.sample(params, cfg, prompts, with_score, key)
    recipe_scores, recipe_out = recipe()
    fin = ours_out.finished
    max_diff = float(np.max(np.abs(recipe_scores[fin] - ours_out.self_reward_logprob[fin]))) if fin.any() else 0.0
    t = interleaved({"ours": lambda: sampler_lib.sample(params, cfg, prompts, with_score, key),
                     "recipe": recipe}, args.repeats)
    results["official_recipe"] = {"batch": batch, "ours_s": t["ours"], "recipe_s": t["recipe"],
                                  "recipe_over_ours": t["recipe"] / t["ours"], "max_abs_score_diff": max_diff,
                                  "ours_median_s": MEDIANS["ours"], "recipe_median_s": MEDIANS["recipe"]}
    print(f"[3] batch {batch}: ours (in-loop score) {t['ours'] * 1e3:8.1f} ms | sample + separate forward "
          f"{t['recipe'] * 1e3:8.1f} ms | ratio {t['recipe'] / t['ours']:.3f}x | max |score diff| {max_diff:.2e}")

  # ---- 4. long responses: decode segments vs one loop over the whole cache ------------------
  if 4 in todo:
    long_prompts = np.random.default_rng(4).integers(4, cfg.vocab_size - 1,
                                                     size=(args.long_batch, args.prompt_len)).tolist()
    segments = SamplingParams().decode_segments
    fns = {"ours": ours_fn(long_prompts, args.long_new_tokens),
           "one_loop": ours_fn(long_prompts, args.long_new_tokens, decode_segments=1)}
    if not args.skip_torch:
      fns["hf"] = hf_fn(long_prompts, args.long_new_tokens)
    t = interleaved(fns, min(args.repeats, 3))
    n_tokens = args.long_batch * args.long_new_tokens
    long = {"batch": args.long_batch, "new_tokens": args.long_new_tokens, "decode_segments": segments,
            "ours_s": t["ours"], "ours_tok_s": n_tokens / t["ours"], "one_loop_s": t["one_loop"],
            "one_loop_tok_s": n_tokens / t["one_loop"], "one_loop_over_ours": t["one_loop"] / t["ours"]}
    if "hf" in t:
      long.update(hf_s=t["hf"], hf_tok_s=n_tokens / t["hf"], speedup=t["hf"] / t["ours"])
    results["long_responses"] = long
    print(f"[4] batch {args.long_batch}, {args.long_new_tokens} new tokens: ours ({segments} decode segments) "
          f"{long['ours_tok_s']:.1f} tok/s | one loop {long['one_loop_tok_s']:.1f} tok/s "
          f"({long['one_loop_over_ours']:.2f}x our time)" +
          (f" | transformers {long['hf_tok_s']:.1f} tok/s | speedup {long['speedup']:.2f}x" if "hf" in t else ""),
          flush=True)

  # ---- 5. RL-shaped batch: n responses per prompt ------------------------------------------
  if 5 in todo:
    rl_prompts = np.random.default_rng(5).integers(4, cfg.vocab_size - 1,
                                                   size=(args.rl_prompts, args.prompt_len)).tolist()
    rl_rows = [p for p in rl_prompts for _ in range(args.rl_n)]
    fns = {"ours": ours_fn(rl_prompts, args.new_tokens, n=args.rl_n),
           "per_row_prefill": ours_fn(rl_rows, args.new_tokens)}
    if not args.skip_torch:
      fns["hf"] = hf_fn(rl_prompts, args.new_tokens, n=args.rl_n)
    t = interleaved(fns, args.repeats)
    n_tokens = len(rl_rows) * args.new_tokens
    rl = {"prompts": args.rl_prompts, "n": args.rl_n, "batch": len(rl_rows), "ours_s": t["ours"],
          "ours_tok_s": n_tokens / t["ours"], "per_row_prefill_s": t["per_row_prefill"],
          "per_row_prefill_over_ours": t["per_row_prefill"] / t["ours"], "ours_median_s": MEDIANS["ours"]}
    if "hf" in t:
      rl.update(hf_s=t["hf"], hf_tok_s=n_tokens / t["hf"], speedup=t["hf"] / t["ours"], hf_median_s=MEDIANS["hf"])
    results["rl_batch"] = rl
    print(f"[5] {args.rl_prompts} prompts x n={args.rl_n}: ours {rl['ours_tok_s']:.1f} tok/s | each row "
          f"prefilled {rl['per_row_prefill_over_ours']:.2f}x our time" +
          (f" | transformers {rl['hf_tok_s']:.1f} tok/s | speedup {rl['speedup']:.2f}x" if "hf" in t else ""),
          flush=True)

  results["loadavg_end"] = os.getloadavg()
  results["command"] = "python " + " ".join(["bench/sampler.py"] + (argv if argv is not None else sys.argv[1:]))
  print()
  if results["throughput"]:
    common.print_table(["batch", "ours tok/s", "transformers tok/s", "speedup", "paired median"], [
        [e["batch"], f"{e['ours_tok_s']:.1f}", f"{e.get('hf_tok_s', float('nan')):.1f}",
         f"{e.get('speedup', float('nan')):.2f}x", f"{e.get('paired_speedup', float('nan')):.2f}x"]
        for e in results["throughput"]])
    print()
  if results["score_overhead"]:
    common.print_table(["workload", "with score (ms)", "without (ms)", "overhead of bests", "of medians",
                        "paired median"], [
        [e["workload"], f"{e['with_score_s'] * 1e3:.1f}", f"{e['without_score_s'] * 1e3:.1f}",
         f"{e['overhead_pct']:+.2f}%", f"{e['median_overhead_pct']:+.2f}%", f"{e['paired_overhead_pct']:+.2f}%"]
        for e in results["score_overhead"]])
    print()
  if results["official_recipe"]:
    r = results["official_recipe"]
    print(f"official recipe / ours = {r['recipe_over_ours']:.3f} (batch {r['batch']})")
  if results["long_responses"]:
    long = results["long_responses"]
    print(f"long responses (batch {long['batch']}, {long['new_tokens']} tokens): one loop / ours = "
          f"{long['one_loop_over_ours']:.2f}" +
          (f", speedup over transformers {long['speedup']:.2f}x" if "speedup" in long else ""))
  if results["rl_batch"]:
    rl = results["rl_batch"]
    print(f"RL-shaped batch ({rl['prompts']} prompts x n={rl['n']}): per-row prefill / ours = "
          f"{rl['per_row_prefill_over_ours']:.2f}" +
          (f", speedup over transformers {rl['speedup']:.2f}x" if "speedup" in rl else ""))
  common.write_results("sampler", results, args.out)


if __name__ == "__main__":
  main()
