r"""Export a training checkpoint (or any loadable model) as a Hugging Face directory.

  python -m laser_jax.export --config=configs/eval.py \
      --config.model.checkpoint_dir=/tmp/laser_jax/tiny_cpu --config.export.output_dir=/tmp/laser_jax/tiny_cpu_hf

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained` and serves with vLLM;
the self-reward score is then read as the log-prob of z_c after the response's EOS
(`laser_jax.evaluate --config.model.hf_path=<dir>` does exactly that).
"""
import sys

from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/eval.py", lock_config=True)


def run(config) -> str:
  """Loads `config.model` as the evaluator does and writes `config.export.output_dir`."""
  from laser_jax import evaluate, hf
  from laser_jax.config_check import ConfigError
  if not config.export.output_dir:
    raise ConfigError("config.export.output_dir: set the directory to write the HF model to")
  model = evaluate.load_model(config)
  return hf.export_hf(model.params, model.cfg, config.export.output_dir, tokenizer=model.tokenizer,
                      dtype=config.export.dtype)


def main(argv):
  del argv
  from laser_jax.config_check import ConfigError
  from laser_jax.hf import HFCheckpointError
  try:
    out = run(_CONFIG.value)
  except (ConfigError, HFCheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {out}")


if __name__ == "__main__":
  from laser_jax import cli
  cli.run(main)
