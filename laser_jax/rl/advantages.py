"""Advantages: GRPO's group-normalised verifier advantages, LaSeR's self-rewarding advantages
from the scores r_s, and their integration (see ../shared/SPEC.md). Pure JAX over per-row arrays.

Group ids are ints in [0, num_groups) (num_groups defaults to B); rows of a group need not be
contiguous. `dense_group_ids` maps arbitrary ids (e.g. prompt uids) to that range.
`objective.rollout_advantages` combines them for a whole rollout batch as the trainer uses them.
"""
import jax
import jax.numpy as jnp
import numpy as np

GRPO_EPS = 1e-6


def dense_group_ids(ids) -> np.ndarray:
  """Host-side: maps arbitrary per-row group keys (ints or strings) to ints in [0, #groups)."""
  _, inverse = np.unique(np.asarray(ids), return_inverse=True)
  return inverse.reshape(-1).astype(np.int32)


def _check_group_ids(group_ids, num_groups: int, name: str = "group_ids"):
  """Out-of-range ids would be silently dropped by segment ops: check them when concrete."""
  if isinstance(group_ids, jax.core.Tracer):
    return
  g = np.asarray(group_ids)
  if g.ndim != 1 or not np.issubdtype(g.dtype, np.integer):
    raise ValueError(f"{name}: expected a 1-D integer array, got shape {g.shape} dtype {g.dtype}")
  if g.size and (g.min() < 0 or g.max() >= num_groups):
    raise ValueError(f"{name}: ids must lie in [0, {num_groups}), got range [{g.min()}, {g.max()}]"
                     " (use advantages.dense_group_ids or pass num_groups)")


def group_mean_std(values: jax.Array, group_ids: jax.Array, num_groups: int | None = None):
  """Per-row group mean, unbiased group std and group size of `values` [B].

  A group of size 1 has std 0 here (its unbiased std is undefined); callers decide what that means.
  """
  values = jnp.asarray(values, jnp.float32)
  num_groups = values.shape[0] if num_groups is None else num_groups
  _check_group_ids(group_ids, num_groups)
  size = jax.ops.segment_sum(jnp.ones_like(values), group_ids, num_groups)
  total = jax.ops.segment_sum(values, group_ids, num_groups)
  mean = total / jnp.maximum(size, 1.0)
  dev = values - mean[group_ids]
  sq = jax.ops.segment_sum(dev * dev, group_ids, num_groups)
  std = jnp.sqrt(sq / jnp.maximum(size - 1.0, 1.0))
  std = jnp.where(size > 1, std, 0.0)
  return mean[group_ids], std[group_ids], size[group_ids]


def grpo_advantages(rewards: jax.Array, group_ids: jax.Array, *, num_groups: int | None = None,
                    norm_by_std: bool = True, eps: float = GRPO_EPS) -> jax.Array:
  """GRPO advantages [B]: (r - mean_g) / (std_g + eps), unbiased std; Dr. GRPO: r - mean_g.

  A group of size 1 takes mean 0 and std 1, as verl's GRPO does (the official LaSeR release's
  base), so its advantage is r / (1 + eps) (Dr. GRPO: r), the same convention as the self-reward
  advantages' (SPEC). Training always has groups of rollout.n >= 2; this matters for n = 1.
  """
  mean, std, size = group_mean_std(rewards, group_ids, num_groups)
  mean, std = jnp.where(size > 1, mean, 0.0), jnp.where(size > 1, std, 1.0)
  centred = jnp.asarray(rewards, jnp.float32) - mean
  return centred / (std + eps) if norm_by_std else centred


def token_advantages(advantages: jax.Array, response_mask: jax.Array) -> jax.Array:
  """Broadcasts per-row advantages [B] (or passes [B, T]) over response tokens, zero off-mask."""
  mask = jnp.asarray(response_mask, jnp.float32)
  adv = jnp.asarray(advantages, jnp.float32)
  if adv.ndim == 1:
    adv = adv[:, None]
  if adv.shape[0] != mask.shape[0] or adv.ndim != 2:
    raise ValueError(f"advantages: expected [B] or [B, T] with B={mask.shape[0]}, got {adv.shape}")
  return jnp.broadcast_to(adv, mask.shape) * mask


def self_rewarding_advantages(scores: jax.Array, finished: jax.Array, group_ids: jax.Array,
                              advantages: jax.Array, *, threshold: float = 0.1,
                              num_groups: int | None = None) -> jax.Array:
  """A^s [B] from the rollout policy's scores r_s (SPEC "self-rewarding advantage integration").

  s = clip(r_s, 0, 1) on finished rows, 0 on truncated ones; per group mu, unbiased sigma
  (size-1 group: mu = 0, sigma = 1); A^s = (s - mu) / sigma where sigma > threshold, else the
  verifier advantage A (`advantages` [B]).
  """
  finished = jnp.asarray(finished, bool)
  s = jnp.where(finished, jnp.clip(jnp.where(finished, scores, 0.0), 0.0, 1.0), 0.0)
  mu, sigma, size = group_mean_std(s, group_ids, num_groups)
  mu = jnp.where(size > 1, mu, 0.0)
  sigma = jnp.where(size > 1, sigma, 1.0)
  use = sigma > threshold
  return jnp.where(use, (s - mu) / jnp.where(use, sigma, 1.0), advantages)


def integrate_advantages(advantages: jax.Array, self_advantages: jax.Array,
                         tau: float) -> jax.Array:
  """A' = (1 - tau) A + tau A^s."""
  return (1.0 - tau) * advantages + tau * self_advantages
