"""launch/tpu.py: the exact gcloud commands of every subcommand (--dry-run), input validation, the
remote shell scripts run for real under bash (the trainer's with a fake python3; setup's whole
sequence, uv venv + install + the trainer's --dry_run, on this machine as a local worker), and
resume after a preemption against a fake `gcloud` on PATH. No network, no gcloud, no TPU."""
import importlib.util
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import sysconfig
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
                           "--branch", "dev", "--dry-run")  # --branch: the old name of --ref.
  assert rc == 0 and len(lines) == 1
  assert lines[0][:-1] == [*SSH, "--worker=all"]
  script = remote_command(lines[0])
  # Python 3.11 from uv (the image's is 3.10), the ref, the tpu extra, the check on every worker.
  assert "uv venv --quiet --allow-existing --python 3.11 laser_jax_venv ;" in script
  assert "git -C laser_jax fetch --quiet --depth=1 https://example.com/l.git dev ;" in script
  assert "uv pip install --python laser_jax_venv/bin/python -e './laser_jax[tpu]' ;" in script
  # A v4-64 has 8 workers: the check joins them as training will.
  assert ('env LASER_JAX_DISTRIBUTED=1 "$HOME"/laser_jax_venv/bin/python -P -m laser_jax.train '
          '--config=configs/tiny_cpu.py --dry_run' in script)


def test_setup_wheel_dry_run_and_bad_input(capsys, tmp_path):
  wheel = tmp_path / "laser_jax-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"")
  rc, lines, _ = call_main(capsys, "setup", *FULL, "--wheel", str(wheel), "--config",
                           "configs/tpu_v4.py", "--install-args=--index-url=https://m/simple",
                           "--dry-run")
  assert rc == 0 and [l[:6] for l in lines] == [SSH[:6], ["gcloud", "compute", "tpus", "tpu-vm",
                                                          "scp", "--recurse"], SSH[:6]]
  assert "mkdir -p laser_jax" in remote_command(lines[0])  # scp's target directory.
  assert lines[1][6:] == [str(wheel), str(ROOT / "configs"), "laser:laser_jax/", *SCOPE,
                          "--worker=all"]
  assert ("uv pip install --python laser_jax_venv/bin/python --index-url=https://m/simple "
          "'./laser_jax/laser_jax-0.1.0-py3-none-any.whl[tpu]' ;") in remote_command(lines[2])
  assert "--config=configs/tpu_v4.py --dry_run" in remote_command(lines[2])
  for extra, needle in [(["--wheel", str(tmp_path / "x.whl")], "x.whl: no such file"),
                        (["--wheel", __file__], "not a laser_jax wheel"),
                        (["--repo-url", "u", "--config", "configs/nope.py"],
                         "--config configs/nope.py: not a config file")]:
    rc, lines, err = call_main(capsys, "setup", *FULL, *extra, "--dry-run")
    assert rc == 2 and lines == [] and needle in err, err


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
  # The venv `setup` makes ($HOME-relative: the script runs from ~/laser_jax).
  assert words[i + 1:i + 8] == ["$HOME/laser_jax_venv/bin/python", "-m", "laser_jax.train",
                                "--config=configs/tpu_v4.py",
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


def test_run_dry_run(capsys):
  rc, lines, _ = call_main(capsys, "run", *FULL, "--worker", "all", "--dry-run", "--", "python",
                           "-m", "laser_jax.evaluate", "--config.eval.output_file=/tmp/a b.jsonl")
  assert rc == 0 and lines[0][:-1] == [*SSH, "--worker=all"]
  assert shlex.split(remote_command(lines[0])) == [
      "cd", "$HOME/laser_jax", ";", "export", "PATH=$HOME/laser_jax_venv/bin:$PATH", ";",
      "python", "-m", "laser_jax.evaluate", "--config.eval.output_file=/tmp/a b.jsonl"]
  for extra, needle in [(["--dry-run"], "give the command after --"),
                        (["--worker", "8", "--dry-run", "--", "ls"], "v4-64 has workers 0..7 (or all)")]:
    rc, lines, err = call_main(capsys, "run", *FULL, *extra)
    assert rc == 2 and lines == [] and needle in err, err


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


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
  """This working tree as a user would ship it: a git repository tagged `v-test`, its
  `git archive` tarball and a wheel built from it (no network: this interpreter's setuptools)."""
  root = tmp_path_factory.mktemp("source")
  src = root / "laser_jax_src"
  files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
  for name in filter(None, files):
    if (ROOT / name).is_file():  # Deleted but not yet staged files are listed too.
      (src / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, src / name)
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(src)]
  for args in (["init", "--quiet"], ["add", "-A"], ["commit", "--quiet", "-m", "test"],
               ["tag", "v-test"], ["archive", "--format=tar.gz", "-o", str(root / "src.tar.gz"),
                                   "HEAD"]):
    subprocess.run(git + args, check=True, timeout=60)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
                  "--no-build-isolation", "-w", str(root / "dist"), str(src)], check=True,
                 timeout=120, capture_output=True)
  [wheel] = (root / "dist").glob("laser_jax-*.whl")
  return {"git": f"file://{src}", "tarball": root / "src.tar.gz", "wheel": wheel}


def _local_worker(tmp_path):
  """Environment whose `gcloud` runs `tpu-vm ssh --command=...` under bash in $HOME and
  `tpu-vm scp` as a copy into $HOME (scp's rules), so this machine plays the one worker of a
  v4-8. The venv setup creates sees this interpreter's packages through a .pth file (no index
  here: the install runs --offline --no-deps); setup's own `uv venv` keeps that file."""
  home, bindir = tmp_path / "home", tmp_path / "localbin"
  bindir.mkdir()
  gcloud = bindir / "gcloud"
  gcloud.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import os, shutil, subprocess, sys
      a, home = sys.argv[1:], os.environ["HOME"]
      if a[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
        [script] = [x[len("--command="):] for x in a if x.startswith("--command=")]
        sys.exit(subprocess.call(["bash", "-c", script], cwd=home))
      assert a[:4] == ["compute", "tpus", "tpu-vm", "scp"], a
      *sources, dest = [x for x in a[4:] if not x.startswith("--")]
      dest = os.path.join(home, dest.split(":", 1)[1])
      for src in sources:
        if os.path.isdir(src) and "--recurse" not in a:
          sys.exit(f"scp: {{src}}: not a regular file")
        if dest.endswith("/") and not os.path.isdir(dest):
          sys.exit(f"scp: {{dest}}: No such file or directory")
        target = os.path.join(dest, os.path.basename(src)) if os.path.isdir(dest) else dest
        if os.path.isdir(src):
          shutil.copytree(src, target, dirs_exist_ok=True)
        else:
          shutil.copy(src, target)
      """))
  gcloud.chmod(0o755)
  import uv  # pylint: disable=import-outside-toplevel  # the test extra's uv, as on a worker
  (bindir / "uv").symlink_to(uv.find_uv_bin())
  version = f"python{sys.version_info.major}.{sys.version_info.minor}"
  site = home / tpu.VENV / "lib" / version / "site-packages"
  site.mkdir(parents=True)
  (site / "installed_here.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  return {"HOME": str(home), "PATH": f"{bindir}:/usr/bin:/bin", "JAX_PLATFORMS": "cpu",
          "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}


@pytest.mark.parametrize("source", ["wheel", "git", "tarball"])
def test_setup_script_runs_on_a_local_worker(tmp_path, source_tree, source):
  """setup, run as written against a local 'worker': uv's venv with this interpreter's Python,
  the install (the wheel; a git tag or the source tarball, editable), the trainer's --dry_run
  check; then `run` uses the venv's python. A broken install or check line fails here, not on a
  slice."""
  env = _local_worker(tmp_path)
  home = pathlib.Path(env["HOME"])
  source_args = ({"wheel": ["--wheel", str(source_tree["wheel"])],
                  "git": ["--repo-url", source_tree["git"], "--ref", "v-test"],
                  "tarball": ["--tarball", str(source_tree["tarball"])]}[source])
  res = cli("setup", *FULL[:-1], "v4-8", *source_args, "--python", sys._base_executable,
            "--install-args=--offline --no-deps --no-build-isolation", env=env)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  # The check's report: the resolved config, the devices, the verdict.
  report = (home / tpu.CHECK_OUTPUT).read_text()
  assert json.loads(report[:report.rindex("}") + 1])["workdir"] == "/tmp/laser_jax/tiny_cpu"
  assert "dry run: config valid" in res.stdout and "(cpu) in 1 process(es)" in res.stdout
  # The package comes from the install: the venv's site-packages, or the checkout (editable).
  where = subprocess.run([str(home / tpu.VENV / "bin" / "python"), "-P", "-c",
                          "import laser_jax, sys; print(laser_jax.__file__, sys.version_info[:2])"],
                         cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **env})
  expected = home / (f"{tpu.VENV}/lib" if source == "wheel" else "laser_jax/laser_jax")
  assert where.stdout.startswith(str(expected)), where.stdout + where.stderr
  assert where.stdout.split(" ", 1)[1].strip() == str(tuple(sys.version_info[:2]))
  if source != "wheel":
    assert (home / "laser_jax" / ".git").is_dir() == (source == "git")
  else:  # The wheel carries the package; the configs come from this checkout.
    assert (home / "laser_jax" / "configs" / "tpu_v4.py").is_file()
  # `run` (evaluate, export, ...) uses the venv's python in the remote directory.
  res = cli("run", "--name", "laser", "--", "python", "-c",
            "import os, sys; print(sys.prefix, os.getcwd())", env=env)
  assert res.returncode == 0, res.stderr
  assert res.stdout.split() == [str(home / tpu.VENV), str(home / "laser_jax")]


def test_setup_script_failures_stop_the_setup(tmp_path, source_tree):
  """A config the check rejects fails setup (exit 1 from gcloud), as a missing ref does."""
  env = _local_worker(tmp_path)
  res = cli("setup", *FULL[:-1], "v4-8", "--repo-url", source_tree["git"], "--ref", "no-such-tag",
            "--python", sys._base_executable, env=env)
  assert res.returncode == 1 and "gcloud exited with status" in res.stderr
  assert not (pathlib.Path(env["HOME"]) / tpu.CHECK_OUTPUT).exists()


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
  assert [c[2] for c in commands] == ["create", "setup", "setup", "setup", "train", "logs", "logs",
                                      "status", "resume", "stop", "delete",
                                      "create", "setup", "run", "run", "run", "delete"]
  (tmp_path / "laser_jax.tar.gz").write_bytes(b"")  # What the README's `git archive` makes.
  (tmp_path / "dist").mkdir()  # ... and its `pip wheel`.
  (tmp_path / "dist" / "laser_jax-0.1.0-py3-none-any.whl").write_bytes(b"")
  for argv in commands:
    extra = ["--poll-s", "0"] if argv[2] == "create" else []
    res = subprocess.run([sys.executable, str(SCRIPT), *argv[2:], *extra], capture_output=True,
                         text=True, env={**os.environ, **env}, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, (argv, res.stderr)
    made = calls()
    assert made and all(c[:3] == ["gcloud", "compute", "tpus"] for c in made), (argv, made)
    assert all("--zone=us-central2-b" in c and "--project=my-project" in c for c in made)
  assert not list((tmp_path / "state").glob("*.json"))  # Both slices forgotten by delete.
