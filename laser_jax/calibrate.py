r"""`python -m laser_jax.calibrate`: c_ref from log pi_ref(z_c | x, y) over sampled solutions, and z_c checks.

  python -m laser_jax.calibrate --config=configs/eval.py --config.model.hf_path=/path/to/model \
      --config.laser.self_reward_token_id=151652 --config.eval.input_file=math500

Parses the flags and runs `laser_jax.evaluation.calibrate.run` (what it measures and warns about
is in its docstring). Bad input is one line and exit status 2 (laser_jax/cli.py).
"""
from laser_jax import cli
from laser_jax.evaluation import calibrate

if __name__ == "__main__":
  cli.run_config_command(calibrate.run)
