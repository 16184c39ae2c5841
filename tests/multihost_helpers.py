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

Or one process of the continuous-batching run:
usage: python tests/multihost_helpers.py continuous COORDINATOR NUM_PROCESSES PROCESS_ID OUT_DIR
Samples this process's block of CONTINUOUS_PROMPTS with `continuous_sample` and writes its own
rows to OUT_DIR/process<PROCESS_ID>.npz.
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


# Six prompts x 3 responses = 18 rows through 4 decode slots (one per data x fsdp shard): slots
# are refilled across the hosts' rows, and rows end at different steps, some at the budget. On two
# hosts each has 9 rows over its 2 batch shards: padded to 10, so the hosts' padding rows sit
# between their real rows (one process pads only at the end).
CONTINUOUS_PROMPTS = [[5, 17, 33, 2], [9], [40, 41, 42, 43, 44, 45, 46], [77, 3], [8, 8], [100, 2, 7]]
SLOT_COUNTS = (0, 4)  # the static sampler and continuous batching
ROW_FIELDS = ("tokens", "lengths", "logprobs", "eos_token", "eos_logprob", "finished", "truncated",
              "self_reward_logprob")


def continuous_sample(mesh) -> dict:
  """This process's rows of one sampler call per SLOT_COUNTS entry (decode_slots, temperature 1)
  of the tiny Transformer of tests/test_sampler.py, its weights sharded over `mesh`; each process
  passes its block of CONTINUOUS_PROMPTS (all of them in a single process)."""
  from laser_jax.generate import sampler as sampler_lib
  from laser_jax.generate.sampling import SamplingParams
  from laser_jax.models import model as model_lib
  from laser_jax.models import sharding as sharding_lib
  from test_sampler import TINY, Z_C
  shardings = jax.tree.map(lambda s: s.sharding, sharding_lib.abstract_params(TINY, mesh))
  params = jax.jit(lambda: model_lib.init_params(TINY, jax.random.key(0)), out_shardings=shardings)()
  # EOS ids 1..8 of a 128-token vocabulary end about one row in 16 per step.
  block = len(CONTINUOUS_PROMPTS) // jax.process_count()
  mine = CONTINUOUS_PROMPTS[jax.process_index() * block:(jax.process_index() + 1) * block]
  return {slots: sampler_lib.sample(params, TINY, mine, SamplingParams(
              n=3, temperature=1.0, max_new_tokens=16, eos_ids=tuple(range(1, 9)), pad_id=0,
              self_reward_token_id=Z_C, decode_slots=slots), jax.random.key(3), mesh=mesh)
          for slots in SLOT_COUNTS}


def main_continuous(coordinator, num_processes, process_id, out_dir):
  jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
  from jax.experimental import multihost_utils

  from laser_jax.models import sharding as sharding_lib
  assert jax.process_count() == int(num_processes) and len(jax.devices()) == 8, jax.devices()
  out = continuous_sample(sharding_lib.make_mesh(data=2, fsdp=2, tensor=2))
  np.savez(f"{out_dir}/process{jax.process_index()}.npz",
           **{f"{f}{slots}": getattr(out[slots], f) for f in ROW_FIELDS for slots in SLOT_COUNTS})
  multihost_utils.sync_global_devices("done")


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
  if sys.argv[1] == "continuous":
    main_continuous(*sys.argv[2:])
  else:
    main(*sys.argv[1:])
