"""Training rows (hand-worked layouts), the sampler-call policy and the chunked log-prob computation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from laser_jax.generate import sampling as sampling_lib
from laser_jax.models import model as model_lib
from laser_jax.models.config import ModelConfig
from laser_jax.generate import calls
from laser_jax.rl import policy, records

PAD, EOS = 0, 9


def _sample(prompt_tokens, prompt_mask, tokens, lengths, finished, logprobs=None, eos_logprob=None, groups=None):
  n, r = np.shape(tokens)
  finished = np.asarray(finished, bool)
  return sampling_lib.SampleOutput(
      prompt_tokens=np.asarray(prompt_tokens), prompt_mask=np.asarray(prompt_mask, bool),
      tokens=np.asarray(tokens, np.int32), lengths=np.asarray(lengths, np.int32),
      logprobs=np.zeros((n, r), np.float32) if logprobs is None else np.asarray(logprobs, np.float32),
      eos_token=np.where(finished, EOS, PAD), eos_logprob=np.zeros(n) if eos_logprob is None else eos_logprob,
      finished=finished, truncated=~finished, self_reward_logprob=np.where(finished, -3.0, np.nan),
      group_ids=np.arange(n) if groups is None else np.asarray(groups), pad_id=PAD)


def _hand_sample(**kw):
  # Two prompts (bucket P = 3), R = 3: row 0 answers [5, 6] then EOS; row 1 is truncated.
  return _sample([[0, 1, 2], [3, 4, 2]], [[0, 1, 1], [1, 1, 1]], [[5, 6, PAD], [7, 7, 7]], [2, 3],
                 [True, False], **kw)


def test_training_rows_layout_hand_worked():
  seq, response_mask = records.build_sequences(_hand_sample())
  np.testing.assert_array_equal(seq.tokens, [[0, 1, 2, 5, 6, 9, 0], [3, 4, 2, 7, 7, 7, 0]])
  np.testing.assert_array_equal(seq.attention_mask, [[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(seq.positions, [[0, 0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 4, 5, 5]])
  np.testing.assert_array_equal(seq.targets, [[1, 2, 5, 6, 9, 0, 0], [4, 2, 7, 7, 7, 0, 0]])
  # Targets that are response tokens (and the EOS of the finished row).
  np.testing.assert_array_equal(response_mask, [[0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0]])
  assert seq.eos_index[0] == 5  # The EOS sits at index P + length = 3 + 2.
  assert seq.eos_index[1] == 2  # Truncated: no EOS, a valid index whose read-out is masked.
  # The schema declared on the fields is the rows' own.
  for name in ("tokens", "positions", "attention_mask", "targets", "eos_index"):
    field = {f.name: f for f in dataclasses.fields(records.Sequences)}[name]
    assert getattr(seq, name).dtype == field.metadata["dtype"], name
    assert getattr(seq, name).ndim == 1 + len(field.metadata["row_shape"]), name


def test_sampler_old_logprobs_are_placed_at_their_targets():
  # Row 0: its two tokens, then its EOS (-0.9); row 1 (truncated): three tokens.
  out = _hand_sample(logprobs=[[-0.1, -0.2, 0.0], [-0.3, -0.4, -0.5]], eos_logprob=np.array([-0.9, np.nan]))
  np.testing.assert_allclose(records.sampler_old_logprobs(out),
                             [[0, 0, -0.1, -0.2, -0.9, 0, 0], [0, 0, -0.3, -0.4, -0.5, 0, 0]])


def test_concat_samples_pads_prompts_and_offsets_groups():
  def make(p, groups):
    n = len(groups)
    return _sample(np.full((n, p), 4), np.ones((n, p)), np.ones((n, 2)), np.full(n, 2), np.ones(n), groups=groups)
  merged = calls.concat_samples([make(2, [0, 0, 1, 1]), make(4, [0, 0])], [0, 2])
  assert merged.prompt_tokens.shape == (6, 4)
  np.testing.assert_array_equal(merged.prompt_tokens[0], [PAD, PAD, 4, 4])
  np.testing.assert_array_equal(merged.prompt_mask[0], [False, False, True, True])
  np.testing.assert_array_equal(merged.group_ids, [0, 0, 1, 1, 2, 2])
  # Offsets are the given starts, not inferred from the rows (a call whose first prompt is 5).
  np.testing.assert_array_equal(calls.concat_samples([make(2, [0, 0, 1, 1]), make(4, [0, 0])], [0, 5]).group_ids,
                                [0, 0, 1, 1, 5, 5])


def test_sample_in_calls_keys_calls_by_index_and_pads_the_last_call():
  """Call i gets fold_in(rng, i) and exactly k prompts (the last padded with copies of its last
  prompt, whose rows are dropped); group ids index the call's prompts."""
  seen = []

  def sample_call(token_ids, key):
    seen.append((token_ids, jax.random.key_data(key)))
    n = len(token_ids)  # one row per prompt: the row's token is the prompt's first token
    return _sample(np.zeros((n, 1)), np.ones((n, 1)), np.array(token_ids)[:, :1], np.ones(n), np.ones(n))

  rng = jax.random.key(7)
  prompts = [[10], [11], [12], [13], [14]]
  got = list(calls.sample_in_calls(sample_call, prompts, rng, prompts_per_call=2))
  assert [start for start, _ in got] == [0, 2, 4]
  assert [ids for ids, _ in seen] == [[[10], [11]], [[12], [13]], [[14], [14]]]
  for i, (_, key) in enumerate(seen):
    np.testing.assert_array_equal(key, jax.random.key_data(jax.random.fold_in(rng, i)))
  assert [out.tokens[:, 0].tolist() for _, out in got] == [[10, 11], [12, 13], [14]]
  # One call (prompts_per_call = 0) is call 0: fold_in(rng, 0) too, not rng itself.
  seen.clear()
  (only,) = calls.sample_in_calls(sample_call, prompts, rng)
  assert len(seen[0][0]) == 5 and only[1].tokens.shape[0] == 5
  np.testing.assert_array_equal(seen[0][1], jax.random.key_data(jax.random.fold_in(rng, 0)))


def test_chunked_token_logprobs_equal_full_and_match_log_softmax():
  cfg = ModelConfig(family="qwen2", vocab_size=50, hidden_size=32, intermediate_size=64,
                              num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, qkv_bias=True)
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 50)
  mask = jnp.ones((2, 11), bool)
  pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
  hidden = model_lib.forward(params, cfg, tokens, pos, mask, return_hidden=True)
  targets = jnp.roll(tokens, -1, axis=1)
  full = policy.token_logprobs(params, cfg, hidden, targets, temperature=0.7)
  chunked = policy.token_logprobs(params, cfg, hidden, targets, temperature=0.7, chunk=4)
  logits = np.asarray(model_lib.forward(params, cfg, tokens, pos, mask), np.float64) / 0.7
  ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  ref = np.take_along_axis(ref, np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(full, ref, atol=1e-5)
  np.testing.assert_allclose(chunked, full, atol=1e-6)
  # Gradients agree too (the chunked path is rematerialised).
  g_full = jax.grad(lambda p: policy.token_logprobs(p, cfg, hidden, targets, 0.7).sum())(params)
  g_chunk = jax.grad(lambda p: policy.token_logprobs(p, cfg, hidden, targets, 0.7, chunk=4).sum())(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_full, g_chunk)


def test_self_reward_logprob_reads_eos_position():
  cfg = ModelConfig(family="llama", vocab_size=40, hidden_size=32, intermediate_size=64,
                              num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16)
  params = model_lib.init_params(cfg, jax.random.key(3))
  tokens = jax.random.randint(jax.random.key(4), (3, 7), 0, 40)
  mask = jnp.ones((3, 7), bool)
  pos = jnp.broadcast_to(jnp.arange(7), (3, 7))
  hidden = model_lib.forward(params, cfg, tokens, pos, mask, return_hidden=True)
  eos_index = jnp.array([2, 6, 4])
  got = policy.self_reward_logprob(params, cfg, hidden, eos_index, token_id=17)
  logits = np.asarray(model_lib.forward(params, cfg, tokens, pos, mask))
  want = [jax.nn.log_softmax(logits[i, int(eos_index[i])])[17] for i in range(3)]
  np.testing.assert_allclose(got, want, atol=1e-5)
