r"""Launch laser_jax training on a Cloud TPU VM slice (v4, v5e = v5litepod, v5p, v6e) with gcloud.

  python launch/tpu.py create --name laser --zone us-central2-b --project my-proj --accelerator v4-64 --spot
  python launch/tpu.py setup  --name laser --repo-url https://github.com/me/laser_jax.git --ref main \
      --config configs/tpu_v4.py          # or --wheel dist/laser_jax-0.1.0-py3-none-any.whl
  python launch/tpu.py train  --name laser --config configs/tpu_v4.py --workdir gs://my-bucket/laser/run1 \
      -- --config.total_steps=1600 --config.model.hf_path=Qwen/Qwen2.5-7B
  python launch/tpu.py run    --name laser [--worker all] -- python -m laser_jax.evaluate --config=...
  python launch/tpu.py logs   --name laser [--worker 3]
  python launch/tpu.py status --name laser
  python launch/tpu.py resume --name laser      # after a spot preemption: recreate, set up, train again
  python launch/tpu.py stop   --name laser      # SIGTERM: the trainer saves the current step and exits
  python launch/tpu.py delete --name laser

Every subcommand takes --dry-run: it prints each gcloud command (one line, shlex-quoted) instead of running it.
`create` saves the launch parameters in <state-dir>/<name>.json (default ~/.laser_jax/launch, or
$LASER_JAX_LAUNCH_DIR); later subcommands read zone, project and accelerator from there, and `setup`/`train`
record what they ran so `resume` can run exactly the same again. The trainer itself resumes from
config.workdir, which must be on GCS (gs://...) so that it survives the loss of the VMs.

`setup` does not use the image's Python (3.10 on the Ubuntu 22.04 TPU images; jax >= 0.7 needs
3.11): it installs uv, creates ~/laser_jax_venv with Python 3.11, installs the project with the
`tpu` extra into it (a git ref, a source tarball or a wheel) and runs
`python -m laser_jax.train --config=... --dry_run` on every worker; `train`, `resume` and `run`
then use that venv's python.

Only the standard library and the gcloud CLI are used: no Google Cloud Python packages.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

# Accelerator generation -> (default runtime version, TensorCores-or-chips counts gcloud accepts).
# Runtime versions are the ones Cloud TPU documents for JAX ("TPU software versions").
# v4/v5p sizes count TensorCores (2 per chip, 4 chips per host); v5litepod/v6e sizes count chips.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
_SINGLE_HOST_CHIPS = (1, 4, 8)  # v5litepod/v6e slices that fit on one VM.
_LITE_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
_ACCELERATOR_RE = re.compile(r"^(v4|v5p|v5litepod|v6e)-([1-9][0-9]*)$")
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_FILE = "~/laser_jax_train.log"  # On every worker; `logs` tails it.
PID_FILE = "~/laser_jax_train.pid"
TARBALL_REMOTE = "laser_jax_src.tar.gz"
# setup: uv provisions this Python in this venv (relative to the home directory) on every worker;
# the images' own Python (3.10 on Ubuntu 22.04) is older than jax >= 0.7 supports.
VENV = "laser_jax_venv"
PYTHON = "3.11"
UV_INSTALLER = "https://astral.sh/uv/install.sh"  # uv's standalone installer, if pip cannot.
CHECK_CONFIG = "configs/tiny_cpu.py"  # setup's `--dry_run` check, unless --config names another.
CHECK_OUTPUT = "laser_jax_dry_run.txt"  # The check's full report on every worker.

# Queued-resource states (Cloud TPU API QueuedResourceState.State) grouped by what `resume` must do.
_WAITING = {"CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"}
_PREEMPTED = {"SUSPENDING", "SUSPENDED"}  # A spot slice taken back by the service.
_FAILED = {"FAILED"}
_DELETING = {"DELETING"}


class LaunchError(Exception):
  """Bad input or an unusable cloud state; printed as one `error: ...` line, exit status 2."""


class GcloudError(Exception):
  """A gcloud command exited non-zero; exit status 1."""


# ----------------------------------------------------------------------------- pure helpers


def parse_accelerator(accelerator):
  """Returns (generation, size) of an accelerator type such as 'v4-64', or raises LaunchError."""
  m = _ACCELERATOR_RE.match(accelerator or "")
  if not m:
    hint = ""
    if accelerator and accelerator.startswith("v5e-"):
      hint = f" (v5e is spelled v5litepod-{accelerator[4:]})"
    raise LaunchError(f"unknown accelerator type {accelerator!r}{hint}; expected v4-N, v5p-N, "
                      f"v5litepod-N or v6e-N, e.g. v4-64, v5litepod-16, v5p-128")
  generation, size = m.group(1), int(m.group(2))
  if generation in ("v4", "v5p"):
    if size % 8:
      raise LaunchError(f"unknown accelerator type {accelerator!r}: {generation} sizes count "
                        f"TensorCores and are multiples of 8 (e.g. {generation}-8, {generation}-64)")
  elif size not in _LITE_SIZES:
    raise LaunchError(f"unknown accelerator type {accelerator!r}: {generation} sizes are "
                      f"{', '.join(map(str, _LITE_SIZES))}")
  return generation, size


def default_runtime_version(accelerator):
  """The TPU software version Cloud TPU recommends for JAX on this accelerator's generation."""
  return RUNTIME_VERSIONS[parse_accelerator(accelerator)[0]]


def num_workers(accelerator):
  """Number of TPU VM hosts (workers) in a slice of this accelerator type."""
  generation, size = parse_accelerator(accelerator)
  if generation in ("v4", "v5p"):
    return max(1, size // 8)  # 8 TensorCores (4 chips) per host.
  return 1 if size in _SINGLE_HOST_CHIPS else size // 4  # Multi-host v5e/v6e: 4 chips per host.


def queued_resource_state(describe_json):
  """The state string of `gcloud compute tpus queued-resources describe --format=json` output."""
  try:
    doc = json.loads(describe_json)
    state = doc["state"]["state"]
  except (ValueError, KeyError, TypeError) as e:
    raise LaunchError(f"cannot read the queued-resource state from gcloud's JSON ({e!r}): "
                      f"{describe_json[:200]!r}") from None
  return str(state)


def classify_state(state):
  """Maps a queued-resource state (or None when it does not exist) to what resume must do.

  Returns one of 'active', 'waiting', 'preempted', 'failed', 'deleting', 'missing'.
  """
  if state is None:
    return "missing"
  if state == "ACTIVE":
    return "active"
  for kind, states in (("waiting", _WAITING), ("preempted", _PREEMPTED), ("failed", _FAILED),
                       ("deleting", _DELETING)):
    if state in states:
      return kind
  raise LaunchError(f"unknown queued-resource state {state!r}")


def resume_plan(kind, force_setup=False):
  """The steps `resume` takes from a classified state: a list drawn from
  'delete', 'create', 'wait', 'setup', 'train'. A fresh node always needs `setup` again."""
  if kind in ("preempted", "failed"):
    return ["delete", "create", "wait", "setup", "train"]
  if kind in ("missing", "deleting"):
    return ["create", "wait", "setup", "train"] if kind == "missing" else [
        "wait_deleted", "create", "wait", "setup", "train"]
  if kind == "waiting":
    return ["wait", "setup", "train"]
  if kind == "active":
    return ["setup", "train"] if force_setup else ["train"]
  raise LaunchError(f"unknown state kind {kind!r}")


def _scope(p):
  return [f"--zone={p['zone']}", f"--project={p['project']}"]


def create_command(p):
  """gcloud command that queues a slice request for node `p['name']`."""
  cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", p["name"],
         f"--node-id={p['name']}", *_scope(p), f"--accelerator-type={p['accelerator']}",
         f"--runtime-version={p['runtime_version']}"]
  if p.get("spot"):
    cmd.append("--spot")
  if p.get("reserved"):
    cmd.append("--reserved")
  return cmd


def describe_command(p):
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", p["name"], *_scope(p),
          "--format=json"]


def delete_command(p):
  """Deletes the queued resource; --force deletes its node first, --quiet skips the prompt."""
  return ["gcloud", "compute", "tpus", "queued-resources", "delete", p["name"], *_scope(p),
          "--force", "--quiet"]


def ssh_command(p, remote_script, worker="all"):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", p["name"], *_scope(p),
          f"--worker={worker}", f"--command={remote_script}"]


def scp_command(p, local_paths, remote_path, recurse=False):
  """Copies local file(s) (directories too with `recurse`) to every worker; `remote_path` is
  relative to the home directory."""
  local_paths = [local_paths] if isinstance(local_paths, str) else list(local_paths)
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", *(["--recurse"] if recurse else []),
          *local_paths, f"{p['name']}:{remote_path}", *_scope(p), "--worker=all"]


def home_path(path):
  """Shell word for a file on a worker: relative paths are from the home directory (so that they
  survive a `cd`), absolute ones stay."""
  return shlex.quote(path) if path.startswith("/") else '"$HOME"/' + shlex.quote(path)


def command_word(program):
  """Shell word for a program: a bare name is looked up on PATH, a path is a `home_path`."""
  return shlex.quote(program) if "/" not in program else home_path(program)


def venv_python(venv=VENV):
  return f"{venv}/bin/python"


def provision_script(venv=VENV, python=PYTHON):
  """Shell (run from the home directory) that installs uv if it is missing and creates the venv
  with `python` (a version, which uv downloads when the image lacks it, or an interpreter path)."""
  q = shlex.quote
  return ("if ! command -v uv >/dev/null 2>&1 ; then "
          f"python3 -m pip install --user --quiet uv || curl -LsSf {UV_INSTALLER} | sh ; fi ; "
          f"uv venv --quiet --allow-existing --python {q(python)} {q(venv)}")


def fetch_git_script(repo_url, ref, remote_dir="laser_jax"):
  """Shell that checks out `ref` (a branch, tag or full commit hash) of `repo_url` in ~/remote_dir,
  fresh or over an earlier setup's checkout (local changes there are discarded)."""
  q = shlex.quote
  d = q(remote_dir)
  return (f"git init --quiet {d} ; git -C {d} fetch --quiet --depth=1 {q(repo_url)} {q(ref)} ; "
          f"git -C {d} checkout --quiet --force FETCH_HEAD")


def install_script(target, venv=VENV, install_args=(), editable=False):
  """Shell that installs the project with the `tpu` extra into the venv: `target` is its source
  directory (installed editable) or a wheel file, relative to the home directory."""
  q = shlex.quote
  spec = f"{target if target.startswith('/') else './' + target}[tpu]"  # A path, not a project name.
  return (f"uv pip install --python {q(venv_python(venv))} "
          + "".join(f"{q(a)} " for a in install_args)
          + ("-e " if editable else "") + q(spec))


def check_script(config=CHECK_CONFIG, remote_dir="laser_jax", venv=VENV, env=()):
  """Shell that runs the trainer's --dry_run of `config` on the installed package (`-P`: the
  source tree in the working directory does not stand in for a broken install); its full report
  stays in ~/CHECK_OUTPUT, the last lines (devices, workdir, verdict) are printed."""
  prefix = shlex.join(["env", *env]) + " " if env else ""
  return (f"cd {home_path(remote_dir)} ; {prefix}{command_word(venv_python(venv))} -P -m "
          f"laser_jax.train {shlex.quote('--config=' + config)} --dry_run > {home_path(CHECK_OUTPUT)} ; "
          f"tail -n 3 {home_path(CHECK_OUTPUT)}")


def _setup_script(steps):
  # uv's installers put it in ~/.local/bin, which a non-interactive ssh shell has not on PATH.
  return " ; ".join(["set -e", 'export PATH="$HOME/.local/bin:$PATH"', *steps])


def setup_git_script(repo_url, ref, remote_dir="laser_jax", venv=VENV, python=PYTHON,
                     install_args=(), config=CHECK_CONFIG, env=()):
  """Remote script: Python `python` in ~/venv (uv), `ref` of `repo_url` in ~/remote_dir installed
  editable with the tpu extra, then the --dry_run check of `config`."""
  return _setup_script([provision_script(venv, python), fetch_git_script(repo_url, ref, remote_dir),
                        install_script(remote_dir, venv, install_args, editable=True),
                        check_script(config, remote_dir, venv, env)])


def setup_tarball_script(remote_dir="laser_jax", venv=VENV, python=PYTHON, install_args=(),
                         config=CHECK_CONFIG, env=()):
  """Remote script: as setup_git_script, from the source tarball copied to ~/TARBALL_REMOTE."""
  q = shlex.quote
  unpack = f"mkdir -p {q(remote_dir)} ; tar -xzf {TARBALL_REMOTE} -C {q(remote_dir)}"
  return _setup_script([provision_script(venv, python), unpack,
                        install_script(remote_dir, venv, install_args, editable=True),
                        check_script(config, remote_dir, venv, env)])


def setup_wheel_scripts(wheel_name, remote_dir="laser_jax", venv=VENV, python=PYTHON,
                        install_args=(), config=CHECK_CONFIG, env=()):
  """Remote scripts before and after the wheel and configs/ are copied into ~/remote_dir: the venv
  and that directory; then the install of the wheel and the --dry_run check of `config`."""
  prepare = _setup_script([provision_script(venv, python), f"mkdir -p {shlex.quote(remote_dir)}"])
  install = _setup_script([install_script(f"{remote_dir}/{wheel_name}", venv, install_args),
                           check_script(config, remote_dir, venv, env)])
  return prepare, install


def _stop_previous(restart):
  """Shell that refuses to start twice, or (restart) SIGTERMs the previous run and waits for its
  checkpoint-and-exit."""
  running = f"[ -f {PID_FILE} ] && kill -0 \"$(cat {PID_FILE})\" 2>/dev/null"
  if restart:
    return (f"if {running} ; then kill -TERM \"$(cat {PID_FILE})\" ; "
            f"while kill -0 \"$(cat {PID_FILE})\" 2>/dev/null ; do sleep 2 ; done ; fi")
  return (f"if {running} ; then echo \"laser_jax.train is already running on $(hostname) "
          f"(pid $(cat {PID_FILE})); use --restart\" >&2 ; exit 1 ; fi")


def train_argv(config, overrides):
  """The trainer's arguments on every worker (after the interpreter)."""
  return ["-m", "laser_jax.train", f"--config={config}", *overrides]


def train_script(config, overrides, env=(), remote_dir="laser_jax", python="python3",
                 restart=False):
  """Remote script: start the trainer in the background under nohup, appending to LOG_FILE.

  `python` is a program on PATH or a path (relative ones from the home directory: setup's venv).
  `env` is a list of 'KEY=VALUE' set for the trainer. The pid goes to PID_FILE so a second start
  is refused and `stop` can SIGTERM it (the trainer then saves the current step and exits).
  """
  prefix = ["env", *env] if env else []
  cmd = (shlex.join(prefix + ["nohup"]) + f" {command_word(python)} "
         + shlex.join(train_argv(config, overrides)))
  return (f"cd {shlex.quote(remote_dir)} ; {_stop_previous(restart)} ; "
          f"{cmd} >> {LOG_FILE} 2>&1 < /dev/null & echo $! > {PID_FILE}")


def run_script(argv, remote_dir="laser_jax", venv=VENV):
  """Remote script: `argv` in ~/remote_dir in the foreground, with the venv's `python` first on PATH."""
  return (f"cd {home_path(remote_dir)} ; export PATH={home_path(venv + '/bin')}:\"$PATH\" ; "
          f"{shlex.join(argv)}")


def stop_script():
  """Remote script: SIGTERM the trainer (it checkpoints and exits) and wait until it is gone."""
  return (_stop_previous(restart=True) + f" ; rm -f {PID_FILE}")


def logs_script(lines=100, follow=True):
  return f"tail -n {int(lines)} {'-F ' if follow else ''}{LOG_FILE}"


def split_overrides(extra):
  """Validates trainer overrides: each must be '--config.<key>=<value>' (absl/ml_collections form)."""
  for arg in extra:
    if arg == "--":
      continue
    if not (arg.startswith("--config.") and "=" in arg):
      raise LaunchError(f"unexpected argument {arg!r}: trainer overrides must look like "
                        f"--config.<key>=<value>")
  return [a for a in extra if a != "--"]


def workdir_of(overrides, workdir):
  """The run's workdir from --workdir or a --config.workdir= override; it must be on GCS."""
  from_override = [a.split("=", 1)[1] for a in overrides if a.startswith("--config.workdir=")]
  if workdir and from_override and from_override[-1] != workdir:
    raise LaunchError(f"--workdir={workdir} conflicts with --config.workdir={from_override[-1]}")
  wd = workdir or (from_override[-1] if from_override else None)
  if not wd:
    raise LaunchError("train needs --workdir gs://BUCKET/PATH (checkpoints must outlive the VMs)")
  if not wd.startswith("gs://") or len(wd) <= len("gs://"):
    raise LaunchError(f"workdir must be a gs:// path so every worker and a resumed slice see it, "
                      f"got {wd!r}")
  return wd


# ----------------------------------------------------------------------------- state file


def state_path(state_dir, name):
  state_dir = state_dir or os.environ.get("LASER_JAX_LAUNCH_DIR") or os.path.join(
      os.path.expanduser("~"), ".laser_jax", "launch")
  return os.path.join(state_dir, f"{name}.json")


def load_state(path):
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise LaunchError(f"{path}: not valid JSON ({e})") from None


def save_state(path, state):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(state, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- execution


class Gcloud:
  """Runs gcloud commands, or in dry-run mode prints them (shlex.join, one per line)."""

  def __init__(self, dry_run):
    self.dry_run = dry_run

  def run(self, cmd):
    if self.dry_run:
      print(shlex.join(cmd), flush=True)
      return
    rc = subprocess.call(cmd)
    if rc:
      raise GcloudError(f"gcloud exited with status {rc}: {shlex.join(cmd)}")

  def describe_state(self, p):
    """The queued resource's state, None if it does not exist; in dry-run prints and returns None."""
    cmd = describe_command(p)
    if self.dry_run:
      print(shlex.join(cmd), flush=True)
      return None
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
      if "NOT_FOUND" in res.stderr or "not found" in res.stderr.lower():
        return None
      raise GcloudError(f"gcloud exited with status {res.returncode}: {shlex.join(cmd)}: "
                        f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ''}")
    return queued_resource_state(res.stdout)


def wait_until(gcloud, p, want, poll_s, timeout_s):
  """Polls the queued resource until its state kind is `want` ('active' or 'missing')."""
  if gcloud.dry_run:
    gcloud.describe_state(p)
    return
  start, last = time.monotonic(), object()
  while True:
    state = gcloud.describe_state(p)
    kind = classify_state(state)
    if state != last:
      print(f"{p['name']}: {state or 'not found'}", file=sys.stderr, flush=True)
      last = state
    if kind == want:
      return
    if want == "active" and kind in ("preempted", "failed", "missing"):
      raise LaunchError(f"queued resource {p['name']} is {state or 'gone'} while waiting for "
                        f"ACTIVE; run `resume`")
    if timeout_s and time.monotonic() - start > timeout_s:
      raise LaunchError(f"queued resource {p['name']} still {state} after {timeout_s}s")
    time.sleep(poll_s)


def do_create(gcloud, p, args, path, state):
  gcloud.run(create_command(p))
  if not gcloud.dry_run:
    save_state(path, {**state, **p})
  if not args.no_wait:
    wait_until(gcloud, p, "active", args.poll_s, args.wait_timeout_s)


def distributed_env(p):
  """Environment that makes every worker of a multi-host slice join jax.distributed."""
  return ["LASER_JAX_DISTRIBUTED=1"] if num_workers(p["accelerator"]) > 1 else []


def do_setup(gcloud, p, setup):
  """Provisions, installs and checks on every worker (see setup_*_script)."""
  common = {"remote_dir": setup["remote_dir"], "venv": setup.get("venv", VENV),
            "python": setup.get("python", PYTHON), "install_args": setup.get("install_args", []),
            "config": setup.get("config", CHECK_CONFIG), "env": distributed_env(p)}
  if setup.get("wheel"):
    prepare, install = setup_wheel_scripts(os.path.basename(setup["wheel"]), **common)
    gcloud.run(ssh_command(p, prepare))
    # The wheel holds the package; the configs the trainer is started with come from this checkout.
    gcloud.run(scp_command(p, [setup["wheel"], os.path.join(REPO_ROOT, "configs")],
                           setup["remote_dir"] + "/", recurse=True))
    gcloud.run(ssh_command(p, install))
  elif setup.get("tarball"):
    gcloud.run(scp_command(p, setup["tarball"], TARBALL_REMOTE))
    gcloud.run(ssh_command(p, setup_tarball_script(**common)))
  else:
    ref = setup.get("ref") or setup["branch"]  # `branch`: launch states saved before --ref.
    gcloud.run(ssh_command(p, setup_git_script(setup["repo_url"], ref, **common)))


def do_train(gcloud, p, train, restart=False):
  script = train_script(train["config"], train["overrides"], train["env"], train["remote_dir"],
                        train["python"], restart)
  gcloud.run(ssh_command(p, script))


# ----------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors and exit status 2."""

  def error(self, message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser():
  common = _Parser(add_help=False, allow_abbrev=False)
  common.add_argument("--name", required=True, help="Queued resource and TPU node name.")
  common.add_argument("--zone", help="e.g. us-central2-b (saved by create).")
  common.add_argument("--project", help="GCP project (default $CLOUDSDK_CORE_PROJECT or "
                      "$GOOGLE_CLOUD_PROJECT; saved by create).")
  common.add_argument("--accelerator", help="v4-N, v5litepod-N, v5p-N or v6e-N (saved by create).")
  common.add_argument("--state-dir", help="Where <name>.json is kept (default $LASER_JAX_LAUNCH_DIR "
                      "or ~/.laser_jax/launch).")
  common.add_argument("--dry-run", action="store_true", help="Print gcloud commands, run nothing.")
  waiting = _Parser(add_help=False, allow_abbrev=False)
  waiting.add_argument("--no-wait", action="store_true", help="Do not wait for ACTIVE.")
  waiting.add_argument("--poll-s", type=float, default=30.0, help="Seconds between state checks.")
  waiting.add_argument("--wait-timeout-s", type=float, default=0.0, help="0 waits forever.")
  creating = _Parser(add_help=False, allow_abbrev=False)
  creating.add_argument("--spot", action="store_true", help="Spot capacity (preemptible).")
  creating.add_argument("--reserved", action="store_true", help="Use the project's reservation.")
  creating.add_argument("--runtime-version", help="Default: the JAX runtime for the generation.")

  parser = _Parser(prog="launch/tpu.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  sub.add_parser("create", parents=[common, creating, waiting], allow_abbrev=False,
                 help="Queue a slice request and wait until it is ACTIVE.")
  setup = sub.add_parser("setup", parents=[common], allow_abbrev=False,
                         help="Install the project on every worker.")
  source = setup.add_mutually_exclusive_group()
  source.add_argument("--repo-url", help="git URL every worker clones.")
  source.add_argument("--tarball", help="Local .tar.gz of the source (e.g. from `git archive`), "
                      "copied to every worker.")
  source.add_argument("--wheel", help="Local wheel (e.g. dist/laser_jax-0.1.0-py3-none-any.whl "
                      "from `pip wheel --no-deps -w dist .`), copied to every worker with this "
                      "checkout's configs/.")
  setup.add_argument("--ref", "--branch", dest="ref", default="main",
                     help="With --repo-url: the branch, tag or full commit hash to install.")
  setup.add_argument("--remote-dir", default="laser_jax", help="Relative to the home directory.")
  setup.add_argument("--venv", default=VENV, help="The virtual environment uv creates, relative "
                     "to the home directory; train and resume run its python.")
  setup.add_argument("--python", default=PYTHON, help="Python of the venv: a version (uv "
                     "downloads it when the image has none; TPU VM images ship 3.10) or a path.")
  setup.add_argument("--config", default=CHECK_CONFIG, help="Config the install is checked with "
                     "(`python -m laser_jax.train --config=... --dry_run` on every worker): the "
                     "one you will train.")
  setup.add_argument("--install-args", default="", help="Extra `uv pip install` arguments, e.g. "
                     "--install-args='--index-url=URL' for a mirror.")
  train = sub.add_parser("train", parents=[common], allow_abbrev=False,
                         help="Start the trainer on all workers (overrides after --).")
  train.add_argument("--config", required=True, help="e.g. configs/tpu_v4.py (in the repo).")
  train.add_argument("--workdir", help="gs://BUCKET/PATH; passed as --config.workdir.")
  train.add_argument("--env", action="append", default=[], help="KEY=VALUE for the trainer.")
  train.add_argument("--restart", action="store_true",
                     help="SIGTERM a running trainer (it checkpoints) before starting.")
  run = sub.add_parser("run", parents=[common], allow_abbrev=False,
                       help="Run a command (after --) in the remote directory with the setup's "
                       "venv first on PATH, in the foreground: evaluate, export, ...")
  run.add_argument("--worker", default="0", help="A worker number, or all.")
  logs = sub.add_parser("logs", parents=[common], allow_abbrev=False, help="Stream a worker's log.")
  logs.add_argument("--worker", type=int, default=0)
  logs.add_argument("--lines", type=int, default=100)
  logs.add_argument("--no-follow", action="store_true")
  sub.add_parser("status", parents=[common], allow_abbrev=False,
                 help="Print the queued resource's state.")
  resume = sub.add_parser("resume", parents=[common, waiting], allow_abbrev=False,
                          help="Recreate if preempted, set up again, rerun the same train command.")
  resume.add_argument("--setup", action="store_true", help="Run setup even if the node is ACTIVE.")
  resume.add_argument("--assume-state", help="Dry-run only: queued-resource state to plan for "
                      "(default: the last state `status` saw).")
  sub.add_parser("stop", parents=[common], allow_abbrev=False,
                 help="SIGTERM the trainer on all workers (it checkpoints and exits).")
  sub.add_parser("delete", parents=[common], allow_abbrev=False,
                 help="Delete the queued resource and its node.")
  return parser


def _resolve(args, state):
  """Launch parameters: flags first, then the saved state, then the environment."""
  p = {"name": args.name}
  if not _NAME_RE.match(args.name):
    raise LaunchError(f"--name {args.name!r}: use lowercase letters, digits and '-', starting "
                      f"with a letter (at most 63 characters)")
  p["zone"] = args.zone or state.get("zone")
  p["project"] = (args.project or state.get("project") or os.environ.get("CLOUDSDK_CORE_PROJECT")
                  or os.environ.get("GOOGLE_CLOUD_PROJECT"))
  p["accelerator"] = args.accelerator or state.get("accelerator")
  missing = [k for k in ("zone", "project", "accelerator") if not p[k]]
  if missing:
    raise LaunchError(f"{args.command}: missing --{' --'.join(missing)} (no saved launch state "
                      f"for {args.name!r}; run create first or pass them)")
  if not _ZONE_RE.match(p["zone"]):
    raise LaunchError(f"--zone {p['zone']!r} is not a zone name like us-central2-b")
  parse_accelerator(p["accelerator"])
  if args.command == "create":
    p["runtime_version"] = args.runtime_version or default_runtime_version(p["accelerator"])
    p["spot"], p["reserved"] = args.spot, args.reserved
    if args.spot and args.reserved:
      raise LaunchError("--spot and --reserved are mutually exclusive")
  else:
    p["runtime_version"] = state.get("runtime_version") or default_runtime_version(p["accelerator"])
    p["spot"], p["reserved"] = state.get("spot", False), state.get("reserved", False)
  return p


def _check_config(flag, config):
  # Workers run the config from their copy of this repository: catch typos here, not on the pod.
  if os.path.isabs(config) or not os.path.isfile(os.path.join(REPO_ROOT, config)):
    raise LaunchError(f"{flag} {config}: not a config file relative to the repository "
                      f"root {REPO_ROOT} (e.g. configs/tpu_v4.py)")


def _setup_params(args, state):
  saved = state.get("setup") or {}
  if not (args.tarball or args.repo_url or args.wheel):
    if saved:
      return saved
    raise LaunchError("setup needs --repo-url URL [--ref REF], --wheel PATH.whl or "
                      "--tarball PATH.tar.gz")
  _check_config("--config", args.config)
  try:
    install_args = shlex.split(args.install_args)
  except ValueError as e:
    raise LaunchError(f"--install-args {args.install_args!r}: {e}") from None
  setup = {"remote_dir": args.remote_dir, "venv": args.venv, "python": args.python,
           "config": args.config, "install_args": install_args}
  if args.repo_url:
    return {**setup, "repo_url": args.repo_url, "ref": args.ref}
  flag, path = ("--tarball", args.tarball) if args.tarball else ("--wheel", args.wheel)
  if not os.path.isfile(path):
    raise LaunchError(f"{flag} {path}: no such file")
  if args.wheel and not re.match(r"^laser_jax-[^-]+-.+\.whl$", os.path.basename(path)):
    raise LaunchError(f"--wheel {path}: not a laser_jax wheel (laser_jax-VERSION-...whl, as "
                      f"`pip wheel --no-deps -w dist .` names it)")
  return {**setup, flag[2:]: os.path.abspath(path)}


def _train_params(args, extra, state):
  _check_config("--config", args.config)
  overrides = split_overrides(extra)
  workdir = workdir_of(overrides, args.workdir)
  if args.workdir:
    overrides = [f"--config.workdir={workdir}"] + [
        o for o in overrides if not o.startswith("--config.workdir=")]
  for kv in args.env:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", kv):
      raise LaunchError(f"--env {kv!r}: expected KEY=VALUE")
  setup = state.get("setup") or {}
  # setup's venv (also when setup ran from elsewhere, with the defaults); a setup saved before
  # the venv existed installed into its `python`.
  python = (venv_python(setup.get("venv", VENV)) if "venv" in setup or not setup
            else setup.get("python", "python3"))
  return {"config": args.config, "overrides": overrides, "env": list(args.env),
          "remote_dir": setup.get("remote_dir", "laser_jax"), "python": python}


def _run_params(args, extra, state):
  argv = extra[1:] if extra[:1] == ["--"] else extra
  if not argv:
    raise LaunchError("run: give the command after --, e.g. -- python -m laser_jax.evaluate ...")
  setup = state.get("setup") or {}
  return run_script(argv, setup.get("remote_dir", "laser_jax"), setup.get("venv", VENV))


def _worker(args, p, allow_all=False):
  """--worker: a worker number of this slice (or 'all')."""
  n = num_workers(p["accelerator"])
  if allow_all and args.worker == "all":
    return "all"
  if not str(args.worker).isdigit() or not 0 <= int(args.worker) < n:
    raise LaunchError(f"--worker {args.worker}: {p['accelerator']} has workers 0..{n - 1}"
                      + (" (or all)" if allow_all else ""))
  return int(args.worker)


def run_command(args, extra):
  path = state_path(args.state_dir, args.name)
  state = load_state(path)
  p = _resolve(args, state)
  gcloud = Gcloud(args.dry_run)
  if extra and args.command not in ("train", "run"):
    raise LaunchError(f"unexpected arguments for {args.command}: {' '.join(extra)}")

  if args.command == "create":
    do_create(gcloud, p, args, path, {})
  elif args.command == "setup":
    setup = _setup_params(args, state)
    do_setup(gcloud, p, setup)
    if not gcloud.dry_run:
      save_state(path, {**state, **p, "setup": setup})
  elif args.command == "train":
    train = _train_params(args, extra, state)
    if not any(kv.startswith("LASER_JAX_DISTRIBUTED=") for kv in train["env"]):
      # Multi-host slice: make every worker join jax.distributed (coordinator from GCE metadata).
      train["env"] = [*distributed_env(p), *train["env"]]
    do_train(gcloud, p, train, args.restart)
    if not gcloud.dry_run:
      save_state(path, {**state, **p, "train": train})
  elif args.command == "run":
    script = _run_params(args, extra, state)
    gcloud.run(ssh_command(p, script, worker=_worker(args, p, allow_all=True)))
  elif args.command == "logs":
    gcloud.run(ssh_command(p, logs_script(args.lines, not args.no_follow), worker=_worker(args, p)))
  elif args.command == "status":
    st = gcloud.describe_state(p)
    if not gcloud.dry_run:
      print(f"{p['name']} ({p['accelerator']}, {p['zone']}): {st or 'NOT_FOUND'} "
            f"[{classify_state(st)}]")
      if state:
        save_state(path, {**state, "last_state": st})
  elif args.command == "resume":
    return _resume(gcloud, p, args, path, state)
  elif args.command == "stop":
    gcloud.run(ssh_command(p, stop_script()))
  elif args.command == "delete":
    gcloud.run(delete_command(p))
    if not gcloud.dry_run and os.path.exists(path):
      os.remove(path)
  return 0


def _resume(gcloud, p, args, path, state):
  if not state.get("train"):
    raise LaunchError(f"resume: no train command saved in {path}; run `train` once first")
  if not state.get("setup"):
    raise LaunchError(f"resume: no setup saved in {path}; run `setup` once first")
  st = gcloud.describe_state(p)
  if gcloud.dry_run:
    # Nothing was asked of the cloud: plan for the assumed or last observed state.
    st = args.assume_state or state.get("last_state")
    print(f"dry-run: planning for state {st or 'NOT_FOUND'}", file=sys.stderr)
  elif args.assume_state:
    raise LaunchError("--assume-state is only for --dry-run")
  for step in resume_plan(classify_state(st), args.setup):
    if step == "delete":
      gcloud.run(delete_command(p))
    elif step == "wait_deleted":
      wait_until(gcloud, p, "missing", args.poll_s, args.wait_timeout_s)
    elif step == "create":
      gcloud.run(create_command(p))
    elif step == "wait":
      wait_until(gcloud, p, "active", args.poll_s, args.wait_timeout_s)
    elif step == "setup":
      do_setup(gcloud, p, state["setup"])
    elif step == "train":
      do_train(gcloud, p, state["train"])
  if not gcloud.dry_run:
    save_state(path, {**state, "last_state": "ACTIVE"})
  return 0


def main(argv=None):
  """CLI entry point; returns the exit status (0 ok, 1 gcloud failed, 2 bad input)."""
  args, extra = build_parser().parse_known_args(argv)
  try:
    return run_command(args, extra)
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except GcloudError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
