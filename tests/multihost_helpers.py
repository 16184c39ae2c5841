"""Helpers of tests/test_multihost.py (not a test module itself).

`parity_reward`: a reward function for the multi-host training test (`reward.fn=
multihost_helpers:parity_reward`) that a tiny untrained model still earns about half the time,
so that advantages and the policy-gradient loss are not all zero there.

Run as a script: one process of the HF round trip.
usage: python tests/multihost_helpers.py COORDINATOR NUM_PROCESSES PROCESS_ID CHECKPOINT OUT_DIR \
           EOS_IDS MAX_NEW_TOKENS      (EOS_IDS comma-separated)

Joins the other processes, loads the HF checkpoint straight into shards of a (data 2, fsdp 2,
tensor 2) mesh spanning every process's devices, and writes from process 0: the logits of a fixed
batch (logits.npy), greedy samples with their self-reward log-probs (sample.npz) and the
parameters exported back to an HF directory (OUT_DIR/export).
"""
import sys

import jax
import numpy as np

PROMPTS = [[5, 17, 42, 9], [3, 8], [200, 201, 202, 203, 204, 205], [77]]
TOKENS = np.array([[5, 17, 42, 9, 100, 3], [3, 8, 15, 16, 23, 42], [200, 201, 202, 203, 204, 205],
                   [77, 78, 79, 80, 81, 82]], np.int32)


def parity_reward(response: str, reference: str) -> float:
  """1 for responses of even length, else 0 (the reference answer is ignored)."""
  del reference
  return float(len(response) % 2 == 0)


def results(checkpoint, mesh, eos_ids, max_new_tokens):
  """(logits of TOKENS, greedy SampleOutput for PROMPTS, params, cfg): every process calls this."""
  from jax.experimental import multihost_utils

  from laser_jax.generate import sampler as sampler_lib
  from laser_jax.generate import sampling as sampling_lib
  from laser_jax.models import hf, model as model_lib
  from laser_jax.models import sharding as sharding_lib
  cfg = hf.load_hf_config(checkpoint)
  params = hf.load_hf_params(checkpoint, cfg, mesh=mesh)
  batch = sharding_lib.batch_sharding(mesh, TOKENS.ndim)
  tokens = jax.make_array_from_callback(TOKENS.shape, batch, lambda idx: TOKENS[idx])
  mask = jax.make_array_from_callback(TOKENS.shape, batch, lambda idx: np.ones_like(TOKENS[idx], bool))
  forward = jax.jit(lambda p, t, m: model_lib.forward(p, cfg, t, model_lib.default_positions(m), m))
  logits = np.asarray(multihost_utils.process_allgather(forward(params, tokens, mask), tiled=True))
  sampling = sampling_lib.SamplingParams(greedy=True, max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids),
                                        pad_id=0, self_reward_token_id=cfg.vocab_size - 1)
  # Each process samples its own block of PROMPTS and gets its own rows back (laser_jax.models.hosts).
  block = len(PROMPTS) // jax.process_count()
  mine = PROMPTS[jax.process_index() * block:(jax.process_index() + 1) * block]
  out = sampler_lib.sample(params, cfg, mine, sampling, jax.random.key(0), mesh=mesh)
  return logits, out, params, cfg


def main(coordinator, num_processes, process_id, checkpoint, out_dir, eos_ids, max_new_tokens):
  jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
  from jax.experimental import multihost_utils

  from laser_jax.models import hf, hosts, sharding as sharding_lib
  assert jax.process_count() == int(num_processes) and len(jax.devices()) == 8, jax.devices()
  mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
  logits, out, params, cfg = results(checkpoint, mesh, [int(e) for e in eos_ids.split(",")],
                                     int(max_new_tokens))
  assert not jax.tree.leaves(params)[0].is_fully_addressable  # Really spread over the processes.
  hf.export_hf(params, cfg, f"{out_dir}/export")  # Collective: every process calls it.
  assert len(out.tokens) == len(PROMPTS) // 2  # this process's rows only
  rows = {name: hosts.gather_rows(getattr(out, name))
          for name in ("tokens", "lengths", "finished", "self_reward_logprob")}
  if jax.process_index() == 0:
    np.save(f"{out_dir}/logits.npy", logits)
    np.savez(f"{out_dir}/sample.npz", tokens=rows["tokens"], lengths=rows["lengths"],
             finished=rows["finished"], self_reward=rows["self_reward_logprob"])
  multihost_utils.sync_global_devices("done")


if __name__ == "__main__":
  main(*sys.argv[1:])
