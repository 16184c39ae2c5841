"""`python -m laser_jax.train --dry_run`: what a run of a config would do, with nothing built.

`dry_run(config)` runs the trainer's start-up validation (`config_check.validate`, the host split of
every batch), prints the resolved config, its warnings, the devices and mesh and whether the
workdir holds a checkpoint to resume from. It loads no model, tokenizer or data (hub ids and data
globs are not resolved) and writes nothing.
"""
import jax
from etils import epath

from laser_jax import config_check
from laser_jax.training import checkpoint
from laser_jax.training import trainer


def _resume_step(workdir: str) -> int | None:
  """The checkpoint step a run in `workdir` resumes from, None if it starts fresh (only lists)."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return None
  try:
    return checkpoint.step_directory(str(directory))[1]
  except checkpoint.CheckpointError:  # Only unfinished saves: the trainer starts fresh too.
    return None


def _describe_workdir(workdir: str) -> str:
  try:
    step = _resume_step(workdir)
  except Exception as e:  # pylint: disable=broad-except  # gcsfs missing, no credentials here, ...
    # Not fatal: the slice's hosts may reach what this machine cannot.
    return f"workdir: {workdir}: cannot be read from here ({type(e).__name__}: {' '.join(str(e).split())})"
  if step is None:
    return f"workdir: {workdir}: no checkpoint, the run starts at step 0"
  return f"workdir: {workdir}: holds a checkpoint at step {step}, the run resumes from it"


def dry_run(config) -> None:
  """Runs the trainer's start-up validation on `config` and prints what a run would do.

  Nothing is built, loaded or written: no model, tokenizer, data or checkpoint manager.
  """
  num_devices = jax.device_count()
  config_check.validate(config, num_devices=num_devices)
  data, fsdp, tensor = config_check.mesh_shape(config, num_devices)
  prompts_per_update = config.mini_batch_size or config.batch_size
  # The trainer's check that every host holds an equal share of each batch (needs no model).
  trainer.check_host_split(config, config.batch_size // prompts_per_update)
  print(config.to_json_best_effort(indent=2, sort_keys=True))
  for line in config_check.warnings(config):
    print(f"warning: {line}")
  kinds = sorted({d.device_kind for d in jax.devices()})
  print(f"devices: {num_devices} ({', '.join(kinds)}) in {jax.process_count()} process(es); "
        f"mesh data={data} fsdp={fsdp} tensor={tensor}")
  print(_describe_workdir(config.workdir))
  model = config.model.hf_path or config.model.preset or "random init (config.model's shape)"
  print(f"dry run: config valid; would train {model} on data.task={config.data.task} to step "
        f"{config.total_steps}; nothing was built, loaded or written")
