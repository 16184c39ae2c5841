r"""Export a training checkpoint (or any loadable model) as a Hugging Face directory.

  python -m laser_jax.export --config=configs/eval.py \
      --config.model.checkpoint_dir=/tmp/laser_jax/tiny_cpu --config.export.output_dir=/tmp/laser_jax/tiny_cpu_hf

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained` and serves with vLLM;
the self-reward score is then read as the log-prob of z_c after the response's EOS
(`laser_jax.evaluate --config.model.hf_path=<dir>` does exactly that).
"""
from ml_collections import config_flags

from laser_jax import cli
from laser_jax import evaluate
from laser_jax import hf
from laser_jax.config_check import ConfigError


def run(config) -> str:
  """Loads `config.model` as the evaluator does and writes `config.export.output_dir`."""
  if not config.export.output_dir:
    raise ConfigError("config.export.output_dir: set the directory to write the HF model to")
  if config.export.dtype not in ("bfloat16", "float32"):
    raise ConfigError(f"config.export.dtype: expected 'bfloat16' or 'float32', got {config.export.dtype!r}")
  model = evaluate.load_model(config)
  return hf.export_hf(model.params, model.cfg, config.export.output_dir, tokenizer=model.tokenizer,
                      dtype=config.export.dtype)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/eval.py", lock_config=True)

  def main(argv):
    del argv
    print(f"wrote {run(cli.required_config(_CONFIG, 'configs/eval.py'))}")

  cli.run(main)
