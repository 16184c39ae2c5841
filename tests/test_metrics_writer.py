"""metrics.jsonl records, TensorBoard events, process-0-only writing, remote mirroring; nothing
lost on an object store that cannot append; the W&B sink (offline) and the samples tables."""
import contextlib
import glob
import json
import struct
import sys
import tempfile
import time

import fsspec
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from tensorboardX.proto import event_pb2

from laser_jax import config_check, default_config
from laser_jax.training import metrics_writer


def _scalars(logdir):
  """{tag: [(step, value)]} read from TFRecord event files (8-byte length, crc, data, crc)."""
  out = {}
  for path in sorted(logdir.iterdir()):
    data = path.read_bytes()
    i = 0
    while i < len(data):
      n = int.from_bytes(data[i:i + 8], "little")
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        if v.HasField("simple_value"):  # not the text tables
          out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_jsonl_and_tensorboard_records(tmp_path):
  w = metrics_writer.MetricsWriter(str(tmp_path))
  w.write(1, {"loss": np.float32(0.5), "f1": float("nan"), "n": np.int64(3)})
  w.write(2, {"loss": 0.25, "eval/accuracy": 0.5})
  w.close()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 1, "loss": 0.5, "f1": None, "n": 3},
                   {"step": 2, "loss": 0.25, "eval/accuracy": 0.5}]
  assert metrics_writer.read_metrics(str(tmp_path)) == lines
  scalars = _scalars(tmp_path / "tensorboard")
  assert scalars["loss"] == [(1, 0.5), (2, 0.25)]
  assert scalars["n"] == [(1, 3.0)] and scalars["eval/accuracy"] == [(2, 0.5)]
  assert "f1" not in scalars  # NaN is written as JSON null, and null is no scalar.


def test_non_zero_process_writes_nothing(tmp_path):
  w = metrics_writer.MetricsWriter(str(tmp_path / "w"), enabled=False)
  assert w.write(3, {"loss": 1.0}) == {"step": 3, "loss": 1.0}
  w.close()
  assert not (tmp_path / "w").exists()


def test_remote_workdir_mirrors_tensorboard_events(tmp_path, monkeypatch):
  assert metrics_writer.is_remote("gs://bucket/run") and not metrics_writer.is_remote(str(tmp_path))
  # Treat a local directory as remote: events are written to a temp dir and copied over.
  monkeypatch.setattr(metrics_writer, "is_remote", lambda path: True)
  w = metrics_writer.MetricsWriter(str(tmp_path))
  for step in range(3):
    w.write(step, {"loss": float(step)})
  assert w._tb_local != tmp_path / "tensorboard"
  w.close()
  assert [s for s, _ in _scalars(tmp_path / "tensorboard")["loss"]] == [0, 1, 2]


# ---- an object store that cannot append ---------------------------------------------------------
class _Upload(MemoryFile):
  """An object being written: stored only when its writer closes it (GCS finalizes on close)."""

  def close(self):
    self.fs.store[self.path] = MemoryFile(self.fs, self.path, self.getvalue())


def _no_append_store_class():
  """A fresh in-memory gs:// that behaves like an object store: open(mode 'a'/'ab') raises, and a
  file exists only from the moment its writer closes it (a process killed while writing leaves
  nothing of it)."""

  class NoAppendStore(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=False, **kwargs):  # epath passes gcsfs's option
      super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
      path = str(path).removeprefix("gs://").removeprefix("gcs://")
      return "/" + path.strip("/")

    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode:
        raise OSError(f"{path}: an object store cannot append (mode {mode!r})")
      if "w" in mode:
        return _Upload(self, self._strip_protocol(path))
      return super()._open(path, mode, **kwargs)

  return NoAppendStore


@contextlib.contextmanager
def object_store(monkeypatch):
  """Serves gs:// from a fresh NoAppendStore, through the path etils.epath takes for gs:// when
  TensorFlow is not installed: its fsspec backend asks fsspec for the 'gcs' filesystem (gcsfs in
  a real run). Yields the store's dict {'/bucket/path': file}."""
  import importlib
  from etils.epath import backend as epath_backend
  registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is its mapping)
  assert epath.Path("gs://b")._backend is not epath_backend.tf_backend, "epath would use tf.io.gfile"
  store = _no_append_store_class()
  for protocol in ("gs", "gcs"):
    monkeypatch.setitem(registry._registry, protocol, store)
  get_fs = type(epath_backend.fsspec_backend)._get_filesystem  # lru-cached per protocol
  get_fs.cache_clear()
  try:
    assert isinstance(fsspec.filesystem("gcs"), store)
    yield store.store
  finally:
    get_fs.cache_clear()


def _store_lines(store, path):
  return [json.loads(l) for l in store[path].getvalue().decode().splitlines()]


def test_object_store_keeps_every_record_up_to_the_last_flush_and_resume_drops_later_ones(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the local events of the writer that "dies"
  with object_store(monkeypatch) as store:
    with pytest.raises(OSError, match="cannot append"):
      epath.Path("gs://bucket/x").open("a")
    w = metrics_writer.MetricsWriter("gs://bucket/run", remote_flush_every=4)
    for step in range(1, 6):  # rewritten whole after record 4
      w.write(step, {"loss": float(step)})
    assert [r["step"] for r in _store_lines(store, "/bucket/run/metrics.jsonl")] == [1, 2, 3, 4]
    w.write_samples(5, [dict(prompt="p|q", answer="2", response="<b>\nx", reward=1.0, score=float("nan"),
                             finished=False)])
    w.flush()  # a checkpoint at step 5
    w.write(6, {"loss": 6.0})
    # The process dies here: `close` never runs, step 6 (after the checkpoint) is lost.
    assert [r["step"] for r in metrics_writer.read_metrics("gs://bucket/run")] == [1, 2, 3, 4, 5]
    assert metrics_writer.read_samples("gs://bucket/run") == [
        {"step": 5, "prompt": "p|q", "answer": "2", "response": "<b>\nx", "reward": 1.0, "score": None,
         "finished": False}]
    events = [k for k in store if k.startswith("/bucket/run/tensorboard/events")]
    assert len(events) == 1 and sorted(s for s, _ in _scalars_of(store[events[0]].getvalue())["loss"]) == [1, 2, 3, 4, 5]

    # Resumed from the checkpoint of step 4: step 5 is redone, so its records go.
    w = metrics_writer.MetricsWriter("gs://bucket/run", resume_step=4, remote_flush_every=100)
    w.write(5, {"loss": 50.0})
    w.close()
    assert metrics_writer.read_metrics("gs://bucket/run") == [{"step": s, "loss": float(s)} for s in range(1, 5)] + [
        {"step": 5, "loss": 50.0}]
    assert metrics_writer.read_samples("gs://bucket/run") == []
    # The resumed run's events file tells TensorBoard to drop the first file's points from step 5 on.
    resumed = [k for k in store if k.startswith("/bucket/run/tensorboard/events") and k not in events]
    purge = [e.step for e in _events(store[resumed[0]].getvalue()) if e.session_log.status == 1]
    assert purge == [5] and _scalars_of(store[resumed[0]].getvalue())["loss"] == [(5, 50.0)]


def _events(data):
  """Events of a TFRecord event file (8-byte length, crc, data, crc)."""
  i = 0
  while i < len(data):
    n = int.from_bytes(data[i:i + 8], "little")
    yield event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    i += 12 + n + 4


def _scalars_of(data):
  out = {}
  for event in _events(data):
    for v in event.summary.value:
      if v.HasField("simple_value"):
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_local_history_is_appended_per_record_and_truncated_on_resume(tmp_path):
  w = metrics_writer.MetricsWriter(str(tmp_path), remote_flush_every=1000)
  w.write(1, {"loss": 1.0})
  # Appended and flushed as it comes (tail -f), not held for a rewrite.
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
  w.write(2, {"loss": 2.0})
  w.close()
  assert not (tmp_path / "samples.jsonl").exists()  # no table written, no file
  metrics_writer.MetricsWriter(str(tmp_path), resume_step=1).close()
  assert metrics_writer.read_metrics(str(tmp_path)) == [{"step": 1, "loss": 1.0}]
  metrics_writer.MetricsWriter(str(tmp_path)).close()  # A fresh start keeps nothing.
  assert metrics_writer.read_metrics(str(tmp_path)) == []


def test_samples_table_is_escaped_markdown():
  rows = [{"a": "x|y", "b": "<|im_start|>1\n2"}, {"a": None, "b": 0.5}]
  assert metrics_writer.markdown_table(rows, ("a", "b")) == (
      "| a | b |\n|---|---|\n| x&#124;y | &lt;&#124;im_start&#124;&gt;1<br>2 |\n|  | 0.5 |")


def test_run_configs_are_kept_per_restart(tmp_path):
  metrics_writer.write_run_config(str(tmp_path), '{"seed": 0}', start_step=0)
  metrics_writer.write_run_config(str(tmp_path), '{"seed": 1}', start_step=25)
  assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 1}
  assert json.loads((tmp_path / "configs" / "config.step_0.json").read_text()) == {"seed": 0}
  assert json.loads((tmp_path / "configs" / "config.step_25.json").read_text()) == {"seed": 1}


# ---- Weights & Biases ----------------------------------------------------------------------------
def _wandb_records(run_file):
  """The protobuf records of an offline run's .wandb file: W&B's LevelDB-log layout (a 7-byte
  file header ':W&B' magic version; 32 KiB blocks of records with a 7-byte header: crc32c,
  length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4; fewer than 7 bytes left in a block = padding)."""
  from wandb.proto import wandb_internal_pb2
  data = open(run_file, "rb").read()
  assert data[:4] == b":W&B"
  block, pos, pieces = 32768, 7, b""
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # block trailer
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if length == 0 and kind == 0:
      break
    pieces += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pieces)
      pieces = b""
      yield record


def _wandb_history(workdir, run_id):
  """{step: {key: value}} over every offline run directory of `run_id` under workdir/wandb."""
  import wandb
  wandb.teardown()  # W&B's service process (it writes the files) done and gone: the files are whole.
  history = {}
  for run_file in sorted(glob.glob(f"{workdir}/wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
    for record in _wandb_records(run_file):
      if record.WhichOneof("record_type") == "history":
        values = history.setdefault(record.history.step.num, {})
        for item in record.history.item:
          name, *field = list(item.nested_key) or [item.key]
          if name.startswith("_"):  # W&B's own: _step, _runtime, _timestamp
            continue
          if field:  # a logged object (the table): {field: value}
            values.setdefault(name, {})[field[0]] = json.loads(item.value_json)
          else:
            values[name] = json.loads(item.value_json)
  return history


def wandb_settings(**overrides):
  c = default_config.get_config().wandb
  c.project, c.mode = "laser-test", "offline"
  return default_config.apply_overrides(c, overrides)


def test_wandb_gets_tensorboards_scalars_and_tables_and_one_run_across_restarts(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  w = metrics_writer.MetricsWriter(str(tmp_path), wandb_settings=wandb_settings(), run_config={"seed": 3})
  w.write(1, {"actor/loss": 0.5, "self_verification/f1": float("nan"), "actor/skipped_updates": 0})
  w.write_samples(1, [dict(prompt="What is 1+1?", answer="2", response="2", reward=1.0, score=0.9, finished=True)])
  w.write(2, {"actor/loss": 0.25, "eval/accuracy": 0.5})
  w.close()
  run_id = (tmp_path / "wandb_run_id").read_text()
  # A restart resumes the same W&B run (offline: a second directory of the same id, named by the
  # second it starts in: a real restart takes longer than this wait).
  time.sleep(1 - time.time() % 1)
  w = metrics_writer.MetricsWriter(str(tmp_path), resume_step=2, wandb_settings=wandb_settings())
  w.write(3, {"actor/loss": 0.125})
  w.close()
  assert (tmp_path / "wandb_run_id").read_text() == run_id
  assert len(glob.glob(f"{tmp_path}/wandb/offline-run-*-{run_id}")) == 2
  history = _wandb_history(tmp_path, run_id)
  tb = _scalars(tmp_path / "tensorboard")
  assert history[1].pop("samples")["_type"] == "table-file"
  # Exactly TensorBoard's scalars: names, steps and values (NaN goes to neither).
  assert {(k, s, v) for s, vals in history.items() for k, v in vals.items()} == {
      (k, s, v) for k, points in tb.items() for s, v in points}
  assert sorted(history) == [1, 2, 3]
  table = json.loads(open(glob.glob(f"{tmp_path}/wandb/offline-run-*-{run_id}/files/media/table/samples_1_*.json")[0]).read())
  assert table["columns"] == list(metrics_writer.SAMPLE_COLUMNS)
  assert table["data"] == [["What is 1+1?", "2", "2", 1.0, 0.9, True]]


@pytest.mark.parametrize("key,value,message", [
    ("profile.steps", (5, 7), r"config\.profile\.steps: expected consecutive RL steps >= 1 such as 5,6 \(got \(5, 7\)\)"),
    ("profile.steps", ("a,b",), r"config\.profile\.steps: expected consecutive .* \(got \('a,b',\)\)"),
    ("profile.steps", (0, 1), r"config\.profile\.steps: expected consecutive"),
    ("profile.steps", (300,), r"config\.profile\.steps: step 300 is after config\.total_steps=250"),
    ("logging.samples_every", -1, r"config\.logging\.samples_every: expected >= 0, got -1"),
    ("logging.remote_flush_every", 0, r"config\.logging\.remote_flush_every: expected >= 1"),
    ("wandb.mode", "sometimes", r"config\.wandb\.mode: expected one of"),
])
def test_bad_tracking_values_are_one_line_errors_naming_the_key(key, value, message):
  c = default_config.apply_overrides(default_config.get_config(), {key: value})
  with pytest.raises(config_check.ConfigError, match=message) as e:
    config_check.validate(c, num_devices=8)
  assert "\n" not in str(e.value)


def test_wandb_asked_for_without_the_package_is_a_config_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when not installed
  c = default_config.apply_overrides(default_config.get_config(), {"wandb.project": "laser"})
  with pytest.raises(config_check.ConfigError, match=r"^config\.wandb\.project: 'laser' asks for Weights "
                     r"& Biases, but wandb is not installed \(pip install 'laser_jax\[wandb\]'\)$"):
    config_check.validate(c, num_devices=8)
  config_check.validate(default_config.apply_overrides(c, {"wandb.mode": "disabled"}), num_devices=8)


def test_wandb_that_cannot_start_is_a_config_error_and_writes_nothing(tmp_path, monkeypatch):
  for name in ("WANDB_API_KEY", "WANDB_MODE"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: not logged in
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
  with pytest.raises(config_check.ConfigError, match=r"^config\.wandb\.project: W&B cannot start a run in "
                     r"'laser-test' \(.*\); or log offline: --config\.wandb\.mode=offline$"):
    metrics_writer.MetricsWriter(str(tmp_path / "run"), resume_step=1, wandb_settings=wandb_settings(mode="online"))
  assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
  assert not (tmp_path / "run" / "wandb_run_id").exists()
