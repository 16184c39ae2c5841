"""DAPO / Dr. GRPO options: overlong shaping, truncation masking, constant norm.

- Overlong reward shaping (DAPO): no penalty up to max_len - L_cache tokens, then a linear ramp
  down to -penalty_factor at max_len.
- Truncation masking (DAPO "overlong filtering"): truncated responses are dropped from the loss.
- Dr. GRPO's constant-length normaliser: per-sequence token sums divided by max_len, not by the
  sequence's own length.
"""
import jax
import jax.numpy as jnp


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
