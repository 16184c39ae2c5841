"""Start-up validation of training and eval configs: one-line errors that name the offending key.

Unknown keys are already rejected by ml_collections (configs are locked, so a misspelt
`--config.laser.los_coef=...` fails in flag parsing). This module catches values that are
individually valid but wrong or inconsistent, before any model is loaded or compiled:
`validate` for a training config, `validate_eval` for `configs/eval.py` (evaluate, calibrate,
export). `warnings` lists settings that run but are probably not what the user wants; `validate`
logs each as one line.
"""
import jax
import ml_collections
from absl import logging

from laser_jax.generate import sampler as sampler_lib
from laser_jax.rl import objective

# The correct class's L_sr target is log pi(z_c) = c_ref + 1 / beta_v; the largest score is
# beta_v * (0 - c_ref). Below this margin the target sits at (or beyond) log p = 0, which no
# softmax reaches: L_sr then pushes p(z_c) towards 1 for every correct solution, forever.
MIN_SCORE_RANGE = 1.5


class ConfigError(ValueError):
  """A config value is invalid; the message starts with the full key name."""


def _require(cond: bool, key: str, message: str):
  if not cond:
    raise ConfigError(f"config.{key}: {message}")


def _one_of(c, key: str, choices):
  value = c
  for part in key.split("."):
    value = value[part]
  _require(value in choices, key, f"expected one of {sorted(choices)}, got {value!r}")


def mesh_shape(c: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolves the (data, fsdp, tensor) sizes, with at most one -1 taking the remaining devices."""
  sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
  names = ["mesh.data", "mesh.fsdp", "mesh.tensor"]
  for name, size in zip(names, sizes):
    _require(size == -1 or size >= 1, name, f"expected a positive size or -1, got {size}")
  _require(sizes.count(-1) <= 1, "mesh", f"at most one axis may be -1, got {tuple(sizes)}")
  known = 1
  for size in sizes:
    known *= size if size != -1 else 1
  if -1 in sizes:
    _require(num_devices % known == 0, "mesh",
             f"{tuple(sizes)} cannot fill {num_devices} devices ({num_devices} % {known} != 0)")
    sizes[sizes.index(-1)] = num_devices // known
  _require(sizes[0] * sizes[1] * sizes[2] == num_devices, "mesh",
           f"data*fsdp*tensor = {sizes[0] * sizes[1] * sizes[2]} but there are {num_devices} devices")
  return tuple(sizes)


def trains_exact_score(c: ml_collections.ConfigDict) -> bool:
  """Whether a training config's score subtracts log pi_ref(z_c | x, y) instead of the constant
  c_ref (the exact variant): the one definition, for the trainer, the AOT report and evaluation
  of the run's checkpoints (a config saved before the key existed reads as the constant)."""
  return bool(c.laser.get("use_self_reward_loss") and c.laser.get("use_ref_model_score"))


def warnings(c: ml_collections.ConfigDict) -> list[str]:
  """One line per setting of a training config that runs but probably should not."""
  out = []
  laser = c.laser
  if laser.use_self_reward_loss and not laser.use_ref_model_score:
    score_range = laser.kl_coef * (0.0 - laser.ref_constant)
    if score_range < MIN_SCORE_RANGE:
      out.append(
          f"config.laser.kl_coef * -config.laser.ref_constant = {laser.kl_coef:g} * {-laser.ref_constant:g} "
          f"= {score_range:.3g} < {MIN_SCORE_RANGE}: the correct class's target log p(z_c) = "
          f"{laser.ref_constant + 1 / laser.kl_coef:.3g} is too close to 0 (or above it) to be reached; "
          f"raise kl_coef to >= {MIN_SCORE_RANGE / -laser.ref_constant:.3g} (python -m laser_jax.calibrate "
          f"prints the range)" if laser.ref_constant < 0 else
          f"config.laser.ref_constant = {laser.ref_constant:g} >= 0: no score can reach the correct "
          f"class's target 1; use the c_ref that python -m laser_jax.calibrate measures")
  return out


def validate_eval(c: ml_collections.ConfigDict, *, sampling: bool = True) -> None:
  """Raises ConfigError for the first invalid value of an eval config (`configs/eval.py`): the
  model keys always, the sampling and output keys when `sampling` (evaluate, calibrate)."""
  m, e = c.model, c.eval
  if bool(m.hf_path) == bool(m.checkpoint_dir):
    raise ConfigError("config.model.hf_path / config.model.checkpoint_dir: set exactly one "
                      f"(got hf_path={m.hf_path!r}, checkpoint_dir={m.checkpoint_dir!r})")
  _one_of(c, "model.dtype", {"float32", "bfloat16"})
  if not sampling:
    return
  _require(bool(e.input_file), "eval.input_file", "empty; give a JSONL/parquet file or an eval-set name")
  _require(bool(e.output_file), "eval.output_file", "empty; give the output JSONL path")
  for key, ok in (("n", e.n >= 1), ("max_new_tokens", e.max_new_tokens >= 1),
                  ("batch_size", e.batch_size >= 1), ("temperature", e.greedy or e.temperature >= 0),
                  ("top_p", 0 < e.top_p <= 1), ("top_k", e.top_k >= 0),
                  ("decode_segments", e.decode_segments >= 1), ("max_prompt_len", e.max_prompt_len >= 0),
                  ("num_workers", e.num_workers >= 0), ("timeout_s", e.timeout_s > 0),
                  ("num_bootstrap", e.num_bootstrap >= 1)):
    _require(ok, f"eval.{key}", f"invalid value {e[key]!r}")
  _one_of(c, "eval.template", {"", "chat", "base"})  # "": the model's own
  _require(c.calibrate.scan_chunk >= 1, "calibrate.scan_chunk", f"expected >= 1, got {c.calibrate.scan_chunk}")


def _validate_tracking(c: ml_collections.ConfigDict) -> None:
  """The logging.*, profile.* and wandb.* keys (laser_jax/training/metrics_writer.py)."""
  for key in ("samples_every", "num_samples", "remote_flush_every"):
    low = 0 if key == "samples_every" else 1
    _require(c.logging[key] >= low, f"logging.{key}", f"expected >= {low}, got {c.logging[key]}")
  steps = tuple(c.profile.steps)
  if steps:  # One trace window: consecutive steps, e.g. --config.profile.steps=5,6.
    _require(all(type(s) is int for s in steps) and steps[0] >= 1
             and steps == tuple(range(steps[0], steps[0] + len(steps))), "profile.steps",
             f"expected consecutive RL steps >= 1 such as 5,6 (got {c.profile.steps!r})")
    _require(steps[-1] <= c.total_steps, "profile.steps",
             f"step {steps[-1]} is after config.total_steps={c.total_steps} (got {c.profile.steps!r})")
  _one_of(c, "wandb.mode", {"online", "offline", "disabled"})
  if c.wandb.project and c.wandb.mode != "disabled":
    import importlib.util
    _require(importlib.util.find_spec("wandb") is not None, "wandb.project",
             f"{c.wandb.project!r} asks for Weights & Biases, but wandb is not installed "
             "(pip install 'laser_jax[wandb]')")


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ConfigError for the first invalid or inconsistent value found; logs `warnings`."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  data, fsdp, _ = mesh_shape(c, num_devices)
  _require(c.total_steps >= 0, "total_steps", f"expected >= 0, got {c.total_steps}")
  _require(c.checkpoint_every >= 1, "checkpoint_every", f"expected >= 1, got {c.checkpoint_every}")
  _require(c.keep_checkpoints >= 1, "keep_checkpoints", f"expected >= 1, got {c.keep_checkpoints}")
  _require(c.eval_every >= 0, "eval_every", f"expected >= 0, got {c.eval_every}")
  _require(c.workdir != "", "workdir", "must be set (a local path or gs://bucket/path)")

  _require(c.batch_size >= 1, "batch_size", f"expected >= 1, got {c.batch_size}")
  _require(c.rollout.n >= 2, "rollout.n",
           f"GRPO needs at least 2 responses per prompt to form a group, got {c.rollout.n}")
  mini = c.mini_batch_size or c.batch_size
  _require(c.batch_size % mini == 0, "mini_batch_size",
           f"{mini} prompts does not divide batch_size={c.batch_size}")
  rows = mini * c.rollout.n
  _require(c.micro_batch_size >= 1 and rows % c.micro_batch_size == 0, "micro_batch_size",
           f"{c.micro_batch_size} does not divide the {rows} responses of a mini-batch "
           f"(mini_batch_size * rollout.n = {mini} * {c.rollout.n})")
  _require(c.micro_batch_size % (data * fsdp) == 0, "micro_batch_size",
           f"{c.micro_batch_size} is not a multiple of the data-parallel size data*fsdp = {data * fsdp}")
  longest = sampler_lib.bucket_length(c.data.max_prompt_len) + c.rollout.max_new_tokens + 1
  _require(c.micro_batch_tokens == 0 or c.micro_batch_tokens >= longest, "micro_batch_tokens",
           f"{c.micro_batch_tokens} cannot hold the longest sequence of {longest} tokens (the prompt bucket of "
           f"data.max_prompt_len={c.data.max_prompt_len} + rollout.max_new_tokens={c.rollout.max_new_tokens} + 1); "
           "use 0 (padded micro-batches) or a larger budget")

  _require(c.rollout.temperature >= 0, "rollout.temperature", f"expected >= 0 (0 = greedy), got {c.rollout.temperature}")
  _require(c.eval.temperature >= 0, "eval.temperature", f"expected >= 0 (0 = greedy), got {c.eval.temperature}")
  _require(0 < c.rollout.top_p <= 1, "rollout.top_p", f"expected in (0, 1], got {c.rollout.top_p}")
  _require(c.rollout.top_k >= 0, "rollout.top_k", f"expected >= 0, got {c.rollout.top_k}")
  _require(c.rollout.decode_segments >= 1, "rollout.decode_segments",
           f"expected >= 1, got {c.rollout.decode_segments}")
  k = c.rollout.tensor_parallel
  _require(k >= 0 and (k == 0 or num_devices % k == 0), "rollout.tensor_parallel",
           f"expected 0 or a divisor of the {num_devices} devices, got {k}")
  # The sampler's batch axes: the training mesh's data x fsdp, or devices / k on the rollout mesh.
  rollout_dp = data * fsdp if k == 0 else num_devices // k
  _require(c.rollout.decode_slots >= 0 and c.rollout.decode_slots % rollout_dp == 0, "rollout.decode_slots",
           f"expected 0 (static) or a multiple of the sampler's data-parallel size {rollout_dp}, "
           f"got {c.rollout.decode_slots}")
  _require(c.rollout.max_new_tokens >= 1, "rollout.max_new_tokens",
           f"expected >= 1, got {c.rollout.max_new_tokens}")
  _require(c.data.max_prompt_len >= 1, "data.max_prompt_len", f"expected >= 1, got {c.data.max_prompt_len}")

  _one_of(c, "optim.schedule", {"constant", "warmup_cosine"})
  _require(c.optim.lr > 0, "optim.lr", f"expected > 0, got {c.optim.lr}")
  # The objective's own lists: every mode it implements is reachable from a config.
  _one_of(c, "loss.adv_estimator", set(objective.ADV_ESTIMATORS))
  _one_of(c, "loss.agg_mode", set(objective.AGG_MODES))
  _one_of(c, "loss.kl_type", set(objective.KL_TYPES))
  _one_of(c, "model.dtype", {"float32", "bfloat16", "auto"})
  _one_of(c, "model.param_dtype", {"float32", "bfloat16"})
  _one_of(c, "model.attention", {"auto", "xla", "chunked", "splash", "cudnn"})
  _require(c.model.attention_block >= 1, "model.attention_block", f"expected >= 1, got {c.model.attention_block}")
  _one_of(c, "data.task", {"synthetic", "files"})
  _one_of(c, "data.template", {"chat", "base"})
  if c.data.task == "files":
    _require(bool(c.data.train_files), "data.train_files", "must name at least one file when data.task='files'")
  _require(c.sft.steps >= 0, "sft.steps", f"expected >= 0, got {c.sft.steps}")
  _require(c.sft.steps == 0 or c.data.task == "synthetic", "sft.steps",
           "the supervised warm start uses the synthetic task's worked solutions; set it to 0 for "
           "data.task='files'")
  _require(c.loss.clip_eps_low >= 0 and c.loss.clip_eps_high >= 0, "loss.clip_eps_low",
           "clip ranges must be >= 0")
  _require(c.loss.clip_ratio_c > 1, "loss.clip_ratio_c", f"expected > 1, got {c.loss.clip_ratio_c}")

  laser = c.laser
  _require(laser.loss_coef >= 0, "laser.loss_coef", f"expected >= 0, got {laser.loss_coef}")
  _require(laser.kl_coef > 0, "laser.kl_coef", f"beta_v must be > 0, got {laser.kl_coef}")
  _require(0 <= laser.adv_integration_coef <= 1, "laser.adv_integration_coef",
           f"tau must be in [0, 1], got {laser.adv_integration_coef}")
  _require(laser.reasoning_warmup_steps >= 0, "laser.reasoning_warmup_steps", "expected >= 0")
  _require(laser.self_rewarding_warmup_steps >= 0, "laser.self_rewarding_warmup_steps", "expected >= 0")
  _require(laser.self_reward_token_id >= 0 or bool(laser.self_reward_token), "laser.self_reward_token_id",
           "set a token id, or -1 with laser.self_reward_token naming the token")
  # The aot section: the file itself is parsed by laser_jax.aot.lengths when the report starts
  # (before compiling; it imports this module), with the same one-line error.
  _require(isinstance(c.aot.response_lengths, str) and bool(c.aot.response_lengths), "aot.response_lengths",
           f"expected a named distribution or a lengths file, got {c.aot.response_lengths!r}")
  _validate_tracking(c)
  for line in warnings(c):
    logging.warning("%s", line)
