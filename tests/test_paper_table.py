"""The paper's table from one command (`configs/eval.py:paper`), end to end on a tiny model and five
tiny eval sets: every column and row printed, the figures those of each set's own summary, one JSON,
and a rerun that redoes nothing (in process and through `python -m laser_jax.evaluate`)."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import numpy_reference
from laser_jax.config_check import ConfigError
from laser_jax.data import eval_sets
from laser_jax.evaluation import evaluator
from laser_jax.evaluation import loading
from laser_jax.evaluation import paper_table
from test_evaluate import PROBLEMS, make_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = ("math500", "aime24", "aime25", "amc23", "olympiadbench")
HEADERS = ("MATH500", "AIME24", "AIME25", "AMC23", "OlympiadBench", "Avg.")


def paper_config():
  """`--config=configs/eval.py:paper`: get_config("paper") of the eval config file."""
  spec = importlib.util.spec_from_file_location("_eval_config", os.path.join(REPO, "configs", "eval.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("paper")


def test_paper_preset_is_the_papers_protocol_and_each_set_gets_its_n():
  c = paper_config()
  assert c.table.sets.split(",") == list(SETS) == list(eval_sets.EVAL_SETS)
  assert tuple(c.table.n) == (2, 32, 32, 32, 2)
  assert (c.eval.temperature, c.eval.max_new_tokens, c.eval.template) == (1.0, 8192, "chat")
  c.table.output_dir = "/tmp/t"
  per_set = [paper_table.set_config(c, column).eval for column in paper_table.table_sets(c)]
  assert [(e.input_file, e.n, e.output_file) for e in per_set] == [
      ("math500", 2, "/tmp/t/math500.jsonl"), ("aime24", 32, "/tmp/t/aime24.jsonl"),
      ("aime25", 32, "/tmp/t/aime25.jsonl"), ("amc23", 32, "/tmp/t/amc23.jsonl"),
      ("olympiadbench", 2, "/tmp/t/olympiadbench.jsonl")]
  assert c.eval.n == 2 and c.eval.input_file == "math500"  # the config itself is left as it was


def parity_reward_none_right_in_olympiadbench(response: str, reference: str) -> float:
  """A reward a random model scores non-trivially on, except for the problems whose answer is
  "none": OlympiadBench's here, a set with no correct response (an empty class)."""
  return 0.0 if reference == "none" else float(len(response) % 2 == 0)


# The tiny run's overrides, as flags (the CLI rerun passes the same). One n for every set (one
# sampler compilation, seconds matter), 3 rather than eval.n's 2: the outputs show table.n is used.
# The score's constants put this random model's scores on both sides of 0.5 (test_evaluate.py).
def tiny_overrides(ckpt, data_dir, out_dir):
  return {"model.hf_path": ckpt, "eval.data_dir": str(data_dir), "table.output_dir": str(out_dir),
          "table.n": (3, 3, 3, 3, 3), "eval.max_new_tokens": 8, "eval.batch_size": 2, "eval.num_workers": 0,
          "eval.reward_fn": "test_paper_table:parity_reward_none_right_in_olympiadbench",
          "eval.num_bootstrap": 10, "laser.kl_coef": 1.0, "laser.ref_constant": -9.8}


def write_sets(data_dir):
  """Five tiny sets where `python -m laser_jax.data fetch` puts them: <dir>/<set dir>/test.jsonl."""
  for i, name in enumerate(SETS):
    os.makedirs(data_dir / eval_sets.EVAL_SETS[name])
    with open(data_dir / eval_sets.EVAL_SETS[name] / "test.jsonl", "w") as f:
      for problem, answer in PROBLEMS[i % 4:i % 4 + 2]:
        answer = "none" if name == "olympiadbench" else answer
        f.write(json.dumps({"problem": f"{problem} ({name})", "answer": answer}) + "\n")


def test_paper_table_end_to_end_prints_every_column_and_resumes(tmp_path, capsys, monkeypatch):
  ckpt = make_checkpoint(tmp_path / "ckpt")
  write_sets(tmp_path / "data")
  overrides = tiny_overrides(ckpt, tmp_path / "data", tmp_path / "table")
  config = paper_config()
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  table = paper_table.run(config, progress=False)
  printed = capsys.readouterr().out

  # One row of headers with every set and the average; the n row; accuracy and F1 per set, in %.
  lines = printed.splitlines()
  assert lines[0].split() == list(HEADERS)
  assert lines[1].split() == ["n", "3", "3", "3", "3", "3"]
  for (key, label), line in zip(paper_table.ROWS, lines[2:4]):
    assert line.startswith(label)
    cells = line[len(label):].split()
    values = [table["per_set"][s]["summary"][key] for s in SETS]
    assert cells == [f"{100 * v:.1f}" for v in values + [np.mean(values)]], key
  on_disk = json.loads((tmp_path / "table" / "table.json").read_text())
  assert on_disk == json.loads(json.dumps(table))
  for name, n in zip(SETS, overrides["table.n"]):
    files = on_disk["per_set"][name]
    rows = [json.loads(line) for line in open(files["output_file"])]
    assert len(rows) == 2 and all(len(r["responses"]) == n for r in rows)
    assert all(f"({name})" in r["problem"] and "Please reason step by step" in r["prompt"] for r in rows)
    assert json.loads(open(files["summary_file"]).read()) == files["summary"]
    assert files["summary"]["n"] == n and on_disk["reward/mean"][name] == files["summary"]["reward/mean"]
    assert files["summary"]["config"]["eval"]["temperature"] == 1.0
    # The F1 in the table is the official one of the set's every response (NumPy, from the SPEC).
    scores = [np.nan if x is None else x for r in rows for x in r["self_rewarding_scores"]]
    want_f1 = numpy_reference.self_verification_official(scores, [a for r in rows for a in r["acc_list"]])[3]
    assert on_disk["self_verification/f1"][name] == pytest.approx(want_f1)
  assert on_disk["self_verification/f1"]["average"] == pytest.approx(
      np.mean([on_disk["self_verification/f1"][s] for s in SETS]))
  # No correct response in this OlympiadBench: the official conventions give its F1 as 0 (an
  # empty class has accuracy 0), a number in the table rather than "n/a".
  olympiad = on_disk["per_set"]["olympiadbench"]["summary"]
  assert olympiad["self_verification/num_correct"] == 0 and olympiad["self_verification/f1"] == 0.0
  assert olympiad["self_verification/f1_finished"] is None  # NaN over the finished ones: no data

  # A rerun redoes nothing: no model load, no evaluation, no file rewritten.
  mtimes = {p: os.stat(tmp_path / "table" / p).st_mtime_ns for p in os.listdir(tmp_path / "table")}

  def must_not_run(*args, **kwargs):
    raise AssertionError("a finished set was evaluated again")
  with monkeypatch.context() as m:
    m.setattr(loading, "load_model", must_not_run)
    m.setattr(evaluator, "run", must_not_run)
    again = paper_table.run(config, progress=False)
  assert json.loads(json.dumps(again)) == on_disk and capsys.readouterr().out == printed
  # The command line, as a user reruns it: the same table printed, the sets' files untouched.
  flags = [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in overrides.items()]
  proc = subprocess.run([sys.executable, "-m", "laser_jax.evaluate", "--config=configs/eval.py:paper", *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith(printed)
  assert all(os.stat(tmp_path / "table" / p).st_mtime_ns == t for p, t in mtimes.items() if p != "table.json")

  # A partial table resumes: only the set whose files are gone is evaluated again.
  os.remove(tmp_path / "table" / "aime25.summary.json")
  ran = []
  real_run = evaluator.run
  monkeypatch.setattr(evaluator, "run", lambda c, **kw: ran.append(c.eval.input_file) or real_run(c, **kw))
  resumed = paper_table.run(config, progress=False, print_table=False)
  assert ran == ["aime25"] and resumed["reward/mean"] == table["reward/mean"]  # the same seed: the same samples

  # A set written with other settings is not mixed into the table: one error naming the key.
  config.eval.temperature = 0.7
  with pytest.raises(ConfigError, match=r"config\.table\.output_dir: .*math500\.summary\.json .*eval\.temperature"):
    paper_table.run(config, progress=False)


@pytest.mark.parametrize("key, value, message", [
    ("table.sets", "math500,gsm8k", "config.table.sets: unknown eval set 'gsm8k'"),
    ("table.n", (2, 32), "config.table.n: one n >= 1 per set of config.table.sets (5)"),
    ("table.sets", "math500,math500", "config.table.sets: a set is named twice"),
])
def test_bad_table_keys_are_one_line_errors(key, value, message):
  config = paper_config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    paper_table.table_sets(config)
