"""Problem/answer records from files: JSONL and parquet readers with configurable field names.

Records are plain dicts {"problem": str, "answer": str}. `read_records(path)` reads JSONL or
parquet by extension (DeepMath-103K's parquet uses `question` / `final_answer`:
`fields="deepmath"`); a malformed row is a `DataError` naming `path:line`. Named eval sets are
found by `eval_sets`, files by address by `sources`, and `tfds_records` serves the same records
through tensorflow-datasets.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

# Field names (problem, answer) of known file layouts.
FIELD_PRESETS = {
    "default": ("problem", "answer"),
    "deepmath": ("question", "final_answer"),  # DeepMath-103K parquet
}


class DataError(ValueError):
  """A malformed data file; the message is `path:line: what is wrong`."""


class MissingFieldError(DataError):
  """A row or file without the problem or answer field."""


def resolve_fields(fields: str | tuple[str, str]) -> tuple[str, str]:
  """The (problem, answer) field names of a preset name (`FIELD_PRESETS`) or an explicit pair."""
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
  problem_key, answer_key = resolve_fields(fields)
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
  problem_key, answer_key = resolve_fields(fields)
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
