"""Every entry point's bad input: one line `error: <flag or key>: <what>` on stderr, exit 2; and
train's --dry_run."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("laser_jax.train", ["--config=configs/tiny_cpu.py", "--config.laser.kl_coeff=0.1"],
     '--config.laser.kl_coeff=0.1: the config has no key \'kl_coeff\' (Did you mean "kl_coef" instead of "kl_coeff"?)'),
    ("laser_jax.train", ["--config=configs/no_such.py"], "--config=configs/no_such.py: no such config file"),
    ("laser_jax.train", ["--config=configs/tiny_cpu.py", "--config.total_steps=abc"],
     "--config.total_steps=abc: invalid literal for int() with base 10: 'abc'"),
    ("laser_jax.train", ["--config=configs/tiny_cpu.py", "--confg.total_steps=1"],
     "--confg.total_steps: no such flag (did you mean --config.total_steps?)"),
    ("laser_jax.train", ["--config=configs/tiny_cpu.py", "--config.model.hf_path=/no/such/dir"],
     "config.model.hf_path: no such directory '/no/such/dir' (nor a gs:// path or a Hugging Face hub id "
     "org/name[@revision])"),
    ("laser_jax.train", ["--config=configs/tiny_cpu.py", "--dry_run", "--config.rollout.n=1"],
     "config.rollout.n: GRPO needs at least 2 responses per prompt to form a group, got 1"),
    ("laser_jax.evaluate", ["--config=configs/eval.py", "--config.eval.nn=3"],
     "--config.eval.nn=3: the config has no key 'nn'"),
    ("laser_jax.export", ["--config=configs/nope.py"], "--config=configs/nope.py: no such config file"),
    ("laser_jax.aot", ["--config=configs/tpu_v4.py", "--topology=v4-64", "--config.model.attentio=chunked"],
     '--config.model.attentio=chunked: the config has no key \'attentio\' (Did you mean "attention" instead of "attentio"?)'),
]


@pytest.mark.parametrize("module,args,message", CASES, ids=[f"{m.split('.')[1]}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_bad_input_is_one_error_line_and_exit_2(module, args, message):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and errors == [f"error: {message}"], (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr


def _files(root):
  return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_train_dry_run_reports_and_builds_loads_writes_nothing(tmp_path):
  """--dry_run prints the resolved config, every validation warning, the devices and the
  checkpoint a run would resume from, and exits 0 without touching the model or the data (a hub
  id and a hub data glob that do not resolve offline) or writing anything."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from laser_jax.training import checkpoint  # pylint: disable=import-outside-toplevel
  workdir, hf_home = tmp_path / "run", tmp_path / "hf"
  saver = checkpoint.Checkpointer(str(workdir), async_save=False)
  for step in (2, 5):
    saver.save(step, {"x": np.zeros(2, np.float32)}, {"position": step})
  latest = saver.latest_step()  # What the trainer's own checkpoint manager resumes from.
  saver.close()
  before = _files(tmp_path)
  overrides = [f"--config.workdir={workdir}", "--config.laser.kl_coef=0.1",
               "--config.model.hf_path=Qwen/Qwen2.5-7B", "--config.data.task=files",
               "--config.data.train_files=hf://datasets/zwhe99/DeepMath-103K/data/*.parquet",
               "--config.sft.steps=0"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
  proc = subprocess.run([sys.executable, "-m", "laser_jax.train", "--config=configs/tiny_cpu.py",
                         "--dry_run", *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  config, end = json.JSONDecoder().raw_decode(proc.stdout)
  assert (config["workdir"], config["laser"]["kl_coef"], config["model"]["hf_path"]) == (
      str(workdir), 0.1, "Qwen/Qwen2.5-7B")
  assert config["rollout"]["n"] == 8  # Untouched keys resolved from the config file.
  assert proc.stdout[end:].strip().splitlines()[:-1] == [
      # kl_coef * -ref_constant = 0.1 * 9 < 1.5: the one warning of this config.
      "warning: config.laser.kl_coef * -config.laser.ref_constant = 0.1 * 9 = 0.9 < 1.5: the correct "
      "class's target log p(z_c) = 1 is too close to 0 (or above it) to be reached; raise kl_coef to "
      ">= 0.167 (python -m laser_jax.calibrate prints the range)",
      "devices: 4 (cpu) in 1 process(es); mesh data=1 fsdp=4 tensor=1",
      f"workdir: {workdir}: holds a checkpoint at step {latest}, the run resumes from it"]
  assert latest == 5 and proc.stdout.strip().splitlines()[-1].startswith("dry run: config valid")
  assert _files(tmp_path) == before and not hf_home.exists()  # Nothing written or downloaded.
