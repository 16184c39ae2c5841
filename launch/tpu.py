r"""Launch laser_jax training on a Cloud TPU VM slice (v4, v5e = v5litepod, v5p, v6e) with gcloud.

  python launch/tpu.py create --name laser --zone us-central2-b --project my-proj --accelerator v4-64 --spot
  python launch/tpu.py setup  --name laser --repo-url https://github.com/me/laser_jax.git --branch main
  python launch/tpu.py train  --name laser --config configs/tpu_v4.py --workdir gs://my-bucket/laser/run1 \
      -- --config.total_steps=1600 --config.model.hf_path=/mnt/models/Qwen2.5-7B
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


def scp_command(p, local_path, remote_path):
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local_path, f"{p['name']}:{remote_path}",
          *_scope(p), "--worker=all"]


def _install(remote_dir, python):
  q = shlex.quote
  return (f"cd {q(remote_dir)} ; {q(python)} -m pip install --upgrade pip ; "
          f"{q(python)} -m pip install -e {q('.[tpu]')}")


def setup_git_script(repo_url, branch, remote_dir="laser_jax", python="python3"):
  """Remote script: clone (or update to) `branch` of `repo_url` in ~/remote_dir, pip install -e '.[tpu]'."""
  q = shlex.quote
  return (f"set -e ; if [ -d {q(remote_dir + '/.git')} ] ; then "
          f"git -C {q(remote_dir)} fetch --depth=1 origin {q(branch)} ; "
          f"git -C {q(remote_dir)} checkout --force FETCH_HEAD ; "
          f"else git clone --depth=1 --branch {q(branch)} {q(repo_url)} {q(remote_dir)} ; fi ; "
          + _install(remote_dir, python))


def setup_tarball_script(remote_dir="laser_jax", python="python3"):
  """Remote script: unpack the copied source tarball into ~/remote_dir, pip install -e '.[tpu]'."""
  q = shlex.quote
  return (f"set -e ; mkdir -p {q(remote_dir)} ; tar -xzf {TARBALL_REMOTE} -C {q(remote_dir)} ; "
          + _install(remote_dir, python))


def _stop_previous(restart):
  """Shell that refuses to start twice, or (restart) SIGTERMs the previous run and waits for its
  checkpoint-and-exit."""
  running = f"[ -f {PID_FILE} ] && kill -0 \"$(cat {PID_FILE})\" 2>/dev/null"
  if restart:
    return (f"if {running} ; then kill -TERM \"$(cat {PID_FILE})\" ; "
            f"while kill -0 \"$(cat {PID_FILE})\" 2>/dev/null ; do sleep 2 ; done ; fi")
  return (f"if {running} ; then echo \"laser_jax.train is already running on $(hostname) "
          f"(pid $(cat {PID_FILE})); use --restart\" >&2 ; exit 1 ; fi")


def train_argv(config, overrides, python="python3"):
  """The trainer command every worker runs."""
  return [python, "-m", "laser_jax.train", f"--config={config}", *overrides]


def train_script(config, overrides, env=(), remote_dir="laser_jax", python="python3",
                 restart=False):
  """Remote script: start the trainer in the background under nohup, appending to LOG_FILE.

  `env` is a list of 'KEY=VALUE' set for the trainer. The pid goes to PID_FILE so a second start
  is refused and `stop` can SIGTERM it (the trainer then saves the current step and exits).
  """
  prefix = ["env", *env] if env else []
  cmd = shlex.join(prefix + ["nohup"] + train_argv(config, overrides, python))
  return (f"cd {shlex.quote(remote_dir)} ; {_stop_previous(restart)} ; "
          f"{cmd} >> {LOG_FILE} 2>&1 < /dev/null & echo $! > {PID_FILE}")


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


def do_setup(gcloud, p, setup):
  if setup.get("tarball"):
    gcloud.run(scp_command(p, setup["tarball"], TARBALL_REMOTE))
    script = setup_tarball_script(setup["remote_dir"], setup["python"])
  else:
    script = setup_git_script(setup["repo_url"], setup["branch"], setup["remote_dir"],
                              setup["python"])
  gcloud.run(ssh_command(p, script))


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
  setup.add_argument("--branch", default="main")
  setup.add_argument("--remote-dir", default="laser_jax", help="Relative to the home directory.")
  setup.add_argument("--python", default="python3", help="Python on the TPU VMs.")
  train = sub.add_parser("train", parents=[common], allow_abbrev=False,
                         help="Start the trainer on all workers (overrides after --).")
  train.add_argument("--config", required=True, help="e.g. configs/tpu_v4.py (in the repo).")
  train.add_argument("--workdir", help="gs://BUCKET/PATH; passed as --config.workdir.")
  train.add_argument("--env", action="append", default=[], help="KEY=VALUE for the trainer.")
  train.add_argument("--restart", action="store_true",
                     help="SIGTERM a running trainer (it checkpoints) before starting.")
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


def _setup_params(args, state):
  saved = state.get("setup") or {}
  if args.tarball:
    if not os.path.isfile(args.tarball):
      raise LaunchError(f"--tarball {args.tarball}: no such file")
    return {"tarball": os.path.abspath(args.tarball), "remote_dir": args.remote_dir,
            "python": args.python}
  if args.repo_url:
    return {"repo_url": args.repo_url, "branch": args.branch, "remote_dir": args.remote_dir,
            "python": args.python}
  if saved:
    return saved
  raise LaunchError("setup needs --repo-url URL [--branch B] or --tarball PATH.tar.gz")


def _train_params(args, extra, state):
  # Workers run the config from their copy of this repository: catch typos here, not on the pod.
  if os.path.isabs(args.config) or not os.path.isfile(os.path.join(REPO_ROOT, args.config)):
    raise LaunchError(f"--config {args.config}: not a config file relative to the repository "
                      f"root {REPO_ROOT} (e.g. configs/tpu_v4.py)")
  overrides = split_overrides(extra)
  workdir = workdir_of(overrides, args.workdir)
  if args.workdir:
    overrides = [f"--config.workdir={workdir}"] + [
        o for o in overrides if not o.startswith("--config.workdir=")]
  for kv in args.env:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", kv):
      raise LaunchError(f"--env {kv!r}: expected KEY=VALUE")
  setup = state.get("setup") or {}
  return {"config": args.config, "overrides": overrides, "env": list(args.env),
          "remote_dir": setup.get("remote_dir", "laser_jax"),
          "python": setup.get("python", "python3")}


def run_command(args, extra):
  path = state_path(args.state_dir, args.name)
  state = load_state(path)
  p = _resolve(args, state)
  gcloud = Gcloud(args.dry_run)
  if extra and args.command != "train":
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
    if num_workers(p["accelerator"]) > 1 and not any(
        kv.startswith("LASER_JAX_DISTRIBUTED=") for kv in train["env"]):
      # Multi-host slice: make every worker join jax.distributed (coordinator from GCE metadata).
      train["env"] = ["LASER_JAX_DISTRIBUTED=1", *train["env"]]
    do_train(gcloud, p, train, args.restart)
    if not gcloud.dry_run:
      save_state(path, {**state, **p, "train": train})
  elif args.command == "logs":
    n = num_workers(p["accelerator"])
    if not 0 <= args.worker < n:
      raise LaunchError(f"--worker {args.worker}: {p['accelerator']} has workers 0..{n - 1}")
    gcloud.run(ssh_command(p, logs_script(args.lines, not args.no_follow), worker=args.worker))
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
