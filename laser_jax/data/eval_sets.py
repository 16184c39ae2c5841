"""The five eval sets (MATH500, AIME24, AIME25, AMC23, OlympiadBench): where they are found.

`load_eval_set(name)` reads `<data dir>/<set>/test.jsonl`, the data dir being the config key
(`data.eval_data_dir` for training, `eval.data_dir` for evaluation), else $LASER_JAX_DATA_DIR,
else the per-user cache; `python -m laser_jax.data fetch --out=DIR` writes them there from the
hub (`EVAL_SET_SOURCES`, `laser_jax.data.eval_fetch`). `load_eval_records` takes a set name or
any files by address.
"""
from __future__ import annotations

import os
import pathlib

from laser_jax.config_check import ConfigError
from laser_jax.data import records as records_lib
from laser_jax.data import sources

# Named eval sets -> directory under the data dir (each holds test.jsonl).
EVAL_SETS = {
    "math500": "math500",
    "aime24": "aime24",
    "aime25": "aime25",
    "amc23": "amc23",
    "olympiadbench": "OlympiadBench",
}

DATA_DIR_ENV = "LASER_JAX_DATA_DIR"


# Where `python -m laser_jax.data fetch` (laser_jax.data.eval_fetch) takes the eval sets from, the same
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



class EvalSetNotFoundError(ConfigError, FileNotFoundError):
  """A named eval set is not in the eval data dir; the message says which command fetches it."""



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
  return records_lib.read_jsonl(eval_set_path(name, directory, keys))


def load_eval_records(value: str, directory: str, keys: tuple[str, str]) -> list[dict]:
  """Records of an eval-set name (unless a local file has that name) or of the files that `value`
  names (local path or glob, gs://, hf://datasets/...: `sources.data_files`). `keys` as above."""
  if value.lower() in EVAL_SETS and not os.path.exists(value):
    return load_eval_set(value, directory, keys)
  return [r for path in sources.data_files(value, f"config.{keys[0]}") for r in records_lib.read_records(path)]
