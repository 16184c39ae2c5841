r"""`python -m laser_jax.export`: a checkpoint (or any loadable model) as a self-describing HF directory.

  python -m laser_jax.export --config=configs/eval.py \
      --config.model.checkpoint_dir=/tmp/laser_jax/tiny_cpu --config.export.output_dir=/tmp/laser_jax/tiny_cpu_hf

Parses the flags and runs `laser_jax.evaluation.export.run` (what the directory holds is in its
docstring). Bad input is one line and exit status 2 (laser_jax/cli.py).
"""
from laser_jax import cli
from laser_jax.evaluation import export


def run(config) -> None:
  out = export.run(config)
  print(f"wrote {out}" + (f" and uploaded it to {config.export.push_to_hub}" if config.export.push_to_hub else ""))


if __name__ == "__main__":
  cli.run_config_command(run)
