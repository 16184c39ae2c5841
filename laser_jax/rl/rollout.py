"""From sampler output to the training batch: sequences, masks, targets and the EOS index.

Layout of one row (S = P + R + 1, P the prompt bucket, R = max_new_tokens):

    [ left-padded prompt (P) | response tokens, then EOS if finished, then pad (R + 1) ]

`targets[i]` is the token at i + 1, so the policy log-prob of response token j sits at index
P + j - 1, and `eos_index` (= P + length) is where the next-token distribution after EOS is read
for the self-rewarding score. Truncated rows have no EOS: their score is masked everywhere.
"""
import dataclasses

import numpy as np


def build_training_batch(prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
                         response_tokens: np.ndarray, response_lengths: np.ndarray,
                         finished: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
  """Assembles the arrays the training forward consumes.

  Args:
    prompt_tokens, prompt_mask: [N, P] left-padded prompts and their validity mask.
    response_tokens: [N, R] generated tokens INCLUDING the EOS of finished rows
      (`SampleOutput.response_tokens`), pad after.
    response_lengths: [N] their lengths, EOS included (`SampleOutput.response_lengths`).
    finished: [N] bool, the row emitted an EOS within the limit.
    pad_id: token used for padding.

  Returns:
    dict of `tokens`, `positions`, `attention_mask`, `targets`, `response_mask` (over targets:
    1 where the target is a response token or the EOS), all [N, S], and `eos_index` [N].
  """
  n, p = prompt_tokens.shape
  response_lengths = np.asarray(response_lengths, np.int32)
  finished = np.asarray(finished, bool)
  # One spare pad column keeps S = P + R + 1 whatever the lengths.
  response = np.pad(response_tokens.astype(np.int32), ((0, 0), (0, 1)), constant_values=pad_id)
  response_valid = np.arange(response.shape[1])[None, :] < response_lengths[:, None]
  response = np.where(response_valid, response, pad_id)

  seq = np.concatenate([prompt_tokens.astype(np.int32), response], axis=1)
  mask = np.concatenate([prompt_mask.astype(bool), response_valid], axis=1)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  targets = np.concatenate([seq[:, 1:], np.full((n, 1), pad_id, np.int32)], axis=1)
  response_mask = np.concatenate(
      [np.zeros((n, p - 1), bool), response_valid, np.zeros((n, 1), bool)], axis=1)
  eos_index = p + response_lengths - 1  # The EOS of a finished row is its last response token.
  return {
      "tokens": seq,
      "positions": positions,
      "attention_mask": mask,
      "targets": targets,
      "response_mask": response_mask.astype(np.float32),
      "eos_index": np.where(finished, eos_index, p - 1).astype(np.int32),
  }


def old_logprobs_from_sampler(response_logprobs: np.ndarray, prompt_len: int) -> np.ndarray:
  """Places the sampler's log-probs of the response tokens (EOS included, 0 after the end;
  `SampleOutput.response_logprobs`) at their target indices of the [N, P + R + 1] batch."""
  n, r = response_logprobs.shape
  out = np.zeros((n, prompt_len + r + 1), np.float32)
  out[:, prompt_len - 1:prompt_len - 1 + r] = response_logprobs
  return out


def concat_samples(outputs: list, pad_id: int):
  """Concatenates SampleOutputs of consecutive prompt chunks into one (prompts left-padded to
  the longest bucket, group ids offset so they keep indexing the full prompt list)."""
  if len(outputs) == 1:
    return outputs[0]
  width = max(o.prompt_tokens.shape[1] for o in outputs)
  fields = {}
  offset = 0
  for o in outputs:
    pad = width - o.prompt_tokens.shape[1]
    pieces = {
        "prompt_tokens": np.pad(o.prompt_tokens, ((0, 0), (pad, 0)), constant_values=pad_id),
        "prompt_mask": np.pad(o.prompt_mask, ((0, 0), (pad, 0)), constant_values=False),
        "group_ids": o.group_ids + offset,
    }
    offset += int(o.group_ids.max()) + 1 if len(o.group_ids) else 0
    for name in ("tokens", "lengths", "logprobs", "eos_token", "eos_logprob", "finished",
                 "truncated", "self_reward_logprob"):
      pieces[name] = getattr(o, name)
    for name, value in pieces.items():
      fields.setdefault(name, []).append(value)
  merged = {name: np.concatenate(values) for name, values in fields.items()}
  return dataclasses.replace(outputs[0], **merged)
