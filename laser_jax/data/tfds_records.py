"""The records of a file or eval set through tensorflow-datasets (no TensorFlow needed).

tfds writes array_record files once and reads them back through `as_data_source()`: random access,
so `build_tfds(...)` can stand wherever a list of records does (`iterator.PromptIterator`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import re
from typing import Sequence

import numpy as np

from laser_jax.data import eval_sets
from laser_jax.data import records as records_lib


@functools.lru_cache(maxsize=None)  # tfds registers builder classes by name: define once.
def _tfds_builder_class():
  import tensorflow_datasets as tfds

  @dataclasses.dataclass
  class MathProblemsConfig(tfds.core.BuilderConfig):
    source_path: str = ""
    problem_field: str = "problem"
    answer_field: str = "answer"

  class MathProblems(tfds.core.GeneratorBasedBuilder):
    """Problem/answer records from one JSONL or parquet file (one builder config per file)."""
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIG_CLASS = MathProblemsConfig

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "index": tfds.features.Scalar(np.int64),
              "problem": tfds.features.Text(),
              "answer": tfds.features.Text(),
          }),
          disable_shuffling=True)  # Keep file order; the iterator shuffles.

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      cfg = self.builder_config
      rows = records_lib.read_records(cfg.source_path, (cfg.problem_field, cfg.answer_field))
      for i, row in enumerate(rows):
        yield i, {"index": i, **row}

  return MathProblems, MathProblemsConfig


class TfdsRecords(Sequence):
  """A tfds data source exposed as a sequence of {"problem", "answer"} str dicts."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(f"record {i} out of range for {len(self)} records")
    row = self._source[i % len(self)]
    return {k: (row[k].decode("utf-8") if isinstance(row[k], bytes) else row[k])
            for k in ("problem", "answer")}


def build_tfds(path_or_eval_set: str | os.PathLike, tfds_dir: str | os.PathLike,
               fields: str | tuple[str, str] = "default") -> TfdsRecords:
  """Prepares (once) a tfds array_record dataset from a file or named eval set; returns its records.

  The builder config name hashes the file's absolute path, size and mtime, so an edited file is
  rebuilt rather than served stale.
  """
  import tensorflow_datasets as tfds
  if str(path_or_eval_set).lower() in eval_sets.EVAL_SETS:
    path = eval_sets.eval_set_path(str(path_or_eval_set))
  else:
    path = pathlib.Path(path_or_eval_set)
    if not path.is_file():
      raise FileNotFoundError(f"data file not found: {path}")
  problem_key, answer_key = records_lib.resolve_fields(fields)
  stat = path.stat()
  key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{problem_key}|{answer_key}"
  stem = re.sub(r"[^a-z0-9]+", "_", f"{path.parent.name}_{path.stem}".lower()).strip("_")
  name = f"{stem}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
  builder_cls, config_cls = _tfds_builder_class()
  config = config_cls(name=name, source_path=str(path), problem_field=problem_key,
                      answer_field=answer_key)
  builder = builder_cls(config=config, data_dir=str(tfds_dir), file_format="array_record")
  tfds.disable_progress_bar()
  builder.download_and_prepare()
  return TfdsRecords(builder.as_data_source(split="train"))
