"""Every notebook runs top to bottom in smoke mode, and every committed notebook is stripped.

Smoke mode (LASER_JAX_SMOKE=1) makes each notebook use a tiny random model on the synthetic task,
on CPU, with no network; the notebooks' last cells assert on what they computed (logged steps,
curve lengths and ranges, in-loop self-reward scores vs a separate forward pass).

The kernel is pinned to this interpreter: a kernelspec written to a temporary JUPYTER_PATH runs
`sys.executable -m ipykernel_launcher`, so a fresh CI venv needs nothing but `pip install -e '.[test]'`.
"""
import glob
import json
import os
import sys
import time

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from laser_jax import notebook_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
KERNEL_NAME = "laser_jax_test_python"
SMOKE_TIMEOUT_S = 600  # per cell; the whole smoke run of one notebook is ~30-60 s on 2 CPU cores


def test_notebooks_exist():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"laser_quickstart.ipynb", "test_time_scaling.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stripped(path):
  """Committed notebooks carry no outputs and no execution counts."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type != "code":
      continue
    assert cell.outputs == [], f"{os.path.basename(path)} cell {i}: has outputs; clear them before committing"
    assert cell.execution_count is None, (
        f"{os.path.basename(path)} cell {i}: execution_count {cell.execution_count}, expected None")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_has_smoke_parameter_cell(path):
  """The first code cell is the parameters cell and reads the smoke switch."""
  nb = nbformat.read(path, as_version=4)
  first = next(c for c in nb.cells if c.cell_type == "code")
  assert first.source.startswith("# Parameters"), first.source[:80]
  assert 'SMOKE = os.environ.get("LASER_JAX_SMOKE") == "1"' in first.source


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """(env for the kernel, JUPYTER_PATH holding a kernelspec that runs this interpreter)."""
  root = tmp_path_factory.mktemp("jupyter")
  spec_dir = root / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "laser_jax tests", "language": "python"}))
  env = dict(os.environ)
  # conftest's 8 fake devices are for the unit tests; a notebook sees the plain single CPU device.
  env.pop("XLA_FLAGS", None)
  env.update(LASER_JAX_SMOKE="1", JAX_PLATFORMS="cpu", MPLBACKEND="Agg", HF_HUB_OFFLINE="1",
             JUPYTER_PATH=str(root), PYTHONPATH=os.pathsep.join(
                 [REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
  return env, str(root)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_smoke_mode(path, kernel_env, monkeypatch):
  env, jupyter_path = kernel_env
  monkeypatch.setenv("JUPYTER_PATH", jupyter_path)  # where the kernel manager finds KERNEL_NAME
  nb = nbformat.read(path, as_version=4)
  # Appended probe: which interpreter ran the notebook, and were we really in smoke mode.
  nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable, SMOKE)"))
  client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=SMOKE_TIMEOUT_S,
                          resources={"metadata": {"path": NOTEBOOK_DIR}})
  t0 = time.perf_counter()
  client.execute(env=env)  # raises CellExecutionError with the cell and traceback on any failure
  elapsed = time.perf_counter() - t0
  stdout = lambda cell: "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")
  probe = stdout(nb.cells[-1]).split()
  assert probe == [sys.executable, "True"], probe
  last_checks = stdout(nb.cells[-2])
  assert last_checks.startswith("OK:"), last_checks
  print(f"{os.path.basename(path)}: {elapsed:.1f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_installs_from_one_marked_line(path):
  """A fresh Colab runtime installs laser_jax from the git URL on the one line the notebook marks
  for editing (the placeholder stops it with a clear message); a checkout skips the install."""
  nb = nbformat.read(path, as_version=4)
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  marked = [(i, line) for i, src in enumerate(code) for line in src.splitlines() if "EDIT THIS ONE LINE" in line]
  assert len(marked) == 1, marked
  cell = code[marked[0][0]].splitlines()
  assert cell[cell.index(marked[0][1]) + 1] == 'REPO_URL = "https://github.com/YOUR_ORG/laser_jax.git"'
  assert sum(line.startswith("REPO_URL =") for src in code for line in src.splitlines()) == 1
  install = code[marked[0][0]]
  assert '"git", "clone", "--depth=1", REPO_URL' in install and '"pip", "install"' in install
  assert 'if "YOUR_ORG" in REPO_URL:' in install


def test_readme_links_each_notebook_with_an_open_in_colab_badge():
  readme = open(os.path.join(REPO, "README.md")).read()
  colab = readme[readme.index("## Colab"):]
  colab = colab[:colab.index("\n## ", 1)]
  for path in NOTEBOOKS:
    rel = os.path.relpath(path, REPO)
    assert f"[`{rel}`]({rel})" in colab
    assert (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/YOUR_ORG/laser_jax/blob/main/{rel})") in colab


def test_device_numerics_for_colab_runtimes():
  import types
  t4 = types.SimpleNamespace(platform="gpu", device_kind="Tesla T4", compute_capability="7.5")
  a100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA A100-SXM4-40GB", compute_capability="8.0")
  tpu = types.SimpleNamespace(platform="tpu", device_kind="TPU v2")
  assert notebook_utils.device_numerics(t4) == {"device": "Tesla T4", "dtype": "float32", "attention": "chunked"}
  assert notebook_utils.device_numerics(a100)["dtype"] == "bfloat16"
  assert notebook_utils.device_numerics(a100)["attention"] == "cudnn"
  assert notebook_utils.device_numerics(tpu) == {"device": "TPU v2", "dtype": "bfloat16", "attention": "splash"}
  assert notebook_utils.device_numerics()["dtype"] == "float32"  # this process: the CPU


# ---- notebook_utils on hand-worked inputs ------------------------------------------------------


def test_metric_series_skips_missing_and_maps_null_to_nan():
  records = [{"step": 0, "eval/reward/mean": 0.5}, {"step": 1, "rollout/reward/mean": 0.25, "self_verification/f1_finished": None},
             {"step": 2, "rollout/reward/mean": 0.75, "self_verification/f1_finished": 0.4}]
  steps, values = notebook_utils.metric_series(records, "rollout/reward/mean")
  assert steps.tolist() == [1, 2] and values.tolist() == [0.25, 0.75]
  steps, values = notebook_utils.metric_series(records, "self_verification/f1_finished")
  assert steps.tolist() == [1, 2] and np.isnan(values[0]) and values[1] == 0.4


def test_scaling_curves_orders_k_and_rejects_gaps():
  metrics = {"mean@n": 0.3, "maj@2": 0.5, "maj@1": 0.3, "best@1": 0.3, "best@2": 0.6,
             "self_weighted_maj@2": 0.55, "self_weighted_maj@1": 0.3, "self_verification/f1": 0.7}
  ks, curves = notebook_utils.scaling_curves(metrics)
  assert ks == [1, 2]
  assert curves == {"maj": [0.3, 0.5], "self_weighted_maj": [0.3, 0.55], "best": [0.3, 0.6]}
  del metrics["best@2"]
  with pytest.raises(ValueError, match=r"no best@k for k in \[2\]"):
    notebook_utils.scaling_curves(metrics)


def test_canonical_answer():
  assert notebook_utils.canonical_answer("so \\boxed{1 / 2} and \\boxed{ \\frac{1}{2} }") == "\\frac{1}{2}"
  assert notebook_utils.canonical_answer("no box here") is None


def test_plots_build_with_agg(monkeypatch):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig = notebook_utils.plot_training([{"step": 1, "rollout/reward/mean": 0.5, "self_verification/f1_finished": None},
                                      {"step": 2, "rollout/reward/mean": 0.7, "self_verification/f1_finished": 0.6}])
  assert [ax.get_title() for ax in fig.axes] == ["rollout/reward/mean", "self_verification/f1_finished"]
  line = fig.axes[0].get_lines()[0]
  assert line.get_xdata().tolist() == [1, 2] and line.get_ydata().tolist() == [0.5, 0.7]
  plt.close(fig)
  fig = notebook_utils.plot_scaling({"maj@1": 0.2, "maj@2": 0.3, "self_weighted_maj@1": 0.2,
                                     "self_weighted_maj@2": 0.4, "best@1": 0.2, "best@2": 0.35})
  labels = [l.get_label() for l in fig.axes[0].get_lines()]
  assert labels == [notebook_utils.METHOD_LABELS[m] for m in notebook_utils.SCALING_METHODS]
  plt.close(fig)
  with pytest.raises(ValueError, match="none of the requested metrics"):
    notebook_utils.plot_training([{"step": 1, "loss": 0.1}])


# ---- the full (non-smoke) path, offline: a tiny HF checkpoint stands in for Qwen2.5 -------------

# Injected after each notebook's parameters cell (quick start: also after its config cell), as a
# user would edit them; the HF checkpoint and data are local files, so nothing is downloaded.
FULL_PATH_PARAMS = {
    "laser_quickstart.ipynb": "NUM_STEPS = 2\nNUM_SAMPLES = 4\nMODEL_DIR = {ckpt!r}\nTRAIN_FILE = {train!r}\n"
                              "WORK = {work!r}",
    "test_time_scaling.ipynb": "MODEL_DIR = {ckpt!r}\nNUM_PROBLEMS = 3\nN = 4\nMAX_NEW_TOKENS = 16\n"
                               "PROBLEMS_PER_CALL = 2\nZC_TOKEN_ID = {zc}\nC_REF = -6.0\nWORK = {work!r}",
}
# colab_small's sizes are for a GPU; shrink them for CPU (the rest of colab_small is kept: bf16,
# remat, logprob chunking, recomputed old log-probs, the math verifier with worker processes).
QUICKSTART_CONFIG_OVERRIDES = (
    "config.batch_size, config.micro_batch_size, config.rollout.n = 2, 8, 4\n"
    "config.rollout.max_new_tokens = config.eval.max_new_tokens = 16\n"
    "config.data.eval_size, config.eval_every = 2, 2\n"
    "config.laser.self_reward_token_id = {zc}\n"
    "config.workdir = {workdir!r}")
MATH_PROBLEMS = [{"problem": "What is 2 + 3?", "answer": "5"},
                 {"problem": "Compute 4 * 6.", "answer": "24"},
                 {"problem": "What is 7 + 8?", "answer": "15"},
                 {"problem": "Let x^2 = 4 with x > 0. Find x.", "answer": "2"}]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL_PATH_PARAMS))
def test_notebook_full_path_offline(name, kernel_env, monkeypatch, tmp_path):
  import hf_fixtures
  env, jupyter_path = kernel_env
  monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
  ckpt = hf_fixtures.make_tiny_hf_checkpoint(str(tmp_path / "ckpt"), "qwen2")
  data_dir = tmp_path / "data"
  (data_dir / "math500").mkdir(parents=True)
  lines = "".join(json.dumps(r) + "\n" for r in MATH_PROBLEMS)
  (data_dir / "math500" / "test.jsonl").write_text(lines)
  (tmp_path / "train.jsonl").write_text(lines)
  env = {k: v for k, v in env.items() if k != "LASER_JAX_SMOKE"}
  env["LASER_JAX_DATA_DIR"] = str(data_dir)
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  params_at = next(i for i, c in enumerate(nb.cells) if c.source.startswith("# Parameters"))
  fill = dict(ckpt=ckpt, train=str(tmp_path / "train.jsonl"), work=str(tmp_path / "work"),
              zc=hf_fixtures.ZC_ID, workdir=str(tmp_path / "run"))
  nb.cells.insert(params_at + 1, nbformat.v4.new_code_cell(FULL_PATH_PARAMS[name].format(**fill)))
  if name == "laser_quickstart.ipynb":
    config_at = next(i for i, c in enumerate(nb.cells) if 'load_config("colab_small")' in c.source)
    nb.cells.insert(config_at + 1, nbformat.v4.new_code_cell(QUICKSTART_CONFIG_OVERRIDES.format(**fill)))
  nb.cells.append(nbformat.v4.new_code_cell("print(SMOKE, model_dir)"))
  client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=SMOKE_TIMEOUT_S,
                          resources={"metadata": {"path": NOTEBOOK_DIR}})
  client.execute(env=env)
  stdout = lambda cell: "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")
  assert stdout(nb.cells[-1]).split() == ["False", ckpt]
  assert stdout(nb.cells[-2]).startswith("OK:"), stdout(nb.cells[-2])
  assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.parquet"))
