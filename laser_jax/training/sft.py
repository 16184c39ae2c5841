"""Supervised warm start: next-token cross-entropy on worked solutions before RL.

The embedded synthetic task starts from a random model; a short supervised phase on the task's
worked solutions brings it into the 10-80% accuracy range where GRPO has signal. The corpus
(`build_sft_corpus`) is any list of {"problem", "solution"} records, prompted as RL prompts are.
"""
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from laser_jax.data import prompts as prompts_lib
from laser_jax.models import model as model_lib
from laser_jax.models import sharding as sharding_lib


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


@dataclasses.dataclass(frozen=True)
class SFTCorpus:
  """Right-padded supervised examples: prompt + solution + EOS."""
  tokens: np.ndarray  # int32 [N, L]
  loss_mask: np.ndarray  # float32 [N, L]: 1 on the solution and EOS tokens (the targets)
  lengths: np.ndarray  # int32 [N]: prompt + solution + EOS tokens


def build_sft_corpus(records: Sequence[dict], tokenizer, template: str = "chat",
                     max_len: int | None = None) -> SFTCorpus:
  """Token ids of the warm-start corpus, prompts built exactly as the RL prompts are.

  `loss_mask[i, t] = 1` marks the tokens the model should predict (the solution and EOS), i.e.
  the loss at position t is on predicting tokens[i, t] from tokens[i, :t].
  """
  rows, masks = [], []
  for r in records:
    prompt_ids = prompts_lib.encode_prompt(prompts_lib.build_prompt(r["problem"], tokenizer, template),
                                    tokenizer, template)
    solution_ids = tokenizer(r["solution"], add_special_tokens=False)["input_ids"]
    ids = prompt_ids + solution_ids + [tokenizer.eos_token_id]
    rows.append(ids)
    masks.append([0] * len(prompt_ids) + [1] * (len(solution_ids) + 1))
  length = max(len(ids) for ids in rows)
  if max_len is not None:
    if length > max_len:
      raise ValueError(f"build_sft_corpus: longest example has {length} tokens > max_len {max_len}")
    length = max_len
  tokens = np.full((len(rows), length), tokenizer.pad_token_id, np.int32)
  loss_mask = np.zeros((len(rows), length), np.float32)
  for i, (ids, mask) in enumerate(zip(rows, masks)):
    tokens[i, :len(ids)] = ids
    loss_mask[i, :len(mask)] = mask
  return SFTCorpus(tokens, loss_mask, np.array([len(ids) for ids in rows], np.int32))
