"""launch/tpu.py: the exact gcloud commands of every subcommand (--dry-run), input validation, the
remote shell scripts run for real under bash with a fake python3, and resume after a preemption
against a fake `gcloud` on PATH. No network, no gcloud, no TPU."""
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu.py"

_spec = importlib.util.spec_from_file_location("launch_tpu", SCRIPT)
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

SCOPE = ["--zone=us-central2-b", "--project=my-proj"]
BASE = ["--name", "laser", "--zone", "us-central2-b", "--project", "my-proj"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "laser", *SCOPE]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
DESCRIBE = [*QR, "describe", "laser", *SCOPE, "--format=json"]
DELETE = [*QR, "delete", "laser", *SCOPE, "--force", "--quiet"]


def create_cmd(accel, runtime, *extra):
  return [*QR, "create", "laser", "--node-id=laser", *SCOPE, f"--accelerator-type={accel}",
          f"--runtime-version={runtime}", *extra]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
  """State files under tmp_path; no project from the developer's environment."""
  monkeypatch.setenv("LASER_JAX_LAUNCH_DIR", str(tmp_path / "state"))
  monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
  monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)


def cli(*args, env=None):
  """Runs `python launch/tpu.py ARGS` in a subprocess."""
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, cwd=ROOT, timeout=60)


def call_main(capsys, *args):
  """Runs tpu.main(ARGS) in-process; returns (status, printed commands as argv lists, stderr)."""
  rc = tpu.main(list(args))
  out, err = capsys.readouterr()
  return rc, [shlex.split(line) for line in out.splitlines()], err


def remote_command(argv):
  """The --command= script of a gcloud tpu-vm ssh argv."""
  [cmd] = [a for a in argv if a.startswith("--command=")]
  return cmd[len("--command="):]


# ----------------------------------------------------------------------------- create


@pytest.mark.parametrize("accel,runtime", [("v4-64", "tpu-ubuntu2204-base"),
                                           ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                           ("v5p-128", "v2-alpha-tpuv5")])
def test_create_dry_run_subprocess(accel, runtime):
  res = cli("create", *BASE, "--accelerator", accel, "--spot", "--dry-run")
  assert res.returncode == 0, res.stderr
  lines = [shlex.split(line) for line in res.stdout.splitlines()]
  assert lines == [create_cmd(accel, runtime, "--spot"), DESCRIBE]  # Create, then wait for ACTIVE.


def test_create_dry_run_main_options(capsys, tmp_path):
  rc, lines, _ = call_main(capsys, "create", *BASE, "--accelerator", "v4-8", "--runtime-version",
                           "tpu-vm-custom", "--no-wait", "--dry-run")
  assert rc == 0
  assert lines == [create_cmd("v4-8", "tpu-vm-custom")]  # No --spot unless asked.
  assert not (tmp_path / "state").exists()  # A dry run records nothing.
  rc, lines, _ = call_main(capsys, "create", *BASE, "--accelerator", "v5litepod-8", "--reserved",
                           "--no-wait", "--dry-run")
  assert lines == [create_cmd("v5litepod-8", "v2-alpha-tpuv5-lite", "--reserved")]


def test_project_from_environment(capsys, monkeypatch):
  monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "env-proj")
  rc, lines, _ = call_main(capsys, "create", "--name", "laser", "--zone", "us-central2-b",
                           "--accelerator", "v4-8", "--no-wait", "--dry-run")
  assert rc == 0 and "--project=env-proj" in lines[0]


@pytest.mark.parametrize("accel", ["v4-63", "v5e-16", "v3-8", "tpu", "v5litepod-12", "v5p-4"])
def test_invalid_accelerator_exits_2_with_one_line(accel):
  res = cli("create", *BASE, "--accelerator", accel, "--dry-run")
  assert res.returncode == 2
  assert res.stdout == ""  # Nothing would have run.
  assert len(res.stderr.strip().splitlines()) == 1
  assert res.stderr.startswith("error: unknown accelerator type") and repr(accel) in res.stderr


@pytest.mark.parametrize("args,needle", [
    (["create", "--zone", "us-central2-b", "--project", "p", "--accelerator", "v4-8"], "--name"),
    (["create", "--name", "laser", "--project", "p", "--accelerator", "v4-8"], "--zone"),
    (["create", "--name", "laser", "--zone", "us-central2-b", "--accelerator", "v4-8"], "--project"),
    (["create", *BASE], "--accelerator"),
    (["create", *BASE[:1], "Bad_Name", *BASE[2:], "--accelerator", "v4-8"], "--name 'Bad_Name'"),
    (["create", "--name", "laser", "--zone", "uscentral", "--project", "p", "--accelerator",
      "v4-8"], "--zone 'uscentral'"),
    (["create", *BASE, "--accelerator", "v4-8", "--spot", "--reserved"], "mutually exclusive"),
    (["frobnicate", *BASE], "frobnicate"),
])
def test_bad_input_exits_2_with_one_line(args, needle):
  res = cli(*args, "--dry-run")
  assert res.returncode == 2 and res.stdout == ""
  assert len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr, res.stderr


# ----------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("accel,workers", [("v4-8", 1), ("v4-64", 8), ("v5p-128", 16),
                                           ("v5litepod-8", 1), ("v5litepod-16", 4),
                                           ("v5litepod-256", 64), ("v6e-4", 1)])
def test_num_workers(accel, workers):
  assert tpu.num_workers(accel) == workers


SAMPLE_DESCRIBE = {  # Shape of `gcloud compute tpus queued-resources describe --format=json`.
    "createTime": "2025-05-01T10:00:00.000000Z",
    "name": "projects/my-proj/locations/us-central2-b/queuedResources/laser",
    "spot": {},
    "state": {"state": "SUSPENDED", "stateInitiator": "SERVICE"},
    "tpu": {"nodeSpec": [{"nodeId": "laser",
                          "parent": "projects/my-proj/locations/us-central2-b",
                          "node": {"acceleratorType": "v4-64",
                                   "runtimeVersion": "tpu-ubuntu2204-base"}}]},
}


def test_state_parsing_and_resume_plan():
  assert tpu.queued_resource_state(json.dumps(SAMPLE_DESCRIBE)) == "SUSPENDED"
  with pytest.raises(tpu.LaunchError, match="cannot read the queued-resource state"):
    tpu.queued_resource_state('{"name": "x"}')
  expected = {None: "missing", "ACTIVE": "active", "WAITING_FOR_RESOURCES": "waiting",
              "PROVISIONING": "waiting", "ACCEPTED": "waiting", "SUSPENDING": "preempted",
              "SUSPENDED": "preempted", "FAILED": "failed", "DELETING": "deleting"}
  assert {s: tpu.classify_state(s) for s in expected} == expected
  with pytest.raises(tpu.LaunchError, match="'EXPLODED'"):
    tpu.classify_state("EXPLODED")
  assert tpu.resume_plan("preempted") == ["delete", "create", "wait", "setup", "train"]
  assert tpu.resume_plan("missing") == ["create", "wait", "setup", "train"]
  assert tpu.resume_plan("waiting") == ["wait", "setup", "train"]
  assert tpu.resume_plan("active") == ["train"]
  assert tpu.resume_plan("active", force_setup=True) == ["setup", "train"]


# ----------------------------------------------------------------------------- setup / train / logs


FULL = [*BASE, "--accelerator", "v4-64"]


def test_setup_git_dry_run(capsys):
  rc, lines, _ = call_main(capsys, "setup", *FULL, "--repo-url", "https://example.com/l.git",
                           "--branch", "dev", "--dry-run")
  assert rc == 0 and len(lines) == 1
  assert lines[0][:-1] == [*SSH, "--worker=all"]
  script = remote_command(lines[0])
  assert "git clone --depth=1 --branch dev https://example.com/l.git laser_jax" in script
  assert "python3 -m pip install -e '.[tpu]'" in script


def test_setup_tarball_dry_run_subprocess(tmp_path):
  tarball = tmp_path / "src dir" / "laser.tar.gz"  # A space in the local path must survive.
  tarball.parent.mkdir()
  tarball.write_bytes(b"")
  res = cli("setup", *FULL, "--tarball", str(tarball), "--dry-run")
  assert res.returncode == 0, res.stderr
  scp, ssh = [shlex.split(line) for line in res.stdout.splitlines()]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tarball),
                 "laser:laser_jax_src.tar.gz", *SCOPE, "--worker=all"]
  assert ssh[:-1] == [*SSH, "--worker=all"]
  assert "tar -xzf laser_jax_src.tar.gz -C laser_jax" in remote_command(ssh)
  res = cli("setup", *FULL, "--tarball", str(tmp_path / "missing.tar.gz"), "--dry-run")
  assert res.returncode == 2 and "missing.tar.gz: no such file" in res.stderr


def test_train_dry_run_passes_config_overrides_and_quoting(capsys):
  rc, lines, _ = call_main(capsys, "train", *FULL, "--config", "configs/tpu_v4.py", "--workdir",
                           "gs://bucket/laser/run 1", "--env", "HF_HOME=/mnt/hf cache", "--dry-run",
                           "--", "--config.total_steps=10", "--config.data.template=chat and more")
  assert rc == 0 and len(lines) == 1
  assert lines[0][:-1] == [*SSH, "--worker=all"]
  words = shlex.split(remote_command(lines[0]))
  i = words.index("nohup")
  # A multi-host slice also gets LASER_JAX_DISTRIBUTED=1 so every worker joins jax.distributed.
  assert words[i - 3:i] == ["env", "LASER_JAX_DISTRIBUTED=1", "HF_HOME=/mnt/hf cache"]
  assert words[i + 1:i + 8] == ["python3", "-m", "laser_jax.train", "--config=configs/tpu_v4.py",
                                "--config.workdir=gs://bucket/laser/run 1",
                                "--config.total_steps=10", "--config.data.template=chat and more"]
  assert words[i + 8:i + 10] == [">>", "~/laser_jax_train.log"]


def test_train_overrides_without_separator_subprocess():
  res = cli("train", *FULL, "--config=configs/orz_7b.py", "--dry-run",
            "--config.workdir=gs://b/orz", "--config.rollout.n=16")
  assert res.returncode == 0, res.stderr
  [line] = res.stdout.splitlines()
  words = shlex.split(remote_command(shlex.split(line)))
  i = words.index("laser_jax.train")
  assert words[i + 1:i + 4] == ["--config=configs/orz_7b.py", "--config.workdir=gs://b/orz",
                                "--config.rollout.n=16"]


@pytest.mark.parametrize("extra,needle", [
    ([], "train needs --workdir gs://"),
    (["--workdir", "/tmp/run"], "workdir must be a gs:// path"),
    (["--workdir", "gs://b/x", "--", "--config.workdir=gs://b/y"], "conflicts"),
    (["--workdir", "gs://b/x", "--", "--steps=3"], "unexpected argument '--steps=3'"),
    (["--workdir", "gs://b/x", "--env", "NOEQUALS"], "--env 'NOEQUALS'"),
])
def test_train_bad_input(capsys, extra, needle):
  rc, lines, err = call_main(capsys, "train", *FULL, "--config", "configs/tpu_v4.py", "--dry-run",
                             *extra)
  assert rc == 2 and lines == []
  assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_logs_status_stop_delete_dry_run(capsys):
  _, lines, _ = call_main(capsys, "logs", *FULL, "--dry-run")
  assert lines == [[*SSH, "--worker=0", "--command=tail -n 100 -F ~/laser_jax_train.log"]]
  _, lines, _ = call_main(capsys, "logs", *FULL, "--worker", "7", "--lines", "20", "--no-follow",
                          "--dry-run")
  assert lines == [[*SSH, "--worker=7", "--command=tail -n 20 ~/laser_jax_train.log"]]
  rc, lines, err = call_main(capsys, "logs", *FULL, "--worker", "8", "--dry-run")
  assert rc == 2 and lines == [] and "v4-64 has workers 0..7" in err
  assert call_main(capsys, "status", *FULL, "--dry-run")[1] == [DESCRIBE]
  _, lines, _ = call_main(capsys, "stop", *FULL, "--dry-run")
  assert lines[0][:-1] == [*SSH, "--worker=all"] and "kill -TERM" in remote_command(lines[0])
  assert call_main(capsys, "delete", *FULL, "--dry-run")[1] == [DELETE]


# ----------------------------------------------------------------------------- remote scripts, run


def _fake_python(tmp_path):
  """A `python3` that records its argv and cwd, then sleeps (a trainer) or exits (pip)."""
  bindir = tmp_path / "bin"
  bindir.mkdir(exist_ok=True)
  fake = bindir / "python3"
  fake.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys, time, signal
      with open({str(tmp_path / 'calls.jsonl')!r}, "a") as f:
        f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
      if "laser_jax.train" in sys.argv:
        signal.signal(signal.SIGTERM, lambda *_: (print("saved step, exiting"), sys.exit(0)))
        print("training started", flush=True)
        time.sleep(30)
      """))
  fake.chmod(0o755)
  return {**os.environ, "HOME": str(tmp_path), "PATH": f"{bindir}:{os.environ['PATH']}"}


def _calls(tmp_path):
  path = tmp_path / "calls.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def test_train_and_stop_scripts_run_under_bash(tmp_path):
  env = _fake_python(tmp_path)
  (tmp_path / "laser_jax").mkdir()
  overrides = ["--config.workdir=gs://b/r", "--config.data.template=a b; echo pwned"]
  script = tpu.train_script("configs/tpu_v4.py", overrides, env=["X_Y=1 2"])
  assert subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, timeout=20).returncode == 0
  deadline = time.time() + 10
  while not _calls(tmp_path) and time.time() < deadline:
    time.sleep(0.05)
  [call] = _calls(tmp_path)
  assert call["argv"] == ["-m", "laser_jax.train", "--config=configs/tpu_v4.py", *overrides]
  assert call["cwd"] == str(tmp_path / "laser_jax")
  pid = int((tmp_path / "laser_jax_train.pid").read_text())
  os.kill(pid, 0)  # Running in the background after the ssh command returned.
  # A second start is refused while the first runs.
  second = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=20)
  assert second.returncode == 1 and "already running" in second.stderr
  assert len(_calls(tmp_path)) == 1
  # stop: SIGTERM, wait for exit, drop the pid file.
  stop = subprocess.run(["bash", "-c", tpu.stop_script()], cwd=tmp_path, env=env, timeout=20)
  assert stop.returncode == 0 and not (tmp_path / "laser_jax_train.pid").exists()
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  log = (tmp_path / "laser_jax_train.log").read_text()
  assert "training started" in log and "saved step, exiting" in log


def test_tarball_setup_script_runs_under_bash(tmp_path):
  env = _fake_python(tmp_path)
  src = tmp_path / "src"
  (src / "laser_jax").mkdir(parents=True)
  (src / "setup.py").write_text("# setup\n")
  (src / "laser_jax" / "__init__.py").write_text("")
  with tarfile.open(tmp_path / tpu.TARBALL_REMOTE, "w:gz") as tar:
    for p in ("setup.py", "laser_jax"):
      tar.add(src / p, arcname=p)
  res = subprocess.run(["bash", "-c", tpu.setup_tarball_script()], cwd=tmp_path, env=env,
                       timeout=20)
  assert res.returncode == 0
  assert (tmp_path / "laser_jax" / "setup.py").read_text() == "# setup\n"
  assert [c["argv"] for c in _calls(tmp_path)] == [["-m", "pip", "install", "--upgrade", "pip"],
                                                  ["-m", "pip", "install", "-e", ".[tpu]"]]
  assert {c["cwd"] for c in _calls(tmp_path)} == {str(tmp_path / "laser_jax")}


# ----------------------------------------------------------------------------- resume, fake gcloud


@pytest.fixture
def fake_gcloud(tmp_path):
  """A `gcloud` on PATH that logs argv and keeps one queued resource's state in a file."""
  bindir = tmp_path / "gbin"
  bindir.mkdir()
  log, state = tmp_path / "gcloud.jsonl", tmp_path / "qr_state"
  fake = bindir / "gcloud"
  fake.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys
      a = sys.argv[1:]
      with open({str(log)!r}, "a") as f:
        f.write(json.dumps(a) + "\\n")
      state = open({str(state)!r}).read().strip() if os.path.exists({str(state)!r}) else ""
      if a[:4] == ["compute", "tpus", "queued-resources", "describe"]:
        if not state:
          sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found")
        doc = json.loads({json.dumps(json.dumps(SAMPLE_DESCRIBE))})
        doc["state"]["state"] = state
        print(json.dumps(doc, indent=2))
      elif a[:4] == ["compute", "tpus", "queued-resources", "create"]:
        open({str(state)!r}, "w").write("ACTIVE")
      elif a[:4] == ["compute", "tpus", "queued-resources", "delete"]:
        open({str(state)!r}, "w").write("")
      """))
  fake.chmod(0o755)
  env = {"PATH": f"{bindir}:{os.environ['PATH']}"}

  def calls():
    out = [["gcloud", *json.loads(l)] for l in log.read_text().splitlines()]
    log.write_text("")
    return out

  return env, state, calls


def test_resume_after_preemption(tmp_path, fake_gcloud, monkeypatch, capsys):
  env, qr_state, calls = fake_gcloud
  monkeypatch.setenv("PATH", env["PATH"])
  train_args = ["--config", "configs/tpu_v4.py", "--workdir", "gs://b/run", "--",
                "--config.total_steps=3"]
  # Real (fake-gcloud) create, setup, train: the parameters are saved for resume.
  assert cli("create", *BASE, "--accelerator", "v4-32", "--spot", "--poll-s", "0", env=env
             ).returncode == 0
  assert calls() == [create_cmd("v4-32", "tpu-ubuntu2204-base", "--spot"), DESCRIBE]
  assert cli("setup", "--name", "laser", "--repo-url", "https://g/l.git", env=env).returncode == 0
  assert cli("train", "--name", "laser", *train_args, env=env).returncode == 0
  setup_cmd, train_cmd = calls()
  assert setup_cmd[:-1] == [*SSH, "--worker=all"] and train_cmd[:-1] == [*SSH, "--worker=all"]
  saved = json.loads((tmp_path / "state" / "laser.json").read_text())
  assert (saved["accelerator"], saved["spot"], saved["setup"]["repo_url"]) == (
      "v4-32", True, "https://g/l.git")

  # The spot slice is preempted; status sees and records it.
  qr_state.write_text("SUSPENDED")
  res = cli("status", "--name", "laser", env=env)
  assert res.returncode == 0 and "SUSPENDED [preempted]" in res.stdout
  assert calls() == [DESCRIBE]

  # Dry-run resume plans from the recorded state: recreate, wait, setup, the same train command.
  rc, lines, err = call_main(capsys, "resume", "--name", "laser", "--dry-run")
  assert rc == 0 and "SUSPENDED" in err
  assert lines == [DESCRIBE, DELETE, create_cmd("v4-32", "tpu-ubuntu2204-base", "--spot"),
                   DESCRIBE, setup_cmd, train_cmd]
  assert calls() == []  # Dry run: gcloud never ran.

  # Real resume runs exactly that against the (fake) cloud.
  res = cli("resume", "--name", "laser", "--poll-s", "0", env=env)
  assert res.returncode == 0, res.stderr
  assert calls() == [DESCRIBE, DELETE, create_cmd("v4-32", "tpu-ubuntu2204-base", "--spot"),
                     DESCRIBE, setup_cmd, train_cmd]
  # Healthy slice: resume only restarts the same train command.
  assert cli("resume", "--name", "laser", env=env).returncode == 0
  assert calls() == [DESCRIBE, train_cmd]

  # delete removes the queued resource and the saved state.
  assert cli("delete", "--name", "laser", env=env).returncode == 0
  assert calls() == [DELETE] and not (tmp_path / "state" / "laser.json").exists()


def test_resume_without_saved_train_is_refused(capsys):
  rc, lines, err = call_main(capsys, "resume", *FULL, "--dry-run")
  assert rc == 2 and lines == [] and "no train command saved" in err


def test_gcloud_failure_exits_1(tmp_path, monkeypatch):
  bindir = tmp_path / "failbin"
  bindir.mkdir()
  (bindir / "gcloud").write_text("#!/bin/sh\necho 'ERROR: permission denied' >&2\nexit 3\n")
  (bindir / "gcloud").chmod(0o755)
  res = cli("delete", *FULL, env={"PATH": f"{bindir}:{os.environ['PATH']}"})
  assert res.returncode == 1
  assert res.stderr.strip().splitlines()[-1].startswith("error: gcloud exited with status 3")


def test_train_config_must_exist_in_repo(capsys):
  rc, lines, err = call_main(capsys, "train", *FULL, "--config", "configs/no_such.py", "--workdir",
                             "gs://b/x", "--dry-run")
  assert rc == 2 and lines == [] and "--config configs/no_such.py: not a config file" in err


def _readme_commands():
  """The `python launch/tpu.py ...` lines of launch/README.md's shell blocks, in order."""
  text = (ROOT / "launch" / "README.md").read_text()
  blocks = text.split("```sh\n")[1:]
  lines = [l.strip() for b in blocks for l in b.split("```")[0].splitlines()]
  return [shlex.split(l) for l in lines if l.startswith("python launch/tpu.py ")]


def test_readme_commands_run_in_order(tmp_path, fake_gcloud):
  """Every command of launch/README.md, run as written against the fake gcloud."""
  env, qr_state, calls = fake_gcloud
  commands = _readme_commands()
  assert [c[2] for c in commands] == ["create", "setup", "setup", "train", "logs", "logs", "status",
                                      "resume", "stop", "delete"]
  (tmp_path / "laser_jax.tar.gz").write_bytes(b"")  # What the README's `git archive` makes.
  for argv in commands:
    extra = ["--poll-s", "0"] if argv[2] == "create" else []
    res = subprocess.run([sys.executable, str(SCRIPT), *argv[2:], *extra], capture_output=True,
                         text=True, env={**os.environ, **env}, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, (argv, res.stderr)
    made = calls()
    assert made and all(c[:3] == ["gcloud", "compute", "tpus"] for c in made), (argv, made)
    assert all("--zone=us-central2-b" in c and "--project=my-project" in c for c in made)
  assert not (tmp_path / "state" / "laser-v4.json").exists()  # Forgotten by delete.
