"""The LaSeR training loop, importable from a notebook: `train(config)`.

One RL step (the records of `rl/records.py`):
  prompts -> `rollout`: the pipeline (`scoring.generate_all`: the in-XLA sampler, n per prompt,
  self-reward log-probs in-loop, decoded and verified) + training rows + old / reference
  log-probs -> `Rollout` -> `batch_vectors`: the whole batch's shaped rewards, r_s and
  advantages (+ self-reward integration after the warm-ups) -> `BatchVectors` -> per optimizer
  update, `update_batch` -> a complete `UpdateBatch` -> `update` (exact gradient accumulation
  over micro-batches) -> metrics -> checkpoint -> periodic evaluation (the same pipeline, scored).

`python -m laser_jax.train --config=...` is a thin wrapper over `train`.

Over 400 lines in one module on purpose: `Trainer`'s methods are the stages of one RL step over
one shared state (mesh, compiled programs, task, sampling settings) and `train` is the loop around
them; each stage is a few lines over the pure functions of `rl/`.
"""
from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from laser_jax import config_check
from laser_jax.models import hosts
from laser_jax.rl import dapo
from laser_jax.rl import objective
from laser_jax.rl import packing
from laser_jax.rl import rl_metrics
from laser_jax.rl import records
from laser_jax.rl import scoring
from laser_jax.training import checkpoint as ckpt_lib
from laser_jax.training import metrics_writer
from laser_jax.training import programs as programs_lib
from laser_jax.training import run_setup as run_setup_lib
from laser_jax.training import tasks


TrainState = programs_lib.TrainState


def warmup_flags(step: int, laser: ml_collections.ConfigDict) -> tuple[bool, bool]:
  """(self-reward loss on, advantage integration on) for the RL step `step` (1-based)."""
  if not laser.use_self_reward_loss:
    return False, False
  return objective.warmup_flags(step, laser.reasoning_warmup_steps, laser.self_rewarding_warmup_steps)


class Trainer:
  """Holds the static parts of a run (mesh, model config, task, jitted functions)."""

  def __init__(self, config: ml_collections.ConfigDict, devices=None):
    """`devices` defaults to all devices (tests pass a subset to compare meshes)."""
    num_devices = len(jax.devices() if devices is None else devices)
    config_check.validate(config, num_devices=num_devices)
    self.config = config
    self.task = tasks.build_task(config)
    self.model_cfg = self.task.model_cfg
    self.tokenizer = self.task.tokenizer
    self.pad_id = self.task.pad_id
    self.eos_ids = self.task.eos_ids
    self.zc_id = self.task.self_reward_token_id
    # Mesh, optimizer, state shardings, programs, sampling settings and step counts: built by the
    # function laser_jax.aot compiles from, so its report is of these very programs.
    self.run_setup = run_setup_lib.build_run_setup(
        config, self.model_cfg, devices=devices, self_reward_token_id=self.zc_id,
        eos_ids=self.eos_ids, pad_id=self.pad_id)
    s = self.run_setup
    self.num_prompts_per_update = s.num_prompts_per_update
    self.updates_per_step = s.updates_per_step
    check_host_split(config, self.updates_per_step)
    self.mesh, self.optimizer, self.schedule = s.mesh, s.optimizer, s.schedule
    self.needs_ref = s.needs_ref
    self.sampling, self.eval_sampling = s.sampling, s.eval_sampling
    self.statics, self.loss_cfg = s.statics, s.loss_cfg
    self.state_shardings, self.param_shardings = s.state_shardings, s.param_shardings
    self.programs = s.programs

  # ---- state ----------------------------------------------------------------------------
  def init_state(self, params) -> TrainState:
    """A fresh state around `params` (host or device arrays), placed in its shardings."""
    shardings = self.state_shardings
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(self.optimizer.init, out_shardings=shardings.opt_state)(params)
    rng = jax.random.key_data(jax.random.key(self.config.seed))
    return TrainState(step=jax.device_put(jnp.int32(0), shardings.step), params=params,
                      opt_state=opt_state, rng=jax.device_put(rng, shardings.rng),
                      skipped_updates=jax.device_put(jnp.int32(0), shardings.step))

  def initial_params(self):
    """The policy RL starts from (`tasks.Task.initial_policy`), in the state's shardings."""
    return self.task.initial_policy(self.mesh, self.param_shardings)

  def reference_params(self, initial_params=None, workdir: str | None = None):
    """pi_ref, the frozen initial policy (`tasks.Task.reference_policy`)."""
    return self.task.reference_policy(self.mesh, self.param_shardings, initial_params, workdir)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state, without allocating it (restore target)."""
    # Random init and HF checkpoints of one ModelConfig have the same parameter shapes.
    return programs_lib.abstract_state(self.model_cfg, self.optimizer, self.mesh)

  # ---- rollout --------------------------------------------------------------------------
  def step_key(self, state: TrainState, salt: int) -> jax.Array:
    base = jax.random.wrap_key_data(jax.device_get(state.rng))
    return jax.random.fold_in(jax.random.fold_in(base, int(state.step)), salt)

  def generate(self, params, prompts: list[tasks.Prompt], sampling, rng,
               score: scoring.Score | None = None) -> scoring.VerifiedSamples:
    """The pipeline (`scoring.generate_all`: sample, decode, verify, and with `score` score) on
    this host's `prompts`, on the rollout layout, in calls of `rollout.prompts_per_chunk`
    prompts of the global batch (each host gives its share; 0 = one call), call i with key
    fold_in(rng, i). Returns this host's rows."""
    per_call = self.config.rollout.prompts_per_chunk // jax.process_count()
    rng = _host_key(rng)  # uncommitted: usable on the rollout mesh too
    with jax.set_mesh(self.programs.rollout_mesh):
      rollout_params = self.programs.to_rollout_layout(params)  # dropped when this returns

    def sample_call(token_ids, key):
      with jax.set_mesh(self.programs.rollout_mesh):  # the key as a host value, made under any mesh
        return self.programs.sampler(rollout_params, token_ids, sampling, _host_key(key))

    return scoring.generate_all(sample_call, prompts, rng, prompts_per_call=per_call,
                                decode=self.task.decode, verifier=self.task.verifier, score=score)

  def rollout(self, params, prompts: list[tasks.Prompt], rng, ref_params=None) -> records.Rollout:
    """`rollout.n` verified responses per prompt (this host's) with their training rows and the
    log-probs the update needs: the rollout policy's (the sampler's, or recomputed in the
    training layout, z_c's included) and pi_ref's where the KL loss or the exact score needs it."""
    c = self.config
    verified = self.generate(params, prompts, self.sampling, rng)
    out = verified.sample
    sequences, response_mask = records.build_sequences(out)
    if c.rollout.recompute_old_logprobs:
      old_logp, z_logprob = self.logprobs(params, sequences)
    else:
      old_logp, z_logprob = records.sampler_old_logprobs(out), out.self_reward_logprob
    ref_logp = ref_z_logprob = None
    if self.needs_ref:
      ref_logp, ref_z_logprob = self.logprobs(ref_params, sequences)
      ref_logp = ref_logp if c.loss.kl_loss_coef > 0 else None
      ref_z_logprob = ref_z_logprob if self.exact_score else None
    if c.loss.mask_truncated:
      response_mask = np.asarray(dapo.mask_truncated(response_mask, verified.finished))
    return records.Rollout(verified=verified, sequences=sequences, response_mask=response_mask,
                           old_logp=old_logp, z_logprob=np.where(verified.finished, z_logprob, np.nan),
                           ref_logp=ref_logp, ref_z_logprob=ref_z_logprob)

  def batch_vectors(self, roll: records.Rollout, step: int) -> tuple[records.BatchVectors, dict]:
    """The whole batch's per-row vectors (every host's rows, the same on every host): shaped
    rewards, r_s and advantages (`scoring.batch_vectors`), and the advantage metrics."""
    num_prompts = roll.num_rows // self.config.rollout.n  # this host's
    return scoring.batch_vectors(roll, self.loss_cfg, step, gather_rows=hosts.gather_rows,
                                 group_offset=jax.process_index() * num_prompts)

  def update_rows(self, roll: records.Rollout) -> list[np.ndarray]:
    """This host's rows of each optimizer update: update u holds the prompts whose index is u
    modulo the number of updates (on every host alike: its prompts are a block of the batch
    whose size is a multiple of it)."""
    group_ids = roll.sample.group_ids
    return [np.flatnonzero(group_ids % self.updates_per_step == u) for u in range(self.updates_per_step)]

  def update_batch(self, roll: records.Rollout, vectors: records.BatchVectors, rows: np.ndarray
                   ) -> tuple[records.UpdateBatch, objective.LossNormalisers]:
    """The complete [num_micro, micro, ...] batch of this host's `rows` for one optimizer update
    (packed into rows of config.micro_batch_tokens when it is > 0: `packing.pack_update_batch`),
    and its loss normalisers; class weights and normalisers span exactly the update's rows of
    every host."""
    first = jax.process_index() * roll.num_rows  # this host's first row in `vectors`
    # Every host holds the same `rows` of its block (update_rows), so the update's rows of the
    # whole batch, in process order, are read from the vectors already gathered.
    everyone = np.concatenate([h * roll.num_rows + rows for h in range(jax.process_count())])
    weights = objective.self_reward_class_weights(vectors.verifier_rewards[everyone], vectors.finished[everyone],
                                                  self.config.laser.balanced)
    mine = jax.process_index() * len(rows)
    batch = records.make_update_batch(roll, rows, vectors.advantages[first + rows],
                                      np.asarray(weights, np.float32)[mine:mine + len(rows)])
    normalisers = jax.tree.map(lambda v: jnp.float32(hosts.total(float(v))),
                               objective.loss_normalisers(self.loss_cfg, batch.response_mask))
    if self.run_setup.micro_batch_tokens:
      plan, rows, (num_micro, slots) = self.packing_plan(batch.sequences, bucket_micro=True)
      return packing.pack_update_batch(batch, plan, num_micro, rows, self.run_setup.micro_batch_tokens,
                                       slots), normalisers
    return records.micro_batches(batch, self.run_setup.num_micro_batches), normalisers

  def packing_plan(self, sequences: records.Sequences, bucket_micro: bool):
    """(plan, this host's packed rows per micro-batch, (micro-batches, slots per row)) of packing
    this host's `sequences` into rows of config.micro_batch_tokens (`packing.plan_packing`); the
    counts are the largest over the hosts, so every host runs the same shapes and calls, rounded
    to powers of two (the micro-batch count only with `bucket_micro`: the update's scan length)."""
    s = self.run_setup
    rows = s.pack_rows // jax.process_count()
    plan = packing.plan_packing(np.sum(sequences.attention_mask, axis=1), s.micro_batch_tokens, rows)
    num_micro, slots = hosts.host_max(plan.num_micro), hosts.host_max(plan.max_slots)
    return plan, rows, (packing.bucket(num_micro) if bucket_micro else num_micro, packing.bucket(slots))

  # ---- update ---------------------------------------------------------------------------
  def update(self, state: TrainState, batch: records.UpdateBatch, normalisers: objective.LossNormalisers,
             sr_loss_on: bool):
    """One optimizer update (`programs.update_step`) from this host's share of a
    [num_micro, micro, ...] batch."""
    return self.programs.update(state, self.programs.place_update_batch(batch), normalisers,
                                jnp.bool_(sr_loss_on))

  # ---- log-probs without gradient (old / reference) -------------------------------------
  def logprobs(self, params, sequences: records.Sequences) -> tuple[np.ndarray, np.ndarray]:
    """Token log-probs (rollout temperature) and z_c log-probs of this host's rows, micro-batch
    by micro-batch (each host gives its share of a micro-batch)."""
    n = sequences.tokens.shape[0]
    if self.run_setup.micro_batch_tokens:
      return self._packed_logprobs(params, sequences)
    mb = self.config.micro_batch_size // jax.process_count()
    outs = []
    for start in range(0, n, mb):
      piece = self.programs.place_logprob_batch(jax.tree.map(lambda v: v[start:start + mb], sequences))
      outs.append([hosts.local_rows(x) for x in self.programs.logprobs(params, piece)])
    return (np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]))

  def _packed_logprobs(self, params, sequences: records.Sequences) -> tuple[np.ndarray, np.ndarray]:
    """`logprobs` over packed rows (config.micro_batch_tokens), back in row order."""
    plan, rows, (num_micro, slots) = self.packing_plan(sequences, bucket_micro=False)
    packed, source = packing.pack_sequences(sequences, plan, num_micro, rows, self.run_setup.micro_batch_tokens,
                                            slots)
    outs = []
    for m in range(num_micro):
      piece = self.programs.place_logprob_batch(jax.tree.map(lambda v: v[m], packed))
      outs.append([hosts.local_rows(x) for x in self.programs.logprobs(params, piece)])
    n = sequences.tokens.shape[0]
    return tuple(packing.row_values(np.stack([o[i] for o in outs]), source, n) for i in (0, 1))

  # ---- one RL step ----------------------------------------------------------------------
  def train_step(self, state: TrainState, prompts: list, ref_params=None) -> tuple[TrainState, dict]:
    """One RL step on `prompts`; returns the new state and this step's metrics (host floats)."""
    # Under the mesh, the model's activation sharding hints (batch over data+fsdp, heads over
    # tensor) apply inside every jitted function of the step.
    with jax.set_mesh(self.mesh):
      return self._train_step(state, prompts, ref_params)

  def _train_step(self, state: TrainState, prompts: list, ref_params) -> tuple[TrainState, dict]:
    c = self.config
    step = int(state.step) + 1
    t0 = time.perf_counter()
    roll = self.rollout(state.params, prompts, self.step_key(state, salt=0), ref_params)
    t_rollout = time.perf_counter() - t0
    vectors, adv_metrics = self.batch_vectors(roll, step)
    self.last_rollout = (prompts, roll, vectors.scores)  # what `sample_rows` shows
    sr_on, _ = warmup_flags(step, c.laser)

    # One optimizer update per mini-batch (`update_rows`); micro-batches inside are accumulated
    # exactly.
    t1 = time.perf_counter()
    pieces, losses, grad_norms = [], [], []
    for rows in self.update_rows(roll):
      batch, normalisers = self.update_batch(roll, vectors, rows)
      state, m = self.update(state, batch, normalisers, sr_on)
      pieces.append(m["terms"])
      losses.append(m["loss"])
      grad_norms.append(m["grad_norm"])
    state = state.replace(step=state.step + 1)
    terms = rl_metrics.finalize_metrics(jax.device_get(rl_metrics.accumulate_metrics(pieces)))
    t_update = time.perf_counter() - t1
    rollout_stats = jax.device_get(rl_metrics.rollout_metrics(
        vectors.verifier_rewards, vectors.response_lengths, vectors.finished, vectors.group_ids))

    num_tokens = hosts.total(float(np.sum(roll.sequences.attention_mask)))
    step_time = time.perf_counter() - t0
    metrics = {
        "actor/loss": float(np.mean(jax.device_get(losses))),
        "actor/grad_norm": float(np.mean(jax.device_get(grad_norms))),
        "actor/lr": float(self.schedule(int(step - 1) * self.updates_per_step)),
        "actor/skipped_updates": int(state.skipped_updates),
        "actor/self_reward_loss_on": float(sr_on),
        # The update's terms under the names objective / rl_metrics give them, none renamed here:
        # a renaming table once dropped the PPO clip fractions.
        **terms,
        **{k: float(v) for k, v in rollout_stats.items()},
        "rollout/verifier_timeouts": int(hosts.total(roll.verified.num_timeouts)),
        **rl_metrics.self_verification_finished(vectors.scores, vectors.verifier_rewards, vectors.finished),
        **{k: float(v) for k, v in jax.device_get(adv_metrics).items()},
        "perf/step_time_s": step_time,
        "perf/rollout_time_s": t_rollout,
        "perf/update_time_s": t_update,
        "perf/tokens_per_s": num_tokens / step_time,
    }
    for key in ("actor/pg_loss", "actor/kl_loss", "actor/self_reward_loss"):
      metrics.setdefault(key, 0.0)  # the same keys whichever terms are on
    if c.mfu_peak_flops > 0:
      metrics["perf/mfu"] = self.step_flops(num_tokens) / step_time / c.mfu_peak_flops
    return state, metrics

  def sample_rows(self, num: int) -> list[dict]:
    """The first `num` responses of the last step's rollout on this host (its first prompt's
    group: right and wrong answers to one problem side by side) as rows of the samples table
    (`metrics_writer.SAMPLE_COLUMNS`): the texts the verifier read (no second decode) and the r_s
    the step computed."""
    prompts, roll, scores = self.last_rollout
    verified = roll.verified
    first_row = jax.process_index() * roll.num_rows  # `scores` spans every host's rows
    rows = []
    for r in range(min(num, roll.num_rows)):
      prompt = prompts[int(verified.sample.group_ids[r])]
      rows.append({"prompt": prompt.problem, "answer": prompt.answer, "response": verified.texts[r],
                   "reward": float(verified.rewards[r]), "score": float(scores[first_row + r]),
                   "finished": bool(verified.finished[r])})
    return rows

  def step_flops(self, tokens: float) -> float:
    """Model FLOPs of one step over `tokens` (all hosts'): 2*N*tokens per forward (rollout),
    6*N*tokens for the update."""
    return rl_metrics.step_model_flops(self.model_cfg.num_params(), tokens, self.run_setup.logprob_forwards)

  # ---- evaluation -----------------------------------------------------------------------
  @property
  def exact_score(self) -> bool:
    """Scores use log pi_ref(z_c | x, y) instead of the constant c_ref (the exact variant)."""
    return self.run_setup.exact_score

  def evaluate(self, params, rng, ref_params=None) -> dict:
    """Held-out accuracy and self-verification on `task.eval_prompts`.

    With the exact score variant, `ref_params` (pi_ref) is required: the scores subtract its
    log pi_ref(z_c | x, y, EOS), as in training.
    """
    if self.exact_score and ref_params is None:
      raise ValueError("Trainer.evaluate: config.laser.use_ref_model_score needs ref_params (pi_ref)")
    with jax.set_mesh(self.mesh):
      return self._evaluate(params, rng, ref_params)

  def _evaluate(self, params, rng, ref_params) -> dict:
    # Each host samples and verifies a block of the eval set (the last blocks padded with copies
    # of a prompt, dropped from every statistic), in calls of the rollout's size (a 500-problem
    # eval set in one call would need 500 * n rows of KV cache).
    prompts, num_real = hosts.host_block(self.task.eval_prompts)
    ref_fn = None
    if self.exact_score:
      ref_fn = lambda out: self.logprobs(ref_params, records.build_sequences(out)[0])[1]
    score = scoring.Score(kl_coef=self.config.laser.kl_coef, ref_constant=self.config.laser.ref_constant,
                          ref_z_logprob_fn=ref_fn)
    scored = self.generate(params, prompts, self.eval_sampling, rng, score=score)
    keep = hosts.gather_rows(scored.sample.group_ids < num_real)
    rewards, scores = hosts.gather_rows(scored.rewards)[keep], hosts.gather_rows(scored.scores)[keep]
    finished = hosts.gather_rows(scored.finished)[keep]
    # Named as `laser_jax.evaluate`'s summary names the same quantity, with `eval/` in front: the
    # truncated responses have no score here, hence the finished-only self-verification figures.
    verification = rl_metrics.self_verification_finished(scores, rewards, finished)
    # Per problem ([problems, n]; texts cross hosts as per-problem ids): within-problem AUROC etc.
    group_ids = hosts.gather_rows(scored.sample.group_ids + jax.process_index() * len(prompts))[keep]
    text_ids = hosts.gather_rows(rl_metrics.problem_text_ids(scored.texts, scored.sample.group_ids))[keep]
    verification.update(rl_metrics.within_problem_measures(
        *rl_metrics.rows_by_problem(group_ids, rewards, scores, text_ids)))
    return {
        "eval/reward/mean": float(np.mean(rewards)),
        **{f"eval/{k}": v for k, v in verification.items()},
        "eval/truncated_frac": float(np.mean(~finished)),
        "eval/num_problems": len(self.task.eval_prompts),
    }


def check_host_split(c: ml_collections.ConfigDict, updates_per_step: int):
  """Every host must hold an equal block of each batch, mini-batch and sampler chunk (hosts.py)."""
  count = jax.process_count()
  if count == 1:
    return
  if c.batch_size % count or (c.batch_size // count) % updates_per_step:
    raise config_check.ConfigError(
        f"config.batch_size: {c.batch_size} prompts over {count} hosts must give each host a multiple "
        f"of the {updates_per_step} optimizer updates per step (config.mini_batch_size)")
  data, fsdp, _ = config_check.mesh_shape(c, jax.device_count())
  if c.micro_batch_tokens and (data * fsdp) % count:
    raise config_check.ConfigError(
        f"config.micro_batch_tokens: {c.micro_batch_tokens} packs one row per data-parallel shard, and "
        f"mesh.data * mesh.fsdp = {data * fsdp} is not a multiple of the {count} hosts")
  for key, value in (("micro_batch_size", c.micro_batch_size), ("rollout.prompts_per_chunk", c.rollout.prompts_per_chunk)):
    if value % count:
      raise config_check.ConfigError(f"config.{key}: {value} is not a multiple of the {count} hosts")


def _host_key(rng: jax.Array) -> jax.Array:
  """The same PRNG key as a host value (from this process's copy of a replicated key)."""
  data = jax.random.key_data(rng)
  if isinstance(data, jax.Array) and not data.is_fully_addressable:
    data = data.addressable_data(0)
  return jax.random.wrap_key_data(np.asarray(data))


def train(config: ml_collections.ConfigDict, *, max_steps: int | None = None,
          progress: bool = True) -> list[dict]:
  """Runs (or resumes) training as configured; returns the metric records written this call.

  `max_steps` stops after that many RL steps of this call without a final save beyond the usual
  schedule (used by tests to simulate an interruption).
  """
  trainer = Trainer(config)
  c = config
  ckpt_lib.hide_orbax_info_logs(not c.library_info_logs)
  ckpt = ckpt_lib.Checkpointer(c.workdir, keep=c.keep_checkpoints, async_save=c.async_checkpointing)
  records = []
  iterator = trainer.task.train_iterator()
  latest = ckpt.latest_step()
  if latest is not None:
    try:
      state, data_state = ckpt.restore(latest, trainer.abstract_state())
    except ckpt_lib.CheckpointError as e:  # Another model shape: nothing in workdir touched.
      ckpt.close()
      raise config_check.ConfigError(
          f"config.workdir: {c.workdir} holds a run of another model ({e}); resume it with its own "
          "config or use a new workdir") from None
    try:
      iterator.set_state(data_state)
    except ValueError as e:  # The data, the seed or the global batch size changed since the save.
      ckpt.close()  # Nothing in workdir has been touched.
      raise config_check.ConfigError(
          f"config.workdir: {c.workdir} holds a run saved with other data, seed or batch size "
          f"({e}); resume it unchanged or use a new workdir") from None
    logging.info("Resumed from %s/checkpoints at step %d", c.workdir, latest)
    initial = None
  else:
    initial = trainer.initial_params()
    state = trainer.init_state(initial)
  try:  # Keeps the records of steps up to the restored checkpoint's (the later ones are redone).
    writer = metrics_writer.MetricsWriter.for_run(c, resume_step=latest)
  except config_check.ConfigError:  # W&B cannot start: nothing of the run's has been written.
    ckpt.close()
    raise
  if jax.process_index() == 0:
    # The resolved config next to the checkpoints: `laser_jax.evaluate` rebuilds the model from it.
    metrics_writer.write_run_config(c.workdir, c.to_json_best_effort(indent=2), start_step=latest or 0)
  ref_params = trainer.reference_params(initial, c.workdir) if trainer.needs_ref else None
  del initial  # Its buffers are the state's, which the first update donates.

  preempt = ckpt_lib.PreemptionFlag()
  profiler = metrics_writer.StepProfiler(tuple(c.profile.steps), c.workdir)
  start = int(state.step)
  end = c.total_steps if max_steps is None else min(c.total_steps, start + max_steps)
  eval_key = jax.random.key(c.seed + 1)
  if start == 0 and c.eval_every > 0:
    records.append(writer.write(0, trainer.evaluate(state.params, eval_key, ref_params)))
  bar = tqdm(total=c.total_steps, initial=start, disable=not progress or jax.process_index() != 0,
             desc="LaSeR", unit="step", dynamic_ncols=True)
  try:
    for _ in range(start, end):
      try:
        prompts = next(iterator)  # this host's block of the global batch
      except StopIteration:
        logging.info("Training data exhausted at step %d", int(state.step))
        break
      profiler.before_step(int(state.step) + 1)
      state, metrics = trainer.train_step(state, prompts, ref_params)
      step = int(state.step)
      if c.eval_every > 0 and (step % c.eval_every == 0 or step == c.total_steps):
        metrics.update(trainer.evaluate(state.params, eval_key, ref_params))
      records.append(writer.write(step, metrics))
      if c.logging.samples_every > 0 and step % c.logging.samples_every == 0:
        writer.write_samples(step, trainer.sample_rows(c.logging.num_samples))
      profiler.after_step(step)
      bar.update(1)
      bar.set_postfix(reward=f"{metrics['rollout/reward/mean']:.3f}",
                      f1=f"{metrics['self_verification/f1_finished']:.2f}", loss=f"{metrics['actor/loss']:.4f}")
      if step % c.log_every == 0:
        line = f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        if bar.disable:
          logging.info(line)
        else:  # Above the progress bar instead of through it.
          bar.write(line, file=sys.stderr)
      stop = preempt.is_set_on_any_host() or ckpt.manager.reached_preemption(step)
      if step % c.checkpoint_every == 0 or step == c.total_steps or stop:
        ckpt.save(step, state, iterator.get_state(), force=stop)
        writer.flush()  # On gs://: what a resume from this checkpoint keeps is now written.
      if stop:
        logging.warning("Preemption signal: saved step %d, exiting.", step)
        break
  finally:
    profiler.stop()
    bar.close()
    ckpt.close()
    writer.close()
    trainer.task.verifier.close()  # its worker processes
    preempt.restore_handlers()
  return records
