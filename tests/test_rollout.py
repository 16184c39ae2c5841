"""Training-batch assembly (hand-worked layouts) and the chunked log-prob computation."""
import jax
import jax.numpy as jnp
import numpy as np

from laser_jax.generate import sampling as sampling_lib
from laser_jax.models import model as model_lib
from laser_jax.models.config import ModelConfig
from laser_jax.rl import policy, rollout

PAD, EOS = 0, 9


def _hand_batch():
  # Two prompts (bucket P = 3), R = 3: row 0 answers [5, 6] then EOS; row 1 is truncated.
  prompt_tokens = np.array([[0, 1, 2], [3, 4, 2]])
  prompt_mask = np.array([[0, 1, 1], [1, 1, 1]], bool)
  response_tokens = np.array([[5, 6, EOS], [7, 7, 7]])  # EOS included, as SampleOutput gives them.
  response_lengths = np.array([3, 3])
  finished = np.array([True, False])
  return prompt_tokens, prompt_mask, response_tokens, response_lengths, finished


def test_training_batch_layout_hand_worked():
  b = rollout.build_training_batch(*_hand_batch(), pad_id=PAD)
  np.testing.assert_array_equal(b["tokens"], [[0, 1, 2, 5, 6, 9, 0], [3, 4, 2, 7, 7, 7, 0]])
  np.testing.assert_array_equal(b["attention_mask"], [[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(b["positions"], [[0, 0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 4, 5, 5]])
  np.testing.assert_array_equal(b["targets"], [[1, 2, 5, 6, 9, 0, 0], [4, 2, 7, 7, 7, 0, 0]])
  # Targets that are response tokens (and the EOS of the finished row).
  np.testing.assert_array_equal(b["response_mask"], [[0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0]])
  assert b["eos_index"][0] == 5  # The EOS sits at index P + length = 3 + 2.


def test_old_logprobs_are_placed_at_their_targets():
  # Row 0: its two tokens, then its EOS (-0.9); row 1 (truncated): three tokens.
  lp = np.array([[-0.1, -0.2, -0.9], [-0.3, -0.4, -0.5]], np.float32)
  out = rollout.old_logprobs_from_sampler(lp, prompt_len=3)
  np.testing.assert_allclose(out, [[0, 0, -0.1, -0.2, -0.9, 0, 0], [0, 0, -0.3, -0.4, -0.5, 0, 0]])


def test_concat_samples_pads_prompts_and_offsets_groups():
  def make(p, groups):
    n = len(groups)
    return sampling_lib.SampleOutput(
        prompt_tokens=np.full((n, p), 4), prompt_mask=np.ones((n, p), bool),
        tokens=np.ones((n, 2), np.int32), lengths=np.full(n, 2), logprobs=np.zeros((n, 2)),
        eos_token=np.full(n, EOS), eos_logprob=np.zeros(n), finished=np.ones(n, bool),
        truncated=np.zeros(n, bool), self_reward_logprob=np.zeros(n),
        group_ids=np.array(groups), pad_id=PAD)
  merged = rollout.concat_samples([make(2, [0, 0, 1, 1]), make(4, [0, 0])], PAD)
  assert merged.prompt_tokens.shape == (6, 4)
  np.testing.assert_array_equal(merged.prompt_tokens[0], [PAD, PAD, 4, 4])
  np.testing.assert_array_equal(merged.prompt_mask[0], [False, False, True, True])
  np.testing.assert_array_equal(merged.group_ids, [0, 0, 1, 1, 2, 2])


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
