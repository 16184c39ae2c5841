"""The learning demonstration of the embedded default (slow: one full default run, ~15 min).

Runs exactly `python -m laser_jax.train --config=configs/tiny_cpu.py` (into a temporary workdir)
and checks the bars of the learning issue on its metrics.jsonl eval records: held-out accuracy up
by >= 10 points from the first to the last eval, and self-verification F1 >= 0.70 at the end.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_default_run_learns_to_solve_and_to_verify(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  res = subprocess.run([sys.executable, "-m", "laser_jax.train", "--config=configs/tiny_cpu.py",
                        f"--config.workdir={tmp_path}"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=3600)
  assert res.returncode == 0, res.stderr[-3000:]
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in records if "eval/accuracy" in r]
  assert evals[0]["step"] == 0 and evals[-1]["step"] == max(r["step"] for r in records)
  gain = evals[-1]["eval/accuracy"] - evals[0]["eval/accuracy"]
  assert gain >= 0.10, [(r["step"], r["eval/accuracy"]) for r in evals]
  assert evals[-1]["eval/self_verification/f1"] >= 0.70, evals[-1]
