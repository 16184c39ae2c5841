"""Inputs by address (laser_jax.data.sources): hub ids from an offline hub cache, gs:// through an fsspec
filesystem registered for the `gs` protocol, local paths and globs, and each bad address as one
ConfigError line naming the key and the value."""
import hashlib
import json
import os
import re
import subprocess
import sys

import huggingface_hub.constants
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as FSSPEC_REGISTRY  # what register_implementation writes

import hf_fixtures
from laser_jax import default_config
from laser_jax.evaluation import loading
from laser_jax.config_check import ConfigError
from laser_jax.data import records as records_lib
from laser_jax.data import sources
from laser_jax.models import hf
from laser_jax.models.config import ModelConfig
from laser_jax.training import tasks
from laser_jax.training import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# A local Hugging Face hub cache (the layout huggingface_hub writes: blobs, snapshots, refs).


def put_in_hub_cache(cache, repo_type: str, repo_id: str, files: dict, revision: str = "main"):
  """Stores `files` ({path in repo: bytes}) as `repo_id` at `revision` (a branch or a commit hash)
  in the hub cache directory `cache`; returns the snapshot directory."""
  commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else \
      hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
  repo_dir = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
  for relative, content in files.items():
    blob = repo_dir / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    link = repo_dir / "snapshots" / commit / relative
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
  if revision != commit:
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
  return repo_dir / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """An empty hub cache the product reads (offline: conftest sets HF_HUB_OFFLINE=1)."""
  cache = tmp_path / "hub"
  cache.mkdir()
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for subprocesses
  assert huggingface_hub.constants.HF_HUB_OFFLINE
  sources._fetch_model.cache_clear()
  yield cache
  sources._fetch_model.cache_clear()


def parquet_bytes(rows: list[dict]) -> bytes:
  sink = pa.BufferOutputStream()
  pq.write_table(pa.Table.from_pylist(rows), sink)
  return sink.getvalue().to_pybytes()


def jsonl_bytes(rows: list[dict]) -> bytes:
  return "".join(json.dumps(r) + "\n" for r in rows).encode()


# ----------------------------------------------------------------------------------------------
# gs:// as a local directory: an fsspec filesystem registered for the `gs` protocol, so the product
# opens it exactly as it opens gcsfs (`sources.remote_filesystem` -> fsspec.core.url_to_fs).


class LocalDirAsGCS(DirFileSystem):
  """gs://bucket/path -> <root>/bucket/path; names come back as gcsfs returns them (bucket/path)."""
  protocol = ("gs", "gcs")
  cachable = False
  root = ""
  downloads = []  # every get_file, to check that a copy is made once

  def __init__(self, **kwargs):
    super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True), **kwargs)

  def get_file(self, rpath, lpath, **kwargs):
    LocalDirAsGCS.downloads.append(rpath)
    return super().get_file(rpath, lpath, **kwargs)


class AnonymousGCS(LocalDirAsGCS):
  """What gcsfs does without credentials: every request is refused (HttpError 401)."""

  def ls(self, path, detail=True, **kwargs):
    raise RuntimeError("Anonymous caller does not have storage.objects.list access to the Google "
                       "Cloud Storage bucket. Permission 'storage.objects.list' denied., 401")

  exists = glob = info = ls


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """The local directory standing in for gs:// (bucket `bucket`); copies go to a tmp cache."""
  root = tmp_path / "gcs"
  (root / "bucket").mkdir(parents=True)
  monkeypatch.setattr(LocalDirAsGCS, "root", str(root))
  monkeypatch.setattr(LocalDirAsGCS, "downloads", [])
  monkeypatch.setitem(FSSPEC_REGISTRY, "gs", LocalDirAsGCS)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  sources._fetch_model.cache_clear()
  yield root
  sources._fetch_model.cache_clear()


# ----------------------------------------------------------------------------------------------
# A tiny model (exported by laser_jax.models.hf, no torch).


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  """A 1-layer qwen2 directory: config.json, random model.safetensors, tokenizer, generation config."""
  from safetensors.numpy import save_file
  path = tmp_path_factory.mktemp("tiny") / "model"
  cfg = ModelConfig(family="qwen2", vocab_size=384, hidden_size=32, intermediate_size=64,
                              num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                              tie_word_embeddings=True, qkv_bias=True)
  shapes, rng = hf.param_shapes(cfg), np.random.default_rng(0)
  tensors = {}
  for name, (where, transposed) in hf.hf_tensor_map(cfg).items():
    shape = hf._get(shapes, where).shape
    tensors[name] = rng.standard_normal(shape[::-1] if transposed else shape).astype(np.float32)
  hf_fixtures.make_tiny_tokenizer(str(path))
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps({
      "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 384, "hidden_size": 32,
      "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
      "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu"}))
  (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
  return path


def model_files(path) -> dict:
  return {name: (path / name).read_bytes() for name in os.listdir(path)}


def same_params(a, b) -> bool:
  import jax
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


PROBLEMS = [{"question": f"What is {i} + {i}?", "final_answer": str(2 * i), "difficulty": 3.0} for i in range(7)]


def files_config(**overrides):
  c = default_config.get_config()
  c.data.task, c.sft.steps, c.data.max_prompt_len = "files", 0, 512
  c.data.problem_key, c.data.answer_key = "question", "final_answer"
  c.laser.self_reward_token = "<|vision_start|>"
  return default_config.apply_overrides(c, overrides)


# ----------------------------------------------------------------------------------------------
# Hub ids and hub datasets.


def test_hub_model_id_and_hub_dataset_train_a_task_offline(hub_cache, tiny_model):
  # Two revisions of a model: @v1 must give v1's weights, not main's.
  put_in_hub_cache(hub_cache, "model", "tiny-org/tiny-qwen", {"config.json": b"{}"})
  put_in_hub_cache(hub_cache, "model", "tiny-org/tiny-qwen", model_files(tiny_model), revision="v1")
  # DeepMath-103K's layout: parquet shards under data/, plus files the glob must not pick up.
  shards = {f"data/train-0000{i}-of-00002.parquet": parquet_bytes(PROBLEMS[4 * i:4 * i + 4]) for i in (1, 0)}
  held_out = [{"problem": "What is 9 + 9?", "answer": "18"}]
  put_in_hub_cache(hub_cache, "dataset", "tiny-org/deepmath", {
      **shards, "README.md": b"# card", "other/train-00000-of-00001.parquet": parquet_bytes(PROBLEMS[:1]),
      "eval/test.jsonl": jsonl_bytes(held_out)})
  c = files_config(**{"model.hf_path": "tiny-org/tiny-qwen@v1", "model.tokenizer_path": "tiny-org/tiny-qwen@v1",
                      "data.train_files": "hf://datasets/tiny-org/deepmath/data/*.parquet",
                      "data.eval_set": "hf://datasets/tiny-org/deepmath/eval/test.jsonl"})
  task = tasks.build_task(c)
  # Shards in sorted order, fields mapped by problem_key / answer_key.
  assert [p.problem for p in task.train_prompts] == [r["question"] for r in PROBLEMS]
  assert [p.answer for p in task.train_prompts] == [r["final_answer"] for r in PROBLEMS]
  assert [(p.problem, p.answer) for p in task.eval_prompts] == [("What is 9 + 9?", "18")]
  local_cfg = hf.load_hf_config(str(tiny_model))
  assert task.model_cfg == tasks.model_config(files_config(**{"model.hf_path": str(tiny_model)}), None)
  assert (task.model_cfg.hidden_size, task.model_cfg.vocab_size) == (local_cfg.hidden_size, 384)
  assert same_params(task.init_params(), hf.load_hf_params(str(tiny_model), local_cfg))
  assert task.tokenizer("What is 1 + 1?")["input_ids"] == \
      hf.load_hf_tokenizer(str(tiny_model))("What is 1 + 1?")["input_ids"]
  assert task.eos_ids == (0, 2)  # generation_config.json of the hub snapshot


def test_existing_local_path_wins_over_hub_id(hub_cache, tiny_model, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "tiny-org").mkdir()
  os.symlink(tiny_model, tmp_path / "tiny-org" / "tiny-qwen")
  put_in_hub_cache(hub_cache, "model", "tiny-org/tiny-qwen", {"config.json": b"{}"})
  assert sources.model_dir("tiny-org/tiny-qwen", "config.model.hf_path") == "tiny-org/tiny-qwen"


# ----------------------------------------------------------------------------------------------
# gs://.


def test_gs_model_dir_is_copied_once_with_the_model_files_only(gcs, tiny_model):
  remote = gcs / "bucket" / "models" / "tiny"
  remote.mkdir(parents=True)
  for name, content in model_files(tiny_model).items():
    (remote / name).write_bytes(content)
  (remote / "optimizer_state.bin").write_bytes(b"junk")  # not a model file
  (remote / "checkpoints" / "10").mkdir(parents=True)
  (remote / "checkpoints" / "10" / "model.safetensors").write_bytes(b"junk")
  local = sources.model_dir("gs://bucket/models/tiny", "config.model.hf_path")
  assert local.startswith(str(gcs.parent / "cache" / "laser_jax" / "gs"))
  assert sorted(os.listdir(local)) == sorted(model_files(tiny_model))
  cfg = hf.load_hf_config(local)
  assert cfg == hf.load_hf_config(str(tiny_model))
  assert same_params(hf.load_hf_params(local, cfg), hf.load_hf_params(str(tiny_model), cfg))
  copies = len(LocalDirAsGCS.downloads)
  sources._fetch_model.cache_clear()  # a new process: the cache on disk is reused
  assert sources.model_dir("gs://bucket/models/tiny", "config.model.hf_path") == local
  assert len(LocalDirAsGCS.downloads) == copies == len(model_files(tiny_model))
  # The trainer's and evaluator's loaders take the gs:// address as they take a local dir.
  c = files_config(**{"model.hf_path": "gs://bucket/models/tiny"})
  assert tasks.model_config(c, None) == tasks.model_config(files_config(**{"model.hf_path": local}), None)
  assert len(tasks.load_task_tokenizer(c)) == len(hf.load_hf_tokenizer(str(tiny_model)))


def test_gs_data_globs_in_sorted_order(gcs):
  (gcs / "bucket" / "deepmath").mkdir()
  for i in (1, 0):
    pq.write_table(pa.Table.from_pylist(PROBLEMS[4 * i:4 * i + 4]),
                   gcs / "bucket" / "deepmath" / f"train-0000{i}-of-00002.parquet")
  (gcs / "bucket" / "extra.jsonl").write_text("".join(
      json.dumps({"question": "Q?", "final_answer": 5}) + "\n" for _ in range(2)))
  paths = sources.data_files("gs://bucket/deepmath/*.parquet, gs://bucket/extra.jsonl",
                             "config.data.train_files")
  assert [os.path.basename(p) for p in paths] == ["train-00000-of-00002.parquet",
                                                  "train-00001-of-00002.parquet", "extra.jsonl"]
  with pytest.raises(ConfigError, match=r"^config\.data\.train_files: 'gs://bucket/deepmath' is a directory; "
                     r"name its files, e\.g\. gs://bucket/deepmath/\*\.parquet$"):
    sources.data_files("gs://bucket/deepmath", "config.data.train_files")
  c = files_config(**{"data.train_files": "gs://bucket/deepmath/*.parquet,gs://bucket/extra.jsonl"})
  assert tasks._train_records(c) == [{"problem": r["question"], "answer": r["final_answer"]}
                                     for r in PROBLEMS] + [{"problem": "Q?", "answer": "5"}] * 2


def test_local_globs_and_keys_for_every_file_type(tmp_path):
  pq.write_table(pa.Table.from_pylist(PROBLEMS[:2]), tmp_path / "b.parquet")
  (tmp_path / "a.jsonl").write_text(json.dumps({"question": "J?", "final_answer": "1"}) + "\n")
  c = files_config(**{"data.train_files": f"{tmp_path}/*.parquet, {tmp_path}/a.jsonl"})
  assert [r["problem"] for r in tasks._train_records(c)] == ["What is 0 + 0?", "What is 1 + 1?", "J?"]
  c.data.problem_key = "problem"  # JSONL and parquet both report the keys they were read with
  with pytest.raises(records_lib.DataError, match=r"^config\.data\.problem_key / config\.data\.answer_key = "
                     r"\('problem', 'final_answer'\): .*b\.parquet: missing column\(s\) \['problem'\]"):
    tasks._train_records(c)
  c.data.train_files = str(tmp_path / "a.jsonl")
  with pytest.raises(records_lib.DataError, match=r"problem_key.*a\.jsonl:1: missing field 'problem'"):
    tasks._train_records(c)


# ----------------------------------------------------------------------------------------------
# Bad input (issue 25 item 8): one line, naming the key and the value.


def _no_gcsfs(monkeypatch):
  monkeypatch.delitem(FSSPEC_REGISTRY, "gs", raising=False)
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` fails, as when not installed


def _anonymous_gcs(monkeypatch, gcs):
  monkeypatch.setattr(AnonymousGCS, "root", str(gcs))
  monkeypatch.setitem(FSSPEC_REGISTRY, "gs", AnonymousGCS)


def _empty_dataset(hub_cache):
  put_in_hub_cache(hub_cache, "dataset", "tiny-org/deepmath", {"data/train.jsonl": b"{}\n"})


BAD_INPUT = [
    ("hub id not cached offline", lambda mp, g, h: None,
     lambda: sources.model_dir("nobody/no-model@v2", "config.model.hf_path"),
     ["config.model.hf_path: 'nobody/no-model@v2' is not in the Hugging Face cache", "HF_HUB_OFFLINE"]),
    ("gs without gcsfs", lambda mp, g, h: _no_gcsfs(mp),
     lambda: sources.model_dir("gs://bucket/models/tiny", "config.model.hf_path"),
     ["config.model.hf_path: reading 'gs://bucket/models/tiny' needs gcsfs"]),
    ("gs without credentials", lambda mp, g, h: _anonymous_gcs(mp, g),
     lambda: sources.model_dir("gs://bucket/models/tiny", "config.model.tokenizer_path"),
     ["config.model.tokenizer_path: cannot read 'gs://bucket/models/tiny'", "Anonymous caller", "credentials"]),
    ("gs data without credentials", lambda mp, g, h: _anonymous_gcs(mp, g),
     lambda: sources.data_files("gs://bucket/data/*.parquet", "config.data.train_files"),
     ["config.data.train_files: cannot read 'gs://bucket/data/*.parquet'", "credentials"]),
    ("nonexistent local dir", lambda mp, g, h: None,
     lambda: sources.model_dir("/no/such/model", "config.laser.ref_hf_path"),
     ["config.laser.ref_hf_path: no such directory '/no/such/model'"]),
    ("local glob matching nothing", lambda mp, g, h: None,
     lambda: sources.data_files("/no/such/dir/*.parquet", "config.data.train_files"),
     ["config.data.train_files: '/no/such/dir/*.parquet' matches no file"]),
    ("gs glob matching nothing", lambda mp, g, h: None,
     lambda: sources.data_files("gs://bucket/nothing/*.parquet", "config.data.train_files"),
     ["config.data.train_files: 'gs://bucket/nothing/*.parquet' matches no file"]),
    ("hub dataset without matching files", lambda mp, g, h: _empty_dataset(h),
     lambda: sources.data_files("hf://datasets/tiny-org/deepmath/data/*.parquet", "config.data.train_files"),
     ["config.data.train_files: 'hf://datasets/tiny-org/deepmath/data/*.parquet': no file of dataset "
      "tiny-org/deepmath matches 'data/*.parquet'"]),
    ("hub dataset not cached offline", lambda mp, g, h: None,
     lambda: sources.data_files("hf://datasets/nobody/none@v1/*.jsonl", "config.data.train_files"),
     ["config.data.train_files: 'hf://datasets/nobody/none@v1/*.jsonl' is not in the Hugging Face cache"]),
]


@pytest.mark.parametrize("setup,fn,fragments", [case[1:] for case in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_address_is_one_config_error_line(setup, fn, fragments, monkeypatch, gcs, hub_cache):
  setup(monkeypatch, gcs, hub_cache)
  with pytest.raises(ConfigError) as e:
    fn()
  message = str(e.value)
  assert "\n" not in message and all(f in message for f in fragments), message
  assert not os.path.exists(gcs.parent / "cache" / "laser_jax" / "gs" / "bucket")  # nothing copied


def test_bad_train_files_stop_the_trainer_before_it_writes(tmp_path, tiny_model):
  c = files_config(**{"data.train_files": f"{tmp_path}/data/*.parquet", "workdir": str(tmp_path / "run"),
                      "model.hf_path": str(tiny_model), "batch_size": 8, "micro_batch_size": 16})
  with pytest.raises(ConfigError, match=r"config\.data\.train_files: '.*/data/\*\.parquet' matches no file"):
    trainer_lib.Trainer(c)
  assert not (tmp_path / "run").exists()


def test_evaluate_cli_exits_2_on_an_uncached_hub_id(tmp_path, hub_cache):
  out = tmp_path / "eval" / "out.jsonl"
  proc = subprocess.run(
      [sys.executable, "-m", "laser_jax.evaluate", "--config=configs/eval.py",
       "--config.model.hf_path=nobody/no-model", f"--config.eval.output_file={out}"],
      cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
  assert errors[0].startswith("error: config.model.hf_path: 'nobody/no-model' is not in the Hugging Face cache")
  assert "Traceback" not in proc.stderr and not out.parent.exists()


def test_a_missing_score_constant_stops_the_evaluator_before_any_weight_is_fetched(hub_cache, tiny_model):
  """A hub model whose weights are not in the cache (offline): the missing beta_v is reported, not
  the missing weights, since its config files are fetched and checked first."""
  files = {k: v for k, v in model_files(tiny_model).items() if not k.endswith(".safetensors")}
  put_in_hub_cache(hub_cache, "model", "org/plain-model", files)
  config = default_config.load_config_file(os.path.join(REPO, "configs", "eval.py"))
  config.model.hf_path = "org/plain-model"
  config.laser.self_reward_token, config.laser.ref_constant = "<|vision_start|>", -23.0
  with pytest.raises(ConfigError, match=r"^config.laser.kl_coef: "):
    loading.load_model(config)
  config.laser.kl_coef = 0.1  # With every constant set, the weights are what is missing.
  with pytest.raises(ConfigError, match=r"^config.model.hf_path: missing file: neither .*/model.safetensors "):
    loading.load_model(config)


# ----------------------------------------------------------------------------------------------
# Multi-host: process 0 first.

_HOST = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import test_sources
from fsspec.registry import _registry
from laser_jax.data import sources
test_sources.LocalDirAsGCS.root = sys.argv[3]
_registry["gs"] = test_sources.LocalDirAsGCS
local = sources.model_dir("gs://bucket/models/tiny", "config.model.hf_path")
print(json.dumps({"process": jax.process_index(), "local": local,
                  "downloads": len(test_sources.LocalDirAsGCS.downloads)}), flush=True)
"""


@pytest.mark.slow  # ~12 s: two processes joined by jax.distributed
def test_two_hosts_sharing_a_cache_copy_a_gs_model_once_process_zero_first(gcs, tiny_model, tmp_path):
  """Process 0 copies; process 1 starts only after it (a barrier) and finds the complete copy in
  the cache both processes share: it copies nothing. Without the ordering both would copy."""
  import socket
  remote = gcs / "bucket" / "models" / "tiny"
  remote.mkdir(parents=True)
  for name, content in model_files(tiny_model).items():
    (remote / name).write_bytes(content)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
  procs = [subprocess.Popen([sys.executable, "-c", _HOST, f"localhost:{port}", str(i), str(gcs)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert [r["downloads"] for r in results] == [len(model_files(tiny_model)), 0]
  assert results[0]["local"] == results[1]["local"]
  assert os.path.isfile(os.path.join(results[1]["local"], "config.json"))
