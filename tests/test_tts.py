"""Test-time metrics against hand-computed values."""
import math

import numpy as np
import pytest

from laser_jax.evaluation import tts
from laser_jax.rl import rl_metrics

NAN = float("nan")


def test_mean_at_n():
  assert tts.mean_at_n([[1, 0, 0, 1], [1, 1, 1, 0]]) == pytest.approx(5 / 8)


def test_self_verification_hand_counts_both_conventions():
  # Correct: scores .9 .2 .7 finished, NaN truncated and unscored; incorrect: .1 .6 finished, one
  # truncated but scored after truncation (.8), two truncated and unscored.
  acc = [[1, 1, 0, 0], [1, 0, 0, 1]]
  scores = [[0.9, 0.2, 0.1, NAN], [0.7, 0.6, 0.8, NAN]]
  finished = [[1, 1, 1, 0], [1, 1, 0, 0]]
  m = {k[len("self_verification/"):]: v for k, v in tts.self_verification(acc, scores, finished=finished).items()}
  # Official: every response. Correct: .9 .7 hit, .2 and unscored miss -> 2/4; incorrect: .1 and
  # the unscored one hit ("incorrect"), .6 and .8 miss -> 2/4.
  assert (m["acc_correct"], m["acc_incorrect"], m["acc"]) == pytest.approx((1 / 2, 1 / 2, 4 / 8))
  assert m["f1"] == pytest.approx(1 / 2)
  assert (m["num_correct"], m["num_incorrect"], m["num_unscored"]) == (4, 4, 2)
  # Finished only: correct .9 .2 .7 -> 2/3; incorrect .1 .6 -> 1/2; the scored truncated .8 is left out.
  assert m["acc_correct_finished"] == pytest.approx(2 / 3)
  assert m["acc_incorrect_finished"] == pytest.approx(1 / 2)
  assert m["acc_finished"] == pytest.approx(3 / 5)
  assert m["f1_finished"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
  assert (m["num_correct_finished"], m["num_incorrect_finished"]) == (3, 2)
  # Without `finished`, the scored responses are the finished ones.
  default = tts.self_verification(acc, scores)
  assert default["self_verification/num_incorrect_finished"] == 3 and default["self_verification/f1"] == m["f1"]


def test_self_verification_threshold_is_strict_and_empty_class_conventions():
  m = tts.self_verification([[1, 1]], [[0.5, 0.51]])
  assert m["self_verification/acc_correct"] == 0.5  # 0.5 is not > 0.5
  # An empty class: accuracy 0 and F1 0 officially; NaN over the finished responses.
  assert m["self_verification/acc_incorrect"] == 0.0 and m["self_verification/f1"] == 0.0
  assert math.isnan(m["self_verification/acc_incorrect_finished"]) and math.isnan(m["self_verification/f1_finished"])
  # Both classes present and both accuracies 0: F1 0 under both conventions.
  m = tts.self_verification([[1, 0]], [[0.2, 0.9]])
  assert [m["self_verification/" + k] for k in ("acc_correct", "acc_incorrect", "f1", "f1_finished")] == [0.0] * 4


def test_vote_majority_and_weighted():
  answers = ["3", "5", "5", None, "3", "5"]
  acc = [1, 0, 0, 0, 1, 0]
  assert tts.vote(answers, acc) == 0.0  # "5" has 3 votes, "3" has 2
  # Weighted: "3" gets .9 + .8 = 1.7, "5" gets .1 + .2 + .3 = .6; the None response's 5.0 is ignored.
  assert tts.vote(answers, acc, [0.9, 0.1, 0.2, 5.0, 0.8, 0.3]) == 1.0
  # NaN adds nothing: "5" gets .1 only, "3" gets .2.
  assert tts.vote(["5", "3", "5"], [0, 1, 0], [0.1, 0.2, NAN]) == 1.0
  # Tie: the answer appearing first wins.
  assert tts.vote(["7", "8"], [0, 1]) == 0.0 and tts.vote(["8", "7"], [1, 0]) == 1.0
  assert tts.vote([None, None], [0, 0]) == 0.0
  # Vote weights must be non-negative.
  with pytest.raises(ValueError, match="non-negative"):
    tts.vote(["1", "2"], [0, 1], [-0.5, -0.1])


def test_best_of():
  assert tts.best_of([0, 1, 0], [0.3, 0.8, 0.5]) == 1.0
  assert tts.best_of([0, 1, 0], [NAN, 0.2, 0.5]) == 0.0
  assert tts.best_of([1, 0], [NAN, NAN]) == 1.0  # all truncated: the first response


def test_scaling_ks():
  assert tts.scaling_ks(1) == [1]
  assert tts.scaling_ks(32) == [1, 2, 4, 8, 16, 32]
  assert tts.scaling_ks(6) == [1, 2, 4]


def test_scaling_metrics_match_hand_enumeration():
  # One problem, n = 2: answers "a" (correct, score .2) and "b" (wrong, score .9).
  # With replacement, size-2 draws are (0,0), (0,1), (1,0), (1,1), each 1/4:
  #   maj@2: a, tie->a (first appearance), tie->a, b  => 3/4
  #   weighted maj@2: a, b (.9 > .2), b, b           => 1/4
  #   best@2: a, b, b, b                            => 1/4
  # @1 draws a single response: 1/2 for all three.
  m = tts.scaling_metrics([["a", "b"]], [[1, 0]], [[0.2, 0.9]], num_bootstrap=20000, seed=3)
  assert m["maj@1"] == pytest.approx(0.5, abs=0.02)
  assert m["best@1"] == pytest.approx(0.5, abs=0.02)
  assert m["maj@2"] == pytest.approx(0.75, abs=0.02)
  assert m["self_weighted_maj@2"] == pytest.approx(0.25, abs=0.02)
  assert m["best@2"] == pytest.approx(0.25, abs=0.02)


def test_scaling_metrics_deterministic_and_shapes():
  rng = np.random.default_rng(0)
  acc = rng.integers(0, 2, (5, 8))
  scores = rng.random((5, 8))
  answers = [[str(int(a)) for a in row] for row in acc]
  m1 = tts.scaling_metrics(answers, acc, scores, num_bootstrap=50, seed=1)
  m2 = tts.scaling_metrics(answers, acc, scores, num_bootstrap=50, seed=1)
  assert m1 == m2
  assert sorted(m1) == sorted(f"{n}@{k}" for n in ("maj", "self_weighted_maj", "best")
                              for k in (1, 2, 4, 8))
  # When the scores equal the verdicts, best@k and weighted vote = "any correct in the draw".
  m = tts.scaling_metrics(answers, acc, acc.astype(float), num_bootstrap=50, seed=1)
  assert m["best@8"] == m["self_weighted_maj@8"]
  with pytest.raises(ValueError, match="num_problems, n"):
    tts.scaling_metrics(answers[:4], acc, scores)


def test_summarize_keys():
  out = tts.summarize([["1", "2"]], [[1, 0]], [[0.9, 0.1]], num_bootstrap=10)
  assert out["reward/mean"] == 0.5 and out["self_verification/f1"] == 1.0 and "best@2" in out
  assert out["self_verification/f1_finished"] == 1.0
  # The within-problem measures and the likelihood baselines are always there (NaN without their input).
  assert out["self_verification/within_auroc"] == 1.0 and out["self_verification/within_auroc_problems"] == 1
  assert out["reward/variance_explained_by_problem"] == 0.0
  assert math.isnan(out["distinct_frac/correct"]) and math.isnan(out["best_by_likelihood@2"])
  out = tts.summarize([["1", "2"]], [[1, 0]], [[0.9, 0.1]], num_bootstrap=10, likelihoods=[[-1.0, -0.5]],
                      responses=[["x", "y"]])
  assert out["best_by_likelihood@2"] < out["best@2"]  # likelihood prefers the wrong "2"; the score, the right "1"
  assert out["distinct_frac/correct"] == 1.0 and out["distinct_frac/incorrect"] == 1.0


def test_self_reward_weights_clip_negative_scores():
  np.testing.assert_array_equal(tts.self_reward_weights([0.7, -0.4, NAN, 0.0]), [0.7, 0.0, 0.0, 0.0])
  # A wrong answer sharing its group with a negative-score response: "7" (wrong) .6 and -0.9,
  # "8" (right) .5. Raw sums: 7 -> -0.3, 8 -> .5 (the wrong answer cancelled itself). Clipped:
  # 7 -> .6 > .5: the right answer's votes are compared with the wrong answer's positive votes only.
  assert tts.vote(["7", "7", "8"], [0, 0, 1], tts.self_reward_weights([0.6, -0.9, 0.5])) == 0.0
  # A right answer with a negative-score duplicate keeps its other votes: "1" (right) .5 and -3.0,
  # "2" (wrong) .4. Raw: 1 -> -2.5 loses; clipped: 1 -> .5 wins.
  assert tts.vote(["1", "1", "2"], [1, 1, 0], tts.self_reward_weights([0.5, -3.0, 0.4])) == 1.0
  # In the bootstrap, against the expectation over all 27 draws of k = 3 with replacement, with
  # weights .5, 0, .4: a draw is right iff "1" is present and its weight beats "2"'s (a tie goes
  # to the answer drawn first).
  m = tts.scaling_metrics([["1", "1", "2"]], [[1, 1, 0]], [[0.5, -3.0, 0.4]], ks=[3], num_bootstrap=20000, seed=0)
  import itertools
  w = [0.5, 0.0, 0.4]
  want = 0.0
  for d in itertools.product(range(3), repeat=3):
    one, two = sum(w[j] for j in d if j < 2), sum(w[j] for j in d if j == 2)
    present_one = any(j < 2 for j in d)
    first_is_one = d[0] < 2
    want += (present_one and (one > two or (one == two and first_is_one))) / 27
  assert m["self_weighted_maj@3"] == pytest.approx(want, abs=0.01)


def test_within_problem_auroc_hand_worked():
  # Problem 0: correct scores .9 .2, incorrect .5: pairs (.9>.5) 1, (.2<.5) 0 -> 1/2.
  # Problem 1: correct .3, incorrect .1 and NaN (unscored, left out) -> 1.
  # Problem 2: all correct -> not counted. Problem 3: one correct with a score, the incorrect unscored -> not counted.
  acc = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
  scores = [[0.9, 0.2, 0.5], [0.3, 0.1, NAN], [0.1, 0.2, 0.3], [0.4, NAN, NAN]]
  value, count = rl_metrics.within_problem_auroc(acc, scores)
  assert (value, count) == (pytest.approx(0.75), 2)
  # Ties count 1/2; the over-all AUROC can be high while within a problem it is chance: each
  # problem's scores are its difficulty.
  value, count = rl_metrics.within_problem_auroc([[1, 0], [1, 0]], [[0.8, 0.8], [0.1, 0.1]])
  assert (value, count) == (0.5, 2)
  value, count = rl_metrics.within_problem_auroc([[1, 1]], [[0.1, 0.2]])
  assert math.isnan(value) and count == 0


def test_distinct_fractions_and_variance_explained_hand_worked():
  responses = [["a", "a", "b", "c"], ["a", "d", "d", "d"]]
  acc = [[1, 1, 0, 0], [1, 0, 0, 0]]
  # Correct: "a", "a" (problem 0) and "a" (problem 1: another problem, so distinct) -> 2 / 3.
  # Incorrect: "b", "c" (problem 0), "d" x3 (problem 1) -> 3 / 5.
  assert rl_metrics.distinct_fractions(responses, acc) == {"distinct_frac/correct": pytest.approx(2 / 3),
                                                   "distinct_frac/incorrect": pytest.approx(3 / 5)}
  assert math.isnan(rl_metrics.distinct_fractions([["x"]], [[0]])["distinct_frac/correct"])
  # Rewards [1 1 0 0], [1 0 0 0]: mean 3/8, total variance 3/8 * 5/8 = 15/64; problem means 1/2 and
  # 1/4 around 3/8: between variance (1/8)^2 = 1/64 -> 1/15.
  assert rl_metrics.reward_variance_explained_by_problem(acc) == pytest.approx(1 / 15)
  assert rl_metrics.reward_variance_explained_by_problem([[1, 1], [0, 0]]) == 1.0
  assert rl_metrics.reward_variance_explained_by_problem([[1, 0], [0, 1]]) == 0.0
  assert math.isnan(rl_metrics.reward_variance_explained_by_problem([[1, 1], [1, 1]]))


def test_likelihood_baselines_hand_enumeration():
  # One problem, n = 2: "a" correct (mean token log-prob -0.1, score .2), "b" wrong (-2.0, score .9).
  # Draws of 2 with replacement, each 1/4: (0,0) a, (0,1) and (1,0): best by likelihood a, weighted
  # by exp: e^-0.1 > e^-2 -> a; (1,1) b. Both baselines 3/4; the score's best@2 is 1/4.
  m = tts.scaling_metrics([["a", "b"]], [[1, 0]], [[0.2, 0.9]], num_bootstrap=20000, seed=3,
                          likelihoods=[[-0.1, -2.0]])
  assert m["best_by_likelihood@2"] == pytest.approx(0.75, abs=0.02)
  assert m["likelihood_weighted_maj@2"] == pytest.approx(0.75, abs=0.02)
  assert m["best@2"] == pytest.approx(0.25, abs=0.02)
  np.testing.assert_allclose(tts.likelihood_weights([0.0, -1.0]), [1.0, math.exp(-1.0)])
  # Weights, not a max: two wrong "b" at -0.5 (e^-.5 = .61 each, 1.21) outvote one right "a" at 0.0 (1.0).
  assert tts.vote(["a", "b", "b"], [1, 0, 0], tts.likelihood_weights([0.0, -0.5, -0.5])) == 0.0
  assert tts.best_of([1, 0, 0], [0.0, -0.5, -0.5]) == 1.0
  # The same draws as the score's metrics: adding the baselines leaves those numbers unchanged.
  plain = tts.scaling_metrics([["a", "b"]], [[1, 0]], [[0.2, 0.9]], num_bootstrap=200, seed=3)
  assert {k: m2 for k, m2 in tts.scaling_metrics([["a", "b"]], [[1, 0]], [[0.2, 0.9]], num_bootstrap=200, seed=3,
                                                likelihoods=[[-0.1, -2.0]]).items() if k in plain} == plain
  with pytest.raises(ValueError, match="without NaN"):
    tts.scaling_metrics([["a", "b"]], [[1, 0]], [[0.2, 0.9]], likelihoods=[[NAN, -2.0]])
