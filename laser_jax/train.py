r"""Command-line entry point: `python -m laser_jax.train --config=configs/<name>.py`.

Overrides use ml_collections' syntax, e.g. `--config.total_steps=10 --config.laser.loss_coef=0`.
Unknown keys, missing config files and mistyped values fail at flag parsing, inconsistent values
at start: one line naming the flag or key, exit status 2 (laser_jax/cli.py).

Multi-host: on a Cloud TPU slice the same command runs on every worker and JAX finds its peers
itself (launch/tpu.py). Elsewhere (a GPU cluster, or several CPU processes on one machine) give
every process `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`; a run on N
processes repeats the single-process run of the same config on as many devices. A process
other than 0 that cannot reach the coordinator within `--initialization_timeout` seconds
stops with a one-line error.

`--dry_run` checks a config before a slice is spent on it: it loads the config with its
overrides, runs the trainer's validation, prints the resolved config, every validation warning,
the devices and mesh, and whether the workdir holds a checkpoint to resume from, then exits 0.
It builds no model, loads no data (hub ids and data globs are not resolved) and writes nothing;
a bad config exits 2 with the one-line error, as a run would. To check a config for a slice from
a machine without it, fake the slice's devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=32 JAX_PLATFORMS=cpu \
      python -m laser_jax.train --config=configs/tpu_v4.py --dry_run
"""
import os
import socket
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from laser_jax import cli
from laser_jax.training import dry_run
from laser_jax.training import programs
from laser_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                          lock_config=True)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process run outside Cloud TPU: HOST:PORT of process 0 "
    "(with --num_processes and --process_id, the same on every process but the id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process run: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process run: this process's index, 0-based.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Multi-process run: seconds to wait for the coordinator and the "
    "other processes to come up (JAX's default).", lower_bound=1)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Validate the config, print it resolved with its warnings, the devices and "
    "whether the workdir holds a checkpoint to resume from, and exit: no model, no data, nothing "
    "written.")


class CoordinatorUnreachable(Exception):
  """The multi-process coordinator did not accept a connection in time."""


def _host_port(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise app.UsageError(f"--coordinator_address={address}: expected HOST:PORT")
  return host.strip("[]"), int(port)  # [::1]:1234 names an IPv6 host.


def _wait_for_coordinator(address: str, timeout_s: int):
  """Polls HOST:PORT until it accepts a TCP connection; CoordinatorUnreachable after timeout_s.

  jax.distributed.initialize would abort the process from C++ with a stack trace instead.
  """
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection(_host_port(address), timeout=5).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise CoordinatorUnreachable(
            f"--coordinator_address={address}: not reachable within --initialization_timeout={timeout_s} s "
            f"({e}); is process 0 running?") from None
      time.sleep(0.5)


def _initialize_distributed():
  """Joins the other processes of a multi-host run (no-op for a single process)."""
  explicit = {"--coordinator_address": _COORDINATOR.value, "--num_processes": _NUM_PROCESSES.value,
              "--process_id": _PROCESS_ID.value}
  if any(v is not None for v in explicit.values()):
    missing = [k for k, v in explicit.items() if v is None]
    if missing:
      raise app.UsageError(f"{', '.join(missing)} missing: a multi-process run needs "
                           "--coordinator_address, --num_processes and --process_id together")
    if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
      raise app.UsageError(f"--process_id={_PROCESS_ID.value} not in [0, --num_processes="
                           f"{_NUM_PROCESSES.value})")
    _host_port(_COORDINATOR.value)  # A usage error if malformed, on every process.
    if _PROCESS_ID.value != 0:  # Process 0 serves the coordinator; the others connect to it.
      _wait_for_coordinator(_COORDINATOR.value, _INIT_TIMEOUT.value)
    logging.info("Joining %d processes through %s as process %d (waiting up to %d s)", _NUM_PROCESSES.value,
                 _COORDINATOR.value, _PROCESS_ID.value, _INIT_TIMEOUT.value)
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               initialization_timeout=_INIT_TIMEOUT.value)
  elif (os.environ.get("LASER_JAX_DISTRIBUTED") == "1" or os.environ.get("TPU_WORKER_HOSTNAMES")
        or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    # Multi-host pod: the same command runs on every worker. On Cloud TPU VMs JAX finds the
    # coordinator in the GCE metadata; launch/tpu.py sets LASER_JAX_DISTRIBUTED=1 on slices.
    jax.distributed.initialize(initialization_timeout=_INIT_TIMEOUT.value)


def main(argv):
  del argv
  config = cli.required_config(_CONFIG, "configs/tiny_cpu.py")
  programs.apply_libtpu_init_args(config)  # before the TPU backend starts
  _initialize_distributed()
  if _DRY_RUN.value:
    dry_run.dry_run(config)
    return
  logging.info("Devices: %s", jax.devices())
  trainer.train(config)


if __name__ == "__main__":
  # Bad input (a flag, a config value, a malformed data row, a broken checkpoint, a coordinator
  # that is not there): one line, exit 2.
  cli.run(main, extra=(CoordinatorUnreachable,))
