"""Hugging Face import/export: config conversion, sharded placement, export round trip, error messages."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

import hf_fixtures
from laser_jax.models import hf, model, sharding

forward = jax.jit(model.forward, static_argnums=1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """family -> path of a tiny random HF checkpoint (Llama untied, Qwen2/Qwen3 tied)."""
  return {f: hf_fixtures.make_tiny_hf_checkpoint(str(tmp_path_factory.mktemp(f)), f, seed=i)
          for i, f in enumerate(hf_fixtures.FAMILIES)}


def batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, 320, (2, 9)).astype(np.int32)
  mask = np.ones((2, 9), bool)
  mask[1, :3] = False  # left padded
  return tokens, np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32), mask


def torch_logits(path, tokens, positions, mask):
  m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    return m(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
             position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()


def assert_one_line_error(fn, *needles):
  with pytest.raises(hf.HFCheckpointError) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg, msg
  for needle in needles:
    assert needle in msg, msg
  return msg


def test_config_conversion(ckpts):
  qwen2 = hf.load_hf_config(ckpts["qwen2"])
  assert (qwen2.family, qwen2.qkv_bias, qwen2.qk_norm, qwen2.tie_word_embeddings) == ("qwen2", True, False, True)
  assert (qwen2.vocab_size, qwen2.hidden_size, qwen2.intermediate_size, qwen2.num_layers) == (384, 64, 128, 2)
  assert (qwen2.num_heads, qwen2.num_kv_heads, qwen2.head_dim, qwen2.rope_theta) == (4, 2, 16, 10000.0)
  assert qwen2.rope_scaling is None
  llama = hf.load_hf_config(ckpts["llama"], dtype="bfloat16", remat=True)
  assert (llama.family, llama.qkv_bias, llama.tie_word_embeddings, llama.dtype, llama.remat) == (
      "llama", False, False, "bfloat16", True)
  assert llama.rope_theta == 500000.0
  assert dict(llama.rope_scaling) == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
  hash(llama)  # usable as a static jit argument
  qwen3 = hf.load_hf_config(ckpts["qwen3"])
  assert (qwen3.family, qwen3.qkv_bias, qwen3.qk_norm, qwen3.rope_theta) == ("qwen3", False, True, 1e6)


def test_legacy_rope_fields_are_understood(tmp_path):
  """config.json written by transformers 4.x: top-level rope_theta / rope_scaling with "type"."""
  cfg = hf.config_from_hf(transformers.LlamaConfig(
      hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=32,
      max_position_embeddings=256, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
      rope_theta=123.0))
  assert cfg.rope_theta == 123.0 and dict(cfg.rope_scaling)["factor"] == 32.0


def test_tokenizer_loads(ckpts):
  tok = hf.load_hf_tokenizer(ckpts["qwen2"])
  ids = tok("What is 3 + 4?").input_ids
  assert tok.decode(ids) == "What is 3 + 4?"
  assert tok.eos_token_id == hf_fixtures.EOS_ID
  assert tok.convert_tokens_to_ids("<|vision_start|>") == hf_fixtures.ZC_ID


def test_sharded_import_places_tensors(ckpts):
  path = ckpts["llama"]
  cfg = hf.load_hf_config(path)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  plain = hf.load_hf_params(path, cfg)
  placed = hf.load_hf_params(path, cfg, mesh=mesh)
  expected = sharding.param_shardings(plain, cfg, mesh)
  jax.tree_util.tree_map(lambda x, s: x.sharding == s or pytest.fail(f"{x.sharding} != {s}"), placed, expected)
  q = placed["layers_0"]["attn"]["q_proj"]["kernel"]
  assert q.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
  assert q.addressable_shards[0].data.shape == (32, 32)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), placed, plain)
  # The plain import equals the raw HF tensors, transposed into [in, out] kernels.
  raw = load_file(os.path.join(path, "model.safetensors"))
  np.testing.assert_array_equal(plain["layers_1"]["mlp"]["down_proj"]["kernel"],
                                raw["model.layers.1.mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(plain["lm_head"]["kernel"], raw["lm_head.weight"].T)


def test_bfloat16_import(ckpts):
  cfg = hf.load_hf_config(ckpts["qwen3"], dtype="bfloat16", param_dtype="bfloat16")
  params = hf.load_hf_params(ckpts["qwen3"], cfg)
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  f32 = hf.load_hf_params(ckpts["qwen3"], cfg, dtype="float32")
  assert {x.dtype for x in jax.tree_util.tree_leaves(f32)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("family", hf_fixtures.FAMILIES)
def test_export_round_trip(ckpts, family, tmp_path):
  """import -> export -> transformers loads the same logits; re-import gives identical params."""
  cfg, params, _ = hf.load_hf(ckpts[family])
  out = hf.export_hf(params, cfg, str(tmp_path / "export"), tokenizer=ckpts[family])
  tokens, positions, mask = batch()
  ours = np.asarray(forward(params, cfg, tokens, positions, mask))
  exported = torch_logits(out, tokens, positions, mask)
  np.testing.assert_allclose(exported[mask], ours[mask], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(exported, torch_logits(ckpts[family], tokens, positions, mask))
  assert hf.load_hf_config(out) == cfg
  again = hf.load_hf_params(out, cfg)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, params)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok("1 + 2 = 3").input_ids == transformers.AutoTokenizer.from_pretrained(ckpts[family])("1 + 2 = 3").input_ids
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["eos_token_id"] == hf_fixtures.EOS_ID
  # Legacy (transformers 4.x / vLLM) spelling of the rope settings is written alongside.
  assert config["rope_theta"] == cfg.rope_theta
  assert config["rope_scaling"] == (dict(cfg.rope_scaling) if cfg.rope_scaling else None)


def test_sharded_export_of_sharded_params_in_bfloat16(ckpts, tmp_path):
  """Params living on a mesh, written as several safetensors files + index, in bf16."""
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  cfg, params, _ = hf.load_hf(ckpts["llama"], mesh=mesh)
  out = hf.export_hf(params, cfg, str(tmp_path / "export"), dtype="bfloat16", max_shard_bytes=40_000)
  index = json.load(open(os.path.join(out, hf.INDEX_FILE)))
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and not os.path.exists(os.path.join(out, hf.SINGLE_FILE))
  assert set(index["weight_map"]) == set(hf.hf_tensor_map(cfg))
  raw = load_file(os.path.join(out, index["weight_map"]["model.embed_tokens.weight"]))
  assert raw["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  # transformers reads the sharded bf16 export; logits match ours in bf16 closely.
  tokens, positions, mask = batch()
  exported = torch_logits(out, tokens, positions, mask)
  again = hf.load_hf_params(out, cfg, mesh=mesh)  # sharded index import, placed on the mesh
  ours = np.asarray(forward(again, cfg, tokens, positions, mask))
  np.testing.assert_allclose(exported[mask], ours[mask], atol=1e-4, rtol=0)
  ref = torch_logits(ckpts["llama"], tokens, positions, mask)
  assert np.abs(exported - ref)[mask].max() < 0.2  # bf16 rounding of the weights only


# ----------------------------------------------------------------------------------------------
# Errors: each a one-line HFCheckpointError naming the problem.

@pytest.fixture
def broken(ckpts, tmp_path):
  """A fresh copy of the qwen2 checkpoint to damage."""
  path = str(tmp_path / "broken")
  shutil.copytree(ckpts["qwen2"], path)
  return path


def test_error_missing_config(tmp_path):
  assert_one_line_error(lambda: hf.load_hf_config(str(tmp_path)), "missing file", "config.json")


def test_error_missing_weights(broken):
  cfg = hf.load_hf_config(broken)
  os.remove(os.path.join(broken, "model.safetensors"))
  assert_one_line_error(lambda: hf.load_hf_params(broken, cfg), "missing file", "model.safetensors")


def test_error_missing_shard_listed_in_index(broken):
  cfg = hf.load_hf_config(broken)
  names = list(load_file(os.path.join(broken, "model.safetensors")))
  with open(os.path.join(broken, hf.INDEX_FILE), "w") as f:
    json.dump({"weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}, f)
  assert_one_line_error(lambda: hf.load_hf_params(broken, cfg), "missing file", "model-00001-of-00002.safetensors")


def test_error_corrupt_safetensors(broken):
  cfg = hf.load_hf_config(broken)
  with open(os.path.join(broken, "model.safetensors"), "wb") as f:
    f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  assert_one_line_error(lambda: hf.load_hf_params(broken, cfg), "corrupt safetensors file", "model.safetensors")


def test_error_truncated_safetensors(broken):
  cfg = hf.load_hf_config(broken)
  fname = os.path.join(broken, "model.safetensors")
  data = open(fname, "rb").read()
  with open(fname, "wb") as f:
    f.write(data[: len(data) // 2])
  assert_one_line_error(lambda: hf.load_hf_params(broken, cfg), "model.safetensors")


def test_error_shape_mismatch(broken):
  cfg = hf.load_hf_config(broken)
  fname = os.path.join(broken, "model.safetensors")
  tensors = load_file(fname)
  tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((48, 64), np.float32)
  save_file(tensors, fname, metadata={"format": "pt"})
  assert_one_line_error(lambda: hf.load_hf_params(broken, cfg), "shape mismatch",
                        "model.layers.1.self_attn.k_proj.weight", "expected (32, 64), got (48, 64)")


def test_error_missing_and_unexpected_tensor(broken):
  cfg = hf.load_hf_config(broken)
  fname = os.path.join(broken, "model.safetensors")
  tensors = load_file(fname)
  del tensors["model.layers.0.mlp.up_proj.weight"]
  save_file(tensors, fname, metadata={"format": "pt"})
  assert_one_line_error(lambda: hf.load_hf_params(broken, cfg), "missing tensor",
                        "model.layers.0.mlp.up_proj.weight")
  tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((128, 64), np.float32)
  tensors["model.layers.0.mlp.extra.weight"] = np.zeros((3,), np.float32)
  save_file(tensors, fname, metadata={"format": "pt"})
  assert_one_line_error(lambda: hf.load_hf_params(broken, cfg), "unexpected tensor", "model.layers.0.mlp.extra.weight")
  # A checkpoint with more layers than the config says is refused too.
  del tensors["model.layers.0.mlp.extra.weight"]
  save_file(tensors, fname, metadata={"format": "pt"})
  assert_one_line_error(lambda: hf.load_hf_params(broken, cfg.replace(num_layers=1)), "unexpected tensor",
                        "model.layers.1.")


def test_error_unsupported_architecture(broken):
  config_file = os.path.join(broken, "config.json")
  config = json.load(open(config_file))
  config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
  json.dump(config, open(config_file, "w"))
  assert_one_line_error(lambda: hf.load_hf_config(broken), "unsupported architecture", "GPT2LMHeadModel")
  with pytest.raises(ValueError):  # HFCheckpointError is a ValueError
    hf.config_from_hf(transformers.MistralConfig())


def test_error_missing_tokenizer(tmp_path):
  assert_one_line_error(lambda: hf.load_hf_tokenizer(str(tmp_path / "nowhere")), "cannot load tokenizer", "no such directory")


def test_cli_checks_a_directory(ckpts, broken, capsys):
  hf.main(["laser_jax.hf", ckpts["llama"]])
  assert "llama, 2 layers" in capsys.readouterr().out
  os.remove(os.path.join(broken, "model.safetensors"))
  # Bad input through the command itself: one line on stderr, exit 2 (as every entry point).
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for args, message in (([broken], "error: missing file"), ([], "error: expected one model directory")):
    run = subprocess.run([sys.executable, "-m", "laser_jax.hf", *args], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith(message) and run.stderr.count("\n") == 1, run.stderr
