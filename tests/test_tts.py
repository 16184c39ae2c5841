"""Test-time metrics against hand-computed values."""
import math

import numpy as np
import pytest

from laser_jax.evaluation import tts

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
  # Negative weights still pick among present answers: -0.1 beats -0.5.
  assert tts.vote(["1", "2"], [0, 1], [-0.5, -0.1]) == 1.0


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
