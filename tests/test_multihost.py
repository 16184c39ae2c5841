"""Multi-host training, for real: two JAX processes (4 CPU devices each) joined by
jax.distributed, launched through the CLI as on a pod, against the one-process 8-device run.

A Cloud TPU v4-64 is 8 hosts; what can break there (the global batch built from host shards,
collective checkpoint saves and restores, one host alone getting the preemption signal) is
exercised here with the same code paths, on one machine.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from laser_jax import default_config, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 6

# A tiny model and batch (4 prompts x 4 responses; 2 prompts per host), checkpoints every 2 steps.
OVERRIDES = {
    "total_steps": TOTAL_STEPS, "checkpoint_every": 2, "eval_every": 3, "async_checkpointing": False,
    "batch_size": 4, "micro_batch_size": 8, "rollout.n": 4, "rollout.max_new_tokens": 12,
    "eval.max_new_tokens": 12, "data.synthetic_train_size": 64, "data.synthetic_eval_size": 8,
    "data.eval_size": 8, "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1,
    "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 16, "laser.ref_constant": -4.0,
    "laser.self_rewarding_warmup_steps": 1, "sft.steps": 0,
}
# Row-level results that must be identical (same prompts, same samples, same verdicts).
EXACT = ("reward_mean", "response_length", "truncated_frac", "eval/accuracy", "self_reward/n_incorrect")
# Neither the timings nor approx_kl, which is ~1e-8 here: float noise of the cross-process sums.
SKIP = ("step_time_s", "rollout_time_s", "update_time_s", "tokens_per_s", "approx_kl")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, num_processes=2, devices_per_process=4):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, "-m", "laser_jax.train", "--config=configs/tiny_cpu.py",
           f"--config.workdir={workdir}", f"--coordinator_address=localhost:{port}",
           f"--num_processes={num_processes}", f"--process_id={i}"]
    cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    log = open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.process{i}.log"), "a")
    procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  return procs


def _wait(procs, timeout=300):
  deadline = time.time() + timeout
  codes = []
  for p, log in procs:
    try:
      codes.append(p.wait(timeout=max(1, deadline - time.time())))
    except subprocess.TimeoutExpired:
      for q, _ in procs:
        q.kill()
      raise AssertionError(f"multi-process run hung; logs next to {log.name}")
    finally:
      log.close()
  return codes


def _log_text(workdir, i):
  with open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.process{i}.log")) as f:
    return f.read()


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_hosts_preempted_on_one_host_then_resumed_repeat_the_one_host_run(tmp_path):
  # The reference: one process, 8 devices (tests/conftest.py), the same config.
  config = default_config.apply_overrides(default_config.get_config(), OVERRIDES)
  config.workdir = str(tmp_path / "one_host")
  trainer.train(config, progress=False)
  reference = _records(config.workdir)
  assert [r["step"] for r in reference] == list(range(TOTAL_STEPS + 1))

  # Two hosts; the preemption signal reaches host 1 only, once the step-2 checkpoint is written.
  workdir = str(tmp_path / "two_hosts")
  procs = _launch(workdir)
  first_checkpoint = os.path.join(workdir, "checkpoints", "2")
  while not os.path.isdir(first_checkpoint) and all(p.poll() is None for p, _ in procs):
    time.sleep(0.1)
  assert os.path.isdir(first_checkpoint), _log_text(workdir, 0)[-3000:]
  procs[1][0].send_signal(signal.SIGTERM)
  codes = _wait(procs)
  assert codes == [0, 0], [_log_text(workdir, i)[-3000:] for i in range(2)]
  # Host 0 never got the signal, yet stopped and saved the same step as host 1 (before the end).
  logs = [_log_text(workdir, i) for i in range(2)]
  saved = [int(log.split("Preemption signal: saved step ")[1].split(",")[0]) for log in logs]
  assert saved[0] == saved[1] < TOTAL_STEPS, saved
  stopped = _records(workdir)
  assert stopped[-1]["step"] == saved[0]

  # The same command again resumes both hosts from that checkpoint and finishes the run.
  assert _wait(_launch(workdir)) == [0, 0], _log_text(workdir, 0)[-3000:]
  records = _records(workdir)
  assert [r["step"] for r in records] == list(range(TOTAL_STEPS + 1))
  assert f"Resumed from {workdir}/checkpoints at step {saved[0]}" in _log_text(workdir, 0)

  for ours, ref in zip(records, reference):
    assert set(ours) == set(ref), ours["step"]
    for key, want in ref.items():
      if key in SKIP or not isinstance(want, (int, float)):
        continue
      if key in EXACT:
        assert ours[key] == want, (ours["step"], key)
      else:
        np.testing.assert_allclose(ours[key], want, rtol=1e-4, atol=1e-6, err_msg=f"step {ours['step']} {key}")


def test_multi_process_flags_must_come_together_and_be_in_range():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cases = {("--num_processes=2",): "--coordinator_address, --process_id missing",
           ("--num_processes=2", "--process_id=2", "--coordinator_address=localhost:1"):
               "--process_id=2 not in [0, --num_processes=2)"}
  for flags, message in cases.items():
    run = subprocess.run([sys.executable, "-m", "laser_jax.train", "--config=configs/tiny_cpu.py", *flags],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and message in run.stderr, (flags, run.returncode, run.stderr[-500:])
