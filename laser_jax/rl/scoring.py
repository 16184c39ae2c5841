"""Sample -> decode -> verify -> self-reward score: the one pipeline behind the trainer's rollout
and evaluation, `laser_jax.evaluate`, calibration and the notebooks (`generate`).

Each caller brings its sampler call (the trainer's on its rollout layout, the evaluator's on the
loaded model) and its verifier; the chunking and PRNG policy (`generate.calls`), the decoding
(`sampling.decode_responses`), the verification and the score are here, once. The score is
r_s = beta_v * (log pi(z_c | x, y) - ref), ref the constant c_ref or, for the exact variant,
log pi_ref(z_c | x, y) (`self_reward_scores`, the one place r_s is computed from log-probs).

The trainer's rollout stops after verification: its scores are computed once from the whole
batch's gathered per-row vectors (`batch_vectors`), where the reference log-probs are at hand.

A truncated response has no EOS, hence no score from the sampler. `laser_jax.evaluate` scores it
as the official evaluation does (`Score.truncated`, `TruncatedScore`): one extra forward over
prompt + response + an appended EOS, reading log pi(z_c) there; training leaves it unscored.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import jax
import numpy as np

from laser_jax.generate import calls
from laser_jax.generate import sampling as sampling_lib
from laser_jax.rl import dapo
from laser_jax.rl import objective
from laser_jax.rl import records


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
  # float64 [N] log pi(z_c | x, y, EOS): read by the sampler, or for a truncated row by the extra
  # forward of `TruncatedScore`; NaN for a truncated row without it.
  z_logprob: np.ndarray
  ref_z_logprob: np.ndarray | None  # float64 [N] log pi_ref(z_c | x, y, EOS) (exact variant), else None
  scores: np.ndarray  # float64 [N] r_s; NaN for a row without a score
  # bool [N]: truncated rows scored with an appended EOS (`TruncatedScore`); all False without it.
  scored_after_truncation: np.ndarray


@dataclasses.dataclass(frozen=True)
class TruncatedScore:
  """How a truncated response is scored, as the official evaluation scores it: EOS appended to its
  tokens (`eos_appended_sequences`) and log pi(z_c | x, y, EOS) read at that EOS, i.e. the score
  of the response followed by EOS + z_c. The caller's forwards run once per sampler call, over
  that call's truncated rows only."""
  eos_id: int  # the EOS appended (the model's first EOS id)
  # Sequences [K] (prompt + response + EOS of the truncated rows) -> [K] log pi(z_c | x, y, EOS).
  z_logprob_fn: Callable[[records.Sequences], np.ndarray]
  # The same for pi_ref: needed with the exact variant (`Score.ref_z_logprob_fn`), else None.
  ref_z_logprob_fn: Callable[[records.Sequences], np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class Score:
  """How responses are scored: beta_v and the offset (c_ref, or pi_ref's log-prob)."""
  kl_coef: float  # beta_v
  ref_constant: float | None  # c_ref; unused with `ref_z_logprob_fn`
  # SampleOutput -> [N] log pi_ref(z_c | x, y) for the exact variant (the reference model's
  # forward, micro-batched by the caller); None = the constant c_ref.
  ref_z_logprob_fn: Callable[[sampling_lib.SampleOutput], np.ndarray] | None = None
  # Truncated responses scored with an appended EOS (the official evaluation); None = they have
  # no score (NaN), as in training.
  truncated: TruncatedScore | None = None


def self_reward_scores(z_logprob, finished, *, kl_coef: float, ref_constant: float | None,
                       ref_z_logprob=None) -> np.ndarray:
  """r_s [N] (float64) of the rows `finished` marks (the finished ones, or those scored after
  truncation too: `score_samples`), NaN for the others (no EOS, no score)."""
  finished = np.asarray(finished, bool)
  z = np.where(finished, np.asarray(z_logprob, np.float64), np.nan)
  ref = None if ref_z_logprob is None else np.where(finished, np.asarray(ref_z_logprob, np.float64), np.nan)
  return np.asarray(objective.self_reward_score(z, kl_coef=kl_coef, ref_constant=ref_constant,
                                                ref_z_logprob=ref), np.float64)


def verify_samples(out: sampling_lib.SampleOutput, answers: Sequence[str], *, decode: Callable,
                   verifier) -> VerifiedSamples:
  """Decodes and verifies the rows of `out` (row r answers `answers[out.group_ids[r]]`).

  decode: (tokens [N, R], lengths [N]) -> list of N texts (`sampling.decode_responses`).
  verifier: `laser_jax.data.verifier.Verifier` (or any (texts, references) -> VerifyResult).
  """
  texts = list(decode(out.tokens, out.lengths))
  result = verifier(texts, [answers[g] for g in out.group_ids])
  return VerifiedSamples(sample=out, texts=texts, rewards=np.asarray(result.rewards, np.float32),
                         num_timeouts=int(result.num_timeouts))


def eos_appended_sequences(out: sampling_lib.SampleOutput, rows: np.ndarray, eos_id: int) -> records.Sequences:
  """prompt + response + EOS of the truncated `rows` of `out`, EOS appended after the response's
  R tokens (the spare last column of the [P + R + 1] row layout) and `eos_index` pointing at it:
  what the official evaluation scores a truncated response on."""
  if np.asarray(out.finished, bool)[rows].any():
    raise ValueError("eos_appended_sequences: rows must be truncated ones (a finished row has its EOS)")
  sequences, _ = records.build_sequences(out)
  sequences = jax.tree.map(lambda v: np.array(v[rows]), sequences)
  eos_index = out.prompt_tokens.shape[1] + out.tokens.shape[1]  # P + R, the spare column
  sequences.tokens[:, eos_index] = eos_id
  sequences.attention_mask[:, eos_index] = True
  sequences.targets[:, eos_index - 1] = eos_id
  positions = np.maximum(np.cumsum(sequences.attention_mask, axis=1) - 1, 0).astype(np.int32)
  return sequences.replace(positions=positions, eos_index=np.full(len(rows), eos_index, np.int32))


def score_samples(out: sampling_lib.SampleOutput, answers: Sequence[str], *, decode: Callable, verifier,
                  score: Score) -> ScoredSamples:
  """Decodes, verifies (`verify_samples`) and scores the rows of `out` with `score` (truncated
  rows too with `score.truncated`, in one batch of this call's truncated rows)."""
  verified = verify_samples(out, answers, decode=decode, verifier=verifier)
  finished = verified.finished
  z = np.where(finished, np.asarray(out.self_reward_logprob, np.float64), np.nan)
  ref = None
  if score.ref_z_logprob_fn is not None:
    ref = np.where(finished, np.asarray(score.ref_z_logprob_fn(out), np.float64), np.nan)
  after_truncation = np.zeros(len(finished), bool)
  truncated_rows = np.flatnonzero(~finished)
  if score.truncated is not None and len(truncated_rows):
    sequences = eos_appended_sequences(out, truncated_rows, score.truncated.eos_id)
    z[truncated_rows] = score.truncated.z_logprob_fn(sequences)
    if ref is not None:
      if score.truncated.ref_z_logprob_fn is None:
        raise ValueError("Score.truncated.ref_z_logprob_fn: needed with the exact score (ref_z_logprob_fn)")
      ref[truncated_rows] = score.truncated.ref_z_logprob_fn(sequences)
    after_truncation[truncated_rows] = True
  scores = self_reward_scores(z, finished | after_truncation, kl_coef=score.kl_coef,
                              ref_constant=score.ref_constant, ref_z_logprob=ref)
  return ScoredSamples(**{f.name: getattr(verified, f.name) for f in dataclasses.fields(verified)},
                       z_logprob=z, ref_z_logprob=ref, scores=scores, scored_after_truncation=after_truncation)


def generate(sample_call: calls.SampleCall, prompts: Sequence, rng: jax.Array, *, prompts_per_call: int,
             decode: Callable, verifier, score: Score | None = None
             ) -> Iterator[tuple[int, VerifiedSamples | ScoredSamples]]:
  """The pipeline, one sampler call at a time: yields (index of the call's first prompt, its
  verified -- and with `score`, scored -- samples, group ids indexing the call's prompts).

  prompts: objects with `token_ids` and `answer` (`data.prompts.Prompt`).
  sample_call, prompts_per_call: the sampler and the call size (`calls.sample_in_calls`).
  """
  for start, out in calls.sample_in_calls(sample_call, [p.token_ids for p in prompts], rng, prompts_per_call):
    answers = [p.answer for p in prompts[start:start + int(out.group_ids.max()) + 1]]
    if score is None:
      yield start, verify_samples(out, answers, decode=decode, verifier=verifier)
    else:
      yield start, score_samples(out, answers, decode=decode, verifier=verifier, score=score)


def generate_all(sample_call: calls.SampleCall, prompts: Sequence, rng: jax.Array, **kwargs
                 ) -> VerifiedSamples | ScoredSamples:
  """`generate` over every call, joined into one record whose group ids index `prompts`."""
  parts = list(generate(sample_call, prompts, rng, **kwargs))
  return join([p for _, p in parts], [s for s, _ in parts])


def join(parts: Sequence[VerifiedSamples], starts: Sequence[int]) -> VerifiedSamples:
  """One record from those of consecutive calls (`calls.concat_samples` for the samples)."""
  if len(parts) == 1 and starts[0] == 0:
    return parts[0]
  fields = {"sample": calls.concat_samples([p.sample for p in parts], starts),
            "texts": [t for p in parts for t in p.texts],
            "rewards": np.concatenate([p.rewards for p in parts]),
            "num_timeouts": sum(p.num_timeouts for p in parts)}
  if isinstance(parts[0], ScoredSamples):
    for name in ("z_logprob", "scores", "scored_after_truncation"):
      fields[name] = np.concatenate([getattr(p, name) for p in parts])
    refs = [p.ref_z_logprob for p in parts]
    fields["ref_z_logprob"] = None if refs[0] is None else np.concatenate(refs)
  return type(parts[0])(**fields)


def batch_vectors(rollout: records.Rollout, loss_cfg: objective.LossConfig, step: int, *,
                  gather_rows: Callable[[np.ndarray], np.ndarray] = lambda x: x, group_offset: int = 0
                  ) -> tuple[records.BatchVectors, dict]:
  """The whole RL batch's per-row vectors, and the advantage metrics.

  Every host's rows of `rollout` are joined by `gather_rows` (`hosts.gather_rows`; identity on
  one host) in process order; `group_offset` (this host's first prompt in the global batch)
  makes group ids global. The reward the advantages use is r_v plus DAPO's overlong penalty when
  `loss.overlong_buffer_len` > 0; r_s is `self_reward_scores` (against pi_ref where the rollout
  carries its z_c log-prob); A' is `objective.rollout_advantages`, with the self-reward
  integration as the warm-ups say at RL step `step`.
  """
  out = rollout.sample
  verifier_rewards = gather_rows(np.asarray(rollout.verified.rewards, np.float32))
  finished = gather_rows(rollout.finished)
  response_lengths = gather_rows(out.response_lengths.astype(np.int32))  # EOS included
  group_ids = gather_rows(out.group_ids.astype(np.int32) + group_offset)
  z_logprob = gather_rows(np.asarray(rollout.z_logprob, np.float32))
  ref_z_logprob = None if rollout.ref_z_logprob is None else gather_rows(rollout.ref_z_logprob)
  rewards = verifier_rewards
  if loss_cfg.overlong_buffer_len > 0:
    rewards = rewards + np.asarray(dapo.overlong_reward_penalty(
        response_lengths, loss_cfg.max_response_length, loss_cfg.overlong_buffer_len,
        loss_cfg.overlong_penalty), np.float32)
  scores = self_reward_scores(z_logprob, finished, kl_coef=loss_cfg.kl_coef, ref_constant=loss_cfg.ref_constant,
                              ref_z_logprob=ref_z_logprob)
  advantages, metrics = objective.rollout_advantages(
      loss_cfg, step, rewards=rewards, group_ids=group_ids, finished=finished,
      scores=scores if loss_cfg.use_self_reward_loss else None)
  vectors = records.BatchVectors(
      verifier_rewards=verifier_rewards, rewards=np.asarray(rewards, np.float32), finished=finished,
      group_ids=group_ids, response_lengths=response_lengths, z_logprob=z_logprob,
      ref_z_logprob=ref_z_logprob, scores=scores, advantages=np.asarray(advantages, np.float32))
  return vectors, metrics
