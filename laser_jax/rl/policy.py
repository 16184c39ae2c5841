"""Training-time log-probabilities from the model: per-token policy log-probs and the LaSeR score.

The training sequence of a response is `prompt (left-padded) + response + EOS`; the logits at index
i predict token i + 1. For a finished row the self-rewarding log-prob log pi(z_c | x, y) is the
z_c entry of the (temperature-1) log-softmax at the EOS index: this is exactly what "placing z_c
right after EOS" computes, without having to feed z_c.
"""
import functools

import jax
import jax.numpy as jnp

from laser_jax.models import model as model_lib


def _target_logprobs(params, cfg, hidden, targets, temperature):
  logits = model_lib.unembed(params, cfg, hidden).astype(jnp.float32) / temperature
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - logz


def token_logprobs(params, cfg, hidden, targets, temperature: float = 1.0, chunk: int = 0):
  """log softmax(logits / T)[target] for every position; hidden [B, S, H], targets [B, S] -> [B, S].

  With `chunk > 0` the vocabulary projection runs over sequence chunks under `jax.checkpoint`, so
  the [B, S, V] logits are never held in memory at once (V = 152k makes them the largest
  activation of a long-context step).
  """
  seq_len = hidden.shape[1]
  if chunk <= 0 or chunk >= seq_len:
    return _target_logprobs(params, cfg, hidden, targets, temperature)
  pad = (-seq_len) % chunk
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = hidden.shape[1] // chunk
  hidden_chunks = hidden.reshape(hidden.shape[0], n, chunk, -1).swapaxes(0, 1)
  target_chunks = targets.reshape(targets.shape[0], n, chunk).swapaxes(0, 1)
  body = jax.checkpoint(functools.partial(_target_logprobs, params, cfg, temperature=temperature))
  out = jax.lax.map(lambda xs: body(xs[0], xs[1]), (hidden_chunks, target_chunks))
  return out.swapaxes(0, 1).reshape(targets.shape[0], -1)[:, :seq_len]


def self_reward_logprob(params, cfg, hidden, eos_index, token_id: int):
  """Unscaled log pi(z_c | x, y, EOS): the z_c log-prob in the distribution at `eos_index` [B]."""
  h = jnp.take_along_axis(hidden, eos_index[:, None, None], axis=1)[:, 0]
  logits = model_lib.unembed(params, cfg, h).astype(jnp.float32)
  return jax.nn.log_softmax(logits, axis=-1)[:, token_id]


def sequence_logprobs(params, cfg, tokens, positions, attention_mask, targets, eos_index, *,
                      temperature: float, self_reward_token_id: int, chunk: int = 0):
  """Per-token log-probs of `targets` and the self-reward log-prob at `eos_index`.

  tokens, positions, attention_mask, targets [B, S]; eos_index [B].
  Returns (token_logp [B, S] with temperature applied, z_logprob [B] at temperature 1).
  """
  hidden = model_lib.forward(params, cfg, tokens, positions, attention_mask, return_hidden=True)
  logp = token_logprobs(params, cfg, hidden, targets, temperature, chunk)
  z_logprob = self_reward_logprob(params, cfg, hidden, eos_index, self_reward_token_id)
  return logp, z_logprob
