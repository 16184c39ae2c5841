"""What one sampler call takes and returns: `SamplingParams` (how to sample, a static argument of
the jitted programs) and `SampleOutput` (the sampled rows on host, with the conventions every
consumer relies on: EOS handling, log-prob temperature, truncated rows).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from laser_jax.models import hosts as hosts_lib


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample. Frozen (hashable): a static argument of the jitted functions.

  Attributes:
    n: responses per prompt; the n rows of one prompt are contiguous in the output.
    temperature: softmax temperature (> 0); 0 means greedy (as vLLM and the official evaluation
      read it); ignored when `greedy`.
    top_p: nucleus threshold in (0, 1]; 1.0 = off. Keeps the smallest set of most likely
      tokens whose probability (after temperature and top-k) sums to >= top_p.
    top_k: keep the k most likely tokens; 0 = off. Tokens tied with the k-th are kept too.
    max_new_tokens: response length limit, counting the EOS token.
    eos_ids: a row stops when it emits any of these ids.
    pad_id: fills token slots after a row's end and padding rows/columns.
    self_reward_token_id: z_c; None = no self-reward score (the loop then never runs the
      extra step for rows finishing on the last allowed step).
    greedy: argmax decoding (log-probs are then taken at temperature 1).
    decode_segments: at most this many decode loops, each over its own chunk of the KV cache
      and attending only over the chunks written so far, so attention reads about half of the
      cache on average instead of all of it every step. Execution only: results are equal up
      to float rounding. Each loop is compiled separately (1 = one loop over the whole cache).
    min_segment_tokens: each decode loop covers at least this many tokens: shorter ones save
      less attention reading than their extra per-chunk matmuls cost (measured on CPU).
    decode_slots: 0 = the static sampler (every row of a call decodes until the longest is
      done); > 0 = continuous batching over this many decode slots, a finished row's slot taking
      the next row (`laser_jax.generate.continuous`). Execution only: the same rows as static.
  """
  n: int = 1
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 256
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  self_reward_token_id: int | None = None
  greedy: bool = False
  decode_segments: int = 4
  min_segment_tokens: int = 64
  decode_slots: int = 0

  def __post_init__(self):
    if self.n < 1:
      raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature == 0 and not self.greedy:
      object.__setattr__(self, "greedy", True)
      object.__setattr__(self, "temperature", 1.0)  # one hashable form of greedy sampling
    if not self.greedy and not self.temperature > 0:
      raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
    if self.decode_segments < 1:
      raise ValueError(f"SamplingParams.decode_segments must be >= 1, got {self.decode_segments}")
    if self.min_segment_tokens < 1:
      raise ValueError(f"SamplingParams.min_segment_tokens must be >= 1, got {self.min_segment_tokens}")
    if self.decode_slots < 0:
      raise ValueError(f"SamplingParams.decode_slots must be >= 0 (0 = static), got {self.decode_slots}")
    if not isinstance(self.eos_ids, tuple):
      raise TypeError(f"SamplingParams.eos_ids must be a tuple of ints, got {type(self.eos_ids).__name__}")

  @property
  def decode_chunk_lengths(self) -> tuple[int, ...]:
    """Cache slots of each decode segment: max_new_tokens split into near-equal parts."""
    n = max(1, min(self.decode_segments, self.max_new_tokens // self.min_segment_tokens))
    base, extra = divmod(self.max_new_tokens, n)
    return tuple(base + (i < extra) for i in range(n))

  @property
  def logprob_temperature(self) -> float:
    """Temperature of the distribution the reported per-token log-probs come from."""
    return 1.0 if self.greedy else float(self.temperature)


@dataclasses.dataclass
class SampleOutput:
  """Sampled responses, NumPy on host. N = len(prompts) * n rows, R = max_new_tokens.

  Attributes:
    prompt_tokens: [N, P] int32, left-padded with pad_id (P = the prompt bucket length).
    prompt_mask: [N, P] bool, True at real prompt tokens.
    tokens: [N, R] int32 generated ids, EOS EXCLUDED, pad_id after the end.
    lengths: [N] int32 number of generated tokens, EOS excluded.
    logprobs: [N, R] float32 log_softmax(logits / T) at `tokens` (T = 1 when greedy); 0 after
      the end.
    eos_token: [N] int32 the EOS id the row emitted (pad_id for truncated rows).
    eos_logprob: [N] float32 log-prob of that EOS token (same convention; NaN if truncated).
    finished: [N] bool, the row emitted an EOS within max_new_tokens.
    truncated: [N] bool, == ~finished.
    self_reward_logprob: [N] float32 log pi(z_c | x, y, EOS), unscaled (T = 1); NaN for
      truncated rows and when no self_reward_token_id was given.
    group_ids: [N] int32 index of the prompt each row answers.
  """
  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  tokens: np.ndarray
  lengths: np.ndarray
  logprobs: np.ndarray
  eos_token: np.ndarray
  eos_logprob: np.ndarray
  finished: np.ndarray
  truncated: np.ndarray
  self_reward_logprob: np.ndarray
  group_ids: np.ndarray
  pad_id: int = 0

  @property
  def response_lengths(self) -> np.ndarray:
    """[N] response length including the EOS of finished rows (what training scores)."""
    return self.lengths + self.finished.astype(np.int32)

  def _with_eos(self, per_token: np.ndarray, at_eos: np.ndarray) -> np.ndarray:
    """`per_token` [N, R] with `at_eos` [N] written after each finished row's last token."""
    out = per_token.copy()
    rows = np.nonzero(self.finished)[0]
    out[rows, self.lengths[rows]] = at_eos[rows]
    return out

  @property
  def response_tokens(self) -> np.ndarray:
    """[N, R] generated ids INCLUDING the EOS of finished rows, pad_id after."""
    return self._with_eos(self.tokens, self.eos_token)

  @property
  def response_logprobs(self) -> np.ndarray:
    """[N, R] log-probs of `response_tokens` (EOS included), 0 after the end."""
    return self._with_eos(self.logprobs, self.eos_logprob)


def sampling_params(section, *, eos_ids, pad_id: int, self_reward_token_id: int | None,
                    **defaults) -> SamplingParams:
  """The one SamplingParams builder: from a config section (`config.rollout`, the training
  config's `config.eval`, or the eval config's `config.eval`) holding n, temperature and
  max_new_tokens, and optionally top_p, top_k, greedy, decode_segments and decode_slots; a key
  the section lacks takes its value from `defaults`, then SamplingParams' own default."""
  keys = ("n", "temperature", "max_new_tokens", "top_p", "top_k", "greedy", "decode_segments", "decode_slots")
  values = {k: section[k] if k in section else defaults[k] for k in keys if k in section or k in defaults}
  return SamplingParams(eos_ids=tuple(int(i) for i in eos_ids), pad_id=int(pad_id),
                        self_reward_token_id=self_reward_token_id, **values)


def decode_responses(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
  """The texts of sampled responses (`SampleOutput.tokens` / `.lengths`: EOS excluded), special
  tokens skipped: what the verifier reads, the JSONL records show and votes are counted on."""
  return [tokenizer.decode(row[:k].tolist(), skip_special_tokens=True) for row, k in zip(tokens, lengths)]


def to_output(state, prompt_tokens, prompt_mask, num_rows: int, sampling: SamplingParams) -> SampleOutput:
  """A sampler's final state (static or continuous: its tokens / logprobs [rows, R+1], finished,
  self_reward) as this host's SampleOutput: strip padding rows, split the EOS out of the token
  buffer."""
  max_new = sampling.max_new_tokens
  buf = hosts_lib.local_rows(state.tokens)[:num_rows, :max_new]
  lps = hosts_lib.local_rows(state.logprobs)[:num_rows, :max_new]
  finished = hosts_lib.local_rows(state.finished)[:num_rows].astype(bool)
  self_reward = hosts_lib.local_rows(state.self_reward)[:num_rows].astype(np.float32)
  is_eos = np.isin(buf, np.asarray(sampling.eos_ids, np.int32)) if sampling.eos_ids else np.zeros(buf.shape, bool)
  lengths = np.where(finished, np.argmax(is_eos, axis=1), max_new).astype(np.int32)
  rows = np.arange(num_rows)
  eos_col = np.minimum(lengths, max_new - 1)
  eos_token = np.where(finished, buf[rows, eos_col], sampling.pad_id).astype(np.int32)
  eos_logprob = np.where(finished, lps[rows, eos_col], np.nan).astype(np.float32)
  after_end = np.arange(max_new)[None, :] >= lengths[:, None]
  tokens = np.where(after_end, sampling.pad_id, buf).astype(np.int32)
  logprobs = np.where(after_end, 0.0, lps).astype(np.float32)
  self_reward = np.where(finished, self_reward, np.nan).astype(np.float32)
  return SampleOutput(
      prompt_tokens=prompt_tokens[:num_rows], prompt_mask=prompt_mask[:num_rows], tokens=tokens,
      lengths=lengths, logprobs=logprobs, eos_token=eos_token, eos_logprob=eos_logprob,
      finished=finished, truncated=~finished, self_reward_logprob=self_reward,
      group_ids=(rows // sampling.n).astype(np.int32), pad_id=sampling.pad_id)
