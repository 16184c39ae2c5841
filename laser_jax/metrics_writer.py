"""Metric sinks: `workdir/metrics.jsonl`, TensorBoard event files and a console line.

Only process 0 writes (the others get a writer whose methods do nothing), so the same code runs
unchanged on every host of a pod.
"""
import json
import math
import os
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.ndarray, jax.Array)):
    value = np.asarray(value).item()
  if isinstance(value, (np.floating, np.integer, np.bool_)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None  # JSON has no NaN; null is what readers (pandas, jq) expect.
  return value


class MetricsWriter:
  """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    self._tb_remote = None
    if not self.enabled:
      return
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    self._jsonl = (path / "metrics.jsonl").open("a")
    tb_dir = path / "tensorboard"
    if is_remote(workdir):
      # tensorboardX writes local files only: write locally, mirror to gs://.../tensorboard.
      self._tb_remote, tb_dir = tb_dir, epath.Path(tempfile.mkdtemp(prefix="laser_jax_tb_"))
    from tensorboardX import SummaryWriter  # TensorBoard-compatible event files, no TF needed.
    self._tb = SummaryWriter(os.fspath(tb_dir))
    self._tb_local = tb_dir
    self._writes = 0

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
    """Writes `metrics` for `step`; returns the JSON-ready record."""
    record = {"step": int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()
    self._writes += 1
    if self._tb_remote is not None and self._writes % 10 == 0:
      self._mirror()
    return record

  def _mirror(self):
    """Copies the local event files to the remote tensorboard directory."""
    self._tb_remote.mkdir(parents=True, exist_ok=True)
    for f in self._tb_local.iterdir():
      (self._tb_remote / f.name).write_bytes(f.read_bytes())

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
      if self._tb_remote is not None:
        self._mirror()


def is_remote(path: str) -> bool:
  """True for object-store paths such as gs://bucket/dir."""
  return "://" in str(path)


def read_metrics(workdir: str) -> list[dict]:
  """Reads back every record of workdir/metrics.jsonl (for tests, notebooks and plots)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
