"""`python -m laser_jax.data fetch --out=DIR [--sets=math500,aime24]`: the eval sets from the hub.

Downloads each set's test split from the hub dataset `data.EVAL_SET_SOURCES` names (through the
Hugging Face cache; HF_HUB_OFFLINE=1 reads only the cache) and writes `DIR/<EVAL_SETS[set]>/test.jsonl`
with {"id", "problem", "answer"} per line, the layout `data.load_eval_set` reads. DIR is local or
gs://. Every set is downloaded and checked before anything is written.
"""
from __future__ import annotations

import json
import os

from laser_jax.data import records as data_lib
from laser_jax.data import sources
from laser_jax.config_check import ConfigError


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
  """The records of eval set `name` from its hub dataset, checked as `data.read_jsonl` checks them."""
  address, files, problem_key, answer_key, id_key = data_lib.EVAL_SET_SOURCES[name]
  repo_id, _, revision = address.partition("@")
  records = []
  for path in sources.hub_files(repo_id, revision or None, files, f"--sets={name}", address):
    for line_no, row in enumerate(_raw_rows(path), start=1):
      where = f"{address}/{os.path.basename(path)}:{line_no}"
      if not isinstance(row, dict) or problem_key not in row or answer_key not in row:
        raise data_lib.DataError(f"{where}: expected fields {problem_key!r} and {answer_key!r}")
      record = {"problem": row[problem_key], "answer": _answer_text(row[answer_key])}
      if not isinstance(record["problem"], str) or not record["problem"].strip() or not record["answer"].strip():
        raise data_lib.DataError(f"{where}: empty problem or answer")
      records.append({"id": row[id_key], **record} if id_key in row else record)
  return records


def fetch(out: str, names: list[str]) -> dict[str, str]:
  """Writes the named sets under `out`; returns {set: path written}."""
  if sources.is_gs(out):
    sources.check_reachable(out, "--out")  # no gcsfs / no credentials: fail before downloading
  downloaded = {name: download(name) for name in names}
  written = {}
  for name, records in downloaded.items():
    path = f"{out.rstrip('/')}/{data_lib.EVAL_SETS[name]}/test.jsonl"
    sources.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "--out")
    written[name] = path
    print(f"{name}: {len(records)} problems from {data_lib.EVAL_SET_SOURCES[name][0]} -> {path}", flush=True)
  return written


def parse_sets(value: str) -> list[str]:
  names = [n.strip().lower() for n in value.split(",") if n.strip()]
  unknown = [n for n in names if n not in data_lib.EVAL_SETS]
  if unknown or not names:
    raise ConfigError(f"--sets={value}: unknown eval set(s) {unknown} (expected a comma-separated "
                      f"subset of {', '.join(data_lib.EVAL_SETS)})")
  return names


def run_cli(argv=None) -> None:
  """The `python -m laser_jax.data` entry point (bad input: one line, exit 2, as every command)."""
  from absl import flags
  from laser_jax import cli
  out = flags.DEFINE_string("out", None, "Directory (local or gs://) to write <set>/test.jsonl into.")
  sets = flags.DEFINE_string("sets", ",".join(data_lib.EVAL_SETS), "Comma-separated eval sets to fetch.")

  def main(args):
    if args[1:] != ["fetch"]:
      cli.fail(f"expected the command `fetch`, got {' '.join(args[1:]) or 'none'} "
               "(usage: python -m laser_jax.data fetch --out=DIR [--sets=math500,aime24])")
    if not out.value:
      cli.fail(f"--out: required, e.g. --out={data_lib.default_data_dir()}")
    fetch(out.value, parse_sets(sets.value))

  cli.run(main, argv=argv)
