"""Token-budget packing (laser_jax.rl.packing): the plan, segment-aware attention, and a packed
update / log-prob pass that equals the padded one.

- plan: hand-worked first-fit-decreasing placements; a pure function of the lengths;
- attention: a packed row's segments attended together (xla, chunked, splash through the Pallas
  interpreter, cudnn's fallback) equal each sequence attended alone, values and gradients;
- update: loss, terms, gradient norm and parameters of a packed step equal the padded step's
  for every aggregation mode, with the KL loss and the exact score;
- log-probs: the packed no-gradient pass gives the padded pass's per-row values.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import test_programs

from laser_jax.generate import sampling
from laser_jax.models import attention as attention_lib
from laser_jax.models import model as model_lib
from laser_jax.rl import objective
from laser_jax.rl import packing
from laser_jax.rl import records
from laser_jax.training import programs

CFG = model_lib.ModelConfig(family="qwen2", vocab_size=48, hidden_size=32, intermediate_size=64,
                            num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                            tie_word_embeddings=True, qkv_bias=True, attention="xla")
ZC, EOS, PAD = 47, 1, 0
P, R = 5, 9  # prompt bucket, max_new_tokens: rows of S = P + R + 1 = 15 tokens


# ---- the plan -------------------------------------------------------------------------------
def test_plan_is_first_fit_decreasing_by_hand():
  # Rows of 10 tokens, 2 per micro-batch. Longest first (ties: lower index): 7 (#1) -> row 0;
  # 6 (#3) -> row 1; 5 (#0) -> row 2; 3 (#2) fits row 0 (7 + 3 = 10); 3 (#4) -> row 1 (6 + 3);
  # 2 (#5) -> row 2 (5 + 2).
  plan = packing.plan_packing(np.array([5, 7, 3, 6, 3, 2]), row_tokens=10, rows=2)
  packed_row = plan.micro * 2 + plan.row
  np.testing.assert_array_equal(packed_row, [2, 0, 0, 1, 1, 2])
  np.testing.assert_array_equal(plan.offset, [0, 0, 7, 0, 6, 5])
  np.testing.assert_array_equal(plan.slot, [0, 0, 1, 0, 1, 1])
  assert (plan.num_micro, plan.max_slots) == (2, 2)
  assert plan.shape() == (2, 2) and plan.shape(num_micro=3, slots=5) == (4, 8)


def test_plan_is_a_pure_function_of_the_lengths_and_never_overflows_a_row():
  lengths = np.random.default_rng(0).integers(1, 40, size=200)
  a, b = packing.plan_packing(lengths, 64, 4), packing.plan_packing(lengths.copy(), 64, 4)
  for name in ("micro", "row", "slot", "offset"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  packed_row = a.micro * 4 + a.row
  for r in np.unique(packed_row):
    mine = np.flatnonzero(packed_row == r)
    spans = sorted((a.offset[i], a.offset[i] + lengths[i]) for i in mine)
    assert spans[-1][1] <= 64 and all(x[1] <= y[0] for x, y in zip(spans, spans[1:]))  # no overlap
    np.testing.assert_array_equal(np.sort(a.slot[mine]), np.arange(len(mine)))
  with pytest.raises(ValueError, match=r"lengths must lie in \[1, 64\]"):
    packing.plan_packing(np.array([3, 65]), 64, 1)


# ---- attention ------------------------------------------------------------------------------
@pytest.mark.parametrize("impl,block", [("xla", 512), ("chunked", 7), *(
    pytest.param(impl, block, marks=pytest.mark.slow) for impl, block in (("chunked", 16), ("splash", 128),
                                                                          ("cudnn", 32)))])
def test_segments_attend_as_separate_sequences(impl, block):
  """Two packed rows (GQA): each segment's outputs and the gradients equal attention over that
  sequence alone (`attend` with a plain causal mask on its slice); padding reads nothing."""
  rng = np.random.default_rng(2)
  b, t, n, kv, d = 2, 40, 4, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for h in (n, kv, kv))
  spans = [[(0, 13), (13, 14), (14, 33)], [(0, 9), (9, 40)]]  # row 0 ends in 7 pad tokens
  segments = np.zeros((b, t), np.int32)
  for row, row_spans in enumerate(spans):
    for s, (lo, hi) in enumerate(row_spans):
      segments[row, lo:hi] = s + 1
  segments = jnp.asarray(segments)
  weights = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) * (segments > 0)[:, :, None, None]

  def packed(q, k, v):
    return attention_lib.attend_causal(q, k, v, segments > 0, impl, block, interpret=True, segment_ids=segments)

  def separate(q, k, v):  # the reference: one plain causal attention per sequence
    out = jnp.zeros_like(q)
    for row, row_spans in enumerate(spans):
      for lo, hi in row_spans:
        piece = [x[row:row + 1, lo:hi] for x in (q, k, v)]
        causal = attention_lib.causal_mask(jnp.arange(hi - lo), jnp.ones((1, hi - lo), bool))
        out = out.at[row:row + 1, lo:hi].set(attention_lib.attend(*piece, causal))
    return out

  got, want = jax.jit(packed)(q, k, v), jax.jit(separate)(q, k, v)
  real = (segments > 0)[:, :, None, None]
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-5, rtol=1e-5)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * weights)
  grads = jax.jit(jax.grad(loss(packed), argnums=(0, 1, 2)))(q, k, v)
  for g, r in zip(grads, jax.jit(jax.grad(loss(separate), argnums=(0, 1, 2)))(q, k, v)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


# ---- update and log-probs -------------------------------------------------------------------
def long_tailed_rows(rng: np.random.Generator, num_rows: int):
  """`records.build_sequences` rows of a sampler output: prompts of 2..P tokens (left-padded),
  responses mostly short, two truncated at R; and the per-row quantities of an update."""
  prompt_lengths = rng.integers(2, P + 1, size=num_rows)
  prompt_mask = np.arange(P)[None] >= P - prompt_lengths[:, None]
  lengths = np.minimum(rng.geometric(0.35, size=num_rows), R - 1)  # generated tokens, EOS excluded
  finished = np.ones(num_rows, bool)
  finished[[1, 6]], lengths[[1, 6]] = False, R
  tokens = np.where(np.arange(R)[None] < lengths[:, None], rng.integers(2, 40, size=(num_rows, R)), PAD)
  out = sampling.SampleOutput(
      prompt_tokens=np.where(prompt_mask, rng.integers(2, 40, size=(num_rows, P)), PAD).astype(np.int32),
      prompt_mask=prompt_mask, tokens=tokens.astype(np.int32), lengths=lengths.astype(np.int32),
      logprobs=np.zeros((num_rows, R), np.float32), eos_token=np.where(finished, EOS, PAD).astype(np.int32),
      eos_logprob=np.zeros(num_rows, np.float32), finished=finished, truncated=~finished,
      self_reward_logprob=np.zeros(num_rows, np.float32), group_ids=np.arange(num_rows, dtype=np.int32) // 2,
      pad_id=PAD)
  sequences, response_mask = records.build_sequences(out)
  rewards = rng.integers(0, 2, size=num_rows).astype(np.float32)
  return records.UpdateBatch(
      sequences=sequences, response_mask=response_mask,
      old_logp=(np.log(1 / 48) + 0.3 * rng.standard_normal(response_mask.shape)).astype(np.float32) * response_mask,
      advantages=rng.standard_normal(num_rows).astype(np.float32), rewards=rewards, finished=finished,
      self_reward_weights=np.asarray(objective.self_reward_class_weights(rewards, finished)),
      ref_logp=(np.log(1 / 48) + 0.2 * rng.standard_normal(response_mask.shape)).astype(np.float32),
      ref_z_logprob=rng.normal(-4.0, 1.0, size=num_rows).astype(np.float32))


def packed_batch(batch: records.UpdateBatch, row_tokens: int, rows: int = 1) -> records.UpdateBatch:
  plan = packing.plan_packing(np.sum(batch.sequences.attention_mask, axis=1), row_tokens, rows)
  num_micro, slots = plan.shape(num_micro=plan.num_micro + 1)  # bucketing leaves empty micro-batches
  return packing.pack_update_batch(batch, plan, num_micro, rows, row_tokens, slots)


@pytest.mark.parametrize("agg_mode", [
    "seq-mean-token-mean", *(pytest.param(m, marks=pytest.mark.slow) for m in objective.AGG_MODES
                             if m != "seq-mean-token-mean")])
def test_packed_update_equals_the_padded_objective_and_one_optimizer_step(agg_mode):
  """Loss, every term, the gradient norm and the parameters after one SGD step of the packed
  update (2 packed rows of 24 tokens per micro-batch, empty slots and an empty micro-batch
  included), KL loss and exact score on, against the existing reference of the padded update
  (tests/test_programs.py): the objective over all padded rows at once, its gradient, one SGD
  step by hand."""
  loss_cfg = objective.LossConfig(agg_mode=agg_mode, max_response_length=R, loss_coef=0.5, kl_coef=0.2,
                                  ref_constant=-4.0, kl_loss_coef=0.1)
  statics, optimizer, params, state = test_programs.sgd_setup(loss_cfg, temperature=0.7, cfg=CFG, zc=ZC)
  batch = long_tailed_rows(np.random.default_rng(3), 12)
  normalisers = objective.loss_normalisers(loss_cfg, batch.response_mask)
  packed = packed_batch(batch, row_tokens=24, rows=2)
  assert packed.sequences.tokens.shape[-2:] == (2, 24) and np.all(packed.sequences.length[-1] == 0)
  got_state, got = jax.jit(lambda state, batch: programs.update_step(
      state, batch, normalisers, True, statics=statics, optimizer=optimizer))(state, packed)

  (loss, terms), grads = jax.jit(jax.value_and_grad(lambda p, b: programs.micro_loss(
      p, b, normalisers, True, statics=statics), has_aux=True))(params, batch)
  want_params = optax.apply_updates(params, optimizer.update(grads, state.opt_state, params)[0])
  np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(got["grad_norm"], optax.global_norm(grads), rtol=1e-5)
  assert set(got["terms"]) == set(terms)
  for key in terms:
    for g, w in zip(got["terms"][key], terms[key]):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=key)
  for g, w in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  assert float(loss) != 0.0


@pytest.mark.slow
def test_packed_logprobs_equal_the_padded_logprobs_per_row():
  """The no-gradient pass over packed rows, back in row order, equals the padded pass on every
  response target and on z_c at the EOS (chunked attention, logits in sequence chunks)."""
  cfg = CFG.replace(attention="chunked", attention_block=8)
  statics = programs.StepStatics(model_cfg=cfg, loss_cfg=objective.LossConfig(), temperature=0.7,
                                 self_reward_token_id=ZC, logprob_chunk=8)
  params = model_lib.init_params(cfg, jax.random.key(1))
  batch = long_tailed_rows(np.random.default_rng(4), 12)
  run = jax.jit(lambda p, s: programs.sequence_logprobs(p, s, statics=statics))
  want_logp, want_z = run(params, batch.sequences)
  plan = packing.plan_packing(np.sum(batch.sequences.attention_mask, axis=1), 20, 2)
  num_micro, slots = plan.shape()
  packed, source = packing.pack_sequences(batch.sequences, plan, num_micro, 2, 20, slots)
  outs = [run(params, jax.tree.map(lambda x: x[m], packed)) for m in range(num_micro)]
  got_logp = packing.row_values(np.stack([o[0] for o in outs]), source, 12)
  got_z = packing.row_values(np.stack([o[1] for o in outs]), source, 12)
  mask = batch.response_mask > 0
  np.testing.assert_allclose(np.where(mask, got_logp, 0), np.where(mask, want_logp, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_z[batch.finished], np.asarray(want_z)[batch.finished], rtol=1e-5, atol=1e-6)


def test_a_token_budget_below_the_longest_sequence_is_a_config_error():
  from laser_jax import config_check, default_config
  c = default_config.get_config()
  c.data.max_prompt_len, c.rollout.max_new_tokens = 20, 30  # prompt bucket 32: 32 + 30 + 1 = 63
  c.micro_batch_tokens = 63
  config_check.validate(c, num_devices=1)
  c.micro_batch_tokens = 62
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c, num_devices=1)
  assert str(e.value).startswith("config.micro_batch_tokens: 62 cannot hold the longest sequence of 63 tokens")
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_packed_training_step_equals_the_padded_step(tmp_path):
  """A Trainer step (rollout, recomputed old and reference log-probs, KL loss, update) with
  micro_batch_tokens = 48 against the same step padded: the same loss, terms and gradient norm."""
  import test_trainer
  from laser_jax.training import trainer as trainer_lib
  metrics = {}
  for tokens in (0, 48):  # rows of 32 + 12 + 1 = 45 tokens
    c = test_trainer.tiny_config(tmp_path / str(tokens), micro_batch_tokens=tokens,
                                 **{"rollout.recompute_old_logprobs": True, "loss.kl_loss_coef": 0.05})
    trainer = trainer_lib.Trainer(c)
    state = trainer.init_state(trainer.initial_params())
    ref = trainer.reference_params(None, c.workdir)
    _, metrics[tokens] = trainer.train_step(state, next(trainer.task.train_iterator()), ref)
  for key in ("actor/loss", "actor/grad_norm", "actor/pg_loss", "actor/kl_loss", "actor/self_reward_loss"):
    np.testing.assert_allclose(metrics[48][key], metrics[0][key], rtol=1e-4, atol=1e-9, err_msg=key)
  assert metrics[0]["actor/grad_norm"] > 0
