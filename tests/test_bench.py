"""The benchmark scripts run end to end in their --quick mode and write their JSON (slow)."""
import json
import os
import subprocess
import sys

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
