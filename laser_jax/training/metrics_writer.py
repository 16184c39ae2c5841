"""What a training run records, in its workdir:

  metrics.jsonl            one JSON record per step (and per evaluation), each step once
  samples.jsonl            tables of sampled rollouts, one JSON record per row (logging.samples_every)
  tensorboard/             TensorBoard events: every numeric metric as a scalar, the tables as text
  config.json              the latest (re)start's resolved config (laser_jax.evaluate reads it)
  configs/config.step_N.json  the config of the (re)start at step N, one per (re)start
  profile/                 jax.profiler traces of the steps in profile.steps
  wandb_run_id             the Weights & Biases run the workdir logs to (wandb.project set)

W&B, when on, gets the scalars TensorBoard gets, under the same names, and the tables.

Only process 0 writes (the others get a writer whose methods do nothing), so the same code runs
unchanged on every host of a pod. Every file goes through etils.epath, so the workdir may be
gs://... (fsspec's gcsfs).

Object stores cannot append to an object, and an object being written does not exist until it is
closed: on a remote workdir each JSONL file is kept in memory and rewritten whole every
`logging.remote_flush_every` records, at every checkpoint (`flush`) and at `close`, and the
TensorBoard events (tensorboardX writes local files) are copied over at the same times. A
checkpoint also closes the current events file (tensorboardX's `flush` leaves events queued in
its writer thread; only `close` writes them all) and the next records start a new one. A
preemption therefore loses only records after the last checkpoint, which the resumed run redoes.
A local file is appended record by record instead, so `tail -f workdir/metrics.jsonl` works.

A (re)start from the checkpoint of step N keeps the records of steps <= N and drops later ones (the
resumed run redoes those steps; a fresh start keeps none); TensorBoard is told the same through
`purge_step`, and W&B, which cannot rewrite its history, is sent each step once.
"""
import html
import json
import math
import os
import shutil
import tempfile
import uuid
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath

from laser_jax import config_check

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
WANDB_ID_FILE = "wandb_run_id"
# A samples-table row: the problem text, its reference answer, the sampled response, the
# verifier's reward, the self-reward score r_s (None when truncated) and whether it ended in EOS.
SAMPLE_COLUMNS = ("prompt", "answer", "response", "reward", "score", "finished")


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.ndarray, jax.Array)):
    value = np.asarray(value).item()
  if isinstance(value, (np.floating, np.integer, np.bool_)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None  # JSON has no NaN; null is what readers (pandas, jq) expect.
  return value


def _scalars(record: Mapping[str, Any]) -> dict:
  """The numeric values of a record: what TensorBoard and W&B get, under the same names."""
  return {k: v for k, v in record.items()
          if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def is_remote(path: str) -> bool:
  """True for object-store paths such as gs://bucket/dir."""
  return "://" in str(path)


class JsonlHistory:
  """One JSONL file of step-stamped records (metrics.jsonl, samples.jsonl), kept across restarts.

  Opening keeps the file's records of steps <= `keep_through_step` (the restored checkpoint's step;
  -1 for a fresh start). With `append` (a local filesystem) each record is appended and flushed
  as it comes; otherwise the file is rewritten whole by `flush`.
  """

  def __init__(self, path: epath.Path, keep_through_step: int, *, append: bool):
    self.path = path
    self._append = append
    lines = _read_lines(path)
    self._lines = [line for line in lines if json.loads(line)["step"] <= keep_through_step]
    self._dirty = len(self._lines) != len(lines)  # records to drop, or added since the last rewrite
    self._file = None
    if append and self._dirty:
      self._rewrite()

  def add(self, record: Mapping[str, Any]) -> None:
    line = json.dumps(record)
    if self._append:
      if self._file is None:  # Opened at the first record: no empty file for an unused history.
        self._file = self.path.open("a")
      self._file.write(line + "\n")
      self._file.flush()
    else:
      self._lines.append(line)
      self._dirty = True

  def flush(self) -> None:
    """Rewrites the file whole if it cannot be appended to and changed since the last rewrite."""
    if not self._append and self._dirty:
      self._rewrite()

  def _rewrite(self) -> None:
    text = "".join(line + "\n" for line in self._lines)
    if self._append:  # Local: write aside and rename, so a crash never leaves half a file.
      tmp = self.path.parent / (self.path.name + ".tmp")
      tmp.write_text(text)
      tmp.replace(self.path)
    else:  # An object store: the new object replaces the old one only once it is complete.
      self.path.write_text(text)
    self._dirty = False

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None


def _read_lines(path: epath.Path) -> list[str]:
  if not path.exists():
    return []
  return [line for line in path.read_text().splitlines() if line.strip()]


def read_metrics(workdir: str) -> list[dict]:
  """Every record of workdir/metrics.jsonl: the run's history across restarts, each step once."""
  return [json.loads(line) for line in _read_lines(epath.Path(workdir) / METRICS_FILE)]


def read_samples(workdir: str) -> list[dict]:
  """Every row of the run's sampled-rollout tables (workdir/samples.jsonl), with its step."""
  return [json.loads(line) for line in _read_lines(epath.Path(workdir) / SAMPLES_FILE)]


def write_run_config(workdir: str, config_json: str, start_step: int) -> None:
  """The resolved config of a (re)start at `start_step`: as configs/config.step_<N>.json, so each
  configuration a run has had is kept, and as config.json (the latest; laser_jax.evaluate reads it).
  A restart from the same step replaces that step's file: the run it replaces left no records
  after the step."""
  root = epath.Path(workdir)
  (root / "configs").mkdir(parents=True, exist_ok=True)
  (root / "configs" / f"config.step_{start_step}.json").write_text(config_json)
  (root / "config.json").write_text(config_json)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A markdown table (TensorBoard's text plugin renders it) with the texts escaped: chat-template
  tokens such as <|im_start|> would otherwise vanish as HTML tags, and | would split cells."""
  def cell(value):
    text = html.escape("" if value is None else str(value), quote=False)
    return text.replace("|", "&#124;").replace("\n", "<br>")
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


class WandbRun:
  """The W&B sink. One W&B run per workdir: its id is kept in workdir/wandb_run_id, and a
  resumed training run resumes it."""

  def __init__(self, workdir: str, settings, run_config: Mapping[str, Any] | None = None):
    """settings: config.wandb (project, entity, name, mode)."""
    import wandb  # Optional (laser_jax[wandb]); config_check.validate names the key if missing.
    self._wandb = wandb
    id_file = epath.Path(workdir) / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:16]
    try:
      self.run = wandb.init(
          project=settings.project, entity=settings.entity or None, name=settings.name or None,
          mode=settings.mode, id=run_id, resume="allow", config=dict(run_config or {}),
          # W&B keeps its local files next to the run's when the workdir is local; for gs:// it
          # uses its default ($WANDB_DIR, else ./wandb).
          dir=None if is_remote(workdir) else os.fspath(workdir))
    except wandb.errors.Error as e:  # not logged in, unknown entity, ...: the user's to fix
      raise config_check.ConfigError(
          f"config.wandb.project: W&B cannot start a run in {settings.project!r} ({' '.join(str(e).split())}); "
          "or log offline: --config.wandb.mode=offline") from None
    if not id_file.exists():
      id_file.write_text(run_id)
    # W&B ignores steps below its counter (a resumed online run's continues after its last
    # logged step): the steps the resumed training run redoes, whose values it already has.
    self._next_step = int(self.run.step)

  def log(self, step: int, values: Mapping[str, Any]) -> None:
    if step >= self._next_step:
      self.run.log(dict(values), step=step)

  def log_table(self, step: int, key: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    if step >= self._next_step:
      table = self._wandb.Table(columns=list(columns), data=[[row[c] for c in columns] for row in rows])
      self.run.log({key: table}, step=step)

  def finish(self) -> None:
    self.run.finish()


class MetricsWriter:
  """Writes metric records and sample tables to every sink (see the module docstring)."""

  def __init__(self, workdir: str, enabled: bool | None = None, *, resume_step: int | None = None,
               remote_flush_every: int = 10, wandb_settings=None,
               run_config: Mapping[str, Any] | None = None):
    """resume_step: the restored checkpoint's step (None = a fresh start); remote_flush_every:
    records between rewrites on a remote workdir; wandb_settings: config.wandb, or None (no W&B)."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._closed = not self.enabled
    if not self.enabled:
      return
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    # First, so that a W&B run that cannot start leaves the workdir's files as they were.
    self._wandb = WandbRun(workdir, wandb_settings, run_config) if wandb_settings is not None else None
    self._remote = is_remote(workdir)
    self._flush_every = remote_flush_every
    self._records = 0
    keep = -1 if resume_step is None else resume_step
    self._metrics = JsonlHistory(root / METRICS_FILE, keep, append=not self._remote)
    self._samples = JsonlHistory(root / SAMPLES_FILE, keep, append=not self._remote)
    self._start = keep + 1  # the first step this (re)start writes
    self._tb_remote = None
    tb_dir = root / "tensorboard"
    if self._remote:
      # tensorboardX writes local files only: write locally, copy to gs://.../tensorboard.
      self._tb_remote, tb_dir = tb_dir, epath.Path(tempfile.mkdtemp(prefix="laser_jax_tb_"))
    self._tb_local = tb_dir
    self._tb = None  # the open events file's writer (`_tb_writer`)
    self._tb_files = 0
    self._mirrored = {}  # local events file name -> size when last copied
    self._tb_writer()

  @classmethod
  def for_run(cls, config, resume_step: int | None) -> "MetricsWriter":
    """The writer of a training run (config: the training config)."""
    wandb_on = bool(config.wandb.project) and config.wandb.mode != "disabled"
    return cls(config.workdir, resume_step=resume_step, remote_flush_every=config.logging.remote_flush_every,
               wandb_settings=config.wandb if wandb_on else None,
               run_config=json.loads(config.to_json_best_effort()) if wandb_on else None)

  def _tb_writer(self):
    """The writer of the open events file (a new file after each checkpoint on a remote workdir)."""
    if self._tb is None:
      from tensorboardX import SummaryWriter  # TensorBoard-compatible event files, no TF needed.
      # purge_step, in the first file of a (re)start: TensorBoard hides the earlier files' points
      # of the steps this (re)start redoes. The suffix orders one (re)start's files and keeps two
      # (re)starts within a second apart.
      self._tb = SummaryWriter(os.fspath(self._tb_local), purge_step=None if self._tb_files else self._start,
                               filename_suffix=f".start_{self._start}.{self._tb_files:05d}")
      self._tb_files += 1
    return self._tb

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
    """Writes `metrics` for `step`; returns the JSON-ready record."""
    record = {"step": int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    self._metrics.add(record)
    scalars = _scalars(record)
    tb = self._tb_writer()
    for key, value in scalars.items():
      tb.add_scalar(key, value, step)
    # Best effort: tensorboardX's writer thread may still hold the latest events; `close` (and on
    # gs:// each checkpoint) writes them all.
    tb.flush()
    if self._wandb is not None:
      self._wandb.log(step, scalars)
    self._records += 1
    if self._remote and self._records % self._flush_every == 0:
      self._publish()
    return record

  def write_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Writes a table of sampled rollouts (rows with SAMPLE_COLUMNS) for `step`: a samples.jsonl
    record per row, TensorBoard text (tag "samples") and a W&B table; returns the records."""
    records = [{"step": int(step), **{c: _to_python(row[c]) for c in SAMPLE_COLUMNS}} for row in rows]
    if not self.enabled:
      return records
    for record in records:
      self._samples.add(record)
    self._tb_writer().add_text("samples", markdown_table(records, SAMPLE_COLUMNS), step)
    if self._wandb is not None:
      self._wandb.log_table(step, "samples", SAMPLE_COLUMNS, records)
    return records

  def _publish(self):
    """Remote workdir, every `remote_flush_every` records: rewrites the JSONL files and copies
    the events written so far."""
    self._metrics.flush()
    self._samples.flush()
    self._mirror()

  def flush(self):
    """Makes every record written so far durable, also on an object store (at each checkpoint)."""
    if self._closed:
      return
    self._metrics.flush()
    self._samples.flush()
    if self._remote and self._tb is not None:
      self._tb.close()  # Writes every queued event; the next record opens a new file.
      self._tb = None
      self._mirror()

  def _mirror(self):
    """Copies the local events files that changed since the last copy to gs://.../tensorboard,
    each whole (a closed file is copied once)."""
    self._tb_remote.mkdir(parents=True, exist_ok=True)
    for f in self._tb_local.iterdir():
      size = os.path.getsize(f)
      if self._mirrored.get(f.name) != size:
        (self._tb_remote / f.name).write_bytes(f.read_bytes())
        self._mirrored[f.name] = size

  def close(self):
    if self._closed:
      return
    self._closed = True
    self._metrics.close()
    self._samples.close()
    if self._tb is not None:
      self._tb.close()
    if self._tb_remote is not None:
      self._mirror()
      shutil.rmtree(self._tb_local, ignore_errors=True)
    if self._wandb is not None:
      self._wandb.finish()


class StepProfiler:
  """A jax.profiler trace of the RL steps `steps` (config.profile.steps, consecutive) into
  workdir/profile (`tensorboard --logdir workdir/profile`, profile tab; or the trace.json.gz in
  Perfetto). Every process traces itself, into workdir/profile/process_<i> when there are several.
  jax.profiler writes local files: for a gs:// workdir the trace goes to a temp dir and is copied
  over when it stops."""

  def __init__(self, steps: Sequence[int], workdir: str):
    self._window = (steps[0], steps[-1]) if steps else None
    self._dest = epath.Path(workdir) / "profile"
    if jax.process_count() > 1:
      self._dest = self._dest / f"process_{jax.process_index()}"
    self._local = None  # where the running trace goes; None = not tracing

  def before_step(self, step: int) -> None:
    """Starts the trace before `step` runs if it is in the window (a run resumed inside the
    window traces the steps it has left)."""
    if self._window is None or self._local is not None or not self._window[0] <= step <= self._window[1]:
      return
    self._local = (epath.Path(tempfile.mkdtemp(prefix="laser_jax_profile_")) if is_remote(self._dest)
                   else self._dest)
    jax.profiler.start_trace(os.fspath(self._local))

  def after_step(self, step: int) -> None:
    if self._local is not None and step >= self._window[1]:
      self.stop()

  def stop(self) -> None:
    """Ends a running trace (also when the run stops inside the window) and copies a local
    trace to a remote workdir."""
    if self._local is None:
      return
    jax.profiler.stop_trace()
    if self._local != self._dest:
      for path in self._local.rglob("*"):
        if path.is_file():
          target = self._dest / path.relative_to(self._local)
          target.parent.mkdir(parents=True, exist_ok=True)
          target.write_bytes(path.read_bytes())
      shutil.rmtree(self._local, ignore_errors=True)
    logging.info("jax.profiler trace of steps %d-%d written to %s", *self._window, self._dest)
    self._local = None
