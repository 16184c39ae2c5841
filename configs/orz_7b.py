r"""LaSeR on Open-Reasoner-Zero-7B (a Qwen2.5-7B RL model), reference settings, TPU v4-64.

Launch:
  python -m laser_jax.train --config=configs/orz_7b.py \
      --config.model.hf_path=/mnt/models/Open-Reasoner-Zero-7B --config.workdir=gs://YOUR_BUCKET/laser/orz-7b
Without the reasoning warm-up (as a third-party note describes ORZ-7B):
  ... --config.laser.reasoning_warmup_steps=0
"""
import os

from laser_jax import default_config


def get_config():
  """Same as tpu_v4.py (Qwen2.5 tokenizer: z_c 151652, c_ref -23) on the ORZ-7B checkpoint."""
  c = default_config.load_config_file(os.path.join(os.path.dirname(__file__), "tpu_v4.py"))
  c.workdir = "gs://YOUR_BUCKET/laser/orz-7b"  # Checkpoints and metrics on GCS.
  c.model.hf_path = "/mnt/models/Open-Reasoner-Zero-7B"  # Local copy on every worker.
  # The official scripts keep 200 + 200 warm-up steps for ORZ-7B too (see SPEC.md).
  c.laser.reasoning_warmup_steps = 200
  c.laser.self_rewarding_warmup_steps = 200
  return c
