"""Checkpointing with orbax's CheckpointManager: the train state plus the data-iterator position.

Layout: `workdir/checkpoints/<step>/{state,data}`. `state` is the train-state pytree (params,
optimizer state, step, RNG), saved sharded and restored straight into the target shardings;
`data` is the JSON position of the prompt iterator, so a resumed run sees exactly the prompts the
uninterrupted run would have seen. `workdir/reference` holds pi_ref's parameters when they come
from the supervised warm start (saved once, at the start of the run): a resume reads them back
instead of recomputing the warm start, which would cost its steps again and, on another mesh,
differ by float rounding.

Readers of a finished run (the evaluator, the exporter, the notebooks) take only its parameters:
`step_directory` finds a step's `state` item and `restore_params` reads the `params` subtree of it,
checked against the expected shapes first.
"""
import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils


class CheckpointError(ValueError):
  """A checkpoint directory is missing, incomplete or of another model; the message is one line."""


def reference_directory(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "reference"


def save_reference(workdir: str, params: Any) -> None:
  """Saves pi_ref's params to `workdir/reference`, replacing any there; returns when written."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(reference_directory(workdir), params, force=True)
    checkpointer.wait_until_finished()


def restore_reference(workdir: str, abstract_params: Any) -> Any | None:
  """pi_ref's params from `save_reference`, into `abstract_params`' shardings; None if absent."""
  if not reference_directory(workdir).exists():
    return None
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(reference_directory(workdir), abstract_params)


def step_directory(checkpoint_dir: str, step: int = -1) -> tuple[str, int]:
  """(`.../checkpoints/<step>/state`, step) of a training workdir (or its checkpoints/ dir);
  step -1 = the latest finished save."""
  root = epath.Path(checkpoint_dir)
  if not root.exists():
    raise CheckpointError(f"{checkpoint_dir} does not exist")
  if (root / "checkpoints").is_dir():
    root = root / "checkpoints"
  # Only finished saves: orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames at the end.
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir())
  if not steps:
    raise CheckpointError(f"no checkpoints (<step>/state) in {root}")
  if step < 0:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"step {step} not in {root} (has {steps})")
  return str(root / str(step) / "state"), step


def restore_params(state_dir: str, abstract_params: Any) -> Any:
  """Restores only the `params` subtree of a train-state item (`step_directory`), into the
  shapes, dtypes and shardings of `abstract_params` (jax.ShapeDtypeStruct leaves with shardings)."""
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(dtype=s.dtype, sharding=s.sharding),
                              abstract_params)
  # The state item sits below the step directory, so orbax warns that the step-level metadata
  # file is missing from it; that and its INFO chatter are noise here.
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    _check_saved_shapes(checkpointer, state_dir, abstract_params)
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True))
  except CheckpointError:
    raise
  except Exception as e:  # orbax raises many types (dtype, missing keys, IO).
    raise CheckpointError(f"cannot restore params from {state_dir}: {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]}") from e
  finally:
    checkpointer.close()
    absl_logging.set_verbosity(level)
  return restored["params"]


def _check_saved_shapes(checkpointer, state_dir: str, abstract_params) -> None:
  """Compares the saved params' shapes with the expected ones before reading any array."""
  try:
    saved = checkpointer.metadata(state_dir).item_metadata.tree["params"]
  except Exception as e:  # Not a trainer checkpoint (or unreadable): say so in one line.
    raise CheckpointError(f"{state_dir} is not a laser_jax train state with params: "
                          f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from e
  shapes = lambda tree: {jax.tree_util.keystr(k): tuple(v.shape)
                         for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  want, got = shapes(abstract_params), shapes(saved)
  for name in sorted(set(want) | set(got)):
    if want.get(name) != got.get(name):
      raise CheckpointError(f"checkpoint {state_dir} does not match the model config: params{name} "
                            f"has shape {got.get(name)} in the checkpoint, the config gives {want.get(name)}")


class _DropOrbaxInfo(logging.Filter):
  """Drops records below WARNING that orbax's modules emit (through absl's logger)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


_DROP_ORBAX_INFO = _DropOrbaxInfo()


def hide_orbax_info_logs(hide: bool = True) -> None:
  """Hides (or shows again) orbax's INFO logs, dozens of lines per save; its warnings still show.

  absl routes every library's logs through one Python logger, so the filter goes on that
  logger's handlers and matches orbax's source files.
  """
  handler = absl_logging.get_absl_handler()
  if hide:
    handler.addFilter(_DROP_ORBAX_INFO)
  else:
    handler.removeFilter(_DROP_ORBAX_INFO)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the two items this project saves."""

  def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
    self.directory = epath.Path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Starts an (async) save of `state` and `data_state` at `step`."""
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores into the shapes, dtypes and shardings of `abstract_state` (jax.ShapeDtypeStruct
    leaves). A checkpoint of another model shape is a CheckpointError naming the first tensor
    that differs, raised before any array is read."""
    checkpointer = ocp.PyTreeCheckpointer()
    try:
      _check_saved_shapes(checkpointer, str(self.directory / str(step) / "state"), abstract_state.params)
    finally:
      checkpointer.close()
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionFlag:
  """Set by SIGTERM (Cloud TPU preemption notice); the loop checks it after every step, on
  every host (`is_set_on_any_host`), so all hosts save the same step and exit together.

  The handler only sets a flag: saving from inside a signal handler could interleave with a
  running step. The loop saves the current step and exits, well inside the 60 s grace period.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def is_set_on_any_host(self) -> bool:
    """Whether any process got the signal: hosts must agree to stop, since the save that
    follows is collective (a host that saved alone would wait for the others forever)."""
    if jax.process_count() == 1:
      return self.is_set()
    return bool(np.any(multihost_utils.process_allgather(np.array([self.is_set()]))))

  def restore_handlers(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
