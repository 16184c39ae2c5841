"""`python -m laser_jax.hf PATH`: checks that a Hugging Face model directory imports (config, every
tensor, tokenizer) and prints a summary (`laser_jax.models.hf.main`); any problem is one line on
stderr and exit status 2 (laser_jax/cli.py).
"""
from laser_jax import cli
from laser_jax.models import hf

if __name__ == "__main__":
  cli.run(hf.main)
