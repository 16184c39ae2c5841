"""The benchmark scripts run end to end in their --quick mode and write their JSON (slow);
bench/length_skew.py also in its --tiny mode, in the default run."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, timeout=1200, xla_flags=""):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
  res = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
  assert res.returncode == 0, res.stderr[-3000:]
  return res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sampler", "train_step"])
def test_benchmark_quick_mode_writes_results(script, tmp_path):
  out = tmp_path / f"{script}.json"
  stdout = _run([f"bench/{script}.py", "--quick", f"--out={out}"], tmp_path)
  assert "|" in stdout  # The printed table.
  result = json.loads(out.read_text())
  # The record names the machine it was measured on and holds the measurements.
  assert result["machine"]["cpu_model"] and result["machine"]["cpu_count"] >= 1
  assert result["command"].startswith(f"python bench/{script}.py")
  if script == "sampler":
    assert [e["batch"] for e in result["throughput"]] == [1, 8]
    assert all(e["ours_tok_s"] > 0 and e["speedup"] > 0 for e in result["throughput"])
    assert {e["workload"] for e in result["score_overhead"]} == {
        "rows stop at different steps", "no EOS (all rows run to the limit)"}
    assert result["official_recipe"]["max_abs_score_diff"] < 1e-4
  else:
    assert result["models"]


def test_length_skew_tiny_run_writes_both_comparisons(tmp_path):
  """bench/length_skew.py end to end at its smallest size (~15-20 s, compiles dominate): the
  table and the JSON hold both rollout modes and all three update layouts, with the token counts
  the comparison rests on (same rows static vs continuous; padded and packed are the same batch;
  the full rows hold as many real tokens, to within the rounding to whole micro-batches)."""
  out = tmp_path / "length_skew.json"
  # Unoptimised XLA code: compiles take half the time, and this run checks what is measured and
  # recorded, not how fast (the targets are --quick's).
  stdout = _run(["bench/length_skew.py", "--tiny", f"--out={out}"], tmp_path,
                xla_flags="--xla_backend_optimization_level=0")
  for row in ("| rollout | static |", "| rollout | continuous (4 slots) |", "| update | padded |",
              "| update | packed |", "| update | full rows |"):
    assert row in stdout, stdout
  result = json.loads(out.read_text())
  assert result["size"] == "tiny" and result["command"].startswith("python bench/length_skew.py --tiny")

  rollout = result["rollout"]
  assert rollout["rows"] == 16 and rollout["max_new_tokens"] == 64
  # The same rows in both modes (per-row keys), so the same useful tokens.
  assert rollout["continuous_useful_tokens"] == rollout["useful_tokens"] == round(rollout["mean_length"] * 16)
  assert rollout["same_rows_frac"] == 1.0
  assert 0 < rollout["fill_fraction"] < 1 and rollout["fill_fraction"] == rollout["useful_tokens"] / (16 * 64)
  for mode in ("static", "continuous"):
    assert rollout[f"{mode}_s"] > 0
    assert rollout[f"{mode}_us_per_token"] == pytest.approx(1e6 * rollout[f"{mode}_s"] / rollout["useful_tokens"])
  assert rollout["speedup"] == pytest.approx(rollout["static_s"] / rollout["continuous_s"])

  batch = result["update_batch"]
  rows, max_new, prompt_len, micro = (batch[k] for k in ("rows", "max_new_tokens", "prompt_len", "micro_batch_size"))
  seq_len = prompt_len + max_new + 1
  assert batch["micro_batch_tokens"] == 2 * seq_len
  lengths = result["update_lengths"]
  assert (lengths["source"], lengths["rows"], lengths["budget"]) == ("rlvr_long_tail", rows, max_new)
  update = {u["update"]: u for u in result["update"]}
  assert list(update) == ["padded", "packed", "full rows"]
  padded, packed, full = update["padded"], update["packed"], update["full rows"]
  # Real tokens: every row's prompt plus its response (EOS included); one batch, two layouts.
  assert padded["useful_tokens"] == packed["useful_tokens"] == round(rows * (prompt_len + lengths["mean"]))
  assert padded["computed_tokens"] == rows * seq_len > packed["computed_tokens"] >= packed["useful_tokens"]
  # Full rows: every row at the budget, as many as hold the same real tokens in whole micro-batches.
  assert full["rows"] % micro == 0 and full["useful_tokens"] == full["rows"] * (prompt_len + max_new)
  assert abs(full["useful_tokens"] - padded["useful_tokens"]) <= micro * seq_len / 2 + full["rows"]
  for u in update.values():
    assert u["best_s"] > 0 and u["us_per_useful_token"] == pytest.approx(1e6 * u["best_s"] / u["useful_tokens"])
    assert u["vs_full_rows"] == pytest.approx(u["us_per_useful_token"] / full["us_per_useful_token"])


@pytest.mark.slow
def test_tunix_benchmark_quick_mode(tmp_path):
  """Needs the benchmark venv: python3 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]'."""
  tunix_python = os.path.join(REPO, ".venv-bench", "bin", "python")
  assert os.path.exists(tunix_python), "create .venv-bench first (see bench/README.md)"
  out = tmp_path / "tunix_rl.json"
  _run(["bench/tunix_rl.py", "--quick", f"--out={out}", f"--tunix-python={tunix_python}"], tmp_path)
  result = json.loads(out.read_text())
  assert result


def _learning_module():
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_learning", os.path.join(REPO, "bench", "learning.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_learning_statistics_and_bars_hand_worked():
  learning = _learning_module()
  rows = [dict.fromkeys([k for k, _ in learning.COLUMNS], 0.5) for _ in range(2)]
  rows[0].update(acc_first=0.3, acc_last=0.6, f1=0.9, **{"mean@n": 0.4, "maj@n": 0.5,
                 "self_weighted_maj@n": 0.54, "best@n": 0.47})
  rows[1].update(acc_first=0.3, acc_last=0.3, f1=float("nan"), **{"mean@n": 0.4, "maj@n": 0.5,
                 "self_weighted_maj@n": 0.52, "best@n": 0.45})
  stats = learning.mean_std(rows)
  assert stats["acc_last"] == pytest.approx([0.45, 0.15])  # population std over the seeds
  assert stats["f1"] == pytest.approx([0.9, 0.0])  # a NaN F1 (empty class) is left out
  grpo = learning.mean_std([dict(rows[0], acc_last=0.46), dict(rows[1], acc_last=0.46)])
  bars = learning.bars({"laser": stats, "grpo": grpo})
  assert bars == {"f1 >= 0.80": True, "score-weighted maj@n >= maj@n + 0.02": True,
                  "best@n >= mean@n + 0.05": True, "held-out accuracy rises >= 0.10": True,
                  "LaSeR final accuracy >= GRPO's": False}
  # A run's row: the eval records' first / last figures and the final models' summary at k = n.
  evals = [{"eval/reward/mean": 0.25}, {"eval/reward/mean": 0.5, "eval/self_verification/f1_finished": None,
                                        "eval/self_verification/auroc_finished": 0.8}]
  scaling = {"reward/mean": 0.4, "self_verification/within_auroc": 0.55,
             "self_verification/within_auroc_problems": 7, "reward/variance_explained_by_problem": 0.71,
             "distinct_frac/correct": 0.2, "distinct_frac/incorrect": 0.8, "best@8": 0.45, "best@4": 0.0,
             "best_by_likelihood@8": 0.48, "self_weighted_maj@8": 0.52, "likelihood_weighted_maj@8": 0.55,
             "maj@8": 0.53}
  row = learning.summarize_run(evals, scaling, 8)
  assert set(row) == {k for k, _ in learning.COLUMNS}
  assert row["acc_first"] == 0.25 and row["acc_last"] == 0.5 and math.isnan(row["f1"]) and row["auroc"] == 0.8
  assert (row["within_auroc"], row["within_auroc_problems"], row["variance_explained_by_problem"]) == (0.55, 7, 0.71)
  assert (row["best@n"], row["best_by_likelihood@n"], row["mean@n"]) == (0.45, 0.48, 0.4)
  assert (row["self_weighted_maj@n"], row["likelihood_weighted_maj@n"], row["maj@n"]) == (0.52, 0.55, 0.53)
  assert (row["distinct_frac/correct"], row["distinct_frac/incorrect"]) == (0.2, 0.8)
  table = learning.format_table({"laser": learning.mean_std([row])}, 1, 8)
  for header in ("within AUROC", "within #problems", "best@8 score", "best@8 likelihood", "mean@8",
                 "wmaj@8 score", "wmaj@8 likelihood", "maj@8", "var by problem", "distinct correct"):
    assert header in table, header
  assert "0.550+-0.000" in table and "7.000+-0.000" in table


@pytest.mark.slow  # 35 s alone (76 s beside other tests): two tiny trainings (LaSeR, GRPO), their final sampling
def test_learning_benchmark_runs_both_methods_per_seed(tmp_path, capsys):
  learning = _learning_module()
  tiny = {"total_steps": 2, "eval_every": 2, "sft.steps": 0, "batch_size": 4, "micro_batch_size": 8,
          "rollout.n": 4, "rollout.max_new_tokens": 12, "eval.max_new_tokens": 12,
          "data.synthetic_train_size": 32, "data.synthetic_eval_size": 8, "data.eval_size": 8,
          "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1,
          "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 16, "reward.num_workers": 0,
          "reward.fn": "multihost_helpers:parity_reward",  # rewards of both classes from a random model
          "laser.ref_constant": -4.0, "laser.kl_coef": 0.4}
  result = learning.main(["--seeds=1", f"--workdir={tmp_path / 'runs'}", f"--out={tmp_path}", "--n=8",
                          "--problems=8", *[f"--set={k}={v}" for k, v in tiny.items()]])
  assert [(r["method"], r["seed"]) for r in result["runs"]] == [("laser", 0), ("grpo", 0)]
  for run in result["runs"]:
    assert [e["step"] for e in run["evals"]] == [0, 2]
    assert run["summary"]["acc_first"] == run["evals"][0]["eval/reward/mean"]
    assert run["summary"]["maj@n"] == run["scaling"]["maj@8"]
  assert set(result["stats"]) == {"laser", "grpo"} and len(result["bars"]) == 5
  assert 0 < result["runs"][0]["summary"]["mean@n"] < 1
  for run in result["runs"]:  # the final models' columns, from the samples' own records
    summary = run["summary"]
    assert summary["best_by_likelihood@n"] == run["scaling"]["best_by_likelihood@8"]
    assert summary["likelihood_weighted_maj@n"] == run["scaling"]["likelihood_weighted_maj@8"]
    for key in ("best_by_likelihood@n", "likelihood_weighted_maj@n", "variance_explained_by_problem",
                "distinct_frac/correct", "distinct_frac/incorrect", "within_auroc"):
      assert 0 <= summary[key] <= 1, (key, summary[key])
    assert summary["within_auroc_problems"] >= 1
  on_disk = json.loads((tmp_path / "learning.json").read_text())
  assert on_disk["machine"]["cpu_count"] >= 1  # the figures name the machine that made them
  for method, columns in result["stats"].items():
    np.testing.assert_array_equal(np.array(list(on_disk["stats"][method].values())),
                                  np.array(list(columns.values())))  # NaN == NaN here
  assert (tmp_path / "learning.png").exists()
  assert "mean +- std over 1 seed(s)" in capsys.readouterr().out


def test_verifier_signals_hand_worked(tmp_path):
  """bench/verifier_signals.py on two problems of four responses: the likelihood ranks every
  correct response above every incorrect one; the score is constant on problem A and ranks
  backwards on B (a NaN score: no EOS); their sum keeps the likelihood's order."""
  import importlib.util
  import types
  spec = importlib.util.spec_from_file_location("bench_signals", os.path.join(REPO, "bench", "verifier_signals.py"))
  signals = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(signals)
  acc = np.array([[1, 1, 0, 0], [0, 1, 0, 1]], float)
  likelihoods = np.array([[-0.1, -0.2, -1.0, -2.0], [-3.0, -0.5, -2.0, -0.4]])
  scores = np.array([[0.3, 0.3, 0.3, 0.3], [0.9, 0.1, np.nan, 0.2]])
  answers = [["1", "1", "2", "3"], ["5", "4", None, "4"]]
  run = signals.measure(acc, scores, likelihoods, answers, k=4, num_bootstrap=4000)
  assert run["mean@4"] == 0.5
  assert run["likelihood"]["within_auroc"] == 1.0 and run["likelihood"]["auroc"] == 1.0
  # A: all tied (1/2); B: the scored rows 0, 1, 3 rank the wrong one first (0).
  assert run["score"]["within_auroc"] == 0.25 and run["score"]["within_problems"] == 2
  assert run["score + likelihood"]["within_auroc"] == 1.0
  # best@4 by a perfect ranking: a correct response is drawn at least once, 1 - (1/2)^4 per problem.
  assert run["likelihood"]["best@4"] == pytest.approx(1 - 0.5**4, abs=0.02)
  # Weighted votes: B's right answer "4" carries both heavy weights under the likelihood, and
  # the score's vote follows the wrong "5" whenever it is drawn (weight 0.9 > 0.1 + 0.2).
  assert run["likelihood"]["weighted_maj@4"] > run["score"]["weighted_maj@4"]
  # The file round trip that bench/learning.py writes, and the script's table and JSON.
  solutions = types.SimpleNamespace(acc=acc, scores=scores, likelihoods=likelihoods, finished=~np.isnan(scores),
                                    answers=answers, texts=[["a"] * 4, ["b"] * 4])
  os.makedirs(tmp_path / "laser_seed0")
  signals.save(str(tmp_path / "laser_seed0" / "final_solutions.npz"), solutions)
  loaded = signals.load(str(tmp_path / "laser_seed0" / "final_solutions.npz"))
  assert loaded[3] == answers and np.array_equal(loaded[1], scores, equal_nan=True)
  signals.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'signals.json'}"])
  result = json.loads((tmp_path / "signals.json").read_text())
  assert result["runs"]["laser_seed0"]["likelihood"]["within_auroc"] == 1.0
  with pytest.raises(SystemExit, match="no \\*/final_solutions.npz"):
    signals.main([f"--workdir={tmp_path / 'empty'}"])
