r"""The paper's table from one command: several eval sets, each with its own n, one table, one JSON.

  python -m laser_jax.evaluate --config=configs/eval.py:paper --config.model.hf_path=/path/to/model

`run(config)` evaluates each set of `table.sets` with `evaluator.run` (the model loaded once for
all of them) into `<table.output_dir>/<set>.jsonl` and its `<set>.summary.json`, with `table.n`'s
samples per problem and the `eval.*` settings, then prints the paper's layout -- accuracy (mean@n,
`reward/mean`) per set and their average, self-verification F1 (official conventions,
`rl_metrics.self_verification`) per set and their average -- and writes
`<table.output_dir>/table.json`: those figures, every set's whole summary and its files. It
resumes: a set whose output and summary are already there, written with the same settings, is
read back, not redone (a finished table loads no model).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import ml_collections
import numpy as np

from laser_jax.config_check import ConfigError
from laser_jax.data import eval_sets
from laser_jax.evaluation import evaluator
from laser_jax.evaluation import loading
from laser_jax.evaluation import report

# The paper's column headers.
DISPLAY_NAMES = {"math500": "MATH500", "aime24": "AIME24", "aime25": "AIME25", "amc23": "AMC23",
                 "olympiadbench": "OlympiadBench"}
# The table's rows: (summary key, row label).
ROWS = (("reward/mean", "Accuracy (mean@n)"), ("self_verification/f1", "Self-verification F1"))
# The settings a resumed set's summary must share with this run: they change its numbers.
SETTINGS = ("model", "laser", "eval.max_new_tokens", "eval.temperature", "eval.top_p", "eval.top_k",
            "eval.greedy", "eval.template", "eval.max_prompt_len", "eval.seed", "eval.limit",
            "eval.reward_fn", "eval.threshold", "eval.score_truncated", "eval.num_bootstrap",
            "eval.bootstrap_seed")


@dataclasses.dataclass(frozen=True)
class TableSet:
  """One column of the table: an eval set, its samples per problem and its output file."""
  name: str
  n: int
  output_file: str

  @property
  def summary_file(self) -> str:
    return report.summary_path(self.output_file)


def table_sets(config: ml_collections.ConfigDict) -> list[TableSet]:
  """The columns `config.table` asks for, validated (ConfigError naming the key)."""
  t = config.table
  names = [s.strip().lower() for s in t.sets.split(",") if s.strip()]
  if not names:
    raise ConfigError(f"config.table.sets: no eval set named (got {t.sets!r})")
  for name in names:
    if name not in eval_sets.EVAL_SETS:
      raise ConfigError(f"config.table.sets: unknown eval set {name!r} (expected some of "
                        f"{', '.join(eval_sets.EVAL_SETS)})")
  if len(set(names)) != len(names):
    raise ConfigError(f"config.table.sets: a set is named twice (got {t.sets!r})")
  ns = tuple(t.n)
  if len(ns) != len(names) or not all(isinstance(n, int) and n >= 1 for n in ns):
    raise ConfigError(f"config.table.n: one n >= 1 per set of config.table.sets ({len(names)}), got {ns!r}")
  if not t.output_dir:
    raise ConfigError("config.table.output_dir: empty; give the directory of the table's files")
  return [TableSet(name, n, os.path.join(t.output_dir, f"{name}.jsonl")) for name, n in zip(names, ns)]


def set_config(config: ml_collections.ConfigDict, column: TableSet) -> ml_collections.ConfigDict:
  """The eval config of one column: `config` with its set, n and output file."""
  c = config.copy_and_resolve_references()
  c.eval.input_file, c.eval.n, c.eval.output_file = column.name, column.n, column.output_file
  return c


def _settings(config_dict: dict) -> dict:
  """The values of `SETTINGS` in a (JSON-normalised) config dict."""
  out = {}
  for key in SETTINGS:
    value = config_dict
    for part in key.split("."):
      value = value.get(part) if isinstance(value, dict) else None
    out[key] = value
  return json.loads(json.dumps(report.json_safe(out)))


def finished_summary(config: ml_collections.ConfigDict, column: TableSet) -> dict | None:
  """The summary of a column already evaluated with these settings, or None when the set has
  not been written yet; ConfigError if it was written with other settings."""
  if not (os.path.isfile(column.output_file) and os.path.isfile(column.summary_file)):
    return None
  with open(column.summary_file) as f:
    summary = json.load(f)
  want = _settings(set_config(config, column).to_dict())
  got = _settings(summary.get("config", {}))
  changed = [k for k in SETTINGS if want[k] != got[k]]
  if summary.get("n") != column.n:
    changed.insert(0, f"n ({summary.get('n')}, config.table.n asks {column.n})")
  if changed:
    raise ConfigError(f"config.table.output_dir: {column.summary_file} was written with other settings "
                      f"({', '.join(changed)}); use another table.output_dir or delete that set's files")
  return summary


def build_table(columns: list[TableSet], summaries: dict[str, dict]) -> dict:
  """The table record: per row (summary key), each set's value and their average; each set's n,
  files and whole summary."""
  table = {"sets": [c.name for c in columns]}
  for key, _ in ROWS:
    values = {c.name: summaries[c.name].get(key) for c in columns}
    finite = [v is not None and math.isfinite(v) for v in values.values()]
    values["average"] = float(np.mean(list(values.values()))) if all(finite) else None
    table[key] = values
  table["per_set"] = {c.name: {"n": c.n, "output_file": c.output_file, "summary_file": c.summary_file,
                               "summary": summaries[c.name]} for c in columns}
  return table


def format_table(table: dict) -> str:
  """The paper's layout: one column per set and the average, rows accuracy and F1 (in %)."""
  headers = [DISPLAY_NAMES.get(s, s) for s in table["sets"]] + ["Avg."]
  widths = [max(len(h), 7) for h in headers]
  cell = lambda v, w: f"{'n/a' if v is None else f'{100 * v:.1f}':>{w}}"
  lines = [f"{'':22}" + "".join(f"  {h:>{w}}" for h, w in zip(headers, widths)),
           f"{'n':22}" + "".join(f"  {table['per_set'][s]['n']:>{w}}" for s, w in zip(table["sets"], widths))]
  for key, label in ROWS:
    values = [table[key][s] for s in table["sets"]] + [table[key]["average"]]
    lines.append(f"{label:22}" + "".join(f"  {cell(v, w)}" for v, w in zip(values, widths)))
  return "\n".join(lines)


def table_path(config: ml_collections.ConfigDict) -> str:
  return os.path.join(config.table.output_dir, "table.json")


def run(config: ml_collections.ConfigDict, *, progress: bool = True, print_table: bool = True,
        model: loading.LoadedModel | None = None) -> dict:
  """Evaluates the sets of `config.table` not already written (one model load for all), writes
  table.json and prints the table; returns the table record (`build_table`)."""
  columns = table_sets(config)
  summaries = {c.name: finished_summary(config, c) for c in columns}
  todo = [c for c in columns if summaries[c.name] is None]
  for column in todo:  # A missing set fails before the model loads.
    evaluator.load_problems(column.name, config.eval.limit, config.eval.data_dir)
  if todo and model is None:
    model = loading.load_model(config)
  for column in todo:
    summaries[column.name] = evaluator.run(set_config(config, column), progress=progress, print_table=False,
                                           model=model)
  table = build_table(columns, summaries)
  os.makedirs(config.table.output_dir, exist_ok=True)
  path = table_path(config)
  with open(path + ".tmp", "w") as f:
    json.dump(report.json_safe(table), f, indent=2, allow_nan=False)
  os.replace(path + ".tmp", path)
  if print_table:
    print(format_table(table), flush=True)
    print(f"table: {path}", flush=True)
  return table
