"""The compiled programs of one RL step, as module-level pure functions with their shardings.

One RL step runs four kinds of XLA program: the sampler's prefill and decode loop
(`sampler.model_sampler`), the no-gradient log-prob forward (old and reference log-probs,
`sequence_logprobs`) and the optimizer update with its micro-batch scan (`update_step`).
`StepPrograms` jits them once per run with the run's shardings. The trainer calls them, and
`laser_jax.aot` lowers the very same jitted functions with abstract inputs for a TPU slice, so
what the compile-time report measures is what a run executes.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from laser_jax.generate import sampler as sampler_lib
from laser_jax.generate import sampling as sampling_lib
from laser_jax.models import hosts
from laser_jax.models import model as model_lib
from laser_jax.models import sharding as sharding_lib
from laser_jax.models.config import ModelConfig
from laser_jax.rl import objective
from laser_jax.rl import packing
from laser_jax.rl import policy
from laser_jax.rl import records
from laser_jax.rl.rl_metrics import SumCount



@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position (saved next to it)."""
  step: jax.Array  # RL steps completed.
  params: Any
  opt_state: Any
  rng: jax.Array  # Raw uint32 key data: plain arrays checkpoint everywhere.
  skipped_updates: jax.Array  # Updates skipped for a non-finite gradient norm.


@dataclasses.dataclass(frozen=True)
class StepStatics:
  """The static settings the step programs are compiled for (frozen, hashable)."""
  model_cfg: ModelConfig
  loss_cfg: objective.LossConfig
  temperature: float  # Token log-probs are log softmax(logits / T): the rollout's (1 when greedy).
  self_reward_token_id: int  # z_c.
  logprob_chunk: int  # Sequence chunk of the vocabulary projection (0 = whole sequence).

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, model_cfg: ModelConfig,
                  self_reward_token_id: int) -> "StepStatics":
    return cls(model_cfg=model_cfg, loss_cfg=objective.LossConfig.from_config(config),
               temperature=float(config.rollout.temperature) or 1.0,  # 0 = greedy: T = 1
               self_reward_token_id=int(self_reward_token_id),
               logprob_chunk=int(config.model.logprob_chunk))


def apply_libtpu_init_args(config: ml_collections.ConfigDict) -> None:
  """Adds `config.libtpu_init_args` to $LIBTPU_INIT_ARGS (read when libtpu starts); flags the
  environment already sets win."""
  wanted = (config.get("libtpu_init_args", "") or "").split()
  current = os.environ.get("LIBTPU_INIT_ARGS", "").split()
  names = {flag.split("=")[0] for flag in current}
  added = [flag for flag in wanted if flag.split("=")[0] not in names]
  if added:
    os.environ["LIBTPU_INIT_ARGS"] = " ".join(current + added)


# ---- the pure step functions ----------------------------------------------------------------
def sequence_logprobs(params, sequences: records.Sequences | packing.PackedSequences, *,
                      statics: StepStatics) -> tuple[jax.Array, jax.Array]:
  """(token log-probs [B, S] at the rollout temperature, log pi(z_c | x, y) [B]) of `sequences`;
  of packed rows, per slot ([rows * slots, S] and [rows * slots]): `packed_logprobs`."""
  if isinstance(sequences, packing.PackedSequences):
    return packed_logprobs(params, sequences, statics=statics)
  s = sequences
  return policy.sequence_logprobs(
      params, statics.model_cfg, s.tokens, s.positions, s.attention_mask, s.targets, s.eos_index,
      temperature=statics.temperature, self_reward_token_id=statics.self_reward_token_id,
      chunk=statics.logprob_chunk)


def packed_logprobs(params, packed: packing.PackedSequences, *, statics: StepStatics) -> tuple[jax.Array, jax.Array]:
  """`sequence_logprobs` of packed rows: the forward over the packed tokens (segment-masked
  attention, restarted positions), its values gathered back to each slot's padded row."""
  hidden = model_lib.forward(params, statics.model_cfg, packed.tokens, packed.positions, packed.segment_ids > 0,
                             segment_ids=packed.segment_ids, return_hidden=True)
  logp = policy.token_logprobs(params, statics.model_cfg, hidden, packed.targets, statics.temperature,
                               statics.logprob_chunk)
  at_eos = packing.eos_hidden(hidden, packed)
  z_logprob = policy.self_reward_logprob(params, statics.model_cfg, at_eos, jnp.zeros(at_eos.shape[0], jnp.int32),
                                         statics.self_reward_token_id)
  return packing.unpack_tokens(logp, packed), z_logprob


def micro_loss(params, micro: records.UpdateBatch, normalisers: objective.LossNormalisers, sr_loss_on, *,
               statics: StepStatics):
  """The LaSeR objective's share of one micro-batch: (loss, named terms)."""
  logp, z_logprob = sequence_logprobs(params, micro.sequences, statics=statics)
  loss, terms = objective.total_loss(statics.loss_cfg, micro, logp=logp, z_logprob=z_logprob,
                                     normalisers=normalisers, self_reward_active=sr_loss_on)
  if isinstance(micro.sequences, packing.PackedSequences) and "actor/self_reward_loss" in terms:
    # L_sr's metric counts rows: the real sequences, not the empty slots (which add 0 to its sum).
    real = jnp.sum((micro.sequences.length > 0).astype(jnp.float32))
    terms["actor/self_reward_loss"] = SumCount(terms["actor/self_reward_loss"].sum, real)
  return loss, terms


def update_step(state: TrainState, batch: records.UpdateBatch, normalisers: objective.LossNormalisers, sr_loss_on, *,
                statics: StepStatics, optimizer: optax.GradientTransformation):
  """One optimizer update from a mini-batch laid out as [num_micro, micro, ...].

  Gradients are summed exactly over the micro-batches (a `lax.scan`); a non-finite gradient
  norm skips the update entirely (parameters and optimizer moments) and is counted.
  """
  grad_fn = jax.value_and_grad(functools.partial(micro_loss, statics=statics), has_aux=True)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  first = jax.tree.map(lambda x: x[0], batch)
  terms_shape = jax.eval_shape(
      lambda: micro_loss(state.params, first, normalisers, sr_loss_on, statics=statics)[1])
  terms_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), terms_shape)

  def body(carry, micro):
    grads_acc, loss_acc, terms_acc = carry
    compute = lambda: grad_fn(state.params, micro, normalisers, sr_loss_on)
    if isinstance(micro.sequences, packing.PackedSequences):
      # The micro-batch count is bucketed (packing.bucket): an all-empty micro-batch is skipped.
      skip = lambda: ((jnp.float32(0), terms_zero), zeros)
      (loss, terms), grads = jax.lax.cond(jnp.any(micro.sequences.length > 0), compute, skip)
    else:
      (loss, terms), grads = compute()
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    terms_acc = jax.tree.map(jnp.add, terms_acc, terms)
    return (grads_acc, loss_acc + loss, terms_acc), None

  (grads, loss, terms), _ = jax.lax.scan(body, (zeros, jnp.float32(0), terms_zero), batch)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(grad_norm)
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  state = state.replace(params=keep(new_params, state.params),
                        opt_state=keep(new_opt_state, state.opt_state),
                        skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32))
  return state, {"loss": loss, "grad_norm": grad_norm, "terms": terms}


# ---- shardings ------------------------------------------------------------------------------
def state_shardings(params, model_cfg: ModelConfig, optimizer, mesh: Mesh) -> TrainState:
  """NamedShardings of the train state around `params` (arrays or ShapeDtypeStructs)."""
  param_shardings = sharding_lib.param_shardings(params, model_cfg, mesh)
  replicated = sharding_lib.replicated(mesh)
  opt_shapes = jax.eval_shape(optimizer.init, params)
  # Optimizer leaves shaped like a parameter take that parameter's sharding (ZeRO-style).
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, s: s, opt_shapes, param_shardings,
      transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                    rng=replicated, skipped_updates=replicated)


def abstract_state(model_cfg: ModelConfig, optimizer, mesh: Mesh) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the train state; allocates nothing."""
  params = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))
  shardings = state_shardings(params, model_cfg, optimizer, mesh)
  shapes = jax.eval_shape(lambda p: TrainState(
      step=jnp.int32(0), params=p, opt_state=optimizer.init(p),
      rng=jax.random.key_data(jax.random.key(0)), skipped_updates=jnp.int32(0)), params)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def update_batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """An update batch leaf [num_micro, micro, ...]: the micro-batch rows over the batch axes."""
  return NamedSharding(mesh, P(None, sharding_lib.BATCH_AXES, *([None] * (ndim - 2))))


def abstract_update_batch(mesh: Mesh, num_micro: int, micro: int, seq_len: int, *,
                          with_ref_logp: bool, with_ref_score: bool) -> records.UpdateBatch:
  """ShapeDtypeStructs (in their shardings) of one optimizer update's [num_micro, micro, ...]
  batch; ref_logp / ref_z_logprob only where the KL loss / the exact score needs pi_ref."""
  return records.UpdateBatch.abstract((num_micro, micro), seq_len, lambda ndim: update_batch_sharding(mesh, ndim),
                              with_ref_logp=with_ref_logp, with_ref_score=with_ref_score)


def abstract_packed_update_batch(mesh: Mesh, num_micro: int, rows: int, row_tokens: int, slots: int, seq_len: int,
                                 *, with_ref_logp: bool, with_ref_score: bool) -> records.UpdateBatch:
  """`abstract_update_batch` of a packed update (`packing.pack_update_batch`): num_micro
  micro-batches of `rows` packed rows of `row_tokens` tokens and rows * slots sequence slots."""
  batch = abstract_update_batch(mesh, num_micro, rows * slots, seq_len, with_ref_logp=with_ref_logp,
                                with_ref_score=with_ref_score)
  leaf = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=update_batch_sharding(mesh, len(shape)))
  tokens, slot = (num_micro, rows, row_tokens), (num_micro, rows * slots)
  return batch.replace(sequences=packing.PackedSequences(
      tokens=leaf(tokens), positions=leaf(tokens), segment_ids=leaf(tokens), targets=leaf(tokens),
      offset=leaf(slot), start=leaf(slot), length=leaf(slot), eos_index=leaf(slot), seq_len=seq_len))


def abstract_logprob_batch(mesh: Mesh, rows: int, seq_len: int) -> records.Sequences:
  """ShapeDtypeStructs (in their shardings) of one log-prob forward's batch."""
  return records.Sequences.abstract((rows,), seq_len, lambda ndim: sharding_lib.batch_sharding(mesh, ndim))


def sampling_params(config: ml_collections.ConfigDict, *, eos_ids, pad_id: int,
                    self_reward_token_id: int):
  """(rollout, eval) `SamplingParams` of a run (`sampling.sampling_params` on `config.rollout` and
  `config.eval`; the periodic evaluation samples without top-k / top-p, in the rollout's decode
  segments)."""
  tokens = dict(eos_ids=eos_ids, pad_id=pad_id, self_reward_token_id=self_reward_token_id)
  rollout = sampling_lib.sampling_params(config.rollout, **tokens)
  evaluation = sampling_lib.sampling_params(config.eval, **tokens, top_p=1.0, top_k=0,
                                            decode_segments=config.rollout.decode_segments,
                                            decode_slots=config.rollout.decode_slots)
  return rollout, evaluation


def rollout_mesh(mesh: Mesh, tensor_parallel: int) -> Mesh:
  """The sampling mesh over `mesh`'s devices: (data = devices / k, fsdp = 1, tensor = k), each
  tensor group k consecutive devices of one host (ordered by process, then id)."""
  devices = sorted(mesh.devices.flat, key=lambda d: (d.process_index, d.id))
  return sharding_lib.make_mesh(data=len(devices) // tensor_parallel, fsdp=1, tensor=tensor_parallel,
                                devices=devices)


class StepPrograms:
  """The jitted programs of a run (see the module docstring), compiled on first call.

  With `rollout_tensor_parallel` = k > 0 the sampler runs on `rollout_mesh` (see
  `rollout.tensor_parallel` in default_config.py): `to_rollout_layout` copies the weights there,
  in the compute dtype, once per RL step.
  """

  def __init__(self, statics: StepStatics, optimizer: optax.GradientTransformation, mesh: Mesh,
               shardings: TrainState, rollout_tensor_parallel: int = 0):
    self.statics = statics
    self.mesh = mesh
    self.state_shardings = shardings
    # The state is donated: the update writes the new parameters and moments in place.
    self.update = jax.jit(functools.partial(update_step, statics=statics, optimizer=optimizer),
                          donate_argnums=(0,), out_shardings=(shardings, None))
    self.logprobs = jax.jit(functools.partial(sequence_logprobs, statics=statics))
    cfg = statics.model_cfg
    if rollout_tensor_parallel:
      self.rollout_mesh = rollout_mesh(mesh, rollout_tensor_parallel)
      self.rollout_param_shardings = jax.tree.map(
          lambda s: s.sharding, sharding_lib.abstract_params(cfg, self.rollout_mesh))
      # The cast runs where the weights are (training layout); the copy then moves once.
      self._cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(cfg.compute_dtype), p))
    else:
      self.rollout_mesh = mesh
      self.rollout_param_shardings = shardings.params
      self._cast = None
    self.sampler = sampler_lib.model_sampler(cfg, self.rollout_mesh)

  def to_rollout_layout(self, params):
    """The weights the sampler reads: `params` itself, or its copy in the rollout layout."""
    if self._cast is None:
      return params
    return jax.device_put(self._cast(params), self.rollout_param_shardings)

  def abstract_rollout_params(self, abstract_params):
    """ShapeDtypeStructs of `to_rollout_layout`'s output (for laser_jax.aot)."""
    if self._cast is None:
      return abstract_params
    dtype = self.statics.model_cfg.compute_dtype
    return jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, dtype, sharding=s),
                        abstract_params, self.rollout_param_shardings)

  def place_update_batch(self, batch: records.UpdateBatch) -> records.UpdateBatch:
    """Global [num_micro, micro, ...] arrays from this host's share of every micro-batch."""
    return jax.tree.map(lambda v: hosts.put_rows(v, update_batch_sharding(self.mesh, v.ndim), axis=1), batch)

  def place_logprob_batch(self, sequences: records.Sequences) -> records.Sequences:
    """A global [rows, ...] batch from this host's rows."""
    return jax.tree.map(lambda v: hosts.put_rows(v, sharding_lib.batch_sharding(self.mesh, v.ndim)), sequences)
