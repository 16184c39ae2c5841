"""Tests for laser_jax.generate.sampler.

References: a toy decode function over a fixed logits table (exact probabilities written in
NumPy), the full-sequence `model.forward` (self-reward and per-token log-probs), and
`transformers` greedy `generate` on the same tiny checkpoint.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laser_jax.generate import draw as draw_lib
from laser_jax.generate import sampler as sampler_lib
from laser_jax.generate.sampler import Sampler
from laser_jax.generate.sampling import SamplingParams
from laser_jax.models import model as model_lib
from laser_jax.models import sharding as sharding_lib
from laser_jax.models.config import ModelConfig

# ------------------------------------------------------------------------------------------------
# Toy step function: logits depend only on the token being consumed (a fixed [V, V] table).


def toy_decode(params, tokens, positions, token_mask, cache, write_index, chunk):
  del positions, token_mask, write_index, chunk
  return params[tokens].astype(jnp.float32), cache


def toy_cache(batch, chunk_lengths):
  return jnp.zeros((batch, sum(chunk_lengths)), jnp.int32)


def exact_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
  """Exact sampling distribution written from the definitions (NumPy, float64)."""
  z = np.asarray(logits, np.float64) / temperature
  keep = np.ones_like(z, bool)
  if top_k:
    keep &= z >= np.sort(z)[::-1][top_k - 1]
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  if top_p < 1.0:
    order = np.argsort(-p)
    mass_before = np.cumsum(p[order]) - p[order]
    kept = order[mass_before < top_p]
    keep2 = np.zeros_like(keep)
    keep2[kept] = True
    p = np.where(keep2, p, 0.0)
    p /= p.sum()
  return p


def chi2_critical(df, z=3.29):
  """Wilson-Hilferty approximation of the chi-square quantile (z=3.29: upper 0.05%)."""
  return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


LOGITS = np.array([2.0, 1.2, 0.9, 0.3, -0.4, -1.5], np.float32)  # distinct, well-separated masses


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.6, 0, 1.0),
    (1.0, 3, 1.0),
    (1.0, 0, 0.75),
    (1.5, 4, 0.8),
])
def test_sampling_distribution_matches_exact(temperature, top_k, top_p):
  vocab = LOGITS.shape[0]
  table = jnp.asarray(np.tile(LOGITS, (vocab, 1)))  # same next-token distribution everywhere
  sampler = Sampler(toy_decode, toy_cache)
  sp = SamplingParams(n=1500, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=4)
  out = sampler(table, [[0]], sp, jax.random.key(3))
  draws = out.tokens.reshape(-1)
  assert out.lengths.tolist() == [4] * 1500 and not out.finished.any()
  p = exact_probs(LOGITS, temperature, top_k, top_p)
  counts = np.bincount(draws, minlength=vocab)
  # Support is exactly the allowed set.
  np.testing.assert_array_equal(counts > 0, p > 0)
  support = p > 0
  expected = p[support] * draws.size
  chi2 = np.sum((counts[support] - expected) ** 2 / expected)
  df = int(support.sum()) - 1
  if df > 0:
    assert chi2 < chi2_critical(df), (chi2, counts, expected)
  # Reported log-probs: the untruncated temperature-scaled log-softmax at the drawn token.
  z = LOGITS.astype(np.float64) / temperature
  log_softmax = z - np.log(np.exp(z - z.max()).sum()) - z.max()
  np.testing.assert_allclose(out.logprobs.reshape(-1), log_softmax[draws], atol=1e-5)


@pytest.mark.parametrize("vocab", [6, 1000, 4096])
def test_inverse_cdf_draw_lands_in_each_tokens_interval(vocab):
  """The two-level draw equals a float64 NumPy inverse CDF: a uniform number in the middle of a
  token's cumulative-probability interval draws that token (V not a multiple of the block size,
  zero-weight tokens and whole zero-weight blocks included)."""
  rng = np.random.default_rng(vocab)
  logits = rng.normal(size=vocab) * 2.0
  logits[rng.random(vocab) < 0.3] = -np.inf  # excluded tokens, as top-k / top-p leave them
  if vocab > 512:
    logits[128:384] = -np.inf  # whole blocks without weight
  logits[vocab // 2] = 3.0
  shifted = (logits - logits[np.isfinite(logits)].max()).astype(np.float32)
  weights = np.exp(shifted.astype(np.float64))
  cdf = np.cumsum(weights)
  total = cdf[-1]
  lower = np.concatenate([[0.0], cdf[:-1]])
  # Tokens whose interval is wide compared with float32 rounding of the prefix sums.
  eligible = np.nonzero(weights / total >= 1e-4)[0]
  chosen = np.unique(np.concatenate([eligible[:3], eligible[-3:], rng.choice(eligible, min(256, eligible.size))]))
  u = ((lower[chosen] + cdf[chosen]) / 2 / total).astype(np.float32)
  rows = jnp.asarray(np.tile(shifted + 1.5, (chosen.size, 1)))  # any offset: the draw shifts by row_max
  row_max = jnp.full((chosen.size,), 1.5, jnp.float32)
  tokens, sums, drawn_ok = jax.jit(draw_lib.inverse_cdf_draw)(rows, row_max, jnp.asarray(u))
  np.testing.assert_array_equal(np.asarray(tokens), chosen)
  assert np.asarray(drawn_ok).all()
  np.testing.assert_allclose(np.asarray(sums), total, rtol=1e-5)
  # The extremes of (0, 1) land on the first and the last token with weight.
  tokens, _, drawn_ok = draw_lib.inverse_cdf_draw(rows[:2], row_max[:2],
                                                     jnp.asarray([np.finfo(np.float32).tiny, 1 - 2**-24]))
  positive = np.nonzero(weights > 0)[0]
  assert np.asarray(tokens).tolist() == [positive[0], positive[-1]] and np.asarray(drawn_ok).all()


def test_greedy_toy_chain_and_eos_handling():
  # Table chain: 1 -> 2 -> 3(EOS); 4 -> 5 -> 6 -> 7 -> 3(EOS); 8 -> 8 -> ... (never ends).
  vocab = 10
  table = np.full((vocab, vocab), -5.0, np.float32)
  for a, b in [(1, 2), (2, 3), (4, 5), (5, 6), (6, 7), (7, 3), (8, 8), (3, 9), (9, 9), (0, 0)]:
    table[a, b] = 5.0
  sampler = Sampler(toy_decode, toy_cache)
  sp = SamplingParams(greedy=True, max_new_tokens=4, eos_ids=(3,), pad_id=0, self_reward_token_id=9)
  out = sampler(jnp.asarray(table), [[1], [4], [8]], sp, jax.random.key(0))
  np.testing.assert_array_equal(out.tokens, [[2, 0, 0, 0], [5, 6, 7, 0], [8, 8, 8, 8]])
  np.testing.assert_array_equal(out.lengths, [1, 3, 4])
  np.testing.assert_array_equal(out.finished, [True, True, False])
  np.testing.assert_array_equal(out.truncated, [False, False, True])
  np.testing.assert_array_equal(out.eos_token, [3, 3, 0])
  np.testing.assert_array_equal(out.response_tokens, [[2, 3, 0, 0], [5, 6, 7, 3], [8, 8, 8, 8]])
  np.testing.assert_array_equal(out.response_lengths, [2, 4, 4])
  # Self-reward: log_softmax(table[EOS])[z_c]; the second row's EOS is its 4th (= last allowed) token.
  row = table[3].astype(np.float64)
  expected_sr = row[9] - np.log(np.exp(row).sum())
  np.testing.assert_allclose(out.self_reward_logprob[:2], expected_sr, atol=1e-5)
  assert np.isnan(out.self_reward_logprob[2])
  # Without a self-reward token, scores are NaN and nothing else changes.
  out2 = sampler(jnp.asarray(table), [[1], [4], [8]], dataclass_replace(sp, self_reward_token_id=None),
                 jax.random.key(0))
  np.testing.assert_array_equal(out2.tokens, out.tokens)
  assert np.isnan(out2.self_reward_logprob).all()


def dataclass_replace(sp, **kw):
  import dataclasses
  return dataclasses.replace(sp, **kw)


def test_seeds_and_groups():
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(16, 16)).astype(np.float32))
  sampler = Sampler(toy_decode, toy_cache)
  sp = SamplingParams(n=4, max_new_tokens=12, temperature=1.0)
  prompts = [[1, 2, 3], [5], [7, 7]]
  a = sampler(table, prompts, sp, jax.random.key(11))
  b = sampler(table, prompts, sp, jax.random.key(11))
  c = sampler(table, prompts, sp, jax.random.key(12))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (a.tokens != c.tokens).mean() > 0.5
  np.testing.assert_array_equal(a.group_ids, [0] * 4 + [1] * 4 + [2] * 4)
  # Rows of one group share the (left-padded) prompt.
  np.testing.assert_array_equal(a.prompt_tokens[4:8], np.tile([[0] * 15 + [5]], (4, 1)))
  np.testing.assert_array_equal(a.prompt_mask.sum(1), [3] * 4 + [1] * 4 + [2] * 4)
  assert len({tuple(t) for t in a.tokens[:4]}) > 1  # the n samples of a prompt differ


def test_each_distinct_prompt_is_prefilled_once():
  """n responses per prompt share one prefill (its cache rows are repeated), which gives the same
  draws as prefilling every row; an uneven sharded batch falls back to prefilling every row."""
  table = jnp.asarray(np.random.default_rng(2).normal(size=(16, 16)).astype(np.float32))
  prefill_rows = []

  def recording_decode(params, tokens, positions, token_mask, cache, write_index, chunk):
    if tokens.shape[1] > 1:  # the prefill (decode steps consume one token)
      prefill_rows.append(tokens.shape[0])
    return toy_decode(params, tokens, positions, token_mask, cache, write_index, chunk)

  sp = SamplingParams(n=4, max_new_tokens=6, temperature=1.0)
  prompts = [[1, 2, 3], [5], [7, 7]]
  shared = Sampler(recording_decode, toy_cache)(table, prompts, sp, jax.random.key(4))
  assert prefill_rows == [3]
  rows = [p for p in prompts for _ in range(4)]
  per_row = Sampler(recording_decode, toy_cache)(table, rows, dataclasses.replace(sp, n=1),
                                                       jax.random.key(4))
  assert prefill_rows == [3, 12]
  np.testing.assert_array_equal(shared.tokens, per_row.tokens)
  np.testing.assert_array_equal(shared.logprobs, per_row.logprobs)
  np.testing.assert_array_equal(shared.prompt_tokens, per_row.prompt_tokens)
  # 5 prompts x n=2 on data x fsdp = 4: prompts pad to 8 (16 rows) but rows only to 12.
  mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
  out = Sampler(recording_decode, toy_cache, mesh=mesh)(
      table, [[1], [2], [3], [4], [5]], dataclasses.replace(sp, n=2), jax.random.key(0))
  assert prefill_rows[-1] == 12 and out.tokens.shape == (10, 6)
  Sampler(recording_decode, toy_cache, mesh=mesh)(
      table, [[1], [2], [3], [4]], dataclasses.replace(sp, n=2), jax.random.key(0))
  assert prefill_rows[-1] == 4


def test_bucketing_does_not_recompile():
  table = jnp.asarray(np.random.default_rng(1).normal(size=(16, 16)).astype(np.float32))
  sampler = Sampler(toy_decode, toy_cache)
  sp = SamplingParams(n=2, max_new_tokens=5)
  sampler(table, [[1, 2, 3], [4]], sp, jax.random.key(0))
  traces = sampler.num_traces
  assert traces == 2  # prefill + decode
  sampler(table, [[1] * 11, [4, 5]], sp, jax.random.key(1))  # same bucket (16), same batch
  assert sampler.num_traces == traces
  sampler(table, [[1] * 17, [4, 5]], sp, jax.random.key(1))  # bucket 32
  assert sampler.num_traces == traces + 2
  assert sampler_lib.bucket_length(3) == 16 and sampler_lib.bucket_length(17) == 32
  assert sampler_lib.bucket_length(64) == 64 and sampler_lib.bucket_length(65) == 128


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match=r"temperature must be >= 0 \(0 = greedy\), got -0.5"):
    SamplingParams(temperature=-0.5)
  # Temperature 0 is greedy decoding, as vLLM and the official evaluation read it.
  assert SamplingParams(temperature=0.0) == SamplingParams(greedy=True)
  with pytest.raises(TypeError, match="eos_ids"):
    SamplingParams(eos_ids=[1, 2])
  with pytest.raises(ValueError, match="decode_segments"):
    SamplingParams(decode_segments=0)
  with pytest.raises(ValueError, match="min_segment_tokens"):
    SamplingParams(min_segment_tokens=0)
  # Segments split max_new_tokens into near-equal cache chunks of at least min_segment_tokens.
  assert SamplingParams(max_new_tokens=10, decode_segments=4, min_segment_tokens=1).decode_chunk_lengths == (3, 3, 2, 2)
  assert SamplingParams(max_new_tokens=2, decode_segments=4, min_segment_tokens=1).decode_chunk_lengths == (1, 1)
  assert SamplingParams(max_new_tokens=200, decode_segments=4).decode_chunk_lengths == (67, 67, 66)
  assert SamplingParams(max_new_tokens=63, decode_segments=4).decode_chunk_lengths == (63,)
  sampler = Sampler(toy_decode, toy_cache)
  with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
    sampler(jnp.zeros((4, 4)), [[1], []], SamplingParams(), jax.random.key(0))


# ------------------------------------------------------------------------------------------------
# The Transformer: scores and log-probs against the full-sequence forward.

TINY = ModelConfig(family="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64,
                             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                             tie_word_embeddings=False)
Z_C = 127
PROMPTS = [[5, 17, 33, 2], [9], [40, 41, 42, 43, 44, 45, 46], [77, 3], [100, 1, 2], [64, 64, 12, 90, 4, 8]]


@functools.lru_cache(maxsize=None)
def tiny_params():
  return model_lib.init_params(TINY, jax.random.key(0))


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def check_against_full_forward(params, prompts, out, temperature):
  """Every row: per-token log-probs, EOS log-prob and self-reward equal the full forward's.

  The reference is one `model.forward` over the right-padded batch of `prompt + response (+ EOS)`.
  """
  seqs = [list(prompts[g]) + out.response_tokens[i, :out.response_lengths[i]].tolist()
          for i, g in enumerate(out.group_ids)]
  width = max(map(len, seqs))
  tokens = np.zeros((len(seqs), width), np.int32)
  mask = np.zeros((len(seqs), width), bool)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)], mask[i, :len(s)] = s, True
  positions = np.tile(np.arange(width, dtype=np.int32), (len(seqs), 1))
  all_logits = np.asarray(jax.jit(model_lib.forward, static_argnums=1)(params, TINY, tokens, positions, mask),
                          np.float64)
  for i, seq in enumerate(seqs):
    p = len(prompts[out.group_ids[i]])
    resp = seq[p:]
    logits = all_logits[i, :len(seq)]
    # Token t of the response is predicted by the logits at position p - 1 + t.
    lp = log_softmax(logits[p - 1:p - 1 + len(resp)] / temperature)[np.arange(len(resp)), resp]
    np.testing.assert_allclose(out.response_logprobs[i, :len(resp)], lp, atol=1e-4, rtol=1e-4)
    if out.finished[i]:
      # Logits at the EOS position = the distribution after `prompt, response, EOS`.
      expected = log_softmax(logits[-1])[Z_C]
      np.testing.assert_allclose(out.self_reward_logprob[i], expected, atol=1e-4, rtol=1e-5)
      np.testing.assert_allclose(out.eos_logprob[i], lp[-1], atol=1e-4, rtol=1e-4)
    else:
      assert np.isnan(out.self_reward_logprob[i]) and np.isnan(out.eos_logprob[i])


def choose_eos_set(seqs):
  """EOS ids and a length limit making greedy rows stop at different steps, one on the last allowed.

  Rows are independent under greedy decoding, so with EOS set E and limit L row r stops at the
  first index < L whose token is in E (else it is truncated). E and L are picked from the
  EOS-free greedy continuations `seqs` [N, max_new]. Returns (E, finish indices (None =
  truncated), L).
  """
  first = [{} for _ in seqs]
  for r, s in enumerate(seqs):
    for j, t in enumerate(s):
      first[r].setdefault(int(t), j)

  def finish(eos, limit):
    idx = [min([first[r][e] for e in eos if e in first[r]], default=limit) for r in range(len(seqs))]
    return [i if i < limit else None for i in idx]

  for limit in range(len(seqs[0]), 1, -1):
    for r0 in range(len(seqs)):
      last = int(seqs[r0][limit - 1])
      if first[r0][last] != limit - 1:
        continue
      eos = {last}
      for r in range(len(seqs)):
        for t, j in sorted(first[r].items(), key=lambda kv: kv[1]):
          f = finish(eos | {t}, limit)
          if f[r0] == limit - 1 and f[r] is not None and f[r] > 0 and f[r] not in finish(eos, limit):
            eos.add(t)
            break
      f = finish(eos, limit)
      if len({x for x in f if x is not None}) >= 2:
        return tuple(sorted(eos)), f, limit
  raise AssertionError(f"could not build an EOS set from greedy sequences {seqs}")


@functools.lru_cache(maxsize=None)
def greedy_setup(max_new=6):
  params = tiny_params()
  free = sampler_lib.sample(params, TINY, PROMPTS, SamplingParams(greedy=True, max_new_tokens=max_new),
                            jax.random.key(0))
  eos, finish, limit = choose_eos_set(free.tokens)
  sp = SamplingParams(greedy=True, max_new_tokens=limit, eos_ids=eos, pad_id=0, self_reward_token_id=Z_C)
  return free, sp, finish


def test_greedy_self_reward_equals_full_forward_including_last_step():
  params = tiny_params()
  free, sp, finish = greedy_setup()
  out = sampler_lib.sample(params, TINY, PROMPTS, sp, jax.random.key(0))
  max_new = sp.max_new_tokens
  assert max_new - 1 in finish  # some row emits EOS as its last allowed token
  for i, f in enumerate(finish):
    if f is None:
      assert not out.finished[i] and out.truncated[i] and out.lengths[i] == max_new
      np.testing.assert_array_equal(out.tokens[i], free.tokens[i, :max_new])
    else:
      assert out.finished[i] and out.lengths[i] == f
      np.testing.assert_array_equal(out.tokens[i, :f], free.tokens[i, :f])
      assert (out.tokens[i, f:] == sp.pad_id).all()
      assert out.eos_token[i] == free.tokens[i, f]
  assert np.isfinite(out.self_reward_logprob[out.finished]).all()
  check_against_full_forward(params, PROMPTS, out, temperature=1.0)


@functools.lru_cache(maxsize=None)
def sampled_output(decode_segments):
  sp = SamplingParams(n=3, temperature=0.8, top_p=0.95, top_k=60, max_new_tokens=10,
                      eos_ids=tuple(range(10, 24)), pad_id=0, self_reward_token_id=Z_C,
                      decode_segments=decode_segments, min_segment_tokens=1)
  return sampler_lib.sample(tiny_params(), TINY, PROMPTS[:4], sp, jax.random.key(5))


@pytest.mark.parametrize("decode_segments", [1, 3])
def test_sampled_logprobs_and_scores_equal_full_forward(decode_segments):
  """Also across decode segments: a loop over the whole cache (1) and three loops that each
  attend over the cache chunks written so far give the same draws and the exact values."""
  out = sampled_output(decode_segments)
  assert out.finished.any() and out.truncated.any()
  assert len(set(out.lengths[out.finished].tolist())) >= 2  # rows finish at different steps
  check_against_full_forward(tiny_params(), PROMPTS[:4], out, temperature=0.8)
  if decode_segments > 1:
    np.testing.assert_array_equal(out.tokens, sampled_output(1).tokens)


def test_shared_prefill_equals_prefilling_every_row():
  """The n rows of a prompt decode from copies of one prefilled cache: the same draws, log-probs
  and scores as when each row prefills its own copy of the prompt."""
  out = sampled_output(1)  # 4 prompts x n = 3: one prefill per prompt
  sp = SamplingParams(n=1, temperature=0.8, top_p=0.95, top_k=60, max_new_tokens=10,
                      eos_ids=tuple(range(10, 24)), pad_id=0, self_reward_token_id=Z_C,
                      decode_segments=1, min_segment_tokens=1)
  rows = [p for p in PROMPTS[:4] for _ in range(3)]
  per_row = sampler_lib.sample(tiny_params(), TINY, rows, sp, jax.random.key(5))
  np.testing.assert_array_equal(out.tokens, per_row.tokens)
  # Equal up to float rounding: a prefill over 4 rows and one over 12 run the matmuls in other
  # blocks (1.7e-6 apart on an AVX-512 host; a wrong cache copy is off by far more).
  np.testing.assert_allclose(out.logprobs, per_row.logprobs, atol=1e-5)
  np.testing.assert_allclose(out.self_reward_logprob, per_row.self_reward_logprob, atol=1e-5)


def test_sharded_matches_single_device():
  params = tiny_params()
  _, sp, _ = greedy_setup()
  single = sampler_lib.sample(params, TINY, PROMPTS, sp, jax.random.key(0))
  mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
  sharded_params = sharding_lib.shard_params(params, TINY, mesh)
  # 6 prompts x n=1 rows are padded to 8 (a multiple of data*fsdp = 4) and stripped again.
  out = sampler_lib.sample(sharded_params, TINY, PROMPTS, sp, jax.random.key(0), mesh=mesh)
  np.testing.assert_array_equal(out.tokens, single.tokens)
  np.testing.assert_array_equal(out.finished, single.finished)
  np.testing.assert_allclose(out.self_reward_logprob, single.self_reward_logprob, atol=1e-5)
  np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)
  # Sampling with the same key gives the same draws when no padding rows are involved; here with
  # three decode segments, so several sharded cache chunks.
  sp_t = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, eos_ids=tuple(range(10, 20)),
                        self_reward_token_id=Z_C, decode_segments=3, min_segment_tokens=1)
  a = sampler_lib.sample(params, TINY, PROMPTS[:4], sp_t, jax.random.key(3))
  b = sampler_lib.sample(sharded_params, TINY, PROMPTS[:4], sp_t, jax.random.key(3), mesh=mesh)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.self_reward_logprob, b.self_reward_logprob, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Greedy decoding equals transformers `generate` on the same tiny checkpoint.

@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_greedy_matches_transformers_generate(family, tmp_path):
  torch = pytest.importorskip("torch")
  import transformers
  from laser_jax.models import hf
  from hf_fixtures import make_tiny_hf_checkpoint

  path = make_tiny_hf_checkpoint(str(tmp_path / family), family=family)
  cfg = hf.load_hf_config(path)
  params = hf.load_hf_params(path, cfg)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  rng = np.random.default_rng(1)
  prompts = [rng.integers(4, cfg.vocab_size, size=n).tolist() for n in (3, 9, 1, 14, 6)]
  max_new = 12
  pad = 0

  def hf_generate(eos_ids):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
      gen = torch_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                 min_new_tokens=0, eos_token_id=list(eos_ids) or None, pad_token_id=pad,
                                 num_beams=1, repetition_penalty=1.0)
    new = gen[:, width:].numpy()
    return np.pad(new, ((0, 0), (0, max_new - new.shape[1])), constant_values=pad)

  # No EOS: all rows generate max_new tokens.
  sp = SamplingParams(greedy=True, max_new_tokens=max_new, pad_id=pad)
  ours = sampler_lib.sample(params, cfg, prompts, sp, jax.random.key(0))
  np.testing.assert_array_equal(ours.tokens, hf_generate(()))
  # With EOS ids chosen so that rows stop at different steps (one on the last allowed step).
  eos, finish, max_new = choose_eos_set(ours.tokens)
  sp = SamplingParams(greedy=True, max_new_tokens=max_new, pad_id=pad, eos_ids=eos, self_reward_token_id=3)
  ours = sampler_lib.sample(params, cfg, prompts, sp, jax.random.key(0))
  np.testing.assert_array_equal(ours.response_tokens, hf_generate(eos))
  np.testing.assert_array_equal(ours.lengths, [max_new if f is None else f for f in finish])
  # The self-reward score equals torch's log-softmax after `prompt + response + EOS`, at z_c.
  for i, p in enumerate(prompts):
    if not ours.finished[i]:
      continue
    seq = torch.tensor([p + ours.response_tokens[i, :ours.response_lengths[i]].tolist()])
    with torch.no_grad():
      logits = torch_model(seq).logits[0, -1].double()
    np.testing.assert_allclose(ours.self_reward_logprob[i], torch.log_softmax(logits, -1)[3].item(), atol=1e-4)
