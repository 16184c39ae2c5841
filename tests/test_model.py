"""The Flax decoder against torch `transformers` (independent reference) and against itself.

- full forward: logits equal transformers' on left- and right-padded batches (f32, 1e-4), per family;
- cached path: prefill + one-token decode steps equal the full forward at every position;
- remat, bf16 and fully-masked rows behave.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_fixtures
from laser_jax.models import attention as attention_lib
from laser_jax.models import hf, model
from laser_jax.models.config import DeviceInfo, ModelConfig, device_info, resolve_attention, resolve_dtype

# Jitted entry points (eager op-by-op dispatch is much slower on CPU).
forward = jax.jit(model.forward, static_argnums=1, static_argnames="return_hidden")
forward_cached = jax.jit(model.forward_cached, static_argnums=1, static_argnames="chunk")

CASES = [("qwen2", None), ("qwen2", False), ("llama", None), ("qwen3", None)]  # (family, tie override)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """(family, tied) -> (cfg, params, torch model) of a tiny random HF checkpoint."""
  out = {}
  for family, tie in CASES:
    path = str(tmp_path_factory.mktemp(f"{family}_{tie}"))
    hf_fixtures.make_tiny_hf_checkpoint(path, family, seed=len(out), tie_word_embeddings=tie)
    cfg = hf.load_hf_config(path)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out[(family, tie)] = (cfg, hf.load_hf_params(path, cfg), torch_model)
  return out


def padded_batch(padding: str, seed=0, batch=3, length=12, vocab=320):
  """Random tokens with ragged lengths, padded on the left or right; positions count real tokens."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, vocab, (batch, length))
  lengths = [length, length - 5, 3][:batch]
  mask = np.zeros((batch, length), bool)
  for b, n in enumerate(lengths):
    if padding == "left":
      mask[b, length - n:] = True
    else:
      mask[b, :n] = True
  tokens = np.where(mask, tokens, hf_fixtures.PAD_ID)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return tokens.astype(np.int32), positions.astype(np.int32), mask


def torch_logits(torch_model, tokens, positions, mask):
  with torch.no_grad():
    return torch_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long),
                       position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("case", CASES, ids=[f"{f}-tie{t}" for f, t in CASES])
def test_logits_match_transformers(checkpoints, case, padding):
  cfg, params, torch_model = checkpoints[case]
  tokens, positions, mask = padded_batch(padding)
  ref = torch_logits(torch_model, tokens, positions, mask)
  ours = np.asarray(forward(params, cfg, tokens, positions, mask))
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  assert np.isfinite(ours).all()
  assert ref[mask].std() > 0.5  # the tiny model's logits are far from uniform, so the check is meaningful
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=0)


def test_hidden_states_and_unembed(checkpoints):
  cfg, params, torch_model = checkpoints[("llama", None)]
  tokens, positions, mask = padded_batch("left")
  hidden = forward(params, cfg, tokens, positions, mask, return_hidden=True)
  assert hidden.shape == (*tokens.shape, cfg.hidden_size)
  with torch.no_grad():
    ref = torch_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                      attention_mask=torch.tensor(mask, dtype=torch.long),
                      position_ids=torch.tensor(positions, dtype=torch.long),
                      output_hidden_states=True).hidden_states[-1].numpy()
  np.testing.assert_allclose(np.asarray(hidden)[mask], ref[mask], atol=1e-4, rtol=0)
  np.testing.assert_allclose(model.unembed(params, cfg, hidden),
                             forward(params, cfg, tokens, positions, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case,chunked", [(c, False) for c in CASES] + [(("qwen2", None), True)],
                         ids=[f"{f}-tie{t}" for f, t in CASES] + ["qwen2-chunked"])
def test_cached_decode_matches_full_forward(checkpoints, case, chunked):
  """Left-padded prompts: prefill the first P slots, then decode one token per step; every real
  position's logits equal the full forward over the whole sequence. Chunked: the cache is split
  into chunks (prompt, 1, 2, 1, rest) and each step attends over the chunks written so far."""
  cfg, params, _ = checkpoints[case]
  tokens, positions, mask = padded_batch("left", seed=1)
  full = np.asarray(forward(params, cfg, tokens, positions, mask))
  prompt_len, total = 6, tokens.shape[1]
  chunk_lengths = (prompt_len, 1, 2, 1, total + 2 - prompt_len - 4) if chunked else None
  cache = model.init_cache(cfg, tokens.shape[0], total + 2, chunk_lengths)  # spare slots stay invalid
  chunk_of_slot = np.repeat(np.arange(len(chunk_lengths)), chunk_lengths) if chunked else np.zeros(total + 2, int)
  step = forward_cached
  logits, cache = step(params, cfg, tokens[:, :prompt_len], positions[:, :prompt_len], mask[:, :prompt_len],
                       cache, 0, chunk=0)
  pieces = [np.asarray(logits)]
  for s in range(prompt_len, total):
    logits, cache = step(params, cfg, tokens[:, s:s + 1], positions[:, s:s + 1], mask[:, s:s + 1], cache,
                         jnp.int32(s), chunk=int(chunk_of_slot[s]))
    pieces.append(np.asarray(logits))
  cached = np.concatenate(pieces, axis=1)
  np.testing.assert_allclose(cached[mask], full[mask], atol=2e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(cache.mask[:, :total]), mask)
  assert not np.asarray(cache.mask[:, total:]).any()
  assert np.isfinite(cached).all()


def test_per_row_decode_attends_over_the_chunks_in_use_only(checkpoints):
  """Decode steps with a write index per row and chunk None (the continuous sampler's) read the
  chunks up to the deepest consuming row's: values in later chunks (NaN here) never reach the
  logits, a row that consumes nothing does not widen the step, and the logits equal the step with
  that chunk given statically (the static sampler's) bit for bit."""
  cfg, params, _ = checkpoints[("qwen2", None)]
  tokens, positions, mask = padded_batch("left", seed=1)
  rows, prompt_len, lengths = tokens.shape[0], 6, (6, 2, 2, 4)
  cache = model.init_cache(cfg, rows, sum(lengths), lengths)
  _, cache = forward_cached(params, cfg, tokens[:, :prompt_len], positions[:, :prompt_len], mask[:, :prompt_len],
                            cache, 0, chunk=0)
  poison = lambda c, chunk: c._replace(v=tuple(v[:chunk + 1] + tuple(jnp.full_like(x, jnp.nan) for x in v[chunk + 1:])
                                               for v in c.v))
  for s, chunk in ((6, 1), (7, 1), (8, 2), (9, 2)):
    step = (tokens[:, s:s + 1], positions[:, s:s + 1], mask[:, s:s + 1])
    write = jnp.full((rows,), s, jnp.int32)
    static, next_cache = forward_cached(params, cfg, *step, cache, write, chunk=chunk)
    bounded, _ = forward_cached(params, cfg, *step, poison(cache, chunk), write)
    np.testing.assert_array_equal(bounded, static)
    assert np.isfinite(np.asarray(bounded)).all()
    # The last row consumes nothing this step; its write index points into the last chunk.
    idle = jnp.asarray(mask[:, s:s + 1]).at[-1].set(False)
    bounded, _ = forward_cached(params, cfg, step[0], step[1], idle, poison(cache, chunk), write.at[-1].set(13))
    assert np.isfinite(np.asarray(bounded[:-1])).all()
    cache = next_cache


def test_cache_layout(checkpoints):
  cfg, params, _ = checkpoints[("qwen2", None)]
  cache = model.init_cache(cfg, batch=2, max_len=7)
  assert len(cache.k) == len(cache.v) == cfg.num_layers and cache.chunk_lengths == (7,)
  assert all(k.shape == (2, cfg.num_kv_heads, cfg.head_dim, 7) for (k,) in cache.k)  # keys transposed
  assert all(v.shape == (2, cfg.num_kv_heads, 7, cfg.head_dim) for (v,) in cache.v)
  assert cache.mask.shape == (2, 7) and cache.mask.dtype == jnp.bool_ and not cache.mask.any()
  tokens = jnp.array([[5, 6, 7], [8, 9, 10]], jnp.int32)
  _, cache = forward_cached(params, cfg, tokens, jnp.array([[0, 1, 2]] * 2, jnp.int32),
                                  jnp.array([[True] * 3, [False, True, True]]), cache, 2)
  # Only slots [2, 5) were written, in every layer's keys and values.
  for (k,), (v,) in zip(cache.k, cache.v):
    np.testing.assert_array_equal(np.abs(np.asarray(k)).sum(axis=(1, 2)) > 0, [[0, 0, 1, 1, 1, 0, 0]] * 2)
    np.testing.assert_array_equal(np.abs(np.asarray(v)).sum(axis=(1, 3)) > 0, [[0, 0, 1, 1, 1, 0, 0]] * 2)
  # A chunked cache: chunk c holds its own slots; writing chunk 1 leaves chunks 0 and 2 untouched.
  chunked = model.init_cache(cfg, 2, 7, (3, 2, 2))
  assert chunked.chunk_lengths == (3, 2, 2)
  assert [k.shape[-1] for k in chunked.k[0]] == [3, 2, 2] and [v.shape[2] for v in chunked.v[0]] == [3, 2, 2]
  _, chunked = forward_cached(params, cfg, tokens[:, :1], jnp.array([[3]] * 2, jnp.int32), jnp.ones((2, 1), bool),
                              chunked, 4, chunk=1)
  for k_chunks in chunked.k:
    assert [bool(np.abs(np.asarray(k)).sum() > 0) for k in k_chunks] == [False, True, False]
    np.testing.assert_array_equal(np.abs(np.asarray(k_chunks[1])).sum(axis=(0, 1, 2)) > 0, [False, True])
  np.testing.assert_array_equal(chunked.mask, [[0, 0, 0, 0, 1, 0, 0]] * 2)
  with pytest.raises(ValueError, match="pass chunk="):
    forward_cached(params, cfg, tokens[:, :1], jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1), bool), chunked, 0)
  with pytest.raises(ValueError, match="sum to max_len"):
    model.init_cache(cfg, 2, 7, (3, 3))
  np.testing.assert_array_equal(cache.mask, [[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0]])


def _next_token_loss_and_grads(tokens, positions, mask):
  """jitted (params, cfg) -> (mean next-token NLL of the batch, its gradients)."""
  def loss(p, c):
    logp = jax.nn.log_softmax(forward(p, c, tokens, positions, mask))
    return -jnp.mean(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1))
  return jax.jit(jax.value_and_grad(loss), static_argnums=1)


def test_remat_gives_identical_values_and_gradients(checkpoints):
  cfg, params, _ = checkpoints[("qwen3", None)]
  tokens, positions, mask = padded_batch("right")
  grad_fn = _next_token_loss_and_grads(tokens, positions, mask)
  v1, g1 = grad_fn(params, cfg)
  v2, g2 = grad_fn(params, cfg.replace(remat=True))
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g2)
  # The cached path works with remat layers too (nothing to rematerialise there, same numbers).
  cache = model.init_cache(cfg, *tokens.shape)
  plain = forward_cached(params, cfg, tokens, positions, mask, cache, 0)
  remat = forward_cached(params, cfg.replace(remat=True), tokens, positions, mask, cache, 0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, plain, remat)


def test_fully_masked_rows_stay_finite(checkpoints):
  cfg, params, _ = checkpoints[("qwen2", None)]
  tokens, positions, mask = padded_batch("left")
  mask[2] = False  # a row with no real token at all

  def total(p):
    return jnp.sum(forward(p, cfg, tokens, positions, mask))

  value, grads = jax.jit(jax.value_and_grad(total))(params)
  assert np.isfinite(value)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
  cache = model.init_cache(cfg, 3, tokens.shape[1])
  logits, _ = forward_cached(params, cfg, tokens, positions, mask, cache, 0)
  assert np.isfinite(np.asarray(logits)).all()


def test_bfloat16_close_to_float32(checkpoints):
  cfg, params, _ = checkpoints[("llama", None)]
  tokens, positions, mask = padded_batch("left")
  ref = np.asarray(forward(params, cfg, tokens, positions, mask))
  cfg16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  out = forward(params16, cfg16, tokens, positions, mask)
  hidden = forward(params16, cfg16, tokens, positions, mask, return_hidden=True)
  assert out.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out) - ref)[mask]
  assert err.max() < 0.1 * np.abs(ref).max(), err.max()
  assert (np.asarray(out).argmax(-1) == ref.argmax(-1))[mask].mean() > 0.9
  cache = model.init_cache(cfg16, 3, tokens.shape[1])
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves((cache.k, cache.v)))


def test_init_params_matches_num_params_and_hf_layout(checkpoints):
  for (family, tie), (cfg, params, torch_model) in checkpoints.items():
    ours = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(params)
    n = sum(x.size for x in jax.tree_util.tree_leaves(ours))
    assert n == cfg.num_params() == sum(p.numel() for p in torch_model.parameters()), (family, tie)


def test_config_validation_errors():
  base = dict(family="qwen2", vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
              num_kv_heads=1, head_dim=4)
  ModelConfig(**base)
  for bad, needle in [({"family": "gpt2"}, "family"), ({"dtype": "float16"}, "dtype"),
                      ({"num_kv_heads": 3, "num_heads": 4}, "num_kv_heads"),
                      ({"rope_scaling": (("rope_type", "yarn"),)}, "llama3")]:
    with pytest.raises(ValueError, match=needle) as e:
      ModelConfig(**{**base, **bad})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_chunked_attention_equals_full_attention_values_and_gradients(padding):
  """attend_causal "chunked" (query blocks, recomputed in the backward) against the [T, T]
  reference, for GQA, padding, and a length that is not a multiple of the block."""
  rng = np.random.default_rng(0)
  b, t, n, kv, d = 2, 13, 4, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for h in (n, kv, kv))
  valid = np.ones((b, t), bool)
  if padding == "left":
    valid[0, :4] = False
  else:
    valid[1, 9:] = False
  valid = jnp.asarray(valid)
  reference = attention_lib.attend(q, k, v, attention_lib.causal_mask(jnp.arange(t), valid))
  weights = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32)

  def loss(q, k, v, impl, block):
    return jnp.sum(attention_lib.attend_causal(q, k, v, valid, impl, block) * weights)

  ref_grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "xla", 4)
  for block in (1, 4, 5, 13, 64):
    out = attention_lib.attend_causal(q, k, v, valid, "chunked", block)
    np.testing.assert_allclose(out, reference, atol=1e-5, rtol=1e-5)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "chunked", block)
    for g, r in zip(grads, ref_grads):
      np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_kernel_attention_paths_equal_the_reference(impl):
  """The flash-kernel paths against the [T, T] reference (f32, 1e-5), values and gradients, on
  the valid query rows (a pad row's output is unspecified: nothing valid reads it): splash through
  the Pallas interpreter, cudnn's wrapper (roll to right padding + causal + key lengths) through
  jax.nn.dot_product_attention's XLA implementation (cuDNN itself needs a GPU). GQA, a length
  that is not a multiple of the tile (cudnn's wrapper pads 150 to 192), and a row with no valid token."""
  rng = np.random.default_rng(1)
  b, t, n, kv, d = 3, 150, 4, 2, 16
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for h in (n, kv, kv))
  valid = np.ones((b, t), bool)
  valid[0, :37] = False  # left padding
  valid[1, 101:] = False  # right padding
  valid[2] = False  # no valid token at all
  valid = jnp.asarray(valid)
  weights = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) * valid[:, :, None, None]
  run = {"splash": lambda q, k, v: attention_lib.attend_splash(q, k, v, valid, block=128, interpret=True),
         "cudnn": lambda q, k, v: attention_lib.attend_cudnn(q, k, v, valid, implementation="xla"),
         "xla": lambda q, k, v: attention_lib.attend_causal(q, k, v, valid, "xla")}

  def loss(impl):
    return lambda q, k, v: jnp.sum(run[impl](q, k, v) * weights)

  out, reference = jax.jit(run[impl])(q, k, v), run["xla"](q, k, v)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.where(valid[:, :, None, None], out, 0), np.where(valid[:, :, None, None], reference, 0),
                             atol=1e-5, rtol=1e-5)
  grads = jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v)
  for g, r in zip(grads, jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def test_resolve_attention_per_platform():
  assert resolve_attention("auto", "tpu", "bfloat16") == "splash"
  assert resolve_attention("auto", "cuda", "bfloat16") == "cudnn"
  assert resolve_attention("auto", "gpu", "float32") == "chunked"  # cuDNN flash is bf16/fp16 only
  assert resolve_attention("auto", "cpu", "bfloat16") == "chunked"
  assert resolve_attention("xla", "tpu", "float32") == "xla"
  with pytest.raises(ValueError, match="'splash' runs on TPU only .*platform: cpu"):
    resolve_attention("splash", "cpu", "float32")
  with pytest.raises(ValueError, match="dtype='bfloat16'"):
    ModelConfig("qwen2", 64, 32, 64, 1, 2, 2, 16, attention="cudnn")


def test_chunked_attention_never_materialises_the_full_scores():
  """The chunked forward + backward keeps a few blocks of scores alive, not [T, T] ones."""
  b, t, n, d, block = 1, 2048, 2, 16, 64
  q = jax.ShapeDtypeStruct((b, t, n, d), jnp.float32)
  valid = jnp.ones((b, t), bool)

  def loss(q, impl):
    return jnp.sum(attention_lib.attend_causal(q, q, q, valid, impl, block))

  def temp_bytes(impl):
    return jax.jit(jax.grad(loss), static_argnums=1).lower(q, impl).compile().memory_analysis().temp_size_in_bytes

  full_scores = b * n * t * t * 4
  assert temp_bytes("xla") >= full_scores
  assert temp_bytes("chunked") < full_scores / 4  # a few [block, T] buffers: 1/32 of [T, T] each


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_equal_the_unrolled_forward(checkpoints, remat):
  cfg, params, _ = checkpoints[("qwen2", None)]
  tokens, positions, mask = padded_batch("left")
  grad_fn = _next_token_loss_and_grads(tokens, positions, mask)
  v1, g1 = grad_fn(params, cfg.replace(remat=remat))
  v2, g2 = grad_fn(params, cfg.replace(remat=remat, scan_layers=True, attention="chunked", attention_block=4))
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g2)


# ---- "auto" numerics from the device (Colab T4 / A100 / L4, TPU), on fake device objects ----------

def _device(platform, kind, capability=None):
  """A stand-in for a jax Device: what `device_info` reads."""
  import types
  fields = dict(platform=platform, device_kind=kind)
  if capability is not None:
    fields["compute_capability"] = capability
  return types.SimpleNamespace(**fields)


T4 = _device("gpu", "Tesla T4", "7.5")
V100 = _device("gpu", "Tesla V100-SXM2-16GB", "7.0")
A100 = _device("gpu", "NVIDIA A100-SXM4-40GB", "8.0")
L4 = _device("gpu", "NVIDIA L4", "8.9")
H100 = _device("gpu", "NVIDIA H100 80GB HBM3", "9.0")
TPU = _device("tpu", "TPU v5 lite")
CPU = _device("cpu", "cpu")


@pytest.mark.parametrize("device, dtype, attention", [
    (T4, "float32", "chunked"), (V100, "float32", "chunked"),  # no bf16, no cuDNN flash attention
    (A100, "bfloat16", "cudnn"), (L4, "bfloat16", "cudnn"), (H100, "bfloat16", "cudnn"),
    (TPU, "bfloat16", "splash"), (CPU, "float32", "chunked"),
], ids=lambda x: getattr(x, "device_kind", x))
def test_auto_numerics_follow_the_device(device, dtype, attention):
  assert resolve_dtype("auto", device) == dtype
  assert resolve_attention("auto", device, resolve_dtype("auto", device)) == attention
  # Explicit values are kept.
  assert resolve_dtype("float32", device) == "float32" and resolve_dtype("bfloat16", device) == "bfloat16"


def test_t4_never_gets_cudnn_flash_attention():
  # Even with bf16 compute asked for explicitly, "auto" attention is chunked on a T4 ...
  assert resolve_attention("auto", T4, "bfloat16") == "chunked"
  # ... and asking for cuDNN there is an error naming the device and its compute capability.
  with pytest.raises(ValueError, match=r"'cudnn' needs a GPU of compute capability >= 8.0 \(this device: Tesla T4, 7.5\)"):
    resolve_attention("cudnn", T4, "bfloat16")
  assert resolve_attention("cudnn", A100, "bfloat16") == "cudnn"


def test_device_info_reads_jax_devices_and_platform_names():
  assert device_info(T4) == DeviceInfo("gpu", "Tesla T4", (7, 5))
  assert device_info("cuda") == DeviceInfo("gpu")
  assert device_info(jax.devices()[0]) == DeviceInfo("cpu", jax.devices()[0].device_kind, None)


def test_colab_config_numerics_per_device():
  """configs/colab_small.py leaves dtype and attention to the device (tasks.model_settings)."""
  import os
  from laser_jax import default_config
  from laser_jax.training import tasks
  m = default_config.load_config_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                                   "colab_small.py")).model
  assert (m.dtype, m.attention, m.param_dtype) == ("auto", "auto", "float32")
  settings = lambda device: (tasks.model_settings(m, device)["dtype"], tasks.model_settings(m, device)["attention"])
  assert settings(T4) == ("float32", "chunked")
  assert settings(A100) == settings(L4) == ("bfloat16", "cudnn")
  assert settings(TPU) == settings("tpu") == ("bfloat16", "splash")
  assert settings(None) == ("float32", "chunked")  # this process's device: the CPU
  # A ModelConfig built from those settings is valid on each (cudnn needs bf16 compute).
  for device in (T4, A100, TPU):
    ModelConfig("qwen2", 64, 32, 64, 1, 2, 2, 16, **tasks.model_settings(m, device))
