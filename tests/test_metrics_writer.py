"""metrics.jsonl records, TensorBoard events, process-0-only writing, remote mirroring."""
import json

import numpy as np
from tensorboardX.proto import event_pb2

from laser_jax import metrics_writer


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
