r"""LaSeR on OctoThinker-3B (Llama-3.2-3B based), reference settings, TPU v4-64.

Launch:
  python -m laser_jax.train --config=configs/octothinker_3b.py \
      --config.model.hf_path=/mnt/models/OctoThinker-3B-Hybrid-Base --config.workdir=gs://YOUR_BUCKET/laser/octothinker-3b
"""
import os

from laser_jax import default_config


def get_config():
  """tpu_v4.py with the Llama-3 tokenizer's z_c (128002) and c_ref -25."""
  c = default_config.load_config_file(os.path.join(os.path.dirname(__file__), "tpu_v4.py"))
  c.workdir = "gs://YOUR_BUCKET/laser/octothinker-3b"
  c.model.hf_path = "/mnt/models/OctoThinker-3B-Hybrid-Base"  # Llama-3.2-3B architecture.
  c.model.preset = "octothinker-3b"  # Its shape, for `laser_jax.aot` where the checkpoint is not.
  c.laser.self_reward_token_id = 128002  # <|reserved_special_token_0|>: never in normal text.
  c.laser.ref_constant = -25.0  # c_ref measured for OctoThinker (SPEC).
  c.data.template = "base"  # A base model: plain prompt with the boxed-answer instruction.
  c.laser.reasoning_warmup_steps = 200  # Official scripts: 200 + 200.
  c.laser.self_rewarding_warmup_steps = 200
  c.mfu_peak_flops = 32 * 275e12
  return c
