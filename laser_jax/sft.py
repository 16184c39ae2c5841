"""Supervised warm start: next-token cross-entropy on worked solutions before RL.

The embedded synthetic task starts from a random model; a short supervised phase on the task's
worked solutions brings it into the 10-80% accuracy range where GRPO has signal.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from laser_jax import model as model_lib
from laser_jax import sharding as sharding_lib


def sft_loss(params, cfg, tokens, loss_mask, lengths):
  """Mean NLL of the tokens marked in `loss_mask` (right-padded rows), as in `SFTCorpus`."""
  t = tokens.shape[1]
  attention_mask = jnp.arange(t)[None, :] < lengths[:, None]
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], tokens.shape)
  logits = model_lib.forward(params, cfg, tokens, positions, attention_mask)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  mask = loss_mask[:, 1:]
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def warm_start(params, cfg, corpus, *, steps: int, batch_size: int, lr: float, seed: int, mesh,
               param_shardings, log_fn=None):
  """Runs `steps` AdamW steps of `sft_loss` on random batches of `corpus`; returns new params."""
  tx = optax.adamw(lr, weight_decay=0.0)
  opt_state = jax.jit(tx.init)(params)
  batch_sharding = NamedSharding(mesh, P(sharding_lib.BATCH_AXES, None))
  row_sharding = NamedSharding(mesh, P(sharding_lib.BATCH_AXES))

  @jax.jit
  def step(params, opt_state, tokens, loss_mask, lengths):
    loss, grads = jax.value_and_grad(sft_loss)(params, cfg, tokens, loss_mask, lengths)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for i in range(steps):
    idx = rng.integers(0, corpus.tokens.shape[0], batch_size)
    params, opt_state, loss = step(
        params, opt_state, jax.device_put(corpus.tokens[idx], batch_sharding),
        jax.device_put(corpus.loss_mask[idx], batch_sharding),
        jax.device_put(corpus.lengths[idx], row_sharding))
    if log_fn is not None and (i + 1) % 50 == 0:
      log_fn(i + 1, float(loss))
  return jax.device_put(params, param_shardings)
