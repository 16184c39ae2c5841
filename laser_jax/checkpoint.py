"""Checkpointing with orbax's CheckpointManager: the train state plus the data-iterator position.

Layout: `workdir/checkpoints/<step>/{state,data}`. `state` is the train-state pytree (params,
optimizer state, step, RNG), saved sharded and restored straight into the target shardings;
`data` is the JSON position of the prompt iterator, so a resumed run sees exactly the prompts the
uninterrupted run would have seen. `workdir/reference` holds pi_ref's parameters when they come
from the supervised warm start (saved once, at the start of the run): a resume reads them back
instead of recomputing the warm start, which would cost its steps again and, on another mesh,
differ by float rounding.
"""
import logging
import os
import signal
import threading
from typing import Any

import orbax.checkpoint as ocp
from etils import epath


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
  from absl import logging as absl_logging
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
    """Restores into the shapes, dtypes and shardings of `abstract_state` (jax.ShapeDtypeStruct leaves)."""
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
    import jax
    if jax.process_count() == 1:
      return self.is_set()
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array([self.is_set()]))))

  def restore_handlers(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
