"""DAPO / Dr. GRPO options: dynamic sampling, overlong shaping, truncation masking, constant norm.

- Dynamic sampling (DAPO): a group whose rewards are all equal has zero GRPO advantage and gives
  no learning signal; drop it and keep sampling until the batch holds `target_groups` groups, for
  at most `max_rounds` sampling rounds. The keep-mask is a JAX function; the accumulation across
  rounds is host-side NumPy (it changes array shapes).
- Overlong reward shaping (DAPO): no penalty up to max_len - L_cache tokens, then a linear ramp
  down to -penalty_factor at max_len.
- Truncation masking (DAPO "overlong filtering"): truncated responses are dropped from the loss.
- Dr. GRPO's constant-length normaliser: per-sequence token sums divided by max_len, not by the
  sequence's own length.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def keep_groups_mask(rewards: jax.Array, group_ids: jax.Array,
                     num_groups: int | None = None) -> jax.Array:
  """[B] bool: True on rows whose group's rewards are not all equal (DAPO dynamic sampling).

  group_ids: [B] ints in [0, num_groups) (default B); rows of a group need not be contiguous.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  num_groups = rewards.shape[0] if num_groups is None else num_groups
  gmax = jax.ops.segment_max(rewards, group_ids, num_groups)
  gmin = jax.ops.segment_min(rewards, group_ids, num_groups)
  return (gmax > gmin)[group_ids]


class DynamicSamplingBuffer:
  """Accumulates kept groups over sampling rounds until `target_groups` or `max_rounds`.

  Each round's batch is a dict of NumPy arrays sharing the leading row axis, holding at least
  `reward_key` and `group_key` (any hashable per-row group keys, unique within a round). Kept
  groups are stored whole; the result renumbers group ids densely (0, 1, ...) in arrival order
  and holds exactly `target_groups` groups when full (later surplus groups are dropped).
  """

  def __init__(self, target_groups: int, max_rounds: int, *, reward_key: str = "rewards",
               group_key: str = "group_ids"):
    if target_groups <= 0 or max_rounds <= 0:
      raise ValueError(f"DynamicSamplingBuffer: target_groups ({target_groups}) and max_rounds "
                       f"({max_rounds}) must be positive")
    self.target_groups = target_groups
    self.max_rounds = max_rounds
    self.reward_key = reward_key
    self.group_key = group_key
    self.rounds = 0
    self.sampled_groups = 0
    self._pieces: list[dict] = []
    self._kept_groups = 0

  @property
  def kept_groups(self) -> int:
    return min(self._kept_groups, self.target_groups)

  @property
  def full(self) -> bool:
    return self._kept_groups >= self.target_groups

  @property
  def done(self) -> bool:
    """True when no more rounds should be sampled (full, or the round budget is spent)."""
    return self.full or self.rounds >= self.max_rounds

  def add(self, batch: dict) -> int:
    """Adds one sampling round; returns how many of its groups were kept."""
    if self.done:
      raise RuntimeError("DynamicSamplingBuffer.add: buffer is already full or out of rounds")
    for key in (self.reward_key, self.group_key):
      if key not in batch:
        raise KeyError(f"DynamicSamplingBuffer.add: batch lacks {key!r} (has {sorted(batch)})")
    n = len(batch[self.reward_key])
    for key, value in batch.items():
      if len(value) != n:
        raise ValueError(f"DynamicSamplingBuffer.add: {key!r} has {len(value)} rows, "
                         f"{self.reward_key!r} has {n}")
    _, dense = np.unique(np.asarray(batch[self.group_key]), return_inverse=True)
    dense = dense.reshape(-1)
    num = int(dense.max()) + 1 if n else 0
    keep = np.asarray(keep_groups_mask(np.asarray(batch[self.reward_key], np.float32),
                                       dense.astype(np.int32), num)) if n else np.zeros(0, bool)
    self.rounds += 1
    self.sampled_groups += num
    kept_ids = [g for g in _first_appearance_order(dense) if keep[dense == g][0]]
    kept_ids = kept_ids[:self.target_groups - self._kept_groups]
    if kept_ids:
      # Renumber kept groups after those already stored, preserving arrival order.
      new_id = {g: self._kept_groups + i for i, g in enumerate(kept_ids)}
      rows = np.isin(dense, kept_ids)
      piece = {k: np.asarray(v)[rows] for k, v in batch.items()}
      piece[self.group_key] = np.array([new_id[g] for g in dense[rows]], np.int32)
      self._pieces.append(piece)
      self._kept_groups += len(kept_ids)
    return len(kept_ids)

  def result(self) -> tuple[dict, dict]:
    """(batch with dense group ids, info {rounds, full, kept_groups, sampled_groups})."""
    info = {"rounds": self.rounds, "full": self.full, "kept_groups": self.kept_groups,
            "sampled_groups": self.sampled_groups}
    if not self._pieces:
      return {}, info
    keys = self._pieces[0].keys()
    return {k: np.concatenate([p[k] for p in self._pieces]) for k in keys}, info


def _first_appearance_order(dense: np.ndarray) -> list[int]:
  _, first = np.unique(dense, return_index=True)
  return [int(dense[i]) for i in np.sort(first)]


def dynamic_sampling(sample_round: Callable[[int], dict], target_groups: int, max_rounds: int,
                     **buffer_kwargs) -> tuple[dict, dict]:
  """Calls `sample_round(round_index)` until `target_groups` informative groups or `max_rounds`.

  Returns (batch, info) as `DynamicSamplingBuffer.result`; when the round budget runs out first,
  `info["full"]` is False and the batch holds fewer groups (the caller decides what to do).
  """
  buf = DynamicSamplingBuffer(target_groups, max_rounds, **buffer_kwargs)
  while not buf.done:
    buf.add(sample_round(buf.rounds))
  return buf.result()


def overlong_reward_penalty(response_lengths: jax.Array, max_response_length: int,
                            overlong_buffer_len: int, penalty_factor: float = 1.0) -> jax.Array:
  """DAPO overlong shaping, a penalty <= 0 to add to the reward, per row [B].

  0 while len <= max_len - L_cache; then -penalty_factor * (len - (max_len - L_cache)) / L_cache,
  reaching -penalty_factor at len = max_len.
  """
  if not 0 < overlong_buffer_len <= max_response_length:
    raise ValueError(f"overlong_buffer_len must be in (0, max_response_length="
                     f"{max_response_length}], got {overlong_buffer_len}")
  expected = max_response_length - overlong_buffer_len
  exceed = jnp.asarray(response_lengths, jnp.float32) - expected
  return jnp.minimum(-exceed / overlong_buffer_len * penalty_factor, 0.0)


def mask_truncated(response_mask: jax.Array, finished: jax.Array) -> jax.Array:
  """Response mask [B, T] with the rows of truncated (unfinished) responses zeroed."""
  mask = jnp.asarray(response_mask, jnp.float32)
  return mask * jnp.asarray(finished, jnp.float32)[:, None]


def drgrpo_normaliser(num_sequences, max_response_length: int):
  """Dr. GRPO's constant loss normaliser: #sequences * max_response_length."""
  return num_sequences * float(max_response_length)
