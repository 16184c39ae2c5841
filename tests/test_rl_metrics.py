"""Tests of laser_jax.rl.rl_metrics against hand-worked cases and NumPy references."""
import math

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

import numpy_reference as ref
from laser_jax.rl import rl_metrics
from laser_jax.rl.rl_metrics import SumCount

SETTINGS = hypothesis.settings(max_examples=50, deadline=None)


def _strip(metrics, suffix=""):
  """{"acc_correct": ...} from {"self_verification/acc_correct" + suffix: ...}."""
  return {k[len("self_verification/"):len(k) - len(suffix)]: v for k, v in metrics.items()
          if k.startswith("self_verification/") and k.endswith(suffix)}


def test_self_verification_finished_hand_worked():
  # Finished correct rows: 0.9 hit, 0.2 miss, 0.7 hit -> 2/3; incorrect: 0.1 hit, 0.6 miss, 0.5 hit.
  # Truncated rows (NaN score, even a "correct" one) are ignored. A score of exactly 0.5 is "incorrect".
  scores = np.array([0.9, 0.2, 0.7, 0.1, 0.6, np.nan, 0.5], np.float32)
  rewards = np.array([1, 1, 1, 0, 0, 1, 0.0])
  finished = np.array([1, 1, 1, 1, 1, 0, 1], bool)
  m = _strip(rl_metrics.self_verification_finished(scores, rewards, finished), "_finished")
  a, b = 2 / 3, 2 / 3  # Incorrect: 0.1 and 0.5 predicted incorrect, 0.6 not -> 2/3.
  assert m["acc_correct"] == pytest.approx(a)
  assert m["acc_incorrect"] == pytest.approx(b)
  assert m["acc"] == pytest.approx(4 / 6)
  assert m["f1"] == pytest.approx(2 * a * b / (a + b))
  assert (m["num_correct"], m["num_incorrect"]) == (3, 3)
  # AUROC by hand: of the 9 (correct, incorrect) pairs of finished rows, the correct one scores
  # higher in 7 (0.9 and 0.7 beat 0.1, 0.6 and 0.5; 0.2 beats 0.1).
  assert m["auroc"] == pytest.approx(7 / 9)
  full = rl_metrics.self_verification_finished(scores, rewards, finished)
  assert full["self_verification/num_unscored"] == 1
  assert full["self_verification/score/mean"] == pytest.approx(np.mean([0.9, 0.2, 0.7, 0.1, 0.6, 0.5]), rel=1e-6)


def test_self_verification_finished_empty_class_is_nan():
  m = rl_metrics.self_verification_finished(np.array([0.9, 0.1]), np.ones(2), np.ones(2, bool))
  assert m["self_verification/acc_correct_finished"] == 0.5
  assert math.isnan(m["self_verification/acc_incorrect_finished"]) and math.isnan(m["self_verification/f1_finished"])
  assert math.isnan(m["self_verification/auroc_finished"])
  m = rl_metrics.self_verification_finished(np.array([0.2, 0.9]), np.array([1, 0.0]), np.ones(2, bool))
  assert m["self_verification/f1_finished"] == 0.0  # Both class accuracies 0: F1 is 0, not NaN.


def test_official_self_verification_hand_worked_truncated_unscored_and_empty_class():
  # Every response counts. Correct: 0.9 hit, NaN (unscored: predicted "incorrect") miss, 0.7 hit
  # -> 2/3; incorrect: 0.1 hit, NaN hit (unscored = "incorrect"), 0.6 miss -> 2/3.
  scores = np.array([0.9, np.nan, 0.7, 0.1, np.nan, 0.6])
  rewards = np.array([1, 1, 1, 0, 0, 0.0])
  m = _strip(rl_metrics.self_verification(scores, rewards))
  assert (m["acc_correct"], m["acc_incorrect"], m["acc"]) == pytest.approx((2 / 3, 2 / 3, 4 / 6))
  assert m["f1"] == pytest.approx(2 / 3)
  assert (m["num_correct"], m["num_incorrect"], m["num_unscored"]) == (3, 3, 2)
  # AUROC: unscored rows score lowest. Pairs (correct vs incorrect): 0.9 beats all 3, 0.7 beats
  # all 3, NaN ties NaN (1/2) and loses to 0.1 and 0.6 -> (3 + 3 + 0.5) / 9.
  assert m["auroc"] == pytest.approx(6.5 / 9)
  # ECE: P = 0, 0 in bin 0 (accuracy 1/2, confidence 0); 0.1 in bin 1 (0 vs 0.1); 0.6 in bin 6
  # (0 vs 0.6); 0.7 in bin 7 (1 vs 0.7); 0.9 in bin 9 (1 vs 0.9).
  assert m["ece"] == pytest.approx((2 * 0.5 + 0.1 + 0.6 + 0.3 + 0.1) / 6)
  assert m["score/mean"] == pytest.approx(np.mean([0.9, 0.7, 0.1, 0.6]))
  # An empty class has accuracy 0, not NaN; and F1 = 0 with it.
  m = _strip(rl_metrics.self_verification(np.array([0.9, np.nan]), np.ones(2)))
  assert (m["acc_correct"], m["acc_incorrect"], m["f1"], m["num_incorrect"]) == (0.5, 0.0, 0.0, 0)
  assert math.isnan(m["auroc"])  # a ranking of one class is undefined
  # Both accuracies 0: F1 0.
  assert _strip(rl_metrics.self_verification(np.array([0.2, 0.9]), np.array([1, 0.0])))["f1"] == 0.0


@SETTINGS
@hypothesis.given(st.lists(st.tuples(st.floats(-1, 2), st.booleans(), st.booleans()),
                           min_size=1, max_size=24))
def test_self_verification_finished_matches_reference(rows):
  scores = np.array([s for s, _, _ in rows], np.float32)
  rewards = np.array([float(c) for _, c, _ in rows])
  finished = np.array([f for _, _, f in rows])
  m = rl_metrics.self_verification_finished(scores, rewards, finished)
  want = ref.self_verification(scores, rewards, finished)
  got = [float(m[f"self_verification/{k}_finished"]) for k in ("acc_correct", "acc_incorrect", "acc", "f1",
                                                               "num_correct", "num_incorrect")]
  np.testing.assert_allclose(got, want, rtol=1e-5, equal_nan=True)


@SETTINGS
@hypothesis.given(st.lists(st.tuples(st.one_of(st.sampled_from([0.0, 0.5, 1.0, math.nan]), st.floats(-1, 2)),
                                     st.booleans()), min_size=1, max_size=24))
def test_official_self_verification_matches_reference(rows):
  """Unscored (NaN) responses, empty classes and ties included, against the SPEC's wording."""
  scores = np.array([s for s, _ in rows], np.float64)
  rewards = np.array([float(c) for _, c in rows])
  m = rl_metrics.self_verification(scores, rewards)
  got = [float(m[f"self_verification/{k}"]) for k in ("acc_correct", "acc_incorrect", "acc", "f1",
                                                      "num_correct", "num_incorrect")]
  np.testing.assert_allclose(got, ref.self_verification_official(list(scores), rewards), rtol=1e-12)
  np.testing.assert_allclose(m["self_verification/auroc"], ref.auroc_unscored_lowest(scores, rewards),
                             rtol=1e-12, equal_nan=True)
  np.testing.assert_allclose(m["self_verification/ece"], ref.ece_unscored_zero(scores, rewards), rtol=1e-9)
  assert m["self_verification/num_unscored"] == int(np.isnan(scores).sum())


def test_rollout_metrics_hand_worked():
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], np.float32)
  finished = np.array([True, False, True, True])
  rewards = np.array([1, 1, 0, 1.0])
  group_ids = np.array([0, 0, 1, 1])  # Group 0 constant, group 1 not.
  m = {k: float(v) for k, v in rl_metrics.rollout_metrics(rewards, mask.sum(axis=1), finished,
                                                          group_ids).items()}
  assert m == {"rollout/reward/mean": 0.75, "rollout/response_length/mean": 2.5,
               "rollout/response_length/max": 4.0, "rollout/truncated_frac": 0.25,
               "rollout/zero_std_group_frac": 0.5}
  # Non-contiguous groups, one of size 1 (constant by definition): 2 of 3 groups constant.
  assert float(rl_metrics.zero_std_group_fraction(np.array([1, 0, 0, 1.0]),
                                                  np.array([2, 0, 2, 1]))) == pytest.approx(2 / 3)


def test_clip_fractions_and_approx_kl_hand_worked():
  log_ratio = np.log(np.array([[1.5, 0.5, 4.0, 1.0]], np.float32))
  adv = np.array([[1.0, -1.0, -1.0, 1.0]])
  mask = np.ones((1, 4))
  m = rl_metrics.clip_fractions(log_ratio, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2,
                                clip_ratio_c=3.0)
  # Token 0: A > 0, rho 1.5 > 1.2 (eps_high); token 1: A < 0, rho 0.5 < 0.8 (eps_low); token 2:
  # A < 0, rho 4 > 3 (dual clip); token 3: inside every bound.
  keys = ("actor/pg_clipfrac", "actor/pg_clipfrac_eps_high", "actor/pg_clipfrac_eps_low", "actor/pg_clipfrac_lower")
  assert [float(m[k].value) for k in keys] == [0.5, 0.25, 0.25, 0.25]
  off = rl_metrics.clip_fractions(log_ratio, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2,
                                  clip_ratio_c=None)
  assert float(off["actor/pg_clipfrac_lower"].value) == 0.0
  assert float(rl_metrics.approx_kl(log_ratio, mask).value) == pytest.approx(
      -np.log([1.5, 0.5, 4.0, 1.0]).mean(), rel=1e-5)


def test_sum_count_accumulation_is_exact_unlike_mean_of_means():
  a = rl_metrics.masked_token_mean(np.array([[1.0, 3.0]]), np.array([[1, 1]]))
  b = rl_metrics.masked_token_mean(np.array([[10.0, np.nan]]), np.array([[1, 0]]))
  total = rl_metrics.add_sum_counts(a, b)
  assert float(total.value) == pytest.approx(14 / 3)
  acc = rl_metrics.finalize_metrics(rl_metrics.accumulate_metrics([{"x": a, "n": 1.0},
                                                                   {"x": b, "n": 2.0}]))
  assert acc == {"x": pytest.approx(14 / 3), "n": 3.0}
  assert (float(a.value) + float(b.value)) / 2 != pytest.approx(14 / 3)
  assert float(SumCount(np.float32(0), np.float32(0)).value) == 0.0
  with pytest.raises(ValueError, match="empty list"):
    rl_metrics.accumulate_metrics([])
  assert isinstance(jax.tree.leaves(total)[0], jax.Array)


def _auroc_by_pairs(scores, labels):
  """Every (correct, incorrect) pair: 1 if the correct one scores higher, 1/2 on a tie."""
  pos = [s for s, l in zip(scores, labels) if l]
  neg = [s for s, l in zip(scores, labels) if not l]
  return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_auroc_hand_worked_ties_and_empty_class():
  # Correct .9 .5 .5, incorrect .5 .1: pairs (.9 beats both) 2, (.5 vs .5) 1/2 + (.5 beats .1) 1, twice.
  assert rl_metrics.auroc([0.9, 0.5, 0.5, 0.5, 0.1], [1, 1, 1, 0, 0]) == pytest.approx((2 + 1.5 + 1.5) / 6)
  assert rl_metrics.auroc([0.2, 0.8], [1, 0]) == 0.0 and rl_metrics.auroc([0.8, 0.2], [1, 0]) == 1.0
  assert math.isnan(rl_metrics.auroc([0.3, 0.4], [1, 1]))  # one class empty: undefined


@SETTINGS
@hypothesis.given(st.lists(st.tuples(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, -1.0]), st.booleans()),
                           min_size=2, max_size=30))
def test_auroc_equals_the_pairwise_count(rows):
  scores, labels = [s for s, _ in rows], [l for _, l in rows]
  hypothesis.assume(any(labels) and not all(labels))
  assert rl_metrics.auroc(scores, labels) == pytest.approx(_auroc_by_pairs(scores, labels))


def test_calibration_hand_worked():
  # Bin [0, .1): .05 (wrong); bin [.9, 1]: .95, 1.0 and 1.7 (clipped to 1) with 2 of 3 right.
  ece, bins = rl_metrics.calibration([0.05, 0.95, 1.0, 1.7], [0, 1, 1, 0])
  assert [(b["low"], b["count"]) for b in bins] == [(0.0, 1), (0.9, 3)]
  want = 1 / 4 * abs(0 - 0.05) + 3 / 4 * abs(2 / 3 - (0.95 + 1 + 1) / 3)
  assert ece == pytest.approx(want)
  assert math.isnan(rl_metrics.calibration([], [])[0])
  # Truncated rows are left out of the score's separation.
  sep = rl_metrics.score_separation([0.9, np.nan, 0.1], [1, 1, 0], [True, False, True])
  assert sep["auroc"] == 1.0 and sum(b["count"] for b in sep["reliability"]) == 2



def test_step_model_flops_by_hand():
  # 1M parameters, 1000 tokens: the sampler's forward 2N, the update 6N per token = 8e9 FLOPs;
  # each log-prob pass (recomputed old log-probs, pi_ref) adds another 2N per token.
  assert rl_metrics.step_model_flops(1_000_000, 1000, 0) == 8e9
  assert rl_metrics.step_model_flops(1_000_000, 1000, 2) == 12e9


def test_problem_text_ids_and_rows_by_problem_hand_worked():
  # Two hosts' rows, each host numbering its own problems 0, 1: ids are the first row (in the
  # host's list) of the same problem with the same text, so "b" of problem 0 (row 1) and of
  # problem 1 (row 3) stay apart.
  texts, group_ids = ["a", "b", "a", "b", "b", "c"], [0, 0, 0, 1, 1, 1]
  np.testing.assert_array_equal(rl_metrics.problem_text_ids(texts, group_ids), [0, 1, 0, 3, 3, 5])
  # Rows in any order -> [problems, n] in group-id order, each problem's rows in their order.
  acc, ids = rl_metrics.rows_by_problem([1, 0, 1, 0], [1.0, 0.0, 0.5, 0.25], [7, 8, 9, 7])
  np.testing.assert_array_equal(acc, [[0.0, 0.25], [1.0, 0.5]])
  np.testing.assert_array_equal(ids, [[8, 7], [7, 9]])
  with pytest.raises(ValueError, match="different numbers of responses"):
    rl_metrics.rows_by_problem([0, 0, 1], [1, 2, 3])
  # AUROC 1 and 0 within the two problems; the distinct shares count those ids as they count texts.
  measures = rl_metrics.within_problem_measures([[1, 1, 0], [0, 0, 1]], [[0.9, 0.9, 0.1], [0.4, 0.4, 0.3]],
                                                [rl_metrics.problem_text_ids(["x", "x", "y"], [0] * 3),
                                                 rl_metrics.problem_text_ids(["x", "x", "z"], [1] * 3)])
  assert measures == {"self_verification/within_auroc": 0.5, "self_verification/within_auroc_problems": 2,
                      "reward/variance_explained_by_problem": pytest.approx(1 / 9),
                      "distinct_frac/correct": pytest.approx(2 / 3), "distinct_frac/incorrect": pytest.approx(2 / 3)}
