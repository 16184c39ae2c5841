r"""Command-line entry point: `python -m laser_jax.train --config=configs/<name>.py`.

Overrides use ml_collections' syntax, e.g. `--config.total_steps=10 --config.laser.loss_coef=0`.
Unknown keys fail at flag parsing; inconsistent values fail at start with the key named.
"""
import os
import sys

from absl import app, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                          lock_config=True)


def main(argv):
  del argv
  import jax
  if (os.environ.get("LASER_JAX_DISTRIBUTED") == "1" or os.environ.get("TPU_WORKER_HOSTNAMES")
      or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    # Multi-host pod: the same command runs on every worker. On Cloud TPU VMs JAX finds the
    # coordinator in the GCE metadata; launch/tpu.py sets LASER_JAX_DISTRIBUTED=1 on slices.
    jax.distributed.initialize()
  from laser_jax import config_check, data, hf, trainer
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny_cpu.py")
  logging.info("Devices: %s", jax.devices())
  try:
    trainer.train(config)
  except (config_check.ConfigError, data.DataError, hf.HFCheckpointError) as e:
    # Bad input (a config value, a malformed data row, a broken checkpoint): one line, exit 2.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
