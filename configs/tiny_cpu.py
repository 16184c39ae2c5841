r"""The embedded default: a tiny model learns the synthetic arithmetic task on 2 CPU cores.

Launch:
  python -m laser_jax.train --config=configs/tiny_cpu.py
GRPO baseline (same seed, no self-rewarding loss):
  python -m laser_jax.train --config=configs/tiny_cpu.py --config.laser.use_self_reward_loss=False \
      --config.workdir=/tmp/laser_jax/tiny_cpu_grpo
"""
from laser_jax import default_config


def get_config():
  """Every key and its meaning: laser_jax/default_config.py (these are its defaults)."""
  config = default_config.get_config()
  return config
