"""The benchmark scripts run end to end in their --quick mode and write their JSON (slow)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, timeout=1200):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
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


@pytest.mark.slow  # 35 s: two tiny trainings (LaSeR, GRPO) and their final sampling
def test_learning_benchmark_runs_both_methods_per_seed(tmp_path, capsys):
  learning = _learning_module()
  tiny = {"total_steps": 2, "eval_every": 2, "sft.steps": 0, "batch_size": 4, "micro_batch_size": 8,
          "rollout.n": 4, "rollout.max_new_tokens": 12, "eval.max_new_tokens": 12,
          "data.synthetic_train_size": 32, "data.synthetic_eval_size": 8, "data.eval_size": 8,
          "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1,
          "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 16, "reward.num_workers": 0,
          "reward.fn": "multihost_helpers:parity_reward",  # rewards of both classes from a random model
          "laser.ref_constant": -4.0, "laser.kl_coef": 0.4}
  result = learning.main(["--seeds=1", f"--workdir={tmp_path / 'runs'}", f"--out={tmp_path}", "--n=2",
                          "--problems=4", *[f"--set={k}={v}" for k, v in tiny.items()]])
  assert [(r["method"], r["seed"]) for r in result["runs"]] == [("laser", 0), ("grpo", 0)]
  for run in result["runs"]:
    assert [e["step"] for e in run["evals"]] == [0, 2]
    assert run["summary"]["acc_first"] == run["evals"][0]["eval/reward/mean"]
    assert run["summary"]["maj@n"] == run["scaling"]["maj@2"]
  assert set(result["stats"]) == {"laser", "grpo"} and len(result["bars"]) == 5
  assert 0 < result["runs"][0]["summary"]["mean@n"] < 1
  on_disk = json.loads((tmp_path / "learning.json").read_text())
  for method, columns in result["stats"].items():
    np.testing.assert_array_equal(np.array(list(on_disk["stats"][method].values())),
                                  np.array(list(columns.values())))  # NaN == NaN here
  assert (tmp_path / "learning.png").exists()
  assert "mean +- std over 1 seed(s)" in capsys.readouterr().out
