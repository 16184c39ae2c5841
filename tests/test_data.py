"""Data: readers and their errors, eval sets, tfds backend, prompts, the resumable iterator."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laser_jax import data, synthetic


def _write_jsonl(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return path


def test_read_jsonl_and_int_answers(tmp_path):
  p = _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"problem": "1+1?", "answer": "2"}), "",
                                          json.dumps({"problem": "AIME", "answer": 70, "id": 3})])
  assert data.read_records(p) == [{"problem": "1+1?", "answer": "2"},
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
  with pytest.raises(data.DataError, match=message) as e:
    data.read_records(p)
  assert "\n" not in str(e.value)


def test_read_parquet_deepmath_fields(tmp_path):
  p = tmp_path / "deepmath.parquet"
  pq.write_table(pa.table({"question": ["q1", "q2"], "final_answer": ["1", "\\frac12"],
                           "difficulty": [3.0, 5.5]}), p)
  assert data.read_records(p, fields="deepmath") == [{"problem": "q1", "answer": "1"},
                                                     {"problem": "q2", "answer": "\\frac12"}]
  with pytest.raises(data.DataError, match=r"deepmath\.parquet: missing column\(s\) \['problem'"):
    data.read_records(p)
  bad = tmp_path / "bad.parquet"
  pq.write_table(pa.table({"problem": ["q1", "q2"], "answer": ["1", None]}), bad)
  with pytest.raises(data.DataError, match=r"bad\.parquet:2: field 'answer'"):
    data.read_records(bad)


def test_read_records_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="data file not found"):
    data.read_records(tmp_path / "nope.jsonl")
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(data.DataError, match="unsupported file type '.csv'"):
    data.read_records(tmp_path / "x.csv")
  with pytest.raises(ValueError, match="unknown field preset 'deep'"):
    data.read_records(_write_jsonl(tmp_path / "y.jsonl", ["{}"]), fields="deep")


def test_eval_sets_row_counts():
  counts = {name: len(data.load_eval_set(name)) for name in data.EVAL_SETS}
  # OlympiadBench: counted from the file (675 lines, all valid rows).
  assert counts == {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "olympiadbench": 675}
  assert data.load_eval_set("MATH500")[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"


def test_eval_set_dir_errors(tmp_path, monkeypatch):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="eval set 'aime24'.*LASER_JAX_DATA_DIR"):
    data.load_eval_set("aime24")
  (tmp_path / "aime24").mkdir()
  _write_jsonl(tmp_path / "aime24" / "test.jsonl", [json.dumps({"problem": "p", "answer": 1})])
  assert data.load_eval_set("aime24") == [{"problem": "p", "answer": "1"}]
  with pytest.raises(ValueError, match="unknown eval set 'gsm8k'"):
    data.load_eval_set("gsm8k")


def test_tfds_backend_matches_reader(tmp_path):
  records = data.build_tfds("aime25", tmp_path / "tfds")
  assert len(records) == 30
  assert list(records) == data.load_eval_set("aime25")  # same rows, same order
  user = _write_jsonl(tmp_path / "u.jsonl", [json.dumps({"question": f"q{i}", "final_answer": i})
                                             for i in range(7)])
  recs = data.build_tfds(user, tmp_path / "tfds", fields="deepmath")
  assert recs[3] == {"problem": "q3", "answer": "3"} and len(recs) == 7
  # An edited file is rebuilt, not served from the stale cache.
  _write_jsonl(user, [json.dumps({"question": "new", "final_answer": 1})])
  assert list(data.build_tfds(user, tmp_path / "tfds", fields="deepmath")) == \
      [{"problem": "new", "answer": "1"}]


@pytest.fixture(scope="module")
def tokenizer():
  return synthetic.build_tokenizer()


def test_build_prompt(tokenizer):
  chat = data.build_prompt("What is 2+3?", tokenizer, "chat")
  assert chat == ("<|bos|><|user|>What is 2+3?\nPlease reason step by step, and put your final "
                  "answer within \\boxed{}.<|assistant|>")
  assert data.build_prompt("What is 2+3?", tokenizer, "base") == \
      "What is 2+3?\n" + data.INSTRUCTION + "\n"
  with pytest.raises(ValueError, match="unknown prompt template 'qwen'"):
    data.build_prompt("x", tokenizer, "qwen")
  tokenizer_without_template = synthetic.build_tokenizer()
  tokenizer_without_template.chat_template = None
  with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
    data.build_prompt("x", tokenizer_without_template, "chat")


def test_prepare_prompts_filters_long(tokenizer):
  records = [{"problem": "What is 1+1?", "answer": "2"},
             {"problem": "What is 12345678+1?", "answer": "12345679"}]
  short_len = len(data.encode_prompt(data.build_prompt(records[0]["problem"], tokenizer), tokenizer))
  prepared = data.prepare_prompts(records, tokenizer, max_prompt_len=short_len)
  assert prepared.num_filtered == 1 and len(prepared.items) == 1
  item = prepared.items[0]
  assert item["index"] == 0 and len(item["prompt_ids"]) == short_len
  assert tokenizer.decode(item["prompt_ids"]) == item["prompt"]
  assert data.prepare_prompts(records, tokenizer).num_filtered == 0


def _drain(it, k=None):
  out = []
  for batch in it:
    out.append(batch)
    if k is not None and len(out) == k:
      break
  return out


def test_iterator_restore_is_exact():
  items = list(range(23))
  full = _drain(data.PromptIterator(items, batch_size=4, seed=7, num_epochs=3))
  assert len(full) == 3 * 5  # 23 // 4 = 5 batches per epoch, remainder dropped
  for k in (0, 3, 5, 7, 14):
    it = data.PromptIterator(items, batch_size=4, seed=7, num_epochs=3)
    head = _drain(it, k) if k else []
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip
    resumed = data.PromptIterator(items, batch_size=4, seed=7, num_epochs=3)
    resumed.set_state(state)
    assert head + _drain(resumed) == full, k


def test_iterator_shuffles_per_epoch_deterministically():
  items = list(range(16))
  a = _drain(data.PromptIterator(items, batch_size=16, seed=1, num_epochs=2))
  b = _drain(data.PromptIterator(items, batch_size=16, seed=1, num_epochs=2))
  c = _drain(data.PromptIterator(items, batch_size=16, seed=2, num_epochs=1))
  assert a == b and sorted(a[0]) == items and sorted(a[1]) == items
  assert a[0] != a[1] and a[0] != c[0] and a[0] != items
  assert _drain(data.PromptIterator(items, 16, shuffle=False)) == [items]


def test_iterator_sharding_two_hosts_is_disjoint_and_covering():
  items = list(range(20))
  for epoch in range(2):
    shards = []
    for host in range(2):
      it = data.PromptIterator(items, batch_size=5, seed=3, num_epochs=2, process_index=host,
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
    return [data.PromptIterator(items, 12 // count, seed=5, num_epochs=None, process_index=p,
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
    data.PromptIterator(items, 4, seed=5, process_index=0, process_count=2).set_state(state)
  # A state from before global_batch_size was recorded restores on its own host count only.
  old = {key: value for key, value in state.items() if key != "global_batch_size"}
  hosts(state["process_count"])[0].set_state(old)
  with pytest.raises(ValueError, match="state process_count=6 does not match this iterator's process_count=1"):
    hosts(1)[0].set_state({**old, "process_count": 6})


def test_iterator_errors():
  with pytest.raises(ValueError, match="10 items are fewer than one global batch of 8 x 2 host"):
    data.PromptIterator(list(range(10)), batch_size=8, process_count=2)
  with pytest.raises(ValueError, match="process_index 2 not in"):
    data.PromptIterator(list(range(10)), batch_size=1, process_index=2, process_count=2)
  it = data.PromptIterator(list(range(10)), batch_size=2, seed=0)
  with pytest.raises(ValueError, match="state seed=1 does not match this iterator's seed=0"):
    it.set_state({**it.get_state(), "seed": 1})
  with pytest.raises(ValueError, match="num_items=11"):
    it.set_state({**it.get_state(), "num_items": 11})
