"""One convention for every command-line entry point (train, aot, evaluate, calibrate, export):
bad input is one line `error: <flag, config key or file:line>: <what>` on stderr and exit status 2,
never a traceback.

`run(main)` replaces `absl.app.run(main)`: flag parsing (the config file, `--config.a.b=value`
overrides) goes through `parse_flags`, and `main` raising one of `bad_input_errors()` (or the
entry point's own `extra` classes) becomes that line.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

from laser_jax import config_check
from laser_jax.data import records
from laser_jax.models import hf
from laser_jax.training import checkpoint


def fail(message: str) -> None:
  """Prints `error: message` on one line and exits with status 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(2)


def bad_input_errors() -> tuple[type[Exception], ...]:
  """The exceptions that mean bad input (a flag, a config value, a data row, a checkpoint). absl's
  UsageError (a flag combination `main` rejects) is one of them: absl itself would print the
  whole usage text and exit 1."""
  return (config_check.ConfigError, records.DataError, hf.HFCheckpointError, checkpoint.CheckpointError,
          app.UsageError)


def required_config(holder: flags.FlagHolder, example: str):
  """The value of a `--config` flag, or the one-line error when it was not given."""
  if holder.value is None:
    fail(f"--config: required, e.g. --config={example}")
  return holder.value


def _config_flag_args(argv) -> list[tuple[str, str]]:
  """(flag, value) of every `--config...=value` argument."""
  out = []
  for arg in argv[1:]:
    if arg.startswith("--config") and "=" in arg:
      name, value = arg[2:].split("=", 1)
      out.append((name, value))
  return out


def _explain(error: Exception, argv) -> str:
  """One line naming the flag a parse failure came from."""
  args = _config_flag_args(argv)
  while error.args and isinstance(error.args[0], Exception):  # AttributeError(KeyError(...))
    error = error.args[0]
  text = str(error.args[0]) if error.args and isinstance(error.args[0], str) else str(error)
  text = text.strip()
  for _ in range(2):  # a KeyError's message may arrive quoted (once or twice)
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
      text = text[1:-1].replace("\\n", "\n").replace("\\'", "'")
  first, _, rest = text.partition("\n")
  missing = re.fullmatch(r"'?([\w-]+)'?", first.strip())
  if missing:  # ml_collections: "'key'\nDid you mean "other" instead of "key"?"
    key = missing.group(1)
    for name, value in args:
      if name.split(".")[-1] == key or f".{key}." in f"{name}.":
        hint = f" ({rest.strip()})" if rest.strip() else ""
        return f"--{name}={value}: the config has no key {key!r}{hint}"
  for name, value in args:
    prefix = f"flag --{name}={value}: "
    if name != "config" and value in text:
      return f"--{name}={value}: {' '.join(text.split()).replace(prefix, '')}"
  return " ".join(text.split())


def parse_flags(argv):
  """absl `flags_parser`: parses argv and loads every config flag now, so that a missing config
  file, an override of a key that does not exist or a value of the wrong type is one line."""
  FLAGS = flags.FLAGS
  for name, value in _config_flag_args(argv):
    if name == "config" and not os.path.isfile(value.split(":")[0]):
      fail(f"--config={value}: no such config file")
  try:
    rest = FLAGS(argv)
    for name in FLAGS:
      if name == "config" or name.startswith("config."):
        FLAGS[name].value  # pylint: disable=pointless-statement  # loads the file, applies overrides
  except flags.UnrecognizedFlagError as e:
    head, dot, tail = e.flagname.partition(".")  # --confg.a.b: a typo of the config flag itself
    close = difflib.get_close_matches(head, list(FLAGS), n=1)
    fail(f"--{e.flagname}: no such flag" + (f" (did you mean --{close[0]}{dot}{tail}?)" if close else ""))
  except Exception as e:  # pylint: disable=broad-except  # any parse failure: one line
    fail(_explain(e, argv))
  return rest


def exit_on_bad_input(fn: Callable, *args, extra: tuple[type[Exception], ...] = ()):
  """`fn(*args)`, with bad input (`bad_input_errors()` or `extra`) reported by `fail`."""
  try:
    return fn(*args)
  except (*bad_input_errors(), *extra) as e:
    fail(str(e))


def run(main: Callable, *, extra: tuple[type[Exception], ...] = (), argv=None) -> None:
  """`absl.app.run(main)` with this module's flag parsing and bad-input errors."""
  app.run(lambda args: exit_on_bad_input(main, args, extra=extra), argv=argv, flags_parser=parse_flags)


def run_config_command(fn: Callable, example: str = "configs/eval.py",
                       help_text: str = "Eval config file (configs/eval.py).") -> None:
  """`run` for a command whose one flag is --config (evaluate, calibrate, export): calls
  `fn(config)` with the loaded config; a missing --config is the one-line error naming `example`."""
  config = config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)

  def main(argv):
    del argv
    fn(required_config(config, example))  # absl would exit with a returned value

  run(main)
