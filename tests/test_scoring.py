"""scoring: decode -> verify -> r_s on a hand-made sampler output, against the SPEC's formula
(numpy_reference.score) and the verifier's rewards."""
import dataclasses

import jax
import numpy as np
import pytest

import numpy_reference as ref
from laser_jax.generate import sampler as sampler_lib
from laser_jax.rl import scoring
from laser_jax.data import prompts as prompts_lib
from laser_jax.data import verifier as verifier_lib

# Three prompts, two rows each; token t decodes to the character chr(ord("0") + t).
TOKENS = np.array([[5, 0, 0], [4, 2, 0], [9, 0, 0], [9, 9, 9], [1, 0, 0], [7, 0, 0]], np.int32)
LENGTHS = np.array([1, 2, 1, 3, 1, 1], np.int32)
FINISHED = np.array([True, True, True, False, True, True])
GROUP_IDS = np.array([0, 0, 1, 1, 2, 2], np.int32)
ANSWERS = ["5", "9", "7"]
Z_LOGPROB = np.array([-20.0, -25.0, -21.0, np.nan, -30.0, -13.0], np.float32)


def sample_output() -> sampler_lib.SampleOutput:
  n = len(TOKENS)
  return sampler_lib.SampleOutput(
      prompt_tokens=np.zeros((n, 2), np.int32), prompt_mask=np.ones((n, 2), bool), tokens=TOKENS,
      lengths=LENGTHS, logprobs=np.zeros(TOKENS.shape, np.float32),
      eos_token=np.where(FINISHED, 1, 0).astype(np.int32),
      eos_logprob=np.where(FINISHED, -0.1, np.nan).astype(np.float32), finished=FINISHED,
      truncated=~FINISHED, self_reward_logprob=Z_LOGPROB, group_ids=GROUP_IDS)


def decode(tokens, lengths):
  return ["".join(chr(ord("0") + t) for t in row[:k]) for row, k in zip(tokens, lengths)]


def boxed_equal(texts, references):
  """A stand-in verifier: reward 1 iff the text equals its reference."""
  rewards = np.array([float(t == r) for t, r in zip(texts, references)], np.float32)
  return verifier_lib.VerifyResult(rewards, 0, 0, np.zeros(len(texts), bool))


def test_verify_pairs_each_row_with_its_prompts_answer():
  verified = scoring.verify_samples(sample_output(), ANSWERS, decode=decode, verifier=boxed_equal)
  assert verified.texts == ["5", "42", "9", "999", "1", "7"]
  # Row r is checked against ANSWERS[GROUP_IDS[r]]: "5"=="5", "42"!="5", "9"=="9", "999"!="9", ...
  np.testing.assert_array_equal(verified.rewards, [1, 0, 1, 0, 0, 1])
  np.testing.assert_array_equal(verified.finished, FINISHED)


@pytest.mark.parametrize("exact", [False, True])
def test_scores_follow_the_spec_and_truncated_rows_get_none(exact):
  ref_z = np.array([-22.0, -24.0, -20.5, -1.0, -26.0, -23.5])
  calls = []

  def ref_z_logprob_fn(out):
    calls.append(out)
    return ref_z

  scored = scoring.score_samples(sample_output(), ANSWERS, decode=decode, verifier=boxed_equal,
                                 score=scoring.Score(kl_coef=0.1, ref_constant=-23.0,
                                                     ref_z_logprob_fn=ref_z_logprob_fn if exact else None))
  want = ref.score(Z_LOGPROB, beta_v=0.1, c_ref=-23.0, ref_z_logprob=ref_z if exact else None)
  np.testing.assert_allclose(scored.scores[FINISHED], want[FINISHED], rtol=1e-12)
  assert np.isnan(scored.scores[~FINISHED]).all() and np.isnan(scored.z_logprob[~FINISHED]).all()
  # By hand: row 0, beta_v * (-20 - (-23)) = 0.3 with c_ref; 0.1 * (-20 - (-22)) = 0.2 exactly.
  assert scored.scores[0] == pytest.approx(0.2 if exact else 0.3)
  if exact:
    assert len(calls) == 1 and np.isnan(scored.ref_z_logprob[3])  # truncated: no reference score
  else:
    assert scored.ref_z_logprob is None and not calls
  np.testing.assert_array_equal(scored.rewards, [1, 0, 1, 0, 0, 1])


def test_generate_runs_the_pipeline_per_call_and_joins_the_calls():
  """Two calls of 2 prompts (the second padded): each call's rows are verified against its own
  prompts' answers and scored; `generate_all` joins them with group ids indexing all prompts."""
  prompts = [prompts_lib.Prompt([p], a) for p, a in zip((0, 1, 2), ANSWERS)]
  seen = []

  def sample_call(token_ids, key):  # rows 2g, 2g+1 of sample_output() answer prompt g
    seen.append([ids[0] for ids in token_ids])
    rows = np.concatenate([[2 * ids[0], 2 * ids[0] + 1] for ids in token_ids])
    out = sample_output()
    picked = {f.name: getattr(out, f.name)[rows] for f in dataclasses.fields(out)
              if isinstance(getattr(out, f.name), np.ndarray)}
    picked["group_ids"] = np.repeat(np.arange(len(token_ids)), 2).astype(np.int32)
    return dataclasses.replace(out, **picked)

  score = scoring.Score(kl_coef=0.2, ref_constant=-9.0)
  parts = list(scoring.generate(sample_call, prompts, jax.random.key(0), prompts_per_call=2, decode=decode,
                                verifier=boxed_equal, score=score))
  assert seen == [[0, 1], [2, 2]] and [start for start, _ in parts] == [0, 2]
  assert parts[1][1].texts == ["1", "7"] and parts[1][1].rewards.tolist() == [0, 1]  # against "7"
  joined = scoring.generate_all(sample_call, prompts, jax.random.key(0), prompts_per_call=2, decode=decode,
                                verifier=boxed_equal, score=score)
  whole = scoring.score_samples(sample_output(), ANSWERS, decode=decode, verifier=boxed_equal, score=score)
  assert joined.texts == whole.texts
  np.testing.assert_array_equal(joined.sample.group_ids, GROUP_IDS)
  np.testing.assert_array_equal(joined.rewards, whole.rewards)
  np.testing.assert_allclose(joined.scores, whole.scores)
  assert joined.scores[5] == pytest.approx(0.2 * (-13.0 + 9.0))
