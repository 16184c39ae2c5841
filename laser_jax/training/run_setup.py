"""A run's static setup, built once by one function for the trainer and for `laser_jax.aot`.

`build_run_setup` turns a validated config and the model it trains into what one RL step's
programs are compiled for: the device mesh, the optimizer and its schedule, the train state's
shapes and shardings, the jitted `programs.StepPrograms`, the (rollout, eval) `SamplingParams`,
and the counts of one step (optimizer updates, micro-batches, log-prob passes, sequence length).
`trainer.Trainer` runs these programs; `laser_jax.aot` compiles the same ones for a TPU slice
(as MaxText's train_compile.py shares its trainer's setup), so the report cannot drift from
what training runs.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from laser_jax import config_check
from laser_jax.generate import sampler as sampler_lib
from laser_jax.generate import sampling as sampling_lib
from laser_jax.models import sharding as sharding_lib
from laser_jax.models.config import ModelConfig
from laser_jax.rl import objective
from laser_jax.training import optim as optim_lib
from laser_jax.training import programs as programs_lib


@dataclasses.dataclass(frozen=True, eq=False)
class RunSetup:
  """Everything static about a run's RL step (`build_run_setup`); holds no weights."""
  mesh: Mesh
  statics: programs_lib.StepStatics  # the model, loss and z_c the programs are compiled for
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule  # learning rate per optimizer update
  abstract_state: programs_lib.TrainState  # ShapeDtypeStructs in their shardings
  programs: programs_lib.StepPrograms
  sampling: sampling_lib.SamplingParams  # the rollout's
  eval_sampling: sampling_lib.SamplingParams  # the periodic evaluation's
  num_prompts_per_update: int  # prompts of one optimizer update (config.mini_batch_size or the batch)
  updates_per_step: int  # optimizer updates per RL step
  num_micro_batches: int  # micro-batches accumulated in one optimizer update (padded: micro_batch_tokens = 0)
  micro_batch_tokens: int  # tokens of one packed row (config.micro_batch_tokens; 0 = padded micro-batches)
  pack_rows: int  # packed rows of one micro-batch: one per data-parallel shard (data * fsdp)
  needs_ref: bool  # a term reads pi_ref: the KL loss, or the exact score
  exact_score: bool  # scores use log pi_ref(z_c | x, y) instead of the constant c_ref
  logprob_forwards: int  # no-gradient forwards per row and step: recomputed old + reference log-probs
  prompts_per_chunk: int  # global prompts per sampler call (0 = all of a call's prompts)
  prompt_bucket: int  # the longest prompt bucket the sampler pads to (config.data.max_prompt_len)
  seq_len: int  # tokens of an update row at that bucket: prompt + rollout.max_new_tokens + 1

  @property
  def model_cfg(self) -> ModelConfig:
    return self.statics.model_cfg

  @property
  def loss_cfg(self) -> objective.LossConfig:
    return self.statics.loss_cfg

  @property
  def state_shardings(self) -> programs_lib.TrainState:
    return jax.tree.map(lambda s: s.sharding, self.abstract_state)

  @property
  def param_shardings(self):
    return self.state_shardings.params

  @property
  def rows_per_update(self) -> int:
    """Responses of one optimizer update."""
    return self.num_prompts_per_update * self.sampling.n

  def prompts_per_sampler_call(self, num_prompts: int) -> int:
    """Prompts in each sampler call when `num_prompts` are sampled (the KV cache's bound)."""
    return min(self.prompts_per_chunk or num_prompts, num_prompts)


def build_run_setup(config: ml_collections.ConfigDict, model_cfg: ModelConfig, *,
                    devices: Sequence[jax.Device] | None = None, self_reward_token_id: int,
                    eos_ids: Sequence[int], pad_id: int) -> RunSetup:
  """The setup of a run of `config` (already `config_check.validate`d) training `model_cfg` on
  `devices` (default: all), with the tokenizer's z_c, EOS and pad ids."""
  devices = jax.devices() if devices is None else list(devices)
  data, fsdp, tensor = config_check.mesh_shape(config, len(devices))
  mesh = sharding_lib.make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=devices)
  statics = programs_lib.StepStatics.from_config(config, model_cfg, self_reward_token_id)
  num_prompts_per_update = config.mini_batch_size or config.batch_size
  updates_per_step = config.batch_size // num_prompts_per_update
  # The schedule counts optimizer updates, not RL steps.
  total_updates = config.total_steps * updates_per_step
  optimizer = optim_lib.make_optimizer(config.optim, total_updates)
  abstract_state = programs_lib.abstract_state(model_cfg, optimizer, mesh)
  programs = programs_lib.StepPrograms(statics, optimizer, mesh,
                                       jax.tree.map(lambda s: s.sharding, abstract_state),
                                       config.rollout.tensor_parallel)
  sampling, eval_sampling = programs_lib.sampling_params(
      config, eos_ids=eos_ids, pad_id=pad_id, self_reward_token_id=self_reward_token_id)
  exact_score = config_check.trains_exact_score(config)
  needs_ref = bool(config.loss.kl_loss_coef > 0 or exact_score)
  # Prompts longer than data.max_prompt_len are dropped, so no sampler call pads further.
  prompt_bucket = sampler_lib.bucket_length(config.data.max_prompt_len, programs.sampler.min_bucket)
  return RunSetup(
      mesh=mesh, statics=statics, optimizer=optimizer,
      schedule=optim_lib.make_schedule(config.optim, total_updates), abstract_state=abstract_state,
      programs=programs, sampling=sampling, eval_sampling=eval_sampling,
      num_prompts_per_update=num_prompts_per_update, updates_per_step=updates_per_step,
      num_micro_batches=num_prompts_per_update * config.rollout.n // config.micro_batch_size,
      micro_batch_tokens=config.micro_batch_tokens, pack_rows=data * fsdp,
      needs_ref=needs_ref, exact_score=exact_score,
      logprob_forwards=int(config.rollout.recompute_old_logprobs) + int(needs_ref),
      prompts_per_chunk=config.rollout.prompts_per_chunk, prompt_bucket=prompt_bucket,
      # records.build_sequences' rows: the prompt, the response and one spare pad column.
      seq_len=prompt_bucket + config.rollout.max_new_tokens + 1)
