"""Every entry point's bad input: one line `error: <flag or key>: <what>` on stderr, exit 2."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("laser_jax.train", ["--config=configs/tiny_cpu.py", "--config.laser.kl_coeff=0.1"],
     '--config.laser.kl_coeff=0.1: the config has no key \'kl_coeff\' (Did you mean "kl_coef" instead of "kl_coeff"?)'),
    ("laser_jax.train", ["--config=configs/no_such.py"], "--config=configs/no_such.py: no such config file"),
    ("laser_jax.train", ["--config=configs/tiny_cpu.py", "--config.total_steps=abc"],
     "--config.total_steps=abc: invalid literal for int() with base 10: 'abc'"),
    ("laser_jax.train", ["--config=configs/tiny_cpu.py", "--confg.total_steps=1"],
     "--confg.total_steps: no such flag (did you mean --config.total_steps?)"),
    ("laser_jax.train", ["--config=configs/tiny_cpu.py", "--config.model.hf_path=/no/such/dir"],
     "config.model.hf_path: missing file /no/such/dir/config.json"),
    ("laser_jax.evaluate", ["--config=configs/eval.py", "--config.eval.nn=3"],
     "--config.eval.nn=3: the config has no key 'nn'"),
    ("laser_jax.export", ["--config=configs/nope.py"], "--config=configs/nope.py: no such config file"),
    ("laser_jax.aot", ["--config=configs/tpu_v4.py", "--topology=v4-64", "--config.model.attentio=chunked"],
     '--config.model.attentio=chunked: the config has no key \'attentio\' (Did you mean "attention" instead of "attentio"?)'),
]


@pytest.mark.parametrize("module,args,message", CASES, ids=[f"{m.split('.')[1]}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_bad_input_is_one_error_line_and_exit_2(module, args, message):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and errors == [f"error: {message}"], (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr
