"""Tests of laser_jax.rl.dapo: overlong shaping, truncation masking, Dr. GRPO norm."""
import numpy as np
import pytest

import numpy_reference as ref
from laser_jax.rl import dapo
from laser_jax.rl import objective as obj


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
