"""`python -m laser_jax.data fetch --out=DIR [--sets=math500,aime24]`: the eval sets from the hub.

Downloads each set's test split from the hub dataset `eval_sets.EVAL_SET_SOURCES` names (through the
Hugging Face cache; HF_HUB_OFFLINE=1 reads only the cache) and writes `DIR/<EVAL_SETS[set]>/test.jsonl`
with {"id", "problem", "answer"} per line, the layout `eval_sets.load_eval_set` reads. DIR is local or
gs://. Every set is downloaded and checked before anything is written.
"""
from __future__ import annotations

import json
import os

from laser_jax.config_check import ConfigError
from laser_jax.data import eval_sets
from laser_jax.data import records as records_lib
from laser_jax.data import sources


def _raw_rows(path: str) -> list[dict]:
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _answer_text(value) -> str:
  """AIME answers are ints, AMC's floats (27.0 -> "27"), OlympiadBench's a list of "$...$"."""
  if isinstance(value, (list, tuple)):
    value = str(value[0]).strip().strip("$").strip() if value else ""
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  return str(value)


def download(name: str) -> list[dict]:
  """The records of eval set `name` from its hub dataset, checked as `records_lib.read_jsonl` checks them."""
  address, files, problem_key, answer_key, id_key = eval_sets.EVAL_SET_SOURCES[name]
  repo_id, _, revision = address.partition("@")
  records = []
  for path in sources.hub_files(repo_id, revision or None, files, f"--sets={name}", address):
    for line_no, row in enumerate(_raw_rows(path), start=1):
      where = f"{address}/{os.path.basename(path)}:{line_no}"
      if not isinstance(row, dict) or problem_key not in row or answer_key not in row:
        raise records_lib.DataError(f"{where}: expected fields {problem_key!r} and {answer_key!r}")
      record = {"problem": row[problem_key], "answer": _answer_text(row[answer_key])}
      if not isinstance(record["problem"], str) or not record["problem"].strip() or not record["answer"].strip():
        raise records_lib.DataError(f"{where}: empty problem or answer")
      records.append({"id": row[id_key], **record} if id_key in row else record)
  return records


def fetch(out: str, names: list[str]) -> dict[str, str]:
  """Writes the named sets under `out`; returns {set: path written}."""
  if sources.is_gs(out):
    sources.check_reachable(out, "--out")  # no gcsfs / no credentials: fail before downloading
  downloaded = {name: download(name) for name in names}
  written = {}
  for name, records in downloaded.items():
    path = f"{out.rstrip('/')}/{eval_sets.EVAL_SETS[name]}/test.jsonl"
    sources.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "--out")
    written[name] = path
    print(f"{name}: {len(records)} problems from {eval_sets.EVAL_SET_SOURCES[name][0]} -> {path}", flush=True)
  return written


def parse_sets(value: str) -> list[str]:
  names = [n.strip().lower() for n in value.split(",") if n.strip()]
  unknown = [n for n in names if n not in eval_sets.EVAL_SETS]
  if unknown or not names:
    raise ConfigError(f"--sets={value}: unknown eval set(s) {unknown} (expected a comma-separated "
                      f"subset of {', '.join(eval_sets.EVAL_SETS)})")
  return names
