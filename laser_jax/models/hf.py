"""Hugging Face checkpoint import / export for the decoder in `laser_jax.models.model`.

Import reads `config.json` with transformers' AutoConfig and the weights with safetensors, file by
file and tensor by tensor; with a mesh, each tensor goes straight into its target NamedSharding via
`jax.make_array_from_callback`, and each device's shard is read as a slice of the (memory-mapped)
file, so no host ever holds the whole model. Export writes config.json (through the family's
transformers config class), safetensors shards (+ index when sharded), generation_config.json and
the tokenizer, so `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` reproduces the logits.

Every problem with an input directory raises `HFCheckpointError` with a one-line message.

Over 400 lines in one module on purpose: import and export are inverse mappings over one config
mapping and one tensor-name table (`hf_tensor_map`), which must change together (tests/test_hf.py
round-trips them).
"""
from __future__ import annotations

import json
import math
import os
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from laser_jax.models import model as model_lib
from laser_jax.models import sharding as sharding_lib
from laser_jax.models.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3")
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some old checkpoints contain


class HFCheckpointError(ValueError):
  """A Hugging Face directory cannot be imported (missing/corrupt file, bad tensor, unsupported model)."""


# ----------------------------------------------------------------------------------------------
# Config.

def _rope_settings(hf_config) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling tuple) from a transformers config (v5 `rope_parameters` or older fields)."""
  params = dict(getattr(hf_config, "rope_parameters", None) or {})
  legacy = dict(getattr(hf_config, "rope_scaling", None) or {})
  theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
  scaling = {**params, **legacy}
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return float(theta), None
  if rope_type != "llama3":
    raise HFCheckpointError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")
  keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [k for k in keys if k not in scaling]
  if missing:
    raise HFCheckpointError(f"llama3 rope scaling is missing {missing}")
  return float(theta), tuple(sorted([(k, scaling[k]) for k in keys] + [("rope_type", "llama3")]))


def config_from_hf(hf_config, **overrides) -> ModelConfig:
  """ModelConfig from a transformers PretrainedConfig; `overrides` set e.g. dtype/param_dtype/remat."""
  model_type = getattr(hf_config, "model_type", None)
  if model_type not in SUPPORTED_MODEL_TYPES:
    archs = getattr(hf_config, "architectures", None) or [model_type]
    raise HFCheckpointError(f"unsupported architecture {archs[0]!r} (model_type {model_type!r}); "
                            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
  g = lambda key, default=None: getattr(hf_config, key, default)
  if g("hidden_act", "silu") != "silu":
    raise HFCheckpointError(f"unsupported hidden_act {g('hidden_act')!r} (only silu)")
  if g("use_sliding_window", False):
    raise HFCheckpointError("sliding-window attention (use_sliding_window=true) is not supported")
  if model_type != "qwen2" and (g("attention_bias", False) or g("mlp_bias", False)):
    raise HFCheckpointError(f"{model_type}: attention_bias/mlp_bias=true is not supported")
  theta, scaling = _rope_settings(hf_config)
  kwargs = dict(
      family=model_type, vocab_size=g("vocab_size"), hidden_size=g("hidden_size"),
      intermediate_size=g("intermediate_size"), num_layers=g("num_hidden_layers"),
      num_heads=g("num_attention_heads"),
      num_kv_heads=g("num_key_value_heads") or g("num_attention_heads"),
      head_dim=g("head_dim") or g("hidden_size") // g("num_attention_heads"),
      rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(g("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(g("tie_word_embeddings", False)), qkv_bias=model_type == "qwen2",
      qk_norm=model_type == "qwen3", max_position_embeddings=g("max_position_embeddings", 32768))
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


def load_hf_config(path: str, **overrides) -> ModelConfig:
  """Reads `path/config.json` with AutoConfig and converts it (qwen2, llama, qwen3 model types)."""
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise HFCheckpointError(f"missing file {config_file}")
  try:
    with open(config_file) as f:
      model_type = json.load(f).get("model_type")
  except (OSError, ValueError) as e:
    raise HFCheckpointError(f"corrupt {config_file}: {_one_line(e)}") from e
  if model_type not in SUPPORTED_MODEL_TYPES:
    with open(config_file) as f:
      archs = json.load(f).get("architectures") or [model_type]
    raise HFCheckpointError(f"unsupported architecture {archs[0]!r} (model_type {model_type!r}) in "
                            f"{config_file}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
  import transformers
  try:
    hf_config = transformers.AutoConfig.from_pretrained(path)
  except Exception as e:  # transformers raises many types; report them uniformly
    raise HFCheckpointError(f"cannot read {config_file}: {_one_line(e)}") from e
  return config_from_hf(hf_config, **overrides)


def load_hf_tokenizer(path: str):
  """The checkpoint's tokenizer, exactly as its tokenizer.json defines it.

  With a tokenizer.json present it is loaded as a generic fast tokenizer: transformers 5's
  AutoTokenizer swaps in the model type's own tokenizer class for some types (qwen2 ->
  Qwen2Tokenizer), which re-derives the pre-tokenizer and silently changes the token ids of any
  custom tokenizer saved next to a qwen2 config (e.g. the synthetic task's). Directories without a
  tokenizer.json (sentencepiece only) go through AutoTokenizer.
  """
  import transformers
  if not os.path.isdir(path):
    raise HFCheckpointError(f"cannot load tokenizer from {path}: no such directory")
  try:
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
      return transformers.PreTrainedTokenizerFast.from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)
  except Exception as e:
    raise HFCheckpointError(f"cannot load tokenizer from {path}: {_one_line(e)}") from e


def _one_line(e: Exception) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text}"[:400]


# ----------------------------------------------------------------------------------------------
# Name mapping: HF tensor name <-> (params path, transposed?).

def hf_tensor_map(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  """Every HF tensor of the model -> (path in our params tree, whether the HF tensor is transposed)."""
  table = {"model.embed_tokens.weight": (("embed", "embedding"), False),
           "model.norm.weight": (("final_norm", "scale"), False)}
  if not cfg.tie_word_embeddings:
    table["lm_head.weight"] = (("lm_head", "kernel"), True)
  for i in range(cfg.num_layers):
    hf, ours = f"model.layers.{i}.", f"layers_{i}"
    table[hf + "input_layernorm.weight"] = ((ours, "input_norm", "scale"), False)
    table[hf + "post_attention_layernorm.weight"] = ((ours, "post_attn_norm", "scale"), False)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      table[hf + f"self_attn.{proj}.weight"] = ((ours, "attn", proj, "kernel"), True)
    if cfg.qkv_bias:
      for proj in ("q_proj", "k_proj", "v_proj"):
        table[hf + f"self_attn.{proj}.bias"] = ((ours, "attn", proj, "bias"), False)
    if cfg.qk_norm:
      for norm in ("q_norm", "k_norm"):
        table[hf + f"self_attn.{norm}.weight"] = ((ours, "attn", norm, "scale"), False)
    for proj in ("gate_proj", "up_proj", "down_proj"):
      table[hf + f"mlp.{proj}.weight"] = ((ours, "mlp", proj, "kernel"), True)
  return table


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def param_shapes(cfg: ModelConfig):
  """ShapeDtypeStruct tree of the params (no allocation)."""
  return jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))


# ----------------------------------------------------------------------------------------------
# Import.

def _weight_files(path: str) -> dict[str, list[str] | None]:
  """file -> tensor names it should hold (None: whatever the single file holds)."""
  index_file, single_file = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
  if os.path.isfile(index_file):
    try:
      with open(index_file) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise HFCheckpointError(f"corrupt {index_file}: {_one_line(e)}") from e
    files: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
      files.setdefault(os.path.join(path, fname), []).append(name)
    return files
  if os.path.isfile(single_file):
    return {single_file: None}
  raise HFCheckpointError(f"missing file: neither {single_file} nor {index_file} exists")


def load_hf_params(path: str, cfg: ModelConfig, mesh=None, dtype: str | None = None):
  """Reads the safetensors weights of `path` into a params tree for `cfg`.

  With `mesh`, every tensor is created directly with its `sharding.param_shardings` placement and
  each device reads only its own slice. `dtype` ("float32" | "bfloat16") defaults to cfg.param_dtype.
  """
  from safetensors import safe_open

  np_dtype = _NP_DTYPES[dtype or cfg.param_dtype]
  table = hf_tensor_map(cfg)
  shapes = param_shapes(cfg)
  shardings = sharding_lib.param_shardings(shapes, cfg, mesh) if mesh is not None else None
  params: dict = {}
  loaded: set[str] = set()
  for fname, expected_names in _weight_files(path).items():
    if not os.path.isfile(fname):
      raise HFCheckpointError(f"missing file {fname} (listed in {INDEX_FILE})")
    try:
      handle = safe_open(fname, framework="numpy")
    except Exception as e:
      raise HFCheckpointError(f"corrupt safetensors file {fname}: {_one_line(e)}") from e
    with handle as f:
      names = f.keys() if expected_names is None else expected_names
      for name in names:
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
          continue
        if name not in table:
          raise HFCheckpointError(f"unexpected tensor {name!r} in {fname} for a {cfg.family} model")
        target_path, transposed = table[name]
        target = _get(shapes, target_path)
        try:
          tensor = f.get_slice(name)
          got = tuple(tensor.get_shape())
        except Exception as e:
          raise HFCheckpointError(f"cannot read tensor {name!r} from {fname}: {_one_line(e)}") from e
        want = tuple(reversed(target.shape)) if transposed else tuple(target.shape)
        if got != want:
          raise HFCheckpointError(f"shape mismatch for tensor {name!r} in {fname}: expected {want}, got {got}")
        read = _slice_reader(tensor, transposed, np_dtype, name, fname)
        if shardings is None:
          value = jnp.asarray(read((slice(None),) * len(want)))
        else:
          value = jax.make_array_from_callback(target.shape, _get(shardings, target_path), read)
        _set(params, target_path, value)
        loaded.add(name)
  missing = [n for n in table if n not in loaded]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise HFCheckpointError(f"missing tensor {missing[0]!r}{more} in {path}")
  return params


def _slice_reader(tensor, transposed: bool, np_dtype, name: str, fname: str):
  """index (in our layout) -> numpy block, read lazily from a safetensors slice."""
  def read(index):
    index = tuple(index)
    try:
      block = tensor[index[::-1]].T if transposed else tensor[index]
    except Exception as e:
      raise HFCheckpointError(f"cannot read tensor {name!r} from {fname}: {_one_line(e)}") from e
    return np.ascontiguousarray(block.astype(np_dtype))
  return read


def load_hf(path: str, mesh=None, dtype: str | None = None, **config_overrides):
  """(cfg, params, tokenizer) of an HF directory; `dtype` sets both compute and param dtype."""
  if dtype is not None:
    config_overrides = {"dtype": dtype, "param_dtype": dtype, **config_overrides}
  cfg = load_hf_config(path, **config_overrides)
  return cfg, load_hf_params(path, cfg, mesh=mesh), load_hf_tokenizer(path)


# ----------------------------------------------------------------------------------------------
# Export.

def hf_config_for(cfg: ModelConfig, dtype: str = "float32", **extra):
  """The transformers config object describing `cfg` (extra: e.g. eos_token_id, pad_token_id)."""
  import transformers
  cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig,
         "qwen3": transformers.Qwen3Config}[cfg.family]
  kwargs = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
      rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
      max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu",
      architectures=[_ARCHITECTURES[cfg.family]])
  if cfg.rope_scaling is not None:
    kwargs["rope_scaling"] = dict(cfg.rope_scaling)
  kwargs.update(extra)
  hf_config = cls(**kwargs)
  hf_config.dtype = dtype
  return hf_config


def _add_legacy_config_fields(config_file: str, cfg: ModelConfig, dtype: str):
  """transformers >= 5 writes rope settings only as `rope_parameters`; servers on transformers 4.x
  (e.g. many vLLM installs) read the top-level `rope_theta` / `rope_scaling` / `torch_dtype`. Both
  generations accept a file carrying both spellings."""
  with open(config_file) as f:
    config = json.load(f)
  config["rope_theta"] = cfg.rope_theta
  config["rope_scaling"] = dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None
  config["torch_dtype"] = dtype
  with open(config_file, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _shard_plan(names_and_bytes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
  shards: list[list[str]] = [[]]
  size = 0
  for name, nbytes in names_and_bytes:
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  return shards


def export_hf(params, cfg: ModelConfig, out_dir: str, tokenizer=None, dtype: str | None = None,
              max_shard_bytes: int = 5 * 10**9, config_overrides: dict | None = None,
              eos_token_ids=None) -> str:
  """Writes an HF directory loadable by `transformers.AutoModelForCausalLM.from_pretrained`.

  tokenizer: None, a path to load with AutoTokenizer, or a tokenizer object; its eos/pad/bos ids go
  into config.json. dtype ("float32" | "bfloat16") defaults to cfg.param_dtype. eos_token_ids: every
  id that ends a response (e.g. Qwen2.5-Instruct's <|im_end|> and <|endoftext|>), written to
  generation_config.json, where generation and `tasks.eos_token_ids` read them; None = the
  tokenizer's EOS only. Tensors are gathered to the host one shard file at a time. In multi-host
  runs every process must call this (the gathers are collective); only process 0 writes.
  """
  import transformers
  from safetensors.numpy import save_file

  dtype = dtype or cfg.param_dtype
  np_dtype = _NP_DTYPES[dtype]
  if isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = load_hf_tokenizer(str(tokenizer))
  extra = {}
  if tokenizer is not None:
    extra = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  extra.update(config_overrides or {})
  hf_config = hf_config_for(cfg, dtype, **extra)

  table = hf_tensor_map(cfg)
  sizes = [(name, math.prod(_get(params, p).shape) * np_dtype.itemsize) for name, (p, _) in table.items()]
  shards = _shard_plan(sizes, max_shard_bytes)
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
    hf_config.save_pretrained(out_dir)
    _add_legacy_config_fields(os.path.join(out_dir, "config.json"), cfg, dtype)
    generation_config = transformers.GenerationConfig.from_model_config(hf_config)
    if eos_token_ids:
      generation_config.eos_token_id = [int(i) for i in eos_token_ids]
    generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
      tokenizer.save_pretrained(out_dir)
  weight_map = {}
  for i, names in enumerate(shards):
    fname = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for name in names:
      path, transposed = table[name]
      value = _to_host(_get(params, path))
      tensors[name] = np.ascontiguousarray((value.T if transposed else value).astype(np_dtype))
      weight_map[name] = fname
    if writer:
      save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
    del tensors
  if writer and len(shards) > 1:
    index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  return out_dir


# ----------------------------------------------------------------------------------------------
# The LaSeR constants of an export (written by laser_jax.export, read by laser_jax.evaluate).

LASER_METADATA_FILE = "laser_jax.json"
# Keys every laser_jax.json holds (laser_jax.export.laser_metadata documents them all).
_LASER_METADATA_KEYS = ("self_reward_token", "self_reward_token_id", "kl_coef", "ref_constant",
                        "use_ref_model_score", "reference_model", "eos_token_id", "prompt")


def read_laser_metadata(path: str) -> dict | None:
  """`path/laser_jax.json`, the self-reward constants of a laser_jax export; None without one."""
  file = os.path.join(path, LASER_METADATA_FILE)
  if not os.path.isfile(file):
    return None
  try:
    with open(file) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise HFCheckpointError(f"corrupt {file}: {_one_line(e)}") from e
  missing = [k for k in _LASER_METADATA_KEYS if not isinstance(metadata, dict) or k not in metadata]
  if missing:
    raise HFCheckpointError(f"corrupt {file}: no {missing[0]!r} (re-export with python -m laser_jax.export)")
  template = metadata["prompt"].get("template") if isinstance(metadata["prompt"], dict) else None
  if template not in ("chat", "base"):
    raise HFCheckpointError(f"corrupt {file}: prompt.template must be 'chat' or 'base' (got {template!r})")
  return metadata


def write_laser_metadata(out_dir: str, metadata: dict) -> str:
  """Writes `out_dir/laser_jax.json` (process 0 only, as `export_hf`); returns its path."""
  file = os.path.join(out_dir, LASER_METADATA_FILE)
  if jax.process_index() == 0:
    with open(file, "w") as f:
      json.dump(metadata, f, indent=2, allow_nan=False)
      f.write("\n")
  return file


def main(argv) -> None:
  """`python -m laser_jax.hf PATH`: checks that PATH imports (config, every tensor, tokenizer) and
  prints a summary; any problem is one line on stderr and exit status 2 (laser_jax/cli.py)."""
  from absl import app
  if len(argv) != 2:
    raise app.UsageError(f"expected one model directory, e.g. python -m laser_jax.hf PATH (got {argv[1:]})")
  path = argv[1]
  cfg = load_hf_config(path)
  params = load_hf_params(path, cfg)
  tokenizer = load_hf_tokenizer(path)
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f"{path}: {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, {n:,} parameters, "
        f"vocab {cfg.vocab_size} (tokenizer {len(tokenizer)})")

