"""Problem/answer data: file readers, tfds builder, eval sets, prompts, a resumable iterator.

Records are plain dicts {"problem": str, "answer": str}. Sources:
- `read_records(path)`: JSONL or parquet with configurable field names (DeepMath-103K's parquet
  uses `question` / `final_answer`: `fields="deepmath"`).
- `load_eval_set(name)`: MATH500, AIME24, AIME25, AMC23, OlympiadBench from the eval data dir
  (`data_dir`); `python -m laser_jax.data fetch --out=DIR` writes them there from the hub
  (`EVAL_SET_SOURCES`, `laser_jax.eval_fetch`).
- `build_tfds(path_or_name)`: the same records materialised with tensorflow-datasets as an
  array_record dataset and read back through `tfds` data sources (random access, no TensorFlow).

`PromptIterator` serves per-host batches with a seeded shuffle per epoch and a small JSON state
so that training resumes at exactly the next batch.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
from typing import Any, Iterator, Sequence

import numpy as np

from laser_jax.data import sources
from laser_jax.config_check import ConfigError

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Field names (problem, answer) of known file layouts.
FIELD_PRESETS = {
    "default": ("problem", "answer"),
    "deepmath": ("question", "final_answer"),  # DeepMath-103K parquet
}

# Named eval sets -> directory under the data dir (each holds test.jsonl).
EVAL_SETS = {
    "math500": "math500",
    "aime24": "aime24",
    "aime25": "aime25",
    "amc23": "amc23",
    "olympiadbench": "OlympiadBench",
}

DATA_DIR_ENV = "LASER_JAX_DATA_DIR"


# Where `python -m laser_jax.data fetch` (laser_jax.eval_fetch) takes the eval sets from, the same
# problems and answers as the release's files: set -> (hub dataset id@revision, the file(s) of its
# test split (fnmatch on the path in the repository), problem field, answer field, id field).
# Revisions are pinned where the file layout was checked. A list answer (OlympiadBench's
# final_answer) gives its first element without the surrounding $...$.
EVAL_SET_SOURCES = {
    "math500": ("HuggingFaceH4/MATH-500@main", "test.jsonl", "problem", "answer", "unique_id"),
    "aime24": ("HuggingFaceH4/aime_2024@main", "data/train-*.parquet", "problem", "answer", "id"),
    "aime25": ("math-ai/aime25@563bb8404243c5f09de6ec262f2db674fe5bce9b", "test.jsonl", "problem",
               "answer", "id"),
    "amc23": ("math-ai/amc23@80815d37005feb82cd7f8fbc6901d5d3eff43057", "test-*.parquet", "question",
              "answer", "id"),
    "olympiadbench": ("math-ai/olympiadbench@main", "test.jsonl", "question", "final_answer", "id"),
}


class DataError(ValueError):
  """A malformed data file; the message is `path:line: what is wrong`."""


class MissingFieldError(DataError):
  """A row or file without the problem or answer field."""


class EvalSetNotFoundError(ConfigError, FileNotFoundError):
  """A named eval set is not in the eval data dir; the message says which command fetches it."""


def _fields(fields: str | tuple[str, str]) -> tuple[str, str]:
  if isinstance(fields, str):
    if fields not in FIELD_PRESETS:
      raise ValueError(f"unknown field preset {fields!r}: expected one of {sorted(FIELD_PRESETS)} "
                       "or a (problem_field, answer_field) tuple")
    return FIELD_PRESETS[fields]
  return tuple(fields)


def _record(row: Any, where: str, problem_key: str, answer_key: str) -> dict[str, str]:
  """Validates one row. Integer/float answers (AIME25 stores ints) become strings."""
  if not isinstance(row, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
  for key in (problem_key, answer_key):
    if key not in row:
      raise MissingFieldError(f"{where}: missing field {key!r} (has {sorted(row)})")
  problem, answer = row[problem_key], row[answer_key]
  if not isinstance(problem, str) or not problem.strip():
    raise DataError(f"{where}: field {problem_key!r} must be a non-empty string, "
                    f"got {type(problem).__name__} {problem!r:.40}")
  if isinstance(answer, (int, float)) and not isinstance(answer, bool):
    answer = str(answer)
  if not isinstance(answer, str) or not answer.strip():
    raise DataError(f"{where}: field {answer_key!r} must be a non-empty string or a number, "
                    f"got {type(answer).__name__} {answer!r:.40}")
  return {"problem": problem, "answer": answer}


def read_jsonl(path: str | os.PathLike, fields: str | tuple[str, str] = "default") -> list[dict]:
  """Reads a JSONL file of problems; blank lines are skipped. Raises DataError `path:line: ...`."""
  problem_key, answer_key = _fields(fields)
  records = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      records.append(_record(row, where, problem_key, answer_key))
  return records


def read_parquet(path: str | os.PathLike, fields: str | tuple[str, str] = "default") -> list[dict]:
  """Reads a parquet file of problems. Errors name `path:row` (1-based row number)."""
  import pyarrow.parquet as pq
  problem_key, answer_key = _fields(fields)
  schema = pq.read_schema(path)
  missing = [k for k in (problem_key, answer_key) if k not in schema.names]
  if missing:
    raise MissingFieldError(f"{path}: missing column(s) {missing} (has {schema.names})")
  table = pq.read_table(path, columns=[problem_key, answer_key])
  return [_record(row, f"{path}:{i}", problem_key, answer_key)
          for i, row in enumerate(table.to_pylist(), start=1)]


def read_records(path: str | os.PathLike, fields: str | tuple[str, str] = "default") -> list[dict]:
  """Reads JSONL (.jsonl/.json) or parquet (.parquet) by extension."""
  suffix = pathlib.Path(path).suffix.lower()
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"data file not found: {path}")
  if suffix in (".jsonl", ".json"):
    return read_jsonl(path, fields)
  if suffix == ".parquet":
    return read_parquet(path, fields)
  raise DataError(f"{path}: unsupported file type {suffix!r} (expected .jsonl, .json or .parquet)")


def default_data_dir() -> str:
  """The per-user eval data dir: $XDG_CACHE_HOME/laser_jax/eval_sets (~/.cache/laser_jax/...)."""
  return os.path.join(sources.cache_root(), "eval_sets")


def data_dir(configured: str = "") -> str:
  """Where named eval sets are found (a local dir or gs://...; set `name` is the file
  `<dir>/<EVAL_SETS[name]>/test.jsonl`): `configured` (config.data.eval_data_dir or
  config.eval.data_dir) if set, else $LASER_JAX_DATA_DIR, else `default_data_dir()`."""
  return configured or os.environ.get(DATA_DIR_ENV) or default_data_dir()


def eval_set_path(name: str, directory: str = "",
                  keys: tuple[str, str] = ("data.eval_set", "data.eval_data_dir")) -> pathlib.Path:
  """The local path of eval set `name`'s test.jsonl (case-insensitive; from a gs:// dir, a local
  copy). `keys`: the config keys of the name and of the directory, named in errors."""
  key = name.lower()
  if key not in EVAL_SETS:
    raise ValueError(f"unknown eval set {name!r}: expected one of {sorted(EVAL_SETS)}")
  root = data_dir(directory)
  path = f"{root.rstrip('/')}/{EVAL_SETS[key]}/test.jsonl"
  local = sources.fetch_file(path, f"config.{keys[1]}") if sources.is_gs(path) else path
  if local is None or not os.path.isfile(local):
    raise EvalSetNotFoundError(
        f"config.{keys[0]}: eval set {name!r} not found at {path} (looked up in config.{keys[1]}, "
        f"else ${DATA_DIR_ENV}, else {default_data_dir()}); fetch it with: "
        f"python -m laser_jax.data fetch --out={root} --sets={key}")
  return pathlib.Path(local)


def load_eval_set(name: str, directory: str = "",
                  keys: tuple[str, str] = ("data.eval_set", "data.eval_data_dir")) -> list[dict]:
  """Records of a named eval set: math500, aime24, aime25, amc23, olympiadbench (`eval_set_path`)."""
  return read_jsonl(eval_set_path(name, directory, keys))


def load_eval_records(value: str, directory: str, keys: tuple[str, str]) -> list[dict]:
  """Records of an eval-set name (unless a local file has that name) or of the files that `value`
  names (local path or glob, gs://, hf://datasets/...: `sources.data_files`). `keys` as above."""
  if value.lower() in EVAL_SETS and not os.path.exists(value):
    return load_eval_set(value, directory, keys)
  return [r for path in sources.data_files(value, f"config.{keys[0]}") for r in read_records(path)]


# ----------------------------------------------------------------------------------------------
# tensorflow-datasets backend. TensorFlow is not needed: tfds writes array_record files and reads
# them back through `as_data_source()` (random access), which is what the iterator below uses.


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
      rows = read_records(cfg.source_path, (cfg.problem_field, cfg.answer_field))
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
  if str(path_or_eval_set).lower() in EVAL_SETS:
    path = eval_set_path(str(path_or_eval_set))
  else:
    path = pathlib.Path(path_or_eval_set)
    if not path.is_file():
      raise FileNotFoundError(f"data file not found: {path}")
  problem_key, answer_key = _fields(fields)
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


# ----------------------------------------------------------------------------------------------
# Prompts.


def build_prompt(problem: str, tokenizer=None, template: str = "chat") -> str:
  """The prompt text for `problem`.

  "chat": the tokenizer's chat template with one user turn `problem + "\\n" + INSTRUCTION` and
  the generation prompt. "base": plain text `problem + "\\n" + INSTRUCTION + "\\n"`.
  """
  content = problem + "\n" + INSTRUCTION
  if template == "base":
    return content + "\n"
  if template != "chat":
    raise ValueError(f"unknown prompt template {template!r}: expected 'chat' or 'base'")
  if tokenizer is None or not getattr(tokenizer, "chat_template", None):
    raise ValueError("prompt template 'chat' needs a tokenizer with a chat_template; "
                     "use template='base' for tokenizers without one")
  return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                       add_generation_prompt=True)


def encode_prompt(prompt: str, tokenizer, template: str = "chat") -> list[int]:
  """Token ids of a prompt. The chat template already writes BOS where the model wants one, so
  special tokens are only added for the base template (e.g. Llama's BOS; Qwen adds none)."""
  return list(tokenizer(prompt, add_special_tokens=(template == "base"))["input_ids"])


@dataclasses.dataclass(frozen=True)
class PreparedPrompts:
  items: list[dict]  # records + "prompt" (str) + "prompt_ids" (list[int]) + "index" (source row)
  num_filtered: int  # records dropped for being longer than max_prompt_len tokens


def prepare_prompts(records: Sequence[dict], tokenizer, template: str = "chat",
                    max_prompt_len: int | None = None) -> PreparedPrompts:
  """Builds and tokenizes prompts; drops (and counts) prompts over `max_prompt_len` tokens."""
  items, num_filtered = [], 0
  for i in range(len(records)):
    record = records[i]
    prompt = build_prompt(record["problem"], tokenizer, template)
    ids = encode_prompt(prompt, tokenizer, template)
    if max_prompt_len is not None and len(ids) > max_prompt_len:
      num_filtered += 1
      continue
    items.append({**record, "prompt": prompt, "prompt_ids": ids, "index": i})
  return PreparedPrompts(items, num_filtered)


# ----------------------------------------------------------------------------------------------
# Iterator.


class PromptIterator:
  """Per-host batches over `items`, reshuffled each epoch, with exact resume.

  Each epoch draws one global permutation from (seed, epoch), identical on every host, and cuts
  it into global batches of G = batch_size * P items (P hosts); host p takes block p of each,
  items [p * batch_size, (p + 1) * batch_size) of the global batch, so the hosts' batches in
  process order are the global batch (`laser_jax.hosts`). The incomplete last global batch of an
  epoch is dropped. `num_epochs=None` repeats forever.

  `get_state()` returns {"epoch", "batch", "seed", "num_items", "process_count",
  "global_batch_size"}; a new iterator given `set_state(state)` yields exactly the batches the
  saved one would have yielded next. The position is host-count independent: global batch b of
  an epoch is positions [b * G, (b + 1) * G) of the epoch's permutation, and an epoch holds
  floor(N / G) batches, for every P. So a state saved on P hosts restores on any host count with
  the same global batch.
  """

  def __init__(self, items: Sequence[Any], batch_size: int, seed: int = 0,
               num_epochs: int | None = 1, shuffle: bool = True, process_index: int = 0,
               process_count: int = 1):
    if batch_size <= 0:
      raise ValueError(f"PromptIterator: batch_size must be > 0, got {batch_size}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"PromptIterator: process_index {process_index} not in [0, {process_count})")
    self.items = items
    self.batch_size = batch_size
    self.seed = seed
    self.num_epochs = num_epochs
    self.shuffle = shuffle
    self.process_index = process_index
    self.process_count = process_count
    self.batches_per_epoch = len(items) // (batch_size * process_count)
    if self.batches_per_epoch == 0:
      raise ValueError(f"PromptIterator: {len(items)} items are fewer than one global batch of "
                       f"{batch_size} x {process_count} host(s)")
    self._epoch = 0
    self._batch = 0
    self._order: np.ndarray | None = None  # this host's item order for self._epoch

  def _host_order(self, epoch: int) -> np.ndarray:
    n = len(self.items)
    order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
             else np.arange(n))
    batches = order[:self.batches_per_epoch * self.batch_size * self.process_count]
    return batches.reshape(self.batches_per_epoch, self.process_count, self.batch_size)[:, self.process_index].reshape(-1)

  def __iter__(self) -> Iterator[list[Any]]:
    return self

  def __next__(self) -> list[Any]:
    if self._batch == self.batches_per_epoch:
      self._epoch, self._batch, self._order = self._epoch + 1, 0, None
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    if self._order is None:
      self._order = self._host_order(self._epoch)
    start = self._batch * self.batch_size
    batch = [self.items[int(j)] for j in self._order[start:start + self.batch_size]]
    self._batch += 1
    return batch

  @property
  def epoch(self) -> int:
    """The epoch of the next batch (completed epochs so far)."""
    return self._epoch + (self._batch == self.batches_per_epoch)

  def get_state(self) -> dict:
    """A JSON-able position: the next batch is batch `batch` of epoch `epoch`."""
    return {"epoch": int(self._epoch), "batch": int(self._batch), "seed": int(self.seed),
            "num_items": len(self.items), "process_count": int(self.process_count),
            "global_batch_size": int(self.batch_size * self.process_count)}

  def set_state(self, state: dict) -> None:
    """Restores a position saved by `get_state`: same data, seed and global batch size; the
    host count may differ (class docstring). A state without "global_batch_size" (saved before
    it was recorded) needs the same host count."""
    mine = {"seed": self.seed, "num_items": len(self.items)}
    if "global_batch_size" in state:
      mine["global_batch_size"] = self.batch_size * self.process_count
    else:
      mine["process_count"] = self.process_count
    for key, value in mine.items():
      if state.get(key) != value:
        raise ValueError(f"PromptIterator.set_state: state {key}={state.get(key)!r} does not "
                         f"match this iterator's {key}={value!r}")
    if not 0 <= state["batch"] <= self.batches_per_epoch:
      raise ValueError(f"PromptIterator.set_state: batch {state['batch']} not in "
                       f"[0, {self.batches_per_epoch}]")
    self._epoch, self._batch, self._order = int(state["epoch"]), int(state["batch"]), None


if __name__ == "__main__":
  from laser_jax.data import eval_fetch  # `python -m laser_jax.data fetch --out=DIR [--sets=...]`
  eval_fetch.run_cli()
