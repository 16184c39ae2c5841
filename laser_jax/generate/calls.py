"""How a list of prompts becomes sampler calls: the one chunking and PRNG policy of every caller
(the trainer's rollout and evaluation, `laser_jax.evaluate`, calibration, the notebooks).

Call i samples prompts [i * k, (i + 1) * k) with key fold_in(rng, i), k = `prompts_per_call`.
The last call is padded to k prompts with copies of its last prompt (their rows are dropped), so
that every call of a run has one compiled shape per prompt bucket.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import jax
import numpy as np

from laser_jax.generate.sampling import SampleOutput

# (token id lists of one call's prompts, PRNG key) -> the rows of those prompts, n per prompt.
SampleCall = Callable[[list, jax.Array], SampleOutput]


def sample_in_calls(sample_call: SampleCall, prompts: Sequence[Sequence[int]], rng: jax.Array,
                    prompts_per_call: int = 0) -> Iterator[tuple[int, SampleOutput]]:
  """Yields (index of the call's first prompt, its SampleOutput) per call (see the module
  docstring); `prompts_per_call` <= 0 = one call. Group ids index the call's own prompts."""
  if not prompts:
    raise ValueError("sample_in_calls: no prompts")
  k = prompts_per_call if prompts_per_call > 0 else len(prompts)
  for i, start in enumerate(range(0, len(prompts), k)):
    chunk = [list(p) for p in prompts[start:start + k]]
    real = len(chunk)
    chunk += [chunk[-1]] * (k - real)
    out = sample_call(chunk, jax.random.fold_in(rng, i))
    yield start, take_prompts(out, real)


def take_prompts(out: SampleOutput, num_prompts: int) -> SampleOutput:
  """The rows of the first `num_prompts` prompts of `out` (a prompt's n rows are contiguous)."""
  keep = out.group_ids < num_prompts
  if keep.all():
    return out
  return dataclasses.replace(out, **{
      f.name: getattr(out, f.name)[keep] for f in dataclasses.fields(out)
      if isinstance(getattr(out, f.name), np.ndarray)})


def concat_samples(outputs: Sequence[SampleOutput], starts: Sequence[int]) -> SampleOutput:
  """One SampleOutput from those of consecutive calls: prompts left-padded to the longest bucket,
  group ids offset by each call's first prompt (`starts`, as `sample_in_calls` yields them) so
  they index the full prompt list."""
  if len(outputs) == 1 and starts[0] == 0:
    return outputs[0]
  pad_id = outputs[0].pad_id
  width = max(o.prompt_tokens.shape[1] for o in outputs)
  merged = {}
  for o, start in zip(outputs, starts):
    pad = width - o.prompt_tokens.shape[1]
    pieces = {f.name: getattr(o, f.name) for f in dataclasses.fields(o) if isinstance(getattr(o, f.name), np.ndarray)}
    pieces["prompt_tokens"] = np.pad(o.prompt_tokens, ((0, 0), (pad, 0)), constant_values=pad_id)
    pieces["prompt_mask"] = np.pad(o.prompt_mask, ((0, 0), (pad, 0)), constant_values=False)
    pieces["group_ids"] = o.group_ids + int(start)
    for name, value in pieces.items():
      merged.setdefault(name, []).append(value)
  return dataclasses.replace(outputs[0], **{name: np.concatenate(v) for name, v in merged.items()})
