"""Sample -> decode -> verify -> self-reward score: the one pipeline behind the trainer's rollout
and evaluation, `laser_jax.evaluate` and the notebooks.

The trainer's rollout stops after verification (`verify_samples`): its scores are computed once,
from the whole batch's gathered per-row vectors, where the reference log-probs are at hand.
Each caller keeps its own way of sampling (the trainer's rollout layout and prompt chunks, the
evaluator's fixed-size batches), passed in as `sample_fn`; everything after the sampler is here,
once: the texts, the verifier's rewards, and r_s = beta_v * (log pi(z_c | x, y) - ref) with ref
either the constant c_ref or, for the exact variant, log pi_ref(z_c | x, y) from `ref_z_logprob_fn`
(`objective.self_reward_score`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from laser_jax.generate import sampling as sampling_lib
from laser_jax.rl import objective


@dataclasses.dataclass(frozen=True)
class VerifiedSamples:
  """Sampled responses with their verifier reward; row r answers prompt `sample.group_ids[r]`."""
  sample: sampling_lib.SampleOutput
  texts: list[str]  # decoded responses (special tokens skipped, EOS excluded)
  rewards: np.ndarray  # float32 [N] verifier reward r_v
  num_timeouts: int  # answers the verifier gave up on (reward 0)

  @property
  def finished(self) -> np.ndarray:
    return self.sample.finished.astype(bool)


@dataclasses.dataclass(frozen=True)
class ScoredSamples(VerifiedSamples):
  """Verified responses with their self-reward score r_s."""
  z_logprob: np.ndarray  # float64 [N] log pi(z_c | x, y) read by the sampler; NaN if truncated
  ref_z_logprob: np.ndarray | None  # float64 [N] log pi_ref(z_c | x, y) (exact variant), else None
  scores: np.ndarray  # float64 [N] r_s; NaN for truncated rows (no EOS, no score)


def verify_samples(out: sampling_lib.SampleOutput, answers: Sequence[str], *, decode: Callable,
                   verifier) -> VerifiedSamples:
  """Decodes and verifies the rows of `out` (row r answers `answers[out.group_ids[r]]`).

  decode: (tokens [N, R], lengths [N]) -> list of N texts.
  verifier: `laser_jax.data.verifier.Verifier` (or any (texts, references) -> VerifyResult).
  """
  texts = list(decode(out.tokens, out.lengths))
  result = verifier(texts, [answers[g] for g in out.group_ids])
  return VerifiedSamples(sample=out, texts=texts, rewards=np.asarray(result.rewards, np.float32),
                         num_timeouts=int(result.num_timeouts))


def generate_and_score(sample_fn: Callable[[Sequence], sampling_lib.SampleOutput], prompts: Sequence,
                       answers: Sequence[str], **score_kwargs) -> ScoredSamples:
  """Samples `prompts` with `sample_fn(prompts)` (a SampleOutput whose group ids index
  `prompts`) and scores every response (`score_samples`; `answers[i]` answers prompt i)."""
  return score_samples(sample_fn(prompts), answers, **score_kwargs)


def score_samples(out: sampling_lib.SampleOutput, answers: Sequence[str], *, decode: Callable, verifier,
                  kl_coef: float, ref_constant: float,
                  ref_z_logprob_fn: Callable[[sampling_lib.SampleOutput], np.ndarray] | None = None
                  ) -> ScoredSamples:
  """Decodes, verifies (`verify_samples`) and scores the rows of `out`.

  Args:
    out: the sampler's output; row r answers `answers[out.group_ids[r]]`.
    decode, verifier: as in `verify_samples`.
    kl_coef, ref_constant: beta_v and c_ref of the score.
    ref_z_logprob_fn: SampleOutput -> [N] log pi_ref(z_c | x, y) for the exact variant (the
      reference model's forward, micro-batched by the caller); None = the constant c_ref.
  """
  verified = verify_samples(out, answers, decode=decode, verifier=verifier)
  finished = verified.finished
  z = np.where(finished, np.asarray(out.self_reward_logprob, np.float64), np.nan)
  ref = None
  if ref_z_logprob_fn is not None:
    ref = np.where(finished, np.asarray(ref_z_logprob_fn(out), np.float64), np.nan)
  scores = np.asarray(objective.self_reward_score(z, kl_coef=kl_coef, ref_constant=ref_constant,
                                                  ref_z_logprob=ref), np.float64)
  return ScoredSamples(**{f.name: getattr(verified, f.name) for f in dataclasses.fields(verified)},
                       z_logprob=z, ref_z_logprob=ref, scores=scores)
