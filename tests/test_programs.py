"""programs.update_step: one optimizer update from micro-batches, against the same objective
evaluated on the whole mini-batch at once and one optax step taken by hand (plain SGD, so that
the parameters compare the accumulated gradient itself: Adam's first step is about lr * sign(g),
which float rounding of a near-zero gradient entry can flip)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from laser_jax.models import model as model_lib
from laser_jax.rl import objective
from laser_jax.rl import records
from laser_jax.training import programs

CFG = model_lib.ModelConfig(family="qwen2", vocab_size=48, hidden_size=32, intermediate_size=64,
                            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                            tie_word_embeddings=True, qkv_bias=True, attention="xla")
ZC = 47
NUM_MICRO, MICRO, S = 3, 2, 10


def update_batch(rng: np.random.Generator) -> records.UpdateBatch:
  """[NUM_MICRO, MICRO, ...] rows: a 4-token prompt, a response of 2-5 tokens ending in EOS (1)."""
  rows = NUM_MICRO * MICRO
  tokens = rng.integers(2, 40, size=(rows, S)).astype(np.int32)
  lengths = rng.integers(2, 6, size=rows)
  eos_index = 4 + lengths  # the EOS position
  tokens[np.arange(rows), eos_index] = 1
  attention = np.arange(S)[None] <= eos_index[:, None]
  targets = np.concatenate([tokens[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
  response_mask = ((np.arange(S)[None] >= 3) & (np.arange(S)[None] < eos_index[:, None])).astype(np.float32)
  rewards = rng.integers(0, 2, size=rows).astype(np.float32)
  finished = rng.random(rows) < 0.8
  batch = records.UpdateBatch(
      sequences=records.Sequences(tokens=tokens, positions=np.tile(np.arange(S, dtype=np.int32), (rows, 1)),
                                   attention_mask=attention, targets=targets, eos_index=eos_index.astype(np.int32)),
      response_mask=response_mask,
      old_logp=(np.log(1 / 48) + 0.3 * rng.standard_normal((rows, S))).astype(np.float32) * response_mask,
      advantages=rng.standard_normal(rows).astype(np.float32), rewards=rewards, finished=finished,
      self_reward_weights=np.where(finished, 1.0 + rewards, 0.0).astype(np.float32))
  return jax.tree.map(lambda x: jnp.asarray(x).reshape((NUM_MICRO, MICRO) + x.shape[1:]), batch)


def sgd_setup(loss_cfg: objective.LossConfig, temperature: float, cfg=CFG, zc: int = ZC):
  """(statics, SGD(0.1), params, train state) of a tiny model: an update step whose one optimizer
  step is easy to apply by hand (tests/test_packing.py uses it too)."""
  statics = programs.StepStatics(model_cfg=cfg, loss_cfg=loss_cfg, temperature=temperature,
                                 self_reward_token_id=zc, logprob_chunk=0)
  optimizer = optax.sgd(0.1)
  params = model_lib.init_params(cfg, jax.random.key(0))
  state = programs.TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                              rng=jnp.zeros(2, jnp.uint32), skipped_updates=jnp.int32(0))
  return statics, optimizer, params, state


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_micro_batched_update_equals_the_whole_batch_objective_and_one_optimizer_step(agg_mode):
  loss_cfg = objective.LossConfig(agg_mode=agg_mode, loss_coef=0.5, kl_coef=0.2, ref_constant=-4.0)
  statics, optimizer, params, state = sgd_setup(loss_cfg, temperature=1.0)
  batch = update_batch(np.random.default_rng(0))
  whole = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
  normalisers = objective.loss_normalisers(loss_cfg, whole.response_mask)

  new_state, out = programs.update_step(state, batch, normalisers, True, statics=statics, optimizer=optimizer)

  # Reference: the objective over all rows in one call (exact normalisers: the micro-batch shares
  # add up to it), its gradient, and one SGD step applied by hand.
  (loss, terms), grads = jax.value_and_grad(programs.micro_loss, has_aux=True)(
      params, whole, normalisers, True, statics=statics)
  updates, _ = optimizer.update(grads, state.opt_state, params)
  want_params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(out["grad_norm"], optax.global_norm(grads), rtol=1e-5)
  for key in terms:
    np.testing.assert_allclose(out["terms"][key], terms[key], rtol=1e-5, atol=1e-7, err_msg=key)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert int(new_state.skipped_updates) == 0 and float(loss) != 0.0
