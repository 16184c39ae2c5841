"""Multi-host training, for real: two JAX processes (4 CPU devices each) joined by
jax.distributed, launched through the CLI as on a pod, against the one-process 8-device run.

A Cloud TPU v4-64 is 8 hosts; what can break there (the global batch built from host shards,
collective checkpoint saves and restores, one host alone getting the preemption signal) is
exercised here with the same code paths, on one machine.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from laser_jax import default_config
from laser_jax.training import metrics_writer, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 6

# A tiny model and batch (4 prompts x 4 responses; 2 prompts per host, two optimizer updates per
# step, so each update's mini-batch spans both hosts), checkpoints (async, the default) every 2
# steps; an eval set of 7 problems (4 per host, one padding copy).
OVERRIDES = {
    "total_steps": TOTAL_STEPS, "checkpoint_every": 2, "eval_every": 3,
    "batch_size": 4, "mini_batch_size": 2, "micro_batch_size": 8, "rollout.n": 4, "rollout.max_new_tokens": 12,
    "eval.max_new_tokens": 12, "data.synthetic_train_size": 64, "data.synthetic_eval_size": 8,
    "data.eval_size": 7, "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1,
    "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 16, "laser.ref_constant": -4.0,
    "laser.self_rewarding_warmup_steps": 1, "sft.steps": 0,
    "reward.fn": "multihost_helpers:parity_reward",  # Non-zero advantages from an untrained model.
}
# Row-level results that must be identical (same prompts, same samples, same verdicts).
EXACT = ("rollout/reward/mean", "rollout/response_length/mean", "rollout/truncated_frac", "eval/reward/mean",
         "self_verification/num_incorrect_finished")
# Neither the timings nor approx_kl, which is ~1e-8 here: float noise of the cross-process sums.
SKIP = ("perf/step_time_s", "perf/rollout_time_s", "perf/update_time_s", "perf/tokens_per_s", "actor/approx_kl")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _spawn(argv_for, log_for, num_processes=2, devices_per_process=4):
  """Starts `python *argv_for(i, port)` for every process i, its output going to `log_for(i)`."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  procs = []
  for i in range(num_processes):
    log = open(log_for(i), "a")
    procs.append((subprocess.Popen([sys.executable, *argv_for(i, port)], cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT), log))
  return procs


def _log_path(workdir, i):
  return os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.process{i}.log")


def _launch(workdir, num_processes=2, devices_per_process=4):
  """The training CLI on `num_processes` processes joined through --coordinator_address (one
  process: a plain single-process run)."""
  def argv(i, port):
    multi = [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
             f"--process_id={i}"] if num_processes > 1 else []
    return ["-m", "laser_jax.train", "--config=configs/tiny_cpu.py", f"--config.workdir={workdir}", *multi,
            *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
  return _spawn(argv, lambda i: _log_path(workdir, i), num_processes, devices_per_process)


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
  with open(_log_path(workdir, i)) as f:
    return f.read()


def _assert_metrics_match(records, reference):
  for ours, ref in zip(records, reference, strict=True):
    assert set(ours) == set(ref), ours["step"]
    for key, want in ref.items():
      if key in SKIP or not isinstance(want, (int, float)):
        continue
      if key in EXACT:
        assert ours[key] == want, (ours["step"], key)
      else:
        np.testing.assert_allclose(ours[key], want, rtol=1e-4, atol=1e-6, err_msg=f"step {ours['step']} {key}")


# 2 min on 2 cores (a one-process reference run, two processes, a preemption and a resume): slow,
# to keep the default suite under 15 min; the default suite keeps a two-process run
# (test_hf_checkpoint_loaded_sampled_and_exported_across_two_processes).
@pytest.mark.slow
def test_two_hosts_preempted_on_one_host_then_resumed_repeat_the_one_host_run(tmp_path):
  # The reference: one process, 8 devices (tests/conftest.py), the same config.
  config = default_config.apply_overrides(default_config.get_config(), OVERRIDES)
  config.workdir = str(tmp_path / "one_host")
  trainer.train(config, progress=False)
  reference = metrics_writer.read_metrics(config.workdir)
  assert [r["step"] for r in reference] == list(range(TOTAL_STEPS + 1))
  assert all(r["actor/pg_loss"] != 0 and 0 < r["rollout/reward/mean"] < 1 for r in reference[1:])  # A real test.

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
  stopped = metrics_writer.read_metrics(workdir)
  assert stopped[-1]["step"] == saved[0]

  # Elastic resume: a copy of that workdir continued by ONE process with 4 devices (another host
  # count and another device count, as when a run moves to a smaller slice) repeats the rest of
  # the run: the data position is global and orbax restores into the new shardings.
  elastic = str(tmp_path / "one_host_4_devices")
  shutil.copytree(workdir, elastic)
  assert _wait(_launch(elastic, num_processes=1)) == [0], _log_text(elastic, 0)[-3000:]
  assert f"Resumed from {elastic}/checkpoints at step {saved[0]}" in _log_text(elastic, 0)
  _assert_metrics_match(metrics_writer.read_metrics(elastic), reference)

  # The same command again resumes both hosts from that checkpoint and finishes the run.
  assert _wait(_launch(workdir)) == [0, 0], _log_text(workdir, 0)[-3000:]
  records = metrics_writer.read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(TOTAL_STEPS + 1))
  assert f"Resumed from {workdir}/checkpoints at step {saved[0]}" in _log_text(workdir, 0)
  _assert_metrics_match(records, reference)


def test_multi_process_flags_must_come_together_and_be_in_range():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  closed = _free_port()  # Nobody listens there.
  cases = {("--num_processes=2",): "--coordinator_address, --process_id missing",
           ("--num_processes=2", "--process_id=2", "--coordinator_address=localhost:1"):
               "--process_id=2 not in [0, --num_processes=2)",
           ("--num_processes=2", "--process_id=0", "--coordinator_address=localhost"):
               "--coordinator_address=localhost: expected HOST:PORT",
           ("--num_processes=2", "--process_id=1", f"--coordinator_address=localhost:{closed}",
            "--initialization_timeout=2"):
               f"--coordinator_address=localhost:{closed}: not reachable within --initialization_timeout=2 s"}
  for flags, message in cases.items():
    run = subprocess.run([sys.executable, "-m", "laser_jax.train", "--config=configs/tiny_cpu.py", *flags],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    # Usage mistakes and an unreachable coordinator alike: the error line alone, exit 2.
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), (
        flags, run.returncode, run.stderr[-500:])


def test_hf_checkpoint_loaded_sampled_and_exported_across_two_processes(tmp_path):
  """The HF path of a pod run: weights read straight into shards spread over two processes
  (data 2 x fsdp 2 x tensor 2 over their 8 devices), a forward, greedy sampling with the in-loop
  score, and the export gathered back: against transformers and against the one-process run."""
  import torch
  import transformers
  from safetensors.numpy import load_file

  import multihost_helpers as worker
  from hf_fixtures import make_tiny_hf_checkpoint
  from laser_jax.models import sharding as sharding_lib
  from test_sampler import choose_eos_set

  checkpoint = make_tiny_hf_checkpoint(str(tmp_path / "hf"))
  mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
  _, free, _, cfg = worker.results(checkpoint, mesh, [], 10)
  eos, finish, max_new = choose_eos_set(free.tokens)  # Rows stop at different steps.
  ref_logits, ref, _, _ = worker.results(checkpoint, mesh, sorted(eos), max_new)

  out_dir = tmp_path / "two_processes"
  out_dir.mkdir()
  procs = _spawn(lambda i, port: [os.path.join(REPO, "tests", "multihost_helpers.py"), f"localhost:{port}", "2",
                                  str(i), checkpoint, str(out_dir), ",".join(map(str, sorted(eos))), str(max_new)],
                 lambda i: out_dir / f"process{i}.log")
  assert _wait(procs) == [0, 0], (out_dir / "process0.log").read_text()[-3000:]

  torch_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
  with torch.no_grad():
    want = torch_model(torch.tensor(worker.TOKENS, dtype=torch.long)).logits.numpy()
  logits = np.load(out_dir / "logits.npy")
  np.testing.assert_allclose(logits, want, atol=1e-4)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)

  sample = np.load(out_dir / "sample.npz")
  np.testing.assert_array_equal(sample["tokens"], ref.tokens)
  np.testing.assert_array_equal(sample["lengths"], [max_new if f is None else f for f in finish])
  np.testing.assert_array_equal(sample["finished"], ref.finished)
  assert sample["finished"].any() and not sample["finished"].all()
  np.testing.assert_allclose(sample["self_reward"], ref.self_reward_logprob, atol=1e-5)  # NaN where truncated
  for i, prompt in enumerate(worker.PROMPTS):  # log pi(z_c | x, y, EOS) from transformers
    if sample["finished"][i]:
      seq = prompt + ref.response_tokens[i, :ref.response_lengths[i]].tolist()
      with torch.no_grad():
        last = torch_model(torch.tensor([seq])).logits[0, -1].double()
      np.testing.assert_allclose(sample["self_reward"][i], torch.log_softmax(last, -1)[-1].item(), atol=1e-4)

  original = load_file(os.path.join(checkpoint, "model.safetensors"))
  exported = {}
  for name in os.listdir(out_dir / "export"):
    if name.endswith(".safetensors"):
      exported.update(load_file(str(out_dir / "export" / name)))
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


# 35 s of CPU (67 s wall on the loaded 2-core machine): two processes each compiling the
# continuous sampler, and the one-process reference; slow, like the other two-process training run.
@pytest.mark.slow
def test_sampling_across_two_processes_gives_each_host_its_rows(tmp_path):
  """The static sampler and continuous batching (decode slots refilled on device from a queue of
  global rows) on two processes whose rows are padded (9 rows per host over 2 shards): each host
  gets, for its own prompts, exactly the rows one process sampling all the prompts with the same
  key gets (the contract of `Sampler.__call__`: a row's draws are keyed by its index among the
  real rows, not by its padded position)."""
  import multihost_helpers as worker
  from laser_jax.models import sharding as sharding_lib

  references = worker.continuous_sample(sharding_lib.make_mesh(data=2, fsdp=2, tensor=2))
  reference = references[4]
  assert reference.lengths.min() < reference.lengths.max() == 16  # rows end at different steps
  assert reference.finished.any() and not reference.finished.all()
  procs = _spawn(lambda i, port: [os.path.join(REPO, "tests", "multihost_helpers.py"), "continuous",
                                  f"localhost:{port}", "2", str(i), str(tmp_path)],
                 lambda i: tmp_path / f"process{i}.log")
  assert _wait(procs) == [0, 0], [(tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2)]
  rows = len(reference.lengths) // 2
  for slots, reference in references.items():
    for i in range(2):
      host = np.load(tmp_path / f"process{i}.npz")
      mine = slice(i * rows, (i + 1) * rows)  # the rows of this host's prompts
      for field in ("tokens", "lengths", "eos_token", "finished", "truncated"):
        np.testing.assert_array_equal(host[f"{field}{slots}"], getattr(reference, field)[mine],
                                      err_msg=f"slots {slots} process {i} {field}")
      for field in ("logprobs", "eos_logprob", "self_reward_logprob"):  # NaN where truncated, on both sides
        np.testing.assert_allclose(host[f"{field}{slots}"], getattr(reference, field)[mine], atol=1e-5, rtol=0,
                                   err_msg=f"slots {slots} process {i} {field}")
