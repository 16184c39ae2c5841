"""Tests of laser_jax.dapo: dynamic sampling, overlong shaping, truncation masking, Dr. GRPO norm."""
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

import numpy_reference as ref
from laser_jax import dapo
from laser_jax import objective as obj

SETTINGS = hypothesis.settings(max_examples=50, deadline=None)


def test_keep_groups_mask_hand_worked_non_contiguous():
  rewards = np.array([1, 0, 1, 1, 0, 0, 0.5], np.float32)
  group_ids = np.array([0, 1, 2, 0, 2, 1, 3])
  # Group 0 (1, 1) constant; 1 (0, 0) constant; 2 (1, 0) kept; 3 (size 1) constant.
  np.testing.assert_array_equal(dapo.keep_groups_mask(rewards, group_ids),
                                [0, 0, 1, 0, 1, 0, 0])


@SETTINGS
@hypothesis.given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from([0.0, 1.0])),
                           min_size=1, max_size=20))
def test_keep_mask_equals_nonzero_group_std(rows):
  group_ids = np.array([g for g, _ in rows], np.int32)
  rewards = np.array([r for _, r in rows], np.float32)
  keep = np.asarray(dapo.keep_groups_mask(rewards, group_ids, num_groups=5))
  for i, g in enumerate(group_ids):
    assert keep[i] == (ref.unbiased_std(rewards[group_ids == g]) > 0)


def _round(rng, num_prompts, n, round_index):
  """A fake sampling round: `num_prompts` groups of `n` rows, shuffled (non-contiguous)."""
  keys = np.repeat([f"r{round_index}p{p}" for p in range(num_prompts)], n)
  rewards = (rng.random(num_prompts * n) < 0.3).astype(np.float32)
  order = rng.permutation(len(keys))
  return {"group_ids": keys[order], "rewards": rewards[order],
          "payload": np.arange(len(keys))[order] + 1000 * round_index}


def test_dynamic_sampling_fills_exactly_and_keeps_whole_groups():
  rng = np.random.default_rng(0)
  rounds = [_round(rng, 6, 4, r) for r in range(10)]
  batch, info = dapo.dynamic_sampling(lambda r: rounds[r], target_groups=5, max_rounds=10)
  assert info["full"] and info["kept_groups"] == 5
  # Reference: walk the rounds, keep groups with non-constant rewards in first-appearance order.
  kept, used = [], 0
  for rd in rounds:
    used += 1
    for key in dict.fromkeys(rd["group_ids"]):
      r = rd["rewards"][rd["group_ids"] == key]
      if r.max() > r.min() and len(kept) < 5:
        kept.append((key, sorted(rd["payload"][rd["group_ids"] == key].tolist())))
    if len(kept) == 5:
      break
  assert info["rounds"] == used and info["sampled_groups"] == 6 * used
  assert sorted(np.unique(batch["group_ids"]).tolist()) == list(range(5))
  for new_id, (_, payload) in enumerate(kept):
    rows = batch["group_ids"] == new_id
    assert sorted(batch["payload"][rows].tolist()) == payload
    assert batch["rewards"][rows].std() > 0


def test_dynamic_sampling_is_bounded_and_reports_partial():
  def all_constant(r):
    return {"group_ids": np.repeat(np.arange(3), 2), "rewards": np.ones(6, np.float32)}
  batch, info = dapo.dynamic_sampling(all_constant, target_groups=2, max_rounds=3)
  assert batch == {} and info == {"rounds": 3, "full": False, "kept_groups": 0,
                                  "sampled_groups": 9}
  buf = dapo.DynamicSamplingBuffer(4, 2)
  assert buf.add({"group_ids": np.array([0, 0, 1, 1]),
                  "rewards": np.array([1, 0, 1, 0.0])}) == 2
  buf.add({"group_ids": np.array([5, 5]), "rewards": np.array([0, 1.0])})
  assert buf.done and not buf.full
  batch, info = buf.result()
  np.testing.assert_array_equal(batch["group_ids"], [0, 0, 1, 1, 2, 2])
  assert info["kept_groups"] == 3 and info["rounds"] == 2
  with pytest.raises(RuntimeError, match="already full or out of rounds"):
    buf.add({"group_ids": np.array([0]), "rewards": np.array([1.0])})


def test_dynamic_sampling_bad_input_errors():
  buf = dapo.DynamicSamplingBuffer(2, 2)
  with pytest.raises(KeyError, match="lacks 'group_ids'"):
    buf.add({"rewards": np.zeros(2)})
  with pytest.raises(ValueError, match="'x' has 3 rows, 'rewards' has 2"):
    buf.add({"rewards": np.zeros(2), "group_ids": np.zeros(2), "x": np.zeros(3)})
  with pytest.raises(ValueError, match="must be positive"):
    dapo.DynamicSamplingBuffer(0, 1)


def test_overlong_penalty_hand_worked_and_reference():
  # max 100, cache 20: free up to 80; 90 -> -0.5; 100 -> -1 (factor 1); factor 2 doubles.
  lengths = np.array([10, 80, 81, 90, 100])
  got = np.asarray(dapo.overlong_reward_penalty(lengths, 100, 20))
  np.testing.assert_allclose(got, [0, 0, -0.05, -0.5, -1.0], rtol=1e-6, atol=1e-7)
  got2 = np.asarray(dapo.overlong_reward_penalty(lengths, 100, 20, penalty_factor=2.0))
  np.testing.assert_allclose(got2, [ref.overlong_penalty(l, 100, 20, 2.0) for l in lengths],
                             rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="overlong_buffer_len must be in"):
    dapo.overlong_reward_penalty(lengths, 100, 0)


def test_mask_truncated_removes_rows_from_policy_loss():
  mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]], np.float32)
  finished = np.array([True, False, True])
  m = np.asarray(dapo.mask_truncated(mask, finished))
  np.testing.assert_array_equal(m, [[1, 1, 0], [0, 0, 0], [1, 0, 0]])
  logp = np.zeros((3, 3), np.float32)
  loss, _ = obj.policy_loss(logp, logp, np.array([1.0, 5.0, -2.0]), m)
  assert float(loss.value) == pytest.approx(-(1 + 1 - 2) / 3)  # Row 1's advantage is gone.


def test_drgrpo_normaliser_is_the_constant_length_mode():
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
  assert dapo.drgrpo_normaliser(2, 4) == 8.0
  assert float(obj.aggregation_count(mask, "seq-mean-token-sum-norm", 4)) == 8.0
  # sum over tokens / (2 sequences * 4): a short sequence is NOT up-weighted by its length.
  vals = np.ones((3, 4), np.float32)
  assert float(obj.aggregate(vals, mask, "seq-mean-token-sum-norm", 4).value) == 6 / 8
