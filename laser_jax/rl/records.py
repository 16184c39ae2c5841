"""The typed records of one RL step, from the sampler's output to the optimizer update.

    SampleOutput (generate.sampling)       what the sampler drew, per row
      -> VerifiedSamples (rl.scoring)      + decoded texts and verifier rewards
      -> Rollout (here)                    + the training rows and every per-row quantity of the
                                             policy that sampled them (old / reference log-probs)
      -> BatchVectors (here)               the whole batch's per-row vectors (all hosts): shaped
                                             rewards, r_s, advantages
      -> UpdateBatch (here)                one optimizer update's rows, complete: `make_update_batch`

Each quantity has one name along that path (`z_logprob`, `ref_z_logprob`, `rewards`, `scores`,
`advantages`, `response_lengths`, ...), the name metrics use too. The per-row shape and dtype of
every array leaf is declared once, on the field (`row_field`), and the abstract batches that
`laser_jax.aot` compiles are derived from it.

Layout of one training row (S = P + R + 1, P the prompt bucket, R = max_new_tokens):

    [ left-padded prompt (P) | response tokens, then EOS if finished, then pad (R + 1) ]

`targets[i]` is the token at i + 1, so the policy log-prob of response token j sits at index
P + j - 1, and `eos_index` (= P + length) is where the next-token distribution after EOS is read
for the self-rewarding score. Truncated rows have no EOS: their score is masked everywhere.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import numpy as np

from laser_jax.generate import sampling as sampling_lib

SEQ = "S"  # A row field's sequence axis (length P + R + 1).


def row_field(row_shape: tuple, dtype, optional: bool = False):
  """A record field holding one value of `row_shape` (SEQ = the sequence axis) and `dtype` per
  row: the one declaration of the schema. Optional fields default to None (absent)."""
  metadata = {"row_shape": row_shape, "dtype": np.dtype(dtype)}
  if optional:
    return flax.struct.field(default=None, metadata=metadata)
  return flax.struct.field(metadata=metadata)


def _abstract(cls, lead: tuple[int, ...], seq_len: int, sharding_of: Callable[[int], Any],
              absent: tuple[str, ...] = (), **nested):
  """ShapeDtypeStructs of record `cls` with leading row axes `lead`, from its fields' schema."""
  values = dict(nested)
  for f in dataclasses.fields(cls):
    if f.name in values:
      continue
    if f.name in absent:
      values[f.name] = None
      continue
    shape = lead + tuple(seq_len for _ in f.metadata["row_shape"])
    values[f.name] = jax.ShapeDtypeStruct(shape, f.metadata["dtype"], sharding=sharding_of(len(shape)))
  return cls(**values)


@flax.struct.dataclass
class Sequences:
  """What a log-prob forward reads: prompt + response + EOS rows (`build_sequences`). Leaves are
  [rows, ...]; [num_micro, micro, ...] inside an update."""
  tokens: Any = row_field((SEQ,), np.int32)
  positions: Any = row_field((SEQ,), np.int32)
  attention_mask: Any = row_field((SEQ,), np.bool_)  # real tokens
  targets: Any = row_field((SEQ,), np.int32)  # the token each position predicts
  eos_index: Any = row_field((), np.int32)  # the EOS position, where log pi(z_c | x, y) is read

  @classmethod
  def abstract(cls, lead: tuple[int, ...], seq_len: int, sharding_of: Callable[[int], Any]) -> "Sequences":
    """ShapeDtypeStructs with leading axes `lead`; `sharding_of(ndim)` gives each leaf's sharding."""
    return _abstract(cls, lead, seq_len, sharding_of)


@flax.struct.dataclass
class UpdateBatch:
  """One optimizer update's rows, everything `objective.total_loss` reads (Tunix's TrainExample).
  Built complete by `make_update_batch`; leaves [rows, ...], [num_micro, micro, ...] in the update.
  A packed update (`packing.pack_update_batch`) holds `packing.PackedSequences` in `sequences`
  and the other fields per sequence slot."""
  sequences: Sequences  # or packing.PackedSequences (config.micro_batch_tokens > 0)
  response_mask: Any = row_field((SEQ,), np.float32)  # over targets: 1 on response tokens + EOS
  old_logp: Any = row_field((SEQ,), np.float32)  # log pi_old of the targets (the rollout policy's)
  advantages: Any = row_field((), np.float32)  # A' (after the self-reward integration when on)
  rewards: Any = row_field((), np.float32)  # verifier reward r_v: the self-reward loss's target
  finished: Any = row_field((), np.bool_)  # the response ended with an EOS
  self_reward_weights: Any = row_field((), np.float32)  # class weights over this update's rows
  ref_logp: Any = row_field((SEQ,), np.float32, optional=True)  # log pi_ref of targets: KL loss only
  ref_z_logprob: Any = row_field((), np.float32, optional=True)  # log pi_ref(z_c|x,y): exact score only

  @classmethod
  def abstract(cls, lead: tuple[int, ...], seq_len: int, sharding_of: Callable[[int], Any], *,
               with_ref_logp: bool, with_ref_score: bool) -> "UpdateBatch":
    """ShapeDtypeStructs with leading axes `lead`; ref_logp / ref_z_logprob only where the KL
    loss / the exact score needs pi_ref (absent = None, as in a real batch)."""
    absent = (() if with_ref_logp else ("ref_logp",)) + (() if with_ref_score else ("ref_z_logprob",))
    return _abstract(cls, lead, seq_len, sharding_of, absent,
                     sequences=Sequences.abstract(lead, seq_len, sharding_of))


def build_sequences(out: sampling_lib.SampleOutput) -> tuple[Sequences, np.ndarray]:
  """The training rows of the sampler's output: (Sequences [N, S], response_mask [N, S] float32,
  1 where the target is a response token or the EOS)."""
  prompt_tokens, prompt_mask, pad_id = out.prompt_tokens, out.prompt_mask, out.pad_id
  n, p = prompt_tokens.shape
  response_lengths = np.asarray(out.response_lengths, np.int32)  # EOS included
  finished = np.asarray(out.finished, bool)
  # One spare pad column keeps S = P + R + 1 whatever the lengths.
  response = np.pad(out.response_tokens.astype(np.int32), ((0, 0), (0, 1)), constant_values=pad_id)
  response_valid = np.arange(response.shape[1])[None, :] < response_lengths[:, None]
  response = np.where(response_valid, response, pad_id)
  tokens = np.concatenate([prompt_tokens.astype(np.int32), response], axis=1)
  mask = np.concatenate([prompt_mask.astype(bool), response_valid], axis=1)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  targets = np.concatenate([tokens[:, 1:], np.full((n, 1), pad_id, np.int32)], axis=1)
  response_mask = np.concatenate([np.zeros((n, p - 1), bool), response_valid, np.zeros((n, 1), bool)], axis=1)
  eos_index = p + response_lengths - 1  # The EOS of a finished row is its last response token.
  sequences = Sequences(tokens=tokens, positions=positions, attention_mask=mask, targets=targets,
                        eos_index=np.where(finished, eos_index, p - 1).astype(np.int32))
  return sequences, response_mask.astype(np.float32)


def sampler_old_logprobs(out: sampling_lib.SampleOutput) -> np.ndarray:
  """The sampler's log-probs of the response tokens (EOS included) at their target indices of
  the [N, P + R + 1] rows: log pi_old without a second forward."""
  response_logprobs = out.response_logprobs
  n, r = response_logprobs.shape
  p = out.prompt_tokens.shape[1]
  old = np.zeros((n, p + r + 1), np.float32)
  old[:, p - 1:p - 1 + r] = response_logprobs
  return old


@dataclasses.dataclass(frozen=True)
class Rollout:
  """One RL step's responses on this host, ready for the update: the verified samples, their
  training rows, and the log-probs of the policy that sampled them (and of pi_ref where a term
  needs it). Row r answers this host's prompt `verified.sample.group_ids[r]`."""
  verified: Any  # rl.scoring.VerifiedSamples: sample, texts, verifier rewards, timeouts
  sequences: Sequences  # [N, S]
  response_mask: np.ndarray  # float32 [N, S] (truncated rows zeroed with DAPO's mask_truncated)
  old_logp: np.ndarray  # float32 [N, S] log pi_old of the targets
  z_logprob: np.ndarray  # float32 [N] log pi_old(z_c | x, y) at the EOS (NaN: truncated)
  ref_logp: np.ndarray | None = None  # float32 [N, S]: with the KL loss only
  ref_z_logprob: np.ndarray | None = None  # float32 [N]: with the exact score only

  @property
  def sample(self) -> sampling_lib.SampleOutput:
    return self.verified.sample

  @property
  def finished(self) -> np.ndarray:
    return self.verified.finished

  @property
  def num_rows(self) -> int:
    return len(self.z_logprob)


@dataclasses.dataclass(frozen=True)
class BatchVectors:
  """Per-row vectors of the whole RL batch (every host's rows in process order, the same on every
  host): what spans groups and hosts -- statistics, scores and advantages -- is computed from these."""
  verifier_rewards: np.ndarray  # float32 [B] r_v
  rewards: np.ndarray  # float32 [B] the reward the advantages use: r_v + DAPO overlong penalty
  finished: np.ndarray  # bool [B]
  group_ids: np.ndarray  # int32 [B] global prompt index
  response_lengths: np.ndarray  # int32 [B] response tokens the loss sees (EOS included)
  z_logprob: np.ndarray  # float32 [B]
  ref_z_logprob: np.ndarray | None  # float32 [B]: exact score only
  scores: np.ndarray  # float64 [B] r_s (NaN: truncated)
  advantages: np.ndarray  # float32 [B] A'


def make_update_batch(rollout: Rollout, rows: np.ndarray, advantages: np.ndarray,
                      self_reward_weights: np.ndarray) -> UpdateBatch:
  """The complete UpdateBatch of this host's `rows` of `rollout` for one optimizer update.

  advantages: [len(rows)] A' of those rows (from the whole batch, `BatchVectors.advantages`);
  self_reward_weights: [len(rows)] class weights computed over the update's rows of every host
  (`objective.self_reward_class_weights`). The self-reward loss targets the verifier reward r_v.
  """
  take = lambda x: None if x is None else np.asarray(x)[rows]
  return UpdateBatch(
      sequences=jax.tree.map(lambda v: v[rows], rollout.sequences),
      response_mask=take(rollout.response_mask), old_logp=take(rollout.old_logp),
      advantages=np.asarray(advantages, np.float32),
      rewards=take(rollout.verified.rewards).astype(np.float32), finished=take(rollout.finished),
      self_reward_weights=np.asarray(self_reward_weights, np.float32),
      ref_logp=take(rollout.ref_logp), ref_z_logprob=take(rollout.ref_z_logprob))


def micro_batches(batch: UpdateBatch, num_micro: int) -> UpdateBatch:
  """[rows, ...] leaves as [num_micro, rows / num_micro, ...] (the update's scan axis first)."""
  return jax.tree.map(lambda v: v.reshape(num_micro, -1, *v.shape[1:]), batch)

