"""Every command shown in README.md works as written.

* The quick-start test command is exactly what .ci/run runs.
* Every `python -m laser_jax.<module> --config=...` line: its config file loads and its
  overrides parse (unknown keys fail here); training configs also pass start-up validation, and
  the training command's other flags (--num_processes, ...) parse too.
* Every `python launch/tpu.py ...` line runs, in order, against the fake gcloud of test_launch.
* The Cloud TPU section's train command is the one its --dry_run line checks.

A one-line `for V in A B ...; do COMMAND; done` stands for COMMAND with $V = A (the other values
only change strings).
"""
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from tests.test_launch import SCRIPT, fake_gcloud  # noqa: F401 (fixture)

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _expand_loop(line):
  loop = re.fullmatch(r"for (\w+) in (\S+)[^;]*; do (.*); done", line)
  return loop.group(3).replace(f"${loop.group(1)}", loop.group(2)) if loop else line


def _shell_lines():
  blocks = README.split("```sh\n")[1:]
  return [_expand_loop(l.strip()) for b in blocks for l in b.split("```")[0].splitlines()
          if l.strip() and not l.strip().startswith("#")]


def _module_commands(module):
  out = []
  for line in _shell_lines():
    for part in line.split("&&"):
      words = shlex.split(part, comments=True)
      if "-m" in words and words[words.index("-m") + 1] == module:
        out.append(words[words.index("-m") + 2:])
  return out


def test_quick_start_test_command_is_what_ci_runs():
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert ci in _shell_lines()
  assert "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/python -m laser_jax.train --config=configs/tiny_cpu.py" in _shell_lines()


_PARSE = """
import sys
from absl import flags
from ml_collections import config_flags
from laser_jax import config_check
if "{module}" == "laser_jax.train":  # Its own flags too (--num_processes, ...).
  from laser_jax import train
  config = train._CONFIG
else:
  config = config_flags.DEFINE_config_file("config", None, lock_config=True)
flags.FLAGS(sys.argv)
if sys.argv[1:2] == ["train"] or "{module}" == "laser_jax.train":
  config_check.validate(config.value, num_devices={devices})
print("ok", config.value.workdir if "workdir" in config.value else "")
"""


@pytest.mark.parametrize("module", ["laser_jax.train", "laser_jax.evaluate", "laser_jax.calibrate",
                                    "laser_jax.export", "laser_jax.aot"])
def test_readme_commands_parse(module):
  """Loads each command's config with its overrides exactly as the CLI does (absl + config_flags)."""
  commands = _module_commands(module)
  assert commands, f"README shows no {module} command"
  for args in commands:
    if module != "laser_jax.train":
      args = [a for a in args if a.startswith("--config")]
    devices = 32 if "tpu_v4" in args[0] else 1
    code = _PARSE.replace("{module}", module).replace("{devices}", str(devices))
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("ok"), (args, res.stderr[-1500:])


def test_readme_launch_commands_run_in_order(tmp_path, fake_gcloud):  # noqa: F811
  env, _, calls = fake_gcloud
  commands = [shlex.split(l) for l in _shell_lines() if l.startswith("python launch/tpu.py ")]
  assert [c[2] for c in commands] == ["create", "setup", "train", "logs", "resume", "delete",
                                      "create", "setup", "run", "run", "run", "run", "delete"]
  for argv in commands:
    extra = ["--poll-s", "0"] if argv[2] == "create" else []
    res = subprocess.run([sys.executable, str(SCRIPT), *argv[2:], *extra], capture_output=True,
                         text=True, env={**os.environ, **env}, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, (argv, res.stderr)
    assert calls(), argv


def test_readme_tpu_train_command_is_the_dry_run_checked_one():
  """The paper run's `launch/tpu.py train` (the same in launch/README.md) is exactly the config,
  workdir and overrides of the README's `laser_jax.train --dry_run` line, which
  test_readme_commands_parse validates on the v4-64's 32 devices (tests/test_cli.py runs
  --dry_run itself)."""
  [train] = [shlex.split(l) for l in _shell_lines() if l.startswith("python launch/tpu.py train ")]
  launch_readme = (ROOT / "launch" / "README.md").read_text()
  assert shlex.join(train) in [shlex.join(shlex.split(l)) for l in launch_readme.splitlines()
                               if l.startswith("python launch/tpu.py train ")]
  config, workdir = train[train.index("--config") + 1], train[train.index("--workdir") + 1]
  overrides = train[train.index("--") + 1:]
  [dry_run] = [a for a in _module_commands("laser_jax.train") if "--dry_run" in a]
  assert dry_run == [f"--config={config}", "--dry_run", f"--config.workdir={workdir}", *overrides]
  assert workdir.startswith("gs://") and "--config.model.hf_path=Qwen/Qwen2.5-7B" in overrides
