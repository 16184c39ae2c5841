"""Data: readers and their errors, eval sets (where they are found, the fetch command), tfds
backend, prompts, the resumable iterator."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laser_jax import default_config
from laser_jax.config_check import ConfigError
from laser_jax.data import eval_sets as eval_sets_lib
from laser_jax.data import iterator as iterator_lib
from laser_jax.data import prompts as prompts_lib
from laser_jax.data import records as records_lib
from laser_jax.data import synthetic
from laser_jax.data import tfds_records
from test_sources import gcs, hub_cache, jsonl_bytes, parquet_bytes, put_in_hub_cache  # noqa: F401 (fixtures)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"  # the release's eval set files (reference only)


def _write_jsonl(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return path


def test_read_jsonl_and_int_answers(tmp_path):
  p = _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"problem": "1+1?", "answer": "2"}), "",
                                          json.dumps({"problem": "AIME", "answer": 70, "id": 3})])
  assert records_lib.read_records(p) == [{"problem": "1+1?", "answer": "2"},
                                  {"problem": "AIME", "answer": "70"}]


@pytest.mark.parametrize("line,message", [
    ('{"problem": "x", "answer": "1"', r"a\.jsonl:2: invalid JSON"),
    ('{"problem": "x"}', r"a\.jsonl:2: missing field 'answer'"),
    ('{"problem": 5, "answer": "1"}', r"a\.jsonl:2: field 'problem' must be a non-empty string"),
    ('{"problem": "x", "answer": null}', r"a\.jsonl:2: field 'answer' must be"),
    ('{"problem": "x", "answer": ["1"]}', r"a\.jsonl:2: field 'answer' must be"),
    ('[1, 2]', r"a\.jsonl:2: expected a JSON object, got list"),
])
def test_read_jsonl_malformed(tmp_path, line, message):
  p = _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"problem": "ok", "answer": "1"}), line])
  with pytest.raises(records_lib.DataError, match=message) as e:
    records_lib.read_records(p)
  assert "\n" not in str(e.value)


def test_read_parquet_deepmath_fields(tmp_path):
  p = tmp_path / "deepmath.parquet"
  pq.write_table(pa.table({"question": ["q1", "q2"], "final_answer": ["1", "\\frac12"],
                           "difficulty": [3.0, 5.5]}), p)
  assert records_lib.read_records(p, fields="deepmath") == [{"problem": "q1", "answer": "1"},
                                                     {"problem": "q2", "answer": "\\frac12"}]
  with pytest.raises(records_lib.DataError, match=r"deepmath\.parquet: missing column\(s\) \['problem'"):
    records_lib.read_records(p)
  bad = tmp_path / "bad.parquet"
  pq.write_table(pa.table({"problem": ["q1", "q2"], "answer": ["1", None]}), bad)
  with pytest.raises(records_lib.DataError, match=r"bad\.parquet:2: field 'answer'"):
    records_lib.read_records(bad)


def test_read_records_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="data file not found"):
    records_lib.read_records(tmp_path / "nope.jsonl")
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(records_lib.DataError, match="unsupported file type '.csv'"):
    records_lib.read_records(tmp_path / "x.csv")
  with pytest.raises(ValueError, match="unknown field preset 'deep'"):
    records_lib.read_records(_write_jsonl(tmp_path / "y.jsonl", ["{}"]), fields="deep")


def test_eval_sets_row_counts():
  counts = {name: len(eval_sets_lib.load_eval_set(name)) for name in eval_sets_lib.EVAL_SETS}
  # OlympiadBench: counted from the file (675 lines, all valid rows).
  assert counts == {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "olympiadbench": 675}
  assert eval_sets_lib.load_eval_set("MATH500")[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"


def test_eval_set_dir_errors(tmp_path, monkeypatch):
  monkeypatch.setenv(eval_sets_lib.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="eval set 'aime24'.*LASER_JAX_DATA_DIR") as e:
    eval_sets_lib.load_eval_set("aime24")
  assert isinstance(e.value, ConfigError)  # exit 2 on the command line; notebooks catch FileNotFoundError
  (tmp_path / "aime24").mkdir()
  _write_jsonl(tmp_path / "aime24" / "test.jsonl", [json.dumps({"problem": "p", "answer": 1})])
  assert eval_sets_lib.load_eval_set("aime24") == [{"problem": "p", "answer": "1"}]
  with pytest.raises(ValueError, match="unknown eval set 'gsm8k'"):
    eval_sets_lib.load_eval_set("gsm8k")


def _eval_set(root, name, records):
  (root / eval_sets_lib.EVAL_SETS[name]).mkdir(parents=True, exist_ok=True)
  _write_jsonl(root / eval_sets_lib.EVAL_SETS[name] / "test.jsonl", [json.dumps(r) for r in records])


def test_eval_sets_are_found_by_key_else_env_else_user_cache(tmp_path, monkeypatch):
  """One resolution for the trainer (data.eval_set / data.eval_data_dir) and the evaluator
  (eval.input_file / eval.data_dir): the key, else $LASER_JAX_DATA_DIR, else the user cache."""
  from laser_jax.evaluation import evaluator
  from laser_jax.training import tasks
  keyed, env, xdg = tmp_path / "keyed", tmp_path / "env", tmp_path / "xdg"
  for root, answer in ((keyed, "1"), (env, "2"), (xdg / "laser_jax" / "eval_sets", "3")):
    _eval_set(root, "amc23", [{"id": 0, "problem": "p", "answer": answer}])
  monkeypatch.setenv(eval_sets_lib.DATA_DIR_ENV, str(env))
  monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
  c = default_config.get_config()
  c.data.eval_set = "AMC23"
  assert tasks._eval_records(c) == evaluator.load_problems("amc23") == [{"problem": "p", "answer": "2"}]
  c.data.eval_data_dir = str(keyed)
  assert tasks._eval_records(c) == evaluator.load_problems("amc23", data_dir=str(keyed)) == \
      [{"problem": "p", "answer": "1"}]
  monkeypatch.delenv(eval_sets_lib.DATA_DIR_ENV)
  assert evaluator.load_problems("amc23") == [{"problem": "p", "answer": "3"}]
  # A missing set: one line naming the key, the path looked at and the command that fetches it.
  with pytest.raises(ConfigError) as e:
    evaluator.load_problems("olympiadbench", data_dir=str(keyed))
  assert str(e.value) == (
      f"config.eval.input_file: eval set 'olympiadbench' not found at {keyed}/OlympiadBench/test.jsonl "
      f"(looked up in config.eval.data_dir, else $LASER_JAX_DATA_DIR, else {xdg}/laser_jax/eval_sets); "
      f"fetch it with: python -m laser_jax.data fetch --out={keyed} --sets=olympiadbench")
  c.data.eval_set = "aime25"
  with pytest.raises(ConfigError, match=r"^config\.data\.eval_set: eval set 'aime25' not found .*"
                     r"config\.data\.eval_data_dir.*fetch --out="):
    tasks._eval_records(c)


# The hub datasets `python -m laser_jax.data fetch` reads, in their own layouts (EVAL_SET_SOURCES),
# built from the first rows of the reference files: fetched, they must give those rows back.
def _as_hub_dataset(name, rows):
  if name == "math500":
    return {"test.jsonl": jsonl_bytes(rows)}
  if name == "aime24":  # parquet, int ids, string answers, with solution / url / year
    return {"data/train-00000-of-00001.parquet": parquet_bytes(
        [{**r, "solution": "...", "url": "https://aops", "year": "2024"} for r in rows])}
  if name == "aime25":  # JSON lines, int answers, string ids
    return {"test.jsonl": jsonl_bytes(rows)}
  if name == "amc23":  # parquet, `question`, float answers
    return {"test-00000-of-00001.parquet": parquet_bytes(
        [{"id": r["id"], "question": r["problem"], "answer": float(r["answer"]), "url": "u"} for r in rows])}
  return {"test.jsonl": jsonl_bytes(  # OlympiadBench: `question`, final_answer a list of "$...$"
      [{"id": r["id"], "question": r["problem"], "solution": ["..."], "final_answer": [f"${r['answer']}$"],
        "is_multiple_answer": False} for r in rows])}


@pytest.fixture
def hub_eval_sets(hub_cache):
  expected = {}
  for name, (address, *_) in eval_sets_lib.EVAL_SET_SOURCES.items():
    rows = [json.loads(line) for line in open(SHARED / eval_sets_lib.EVAL_SETS[name] / "test.jsonl")][:3]
    repo_id, _, revision = address.partition("@")
    put_in_hub_cache(hub_cache, "dataset", repo_id, _as_hub_dataset(name, rows), revision)
    expected[name] = rows
  return expected


def test_fetch_command_writes_the_eval_sets_from_the_hub_offline(hub_eval_sets, tmp_path):
  out = tmp_path / "eval_sets"
  proc = subprocess.run([sys.executable, "-m", "laser_jax.data", "fetch", f"--out={out}"], cwd=REPO,
                        env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name, rows in hub_eval_sets.items():
    assert eval_sets_lib.load_eval_set(name, str(out)) == records_lib.read_jsonl(_write_jsonl(
        tmp_path / f"{name}.jsonl", [json.dumps(r) for r in rows])), name
    written = [json.loads(line) for line in open(out / eval_sets_lib.EVAL_SETS[name] / "test.jsonl")]
    id_key = "unique_id" if name == "math500" else "id"
    assert [r["id"] for r in written] == [r[id_key] for r in rows]
    assert set(written[0]) == {"id", "problem", "answer"}
  assert "olympiadbench: 3 problems from math-ai/olympiadbench@main" in proc.stdout


def test_fetch_subsets_to_gs_and_bad_input(hub_eval_sets, gcs, tmp_path, hub_cache):
  from laser_jax.data import eval_fetch
  from laser_jax.training import tasks
  written = eval_fetch.fetch("gs://bucket/eval", eval_fetch.parse_sets("AIME25, math500"))
  assert sorted(written) == sorted(os.listdir(gcs / "bucket" / "eval")) == ["aime25", "math500"]
  c = default_config.get_config()
  c.data.eval_set, c.data.eval_data_dir = "aime25", "gs://bucket/eval"  # read back through gs://
  assert tasks._eval_records(c) == [{"problem": r["problem"], "answer": str(r["answer"])}
                                    for r in hub_eval_sets["aime25"]]
  with pytest.raises(ConfigError, match=r"^--sets=math500,gsm8k: unknown eval set\(s\) \['gsm8k'\]"):
    eval_fetch.parse_sets("math500,gsm8k")
  shutil.rmtree(hub_cache / "datasets--math-ai--amc23")  # not cached, offline: nothing is written
  with pytest.raises(ConfigError, match=r"^--sets=amc23: 'math-ai/amc23@80815d.*' is not in the Hugging Face cache"):
    eval_fetch.fetch(str(tmp_path / "out"), ["math500", "amc23"])
  assert not (tmp_path / "out").exists()


def test_tfds_backend_matches_reader(tmp_path):
  records = tfds_records.build_tfds("aime25", tmp_path / "tfds")
  assert len(records) == 30
  assert list(records) == eval_sets_lib.load_eval_set("aime25")  # same rows, same order
  user = _write_jsonl(tmp_path / "u.jsonl", [json.dumps({"question": f"q{i}", "final_answer": i})
                                             for i in range(7)])
  recs = tfds_records.build_tfds(user, tmp_path / "tfds", fields="deepmath")
  assert recs[3] == {"problem": "q3", "answer": "3"} and len(recs) == 7
  # An edited file is rebuilt, not served from the stale cache.
  _write_jsonl(user, [json.dumps({"question": "new", "final_answer": 1})])
  assert list(tfds_records.build_tfds(user, tmp_path / "tfds", fields="deepmath")) == \
      [{"problem": "new", "answer": "1"}]


@pytest.fixture(scope="module")
def tokenizer():
  return synthetic.build_tokenizer()


def test_build_prompt(tokenizer):
  chat = prompts_lib.build_prompt("What is 2+3?", tokenizer, "chat")
  assert chat == ("<|bos|><|user|>What is 2+3?\nPlease reason step by step, and put your final "
                  "answer within \\boxed{}.<|assistant|>")
  assert prompts_lib.build_prompt("What is 2+3?", tokenizer, "base") == \
      "What is 2+3?\n" + prompts_lib.INSTRUCTION + "\n"
  with pytest.raises(ValueError, match="unknown prompt template 'qwen'"):
    prompts_lib.build_prompt("x", tokenizer, "qwen")
  tokenizer_without_template = synthetic.build_tokenizer()
  tokenizer_without_template.chat_template = None
  with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
    prompts_lib.build_prompt("x", tokenizer_without_template, "chat")


def test_prepare_prompts_filters_long(tokenizer):
  records = [{"problem": "What is 1+1?", "answer": "2"},
             {"problem": "What is 12345678+1?", "answer": "12345679"}]
  short_len = len(prompts_lib.encode_prompt(prompts_lib.build_prompt(records[0]["problem"], tokenizer),
                                            tokenizer))
  prepared = prompts_lib.prepare_prompts(records, tokenizer, max_prompt_len=short_len)
  assert prepared.num_filtered == 1 and len(prepared.items) == 1
  item = prepared.items[0]
  assert item["index"] == 0 and len(item["prompt_ids"]) == short_len
  assert tokenizer.decode(item["prompt_ids"]) == item["prompt"]
  assert prompts_lib.prepare_prompts(records, tokenizer).num_filtered == 0


def _drain(it, k=None):
  out = []
  for batch in it:
    out.append(batch)
    if k is not None and len(out) == k:
      break
  return out


def test_iterator_restore_is_exact():
  items = list(range(23))
  full = _drain(iterator_lib.PromptIterator(items, batch_size=4, seed=7, num_epochs=3))
  assert len(full) == 3 * 5  # 23 // 4 = 5 batches per epoch, remainder dropped
  for k in (0, 3, 5, 7, 14):
    it = iterator_lib.PromptIterator(items, batch_size=4, seed=7, num_epochs=3)
    head = _drain(it, k) if k else []
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip
    resumed = iterator_lib.PromptIterator(items, batch_size=4, seed=7, num_epochs=3)
    resumed.set_state(state)
    assert head + _drain(resumed) == full, k


def test_iterator_shuffles_per_epoch_deterministically():
  items = list(range(16))
  a = _drain(iterator_lib.PromptIterator(items, batch_size=16, seed=1, num_epochs=2))
  b = _drain(iterator_lib.PromptIterator(items, batch_size=16, seed=1, num_epochs=2))
  c = _drain(iterator_lib.PromptIterator(items, batch_size=16, seed=2, num_epochs=1))
  assert a == b and sorted(a[0]) == items and sorted(a[1]) == items
  assert a[0] != a[1] and a[0] != c[0] and a[0] != items
  assert _drain(iterator_lib.PromptIterator(items, 16, shuffle=False)) == [items]


def test_iterator_sharding_two_hosts_is_disjoint_and_covering():
  items = list(range(20))
  for epoch in range(2):
    shards = []
    for host in range(2):
      it = iterator_lib.PromptIterator(items, batch_size=5, seed=3, num_epochs=2, process_index=host,
                               process_count=2)
      batches = _drain(it)
      assert len(batches) == 4
      shards.append([x for b in batches[2 * epoch:2 * epoch + 2] for x in b])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == items


def _global_batches(iterators, count):
  """`count` global batches of host iterators: the hosts' blocks in process order."""
  return [[x for it in iterators for x in next(it)] for _ in range(count)]


def test_iterator_state_saved_on_some_hosts_restores_on_any_host_count():
  items = list(range(203))  # 203 // 12 = 16 batches per epoch for 1, 2, 3, 4 or 6 hosts alike.
  def hosts(count):
    return [iterator_lib.PromptIterator(items, 12 // count, seed=5, num_epochs=None, process_index=p,
                                process_count=count) for p in range(count)]
  full = _global_batches(hosts(1), 40)  # Two and a half epochs.
  for saved_on, resumed_on, k in ((4, 1, 7), (1, 4, 16), (2, 3, 23), (6, 2, 35)):
    before = hosts(saved_on)
    head = _global_batches(before, k)
    state = json.loads(json.dumps(before[0].get_state()))
    assert state["global_batch_size"] == 12 and state["process_count"] == saved_on
    after = hosts(resumed_on)
    for it in after:
      it.set_state(state)
    assert head + _global_batches(after, 40 - k) == full, (saved_on, resumed_on, k)
  # Another global batch size is another data position: refused, whatever the host count.
  with pytest.raises(ValueError, match="state global_batch_size=12 does not match this iterator's global_batch_size=8"):
    iterator_lib.PromptIterator(items, 4, seed=5, process_index=0, process_count=2).set_state(state)
  # A state from before global_batch_size was recorded restores on its own host count only.
  old = {key: value for key, value in state.items() if key != "global_batch_size"}
  hosts(state["process_count"])[0].set_state(old)
  with pytest.raises(ValueError, match="state process_count=6 does not match this iterator's process_count=1"):
    hosts(1)[0].set_state({**old, "process_count": 6})


def test_iterator_errors():
  with pytest.raises(ValueError, match="10 items are fewer than one global batch of 8 x 2 host"):
    iterator_lib.PromptIterator(list(range(10)), batch_size=8, process_count=2)
  with pytest.raises(ValueError, match="process_index 2 not in"):
    iterator_lib.PromptIterator(list(range(10)), batch_size=1, process_index=2, process_count=2)
  it = iterator_lib.PromptIterator(list(range(10)), batch_size=2, seed=0)
  with pytest.raises(ValueError, match="state seed=1 does not match this iterator's seed=0"):
    it.set_state({**it.get_state(), "seed": 1})
  with pytest.raises(ValueError, match="num_items=11"):
    it.set_state({**it.get_state(), "num_items": 11})
