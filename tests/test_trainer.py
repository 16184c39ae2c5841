"""End-to-end trainer tests on a very small model and the synthetic task."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from laser_jax import config_check, default_config
from laser_jax.rl import objective
from laser_jax.training import metrics_writer, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {"perf/step_time_s", "perf/rollout_time_s", "perf/update_time_s", "perf/tokens_per_s", "perf/mfu"}


def tiny_config(workdir, **overrides):
  c = default_config.get_config()
  c.workdir = str(workdir)
  c.total_steps = 2
  c.checkpoint_every = 1
  c.eval_every = 2
  c.async_checkpointing = False
  c.batch_size = 4
  c.micro_batch_size = 8
  c.rollout.n = 4
  c.rollout.max_new_tokens = 12
  c.eval.max_new_tokens = 12
  c.data.synthetic_train_size = 64
  c.data.synthetic_eval_size = 8
  c.data.eval_size = 8
  c.model.hidden_size = 32
  c.model.intermediate_size = 64
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.head_dim = 16
  c.laser.ref_constant = -4.0  # Random tiny model: log pi(z_c) ~ -log(V); keeps scores near [0, 1].
  c.laser.kl_coef, c.laser.loss_coef = 0.1, 0.1  # the paper's beta_v and alpha (the pinned step's)
  c.laser.self_rewarding_warmup_steps = 1  # Integration on from step 2.
  c.sft.steps = 0  # No supervised warm start: seconds matter here.
  return default_config.apply_overrides(c, overrides)


def _steps(records):
  return [r for r in records if "actor/loss" in r]


# One seeded step's metrics, every key and value (nanodo's train_test): a metric renamed, lost or
# changed in value fails here. The step (`golden_config`) is one where every pinned value can move:
# most responses finish, both classes are present, the update is partly off-policy.
# Re-pin only for an intended change of the step, and say so in the commit.
GOLDEN_STEP_1 = {
    "actor/approx_kl": 0.010823067277669907, "actor/pg_clipfrac": 0.048192769289016724,
    "actor/pg_clipfrac_eps_high": 0.012048192322254181, "actor/pg_clipfrac_eps_low": 0.03614457696676254,
    "actor/pg_clipfrac_lower": 0.0, "actor/grad_norm": 1.468973159790039, "actor/kl_loss": 0.015404186211526394,
    "actor/loss": 0.1916363388299942, "actor/lr": 0.003, "actor/pg_loss": 0.15918461978435516,
    "actor/self_reward_loss": 0.3320125341415405, "actor/self_reward_loss_on": 1.0,
    "actor/skipped_updates": 0, "advantage/abs_mean": 0.591505229473114, "advantage/integration_on": 1.0,
    "advantage/self_differs_frac": 0.0,
    "advantage/verifier_abs_mean": 0.591505229473114, "rollout/response_length/max": 31.0,
    "rollout/response_length/mean": 15.5625, "rollout/reward/mean": 0.375, "rollout/truncated_frac": 0.0,
    "rollout/verifier_timeouts": 0, "rollout/zero_std_group_frac": 0.25,
    "self_verification/acc_finished": 0.25, "self_verification/acc_correct_finished": 0.5,
    "self_verification/acc_incorrect_finished": 0.1,
    "self_verification/auroc_finished": 0.11666666666666667,
    "self_verification/ece_finished": 0.33916272521018986, "self_verification/f1_finished": 0.16666666666666669,
    "self_verification/num_correct_finished": 6, "self_verification/num_incorrect_finished": 10,
    "self_verification/num_unscored": 0, "self_verification/score/mean": 0.5819055259227753, "step": 1,
}


def golden_config(workdir):
  """The pinned step: a short supervised warm start so that the responses end in EOS (16 of 16),
  parity rewards so that both classes are present (6 right, 10 wrong) and scores straddle the 0.5
  threshold; two optimizer updates per step so that the second is off-policy (approx KL and the
  clip fractions move); advantage integration and the k3 KL loss on from step 1."""
  return tiny_config(workdir, total_steps=1, eval_every=0, **{
      "reward.fn": "multihost_helpers:parity_reward", "reward.num_workers": 0,
      "sft.steps": 120, "sft.batch_size": 16, "mini_batch_size": 2, "optim.lr": 3e-3,
      "rollout.max_new_tokens": 32, "laser.ref_constant": -10.0, "laser.kl_coef": 0.2,
      "laser.self_rewarding_warmup_steps": 0, "loss.kl_loss_coef": 0.05})


def test_golden_metrics_of_one_seeded_step(tmp_path):
  (record,) = trainer.train(golden_config(tmp_path), progress=False)
  got = {k: v for k, v in record.items() if k not in TIMING_KEYS}
  assert sorted(got) == sorted(GOLDEN_STEP_1)
  for key, want in GOLDEN_STEP_1.items():
    if want is None:  # an empty class: NaN, written as null
      assert got[key] is None, key
      continue
    # approx_kl is float noise around 0 (on-policy): pinned by the absolute tolerance.
    np.testing.assert_allclose(got[key], want, rtol=1e-4, atol=1e-6, err_msg=key)


def test_two_step_run_writes_metrics_and_checkpoints(tmp_path, monkeypatch):
  # Also a samples table every step, a profile of step 2 and W&B (offline): checked at the end.
  monkeypatch.setenv("WANDB_SILENT", "true")
  records = trainer.train(tiny_config(tmp_path / "run", mfu_peak_flops=1e12, **{
      "logging.samples_every": 1, "logging.num_samples": 3, "profile.steps": (2,),
      "wandb.project": "laser-test", "wandb.mode": "offline"}), progress=False)
  steps = _steps(records)
  assert all(0 < r["perf/mfu"] < 1 for r in steps)
  assert [r["step"] for r in steps] == [1, 2]
  required = {"step", "actor/loss", "actor/pg_loss", "actor/self_reward_loss", "actor/kl_loss", "rollout/reward/mean",
              "self_verification/acc_correct_finished", "self_verification/acc_incorrect_finished",
              "self_verification/f1_finished", "rollout/response_length/mean", "rollout/truncated_frac",
              "perf/step_time_s", "perf/tokens_per_s"}
  for r in steps:
    assert required <= set(r), required - set(r)
    assert np.isfinite(r["actor/loss"]) and r["actor/self_reward_loss"] > 0
  assert "eval/reward/mean" in records[0] and records[0]["step"] == 0
  assert "eval/self_verification/f1_finished" in steps[-1]
  on_disk = metrics_writer.read_metrics(str(tmp_path / "run"))
  assert [r["step"] for r in on_disk] == [0, 1, 2]
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2"]
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "run" / "tensorboard"))
  _check_samples_profile_and_wandb(tmp_path / "run", records)
  # The README's table of metric names is every name the run recorded, and no other; and the
  # periodic eval's `eval/X` is the evaluator summary's X (its README table is checked against a
  # real summary by tests/test_evaluate.py): one name per quantity.
  names = {k for r in records for k in r} - {"step"}
  assert readme_metric_names() == names
  eval_keys = {k[len("eval/"):] for k in names if k.startswith("eval/")}
  assert eval_keys and eval_keys <= readme_metric_names("eval-summary-names"), \
      eval_keys - readme_metric_names("eval-summary-names")


def readme_metric_names(marker: str = "metric-names") -> set[str]:
  """The names in the first column of a README table (between its `marker` comments)."""
  import re
  text = open(os.path.join(REPO, "README.md")).read()
  table = text[text.index(f"<!-- {marker}:start -->"):text.index(f"<!-- {marker}:end -->")]
  return {name for row in table.splitlines()[3:] for name in re.findall(r"`([^`]+)`", row.split(" | ")[0])}


def _check_samples_profile_and_wandb(workdir, records):
  import glob
  import re
  from test_metrics_writer import _events, _scalars, _wandb_history
  samples = metrics_writer.read_samples(str(workdir))
  assert [r["step"] for r in samples] == [1, 1, 1, 2, 2, 2]
  for step in (1, 2):
    rows = [r for r in samples if r["step"] == step]
    assert len({r["prompt"] for r in rows}) == 1  # the first responses: one prompt's group
    a, op, b = re.fullmatch(r"What is (\d+)([-+*])(\d+)\?", rows[0]["prompt"]).groups()
    assert rows[0]["answer"] == str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    for r in rows:
      boxed = [b.strip() for b in re.findall(r"\\boxed\{([^{}]*)\}", r["response"])]
      right = bool(boxed) and re.fullmatch(r"-?\d+", boxed[-1]) and int(boxed[-1]) == int(r["answer"])
      assert r["reward"] == float(bool(right)), r
      assert (r["score"] is None) == (not r["finished"])  # no EOS, no score
  events = [e for f in (workdir / "tensorboard").iterdir() for e in _events(f.read_bytes())]
  assert sorted(e.step for e in events for v in e.summary.value if v.tag == "samples/text_summary") == [1, 2]
  # W&B (an offline run in the workdir): per step, exactly TensorBoard's scalars.
  history = _wandb_history(workdir, (workdir / "wandb_run_id").read_text())
  assert sorted(history) == [0, 1, 2] and all("samples" in history[s] for s in (1, 2))
  tb = _scalars(workdir / "tensorboard")
  for step, values in history.items():
    values.pop("samples", None)
    # (TensorBoard keeps float32, W&B the float.)
    assert values == pytest.approx({k: v for k, points in tb.items() for s, v in points if s == step}, rel=1e-6), step
  assert set(history[2]) == {k for k, v in records[-1].items() if k != "step" and v is not None}
  # The jax.profiler trace of step 2.
  assert glob.glob(f"{workdir}/profile/plugins/profile/*/*.xplane.pb")


def _comparable(records):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in _steps(records)]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
  """The metric records of a 4-step run that nothing interrupted (the resume tests' reference)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return trainer.train(tiny_config(workdir, total_steps=4, eval_every=0), progress=False)


def _assert_same_steps(a, b):
  a, b = _comparable(a), _comparable(b)
  assert len(a) == len(b) == 4
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for k in ra:
      if ra[k] is None or rb[k] is None:
        assert ra[k] == rb[k], k
      else:
        np.testing.assert_allclose(rb[k], ra[k], rtol=1e-6, atol=1e-6, err_msg=f"step {ra['step']} {k}")


def test_resume_reproduces_uninterrupted_run(tmp_path, uninterrupted_run):
  cfg = tiny_config(tmp_path / "cut", total_steps=4, eval_every=0)
  first = trainer.train(cfg, max_steps=2, progress=False)
  assert [r["step"] for r in _steps(first)] == [1, 2]
  second = trainer.train(cfg, progress=False)
  assert [r["step"] for r in _steps(second)] == [3, 4]
  _assert_same_steps(uninterrupted_run, first + second)


def test_run_killed_and_resumed_on_a_store_that_cannot_append_keeps_its_whole_history(
    tmp_path, monkeypatch, uninterrupted_run):
  """gs:// is an object store here that refuses append and shows a file only once its writer
  closes it (test_metrics_writer.object_store). Orbax reaches gs:// through tensorstore's own
  GCS driver, not fsspec, so the checkpoints go to a local directory instead."""
  import tempfile
  from test_metrics_writer import _events, _scalars_of, object_store
  from laser_jax.training import checkpoint as ckpt_lib
  real_checkpointer = ckpt_lib.Checkpointer
  monkeypatch.setattr(ckpt_lib, "Checkpointer", lambda workdir, **kw: real_checkpointer(str(tmp_path), **kw))
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the local events of the run that "dies"
  workdir = "gs://bucket/run"
  overrides = dict(total_steps=4, eval_every=0, checkpoint_every=2, **{"logging.remote_flush_every": 100})
  with object_store(monkeypatch) as store:
    with monkeypatch.context() as killed:
      # The process dies after step 3: the writer never closes, so what it held since the
      # checkpoint of step 2 (step 3) is lost, as on a preempted VM.
      killed.setattr(metrics_writer.MetricsWriter, "close", lambda self: None)
      trainer.train(tiny_config(workdir, **overrides), max_steps=3, progress=False)
    assert [r["step"] for r in metrics_writer.read_metrics(workdir)] == [1, 2]
    trainer.train(tiny_config(workdir, log_every=2, **overrides), progress=False)  # resumes at step 3
    history = metrics_writer.read_metrics(workdir)
    # Each step exactly once, with the uninterrupted run's values.
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    _assert_same_steps(uninterrupted_run, history)
    # Both (re)starts' configs are kept; config.json is the latest.
    config = lambda name: json.loads(store[f"/bucket/run/{name}"].getvalue())
    assert config("configs/config.step_0.json")["log_every"] == 1
    assert config("configs/config.step_2.json")["log_every"] == config("config.json")["log_every"] == 2
    # TensorBoard: the killed run's events up to its checkpoint, the resumed run's from step 3
    # (its first events file purges the steps it redoes).
    files = {k: v.getvalue() for k, v in store.items() if k.startswith("/bucket/run/tensorboard/")}
    points = sorted(s for data in files.values() for s, _ in _scalars_of(data).get("actor/loss", []))
    assert points == [1, 2, 3, 4]
    assert sorted(e.step for data in files.values() for e in _events(data) if e.session_log.status == 1) == [0, 3]


def _one_step(cfg, devices=None):
  t = trainer.Trainer(cfg, devices=devices)
  state = t.init_state(t.initial_params())
  prompts = next(t.task.train_iterator())
  state, metrics = t.train_step(state, prompts)
  return t, jax.device_get(state.params), metrics


def test_sharded_step_matches_single_device(tmp_path):
  cfg1 = tiny_config(tmp_path / "a", micro_batch_size=16)
  _, params1, m1 = _one_step(cfg1, devices=jax.devices()[:1])
  cfg8 = tiny_config(tmp_path / "b", micro_batch_size=16)
  cfg8.mesh.data, cfg8.mesh.fsdp, cfg8.mesh.tensor = 2, 2, 2
  _, params8, m8 = _one_step(cfg8, devices=jax.devices()[:8])
  for k in ("actor/loss", "actor/pg_loss", "actor/self_reward_loss", "rollout/reward/mean",
            "rollout/response_length/mean"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params8, params1)


def test_laser_with_zero_alpha_equals_grpo_step(tmp_path):
  # Warm-up keeps integration off, so the only difference would be alpha * L_sr.
  laser = tiny_config(tmp_path / "l", **{"laser.loss_coef": 0.0, "laser.self_rewarding_warmup_steps": 5})
  grpo = tiny_config(tmp_path / "g", **{"laser.use_self_reward_loss": False})
  _, p_laser, m_laser = _one_step(laser)
  _, p_grpo, m_grpo = _one_step(grpo)
  assert m_laser["actor/self_reward_loss"] > 0  # The term is computed, but weighted by alpha = 0.
  np.testing.assert_allclose(m_laser["actor/loss"], m_grpo["actor/loss"], rtol=1e-6, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p_laser, p_grpo)
  # And alpha > 0 really changes the update.
  _, p_on, _ = _one_step(tiny_config(tmp_path / "on", **{"laser.self_rewarding_warmup_steps": 5}))
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p_on, p_grpo))
  assert max(diffs) > 1e-6


@pytest.mark.parametrize("key,value,message", [
    ("micro_batch_size", 5, "config.micro_batch_size"),
    ("rollout.n", 1, "config.rollout.n"),
    ("mesh.tensor", 3, "config.mesh"),
    ("loss.agg_mode", "bogus", "config.loss.agg_mode"),
    ("laser.adv_integration_coef", 1.5, "config.laser.adv_integration_coef"),
    ("sft.steps", -1, "config.sft.steps"),
    ("rollout.decode_segments", 0, "config.rollout.decode_segments"),
    ("eval.temperature", -1.0, "config.eval.temperature"),
])
def test_bad_config_values_name_the_key(tmp_path, key, value, message):
  cfg = tiny_config(tmp_path, **{key: value})
  with pytest.raises(config_check.ConfigError, match=message.replace(".", r"\.")):
    config_check.validate(cfg, num_devices=8)


def test_temperature_zero_is_greedy_in_rollout_and_eval(tmp_path):
  from laser_jax.training import programs
  cfg = tiny_config(tmp_path, **{"rollout.temperature": 0.0, "eval.temperature": 0.0})
  config_check.validate(cfg, num_devices=8)
  rollout, evaluation = programs.sampling_params(cfg, eos_ids=(1,), pad_id=0, self_reward_token_id=2)
  assert rollout.greedy and evaluation.greedy
  # Recomputed log-probs are the sampler's: temperature 1 under greedy decoding.
  assert programs.StepStatics.from_config(cfg, None, 2).temperature == rollout.logprob_temperature == 1.0


def test_warm_start_needs_the_synthetic_task(tmp_path):
  cfg = tiny_config(tmp_path, **{"sft.steps": 10, "data.task": "files", "data.train_files": "x.jsonl"})
  with pytest.raises(config_check.ConfigError, match=r"config\.sft\.steps: the supervised warm start"):
    config_check.validate(cfg, num_devices=8)


def _cli(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.Popen([sys.executable, "-m", "laser_jax.train", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_cli_rejects_unknown_key_and_bad_value(tmp_path):
  out, _ = _cli(["--config=configs/tiny_cpu.py", "--config.laser.los_coef=0.2"]).communicate(timeout=120)
  assert "los_coef" in out
  proc = _cli(["--config=configs/tiny_cpu.py", f"--config.workdir={tmp_path}", "--config.rollout.n=1"])
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert "config.rollout.n: GRPO needs at least 2 responses" in out


SMALL_FLAGS = ["--config.batch_size=4", "--config.micro_batch_size=8", "--config.rollout.n=4",
               "--config.rollout.max_new_tokens=12", "--config.model.hidden_size=32",
               "--config.model.intermediate_size=64", "--config.model.num_layers=1",
               "--config.model.head_dim=16", "--config.data.synthetic_train_size=64",
               "--config.eval_every=0", "--config.checkpoint_every=1000", "--config.sft.steps=0"]


@pytest.mark.parametrize("key, values", [("agg_mode", objective.AGG_MODES), ("kl_type", objective.KL_TYPES),
                                         ("adv_estimator", objective.ADV_ESTIMATORS)])
def test_every_mode_the_objective_implements_is_a_valid_config(tmp_path, key, values):
  for value in values:
    cfg = tiny_config(tmp_path, **{f"loss.{key}": value})
    config_check.validate(cfg, num_devices=jax.device_count())
    assert getattr(objective.LossConfig.from_config(cfg), key) == value
  with pytest.raises(config_check.ConfigError, match=f"^config.loss.{key}: "):
    config_check.validate(tiny_config(tmp_path, **{f"loss.{key}": "bogus"}), num_devices=jax.device_count())


def test_dr_grpo_with_k1_kl_runs_a_step_from_command_line_overrides(tmp_path):
  """Dr. GRPO (no std division, token sums over #sequences * max_new_tokens) with the k1 KL loss,
  set only by overrides, trains a step: the KL term is on and the run records the modes."""
  workdir = tmp_path / "run"
  modes = ["--config.loss.agg_mode=seq-mean-token-sum-norm", "--config.loss.adv_estimator=drgrpo",
           "--config.loss.kl_loss_coef=0.5", "--config.loss.kl_type=kl"]
  proc = _cli(["--config=configs/tiny_cpu.py", f"--config.workdir={workdir}", "--config.total_steps=2",
               *SMALL_FLAGS, *modes])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-2000:]
  first, second = metrics_writer.read_metrics(str(workdir))
  # k1 = logp - logp_ref: ~0 at step 1 (the policy is still pi_ref, up to float rounding between
  # the sampler's and the reference forward's log-probs), non-zero once the policy has moved.
  assert abs(first["actor/kl_loss"]) < 1e-5 and abs(second["actor/kl_loss"]) > 1e-6
  assert np.isfinite(first["actor/loss"]) and np.isfinite(second["actor/loss"])
  saved = json.loads((workdir / "config.json").read_text())["loss"]
  assert (saved["agg_mode"], saved["adv_estimator"], saved["kl_type"]) == (
      "seq-mean-token-sum-norm", "drgrpo", "kl")


def test_resume_with_another_seed_is_a_one_line_config_error(tmp_path):
  cfg = tiny_config(tmp_path, total_steps=2, eval_every=0)
  trainer.train(cfg, max_steps=1, progress=False)
  changed = tiny_config(tmp_path, total_steps=2, eval_every=0, seed=1)
  with pytest.raises(config_check.ConfigError, match=r"^config.workdir: .* holds a run saved with other "
                     r"data, seed or batch size \(PromptIterator.set_state: state seed=0 does not match "
                     r"this iterator's seed=1\)"):
    trainer.train(changed, progress=False)
  # Another model shape (e.g. a config that changed hidden_size): the first differing tensor,
  # named before any array is read, not orbax's traceback.
  wider = tiny_config(tmp_path, total_steps=2, eval_every=0, **{"model.hidden_size": 48})
  with pytest.raises(config_check.ConfigError, match=r"^config.workdir: .* holds a run of another model "
                     r"\(checkpoint .*/checkpoints/1/state does not match the model config: "
                     r"params\['embed'\]\['embedding'\] has shape \(\d+, 32\) in the checkpoint, "
                     r"the config gives \(\d+, 48\)\)"):
    trainer.train(wider, progress=False)
  # The workdir is untouched: its metrics, its checkpoint and the config it was run with.
  assert [r["step"] for r in metrics_writer.read_metrics(str(tmp_path))] == [1]
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


@pytest.mark.slow  # 45 s; tests/test_multihost.py preempts (SIGTERM) and resumes a run by default.
def test_sigterm_saves_current_step_and_resume_repeats_none(tmp_path):
  workdir = tmp_path / "run"
  args = ["--config=configs/tiny_cpu.py", f"--config.workdir={workdir}", "--config.total_steps=1000",
          *SMALL_FLAGS]
  proc = _cli(args)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
    time.sleep(0.5)
  assert metrics.exists(), "no step finished in time"
  proc.send_signal(signal.SIGTERM)
  t0 = time.time()
  out, _ = proc.communicate(timeout=60)
  assert time.time() - t0 < 60
  assert proc.returncode == 0, out[-2000:]
  done = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved[-1] == done[-1]  # The step in progress when SIGTERM came was finished and saved.
  assert "checkpoint_manager.py" not in out  # orbax's INFO chatter is hidden by default.
  resumed = _cli(["--config=configs/tiny_cpu.py", f"--config.workdir={workdir}",
                  f"--config.total_steps={done[-1] + 1}", *SMALL_FLAGS])
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out[-2000:]
  steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
  assert steps == list(range(1, done[-1] + 2))  # Each step exactly once, none repeated.


def test_hf_checkpoint_files_task_with_reference_model(tmp_path):
  """data.task='files' on a tiny HF checkpoint, math-verify reward, KL loss and the exact
  reference-model score: the reference model is loaded and its log-probs enter the loss."""
  from tests import hf_fixtures
  ckpt = hf_fixtures.make_tiny_hf_checkpoint(str(tmp_path / "hf"), "qwen2")
  train_file = tmp_path / "train.jsonl"
  train_file.write_text("".join(json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n"
                                for i in range(8)))
  cfg = tiny_config(tmp_path / "run", **{
      "data.task": "files", "data.train_files": str(train_file), "data.eval_set": str(train_file),
      "data.max_prompt_len": 128, "model.hf_path": ckpt, "reward.fn": "math", "reward.num_workers": 1,
      "laser.self_reward_token_id": hf_fixtures.ZC_ID, "laser.use_ref_model_score": True,
      "loss.kl_loss_coef": 0.05, "total_steps": 1, "eval_every": 1})
  t = trainer.Trainer(cfg)
  assert t.needs_ref and t.eos_ids == (hf_fixtures.EOS_ID,)
  state = t.init_state(t.initial_params())
  ref = jax.device_get(state.params)
  state, metrics = t.train_step(state, next(t.task.train_iterator()), ref_params=state.params)
  # At step 1 the policy equals the reference, so the KL term is ~0 and the exact-variant score
  # is beta_v * (log pi - log pi_ref) = 0 for every finished row: L_sr = mean(w * r_v^2).
  assert abs(metrics["actor/kl_loss"]) < 1e-5
  assert np.isfinite(metrics["actor/loss"])
  new = jax.device_get(state.params)
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), new, ref))) > 0
  ev = t.evaluate(state.params, jax.random.key(0), ref_params=ref)
  assert ev["eval/num_problems"] == 8 and 0.0 <= ev["eval/reward/mean"] <= 1.0


def test_eval_with_the_exact_score_subtracts_the_reference_logprob(tmp_path):
  """In-training eval scores with log pi_ref(z_c | x, y) under the exact variant, not c_ref."""
  overrides = {"laser.ref_constant": -100.0, "eval_every": 0}
  t = trainer.Trainer(tiny_config(tmp_path, **{**overrides, "laser.use_ref_model_score": True}))
  params = t.initial_params()
  # pi_ref = the policy: every exact score is 0 -> "incorrect"; with c_ref = -100 the constant
  # variant's scores are ~10 -> "correct". The random policy gets every answer wrong.
  ev = t.evaluate(params, jax.random.key(0), ref_params=params)
  assert ev["eval/truncated_frac"] < 1 and ev["eval/reward/mean"] == 0
  assert ev["eval/self_verification/acc_incorrect_finished"] == 1.0
  constant = trainer.Trainer(tiny_config(tmp_path, **overrides)).evaluate(params, jax.random.key(0))
  assert constant["eval/self_verification/acc_incorrect_finished"] == 0.0
  with pytest.raises(ValueError, match="needs ref_params"):
    t.evaluate(params, jax.random.key(0))


def test_eval_reports_the_within_problem_measures_of_its_samples(tmp_path):
  """The periodic eval's within-problem AUROC, reward variance explained by the problem and
  distinct shares equal those worked out here, by pairwise counting and sets of texts, from the
  same samples (`generate` with the eval's key: the eval's pipeline)."""
  from laser_jax.rl import scoring
  c = tiny_config(tmp_path, **{"reward.fn": "multihost_helpers:parity_reward", "reward.num_workers": 0,
                               "eval.n": 8, "eval_every": 0})
  t = trainer.Trainer(c)
  params, key = t.initial_params(), jax.random.key(4)  # 4 problems with both classes scored
  ev = t.evaluate(params, key)
  with jax.set_mesh(t.mesh):
    scored = t.generate(params, t.task.eval_prompts, t.eval_sampling, key,
                        score=scoring.Score(kl_coef=c.laser.kl_coef, ref_constant=c.laser.ref_constant))
  acc, scores = scored.rewards.reshape(8, 8), scored.scores.reshape(8, 8)  # a problem's rows are contiguous
  texts = [scored.texts[8 * p:8 * p + 8] for p in range(8)]
  within = []
  for a, s in zip(acc, scores):
    pos, neg = s[(a == 1) & ~np.isnan(s)], s[(a == 0) & ~np.isnan(s)]
    if len(pos) and len(neg):  # P(a correct one scores above an incorrect one), ties 1/2
      within.append(np.mean([(x > y) + 0.5 * (x == y) for x in pos for y in neg]))
  assert len(within) >= 3, "the sample must exercise the within-problem AUROC"
  assert ev["eval/self_verification/within_auroc_problems"] == len(within)
  assert ev["eval/self_verification/within_auroc"] == pytest.approx(np.mean(within))
  between = np.mean((acc.mean(1) - acc.mean()) ** 2)
  assert ev["eval/reward/variance_explained_by_problem"] == pytest.approx(between / np.mean((acc - acc.mean()) ** 2))
  for name, verdict in (("correct", 1), ("incorrect", 0)):
    chosen = [(p, text) for p in range(8) for text, a in zip(texts[p], acc[p]) if a == verdict]
    assert ev[f"eval/distinct_frac/{name}"] == pytest.approx(len(set(chosen)) / len(chosen))


@pytest.mark.slow  # 55 s: a warm start, a run, a resume and an evaluation.
def test_reference_policy_is_the_post_warm_start_initial_policy_and_resumes_restore_it(tmp_path, monkeypatch):
  """pi_ref (KL loss, exact score) is the policy RL starts from: after the supervised warm start,
  not the random init. The run saves it in workdir/reference; a resumed run restores it instead
  of running the warm start again, and then repeats the uninterrupted run."""
  import shutil
  from laser_jax.training import checkpoint as ckpt_lib
  from laser_jax.training import sft
  overrides = {"sft.steps": 3, "sft.batch_size": 8, "loss.kl_loss_coef": 0.05, "total_steps": 2,
               "eval_every": 0}
  cfg = tiny_config(tmp_path / "run", **overrides)
  first = trainer.train(cfg, max_steps=1, progress=False)
  # Step 1 samples and updates from the initial policy, so its KL to pi_ref is zero.
  assert abs(_steps(first)[0]["actor/kl_loss"]) < 1e-6, _steps(first)[0]["actor/kl_loss"]
  t = trainer.Trainer(cfg)
  initial = jax.device_get(t.initial_params())
  random_init = jax.device_get(t.task.init_params(reference=True))
  differs = lambda a, b: max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))
  assert differs(initial, random_init) > 1e-4  # The warm start moved the weights.
  saved = jax.device_get(ckpt_lib.restore_reference(cfg.workdir, t.abstract_state().params))
  jax.tree.map(np.testing.assert_array_equal, saved, initial)

  def no_warm_start(*args, **kwargs):
    raise AssertionError("the warm start ran again on resume")
  with monkeypatch.context() as patch:
    patch.setattr(sft, "warm_start", no_warm_start)
    second = trainer.train(cfg, progress=False)
  full = trainer.train(tiny_config(tmp_path / "full", **overrides), progress=False)
  resumed, uninterrupted = _comparable(first + second), _comparable(full)
  assert [r["step"] for r in resumed] == [1, 2] and uninterrupted[1]["actor/kl_loss"] > 0
  for key in ("actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/self_reward_loss", "rollout/reward/mean"):
    np.testing.assert_allclose(resumed[1][key], uninterrupted[1][key], rtol=1e-6, atol=1e-7, err_msg=key)

  # A workdir without the saved copy (from before it was saved) recomputes the same policy.
  shutil.rmtree(ckpt_lib.reference_directory(cfg.workdir))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(t.reference_params(workdir=cfg.workdir)), initial)


def test_orbax_info_logs_are_hidden_but_warnings_and_our_logs_pass():
  import logging
  from laser_jax.training import checkpoint as ckpt_lib
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  record = lambda level, path: logging.LogRecord("absl", level, path, 1, "m", None, None)
  orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
  ours = os.path.join(REPO, "laser_jax", "trainer.py")
  try:
    ckpt_lib.hide_orbax_info_logs()
    assert not handler.filter(record(logging.INFO, orbax_file))
    assert handler.filter(record(logging.WARNING, orbax_file))
    assert handler.filter(record(logging.INFO, ours))
    ckpt_lib.hide_orbax_info_logs(False)  # config.library_info_logs = True
    assert handler.filter(record(logging.INFO, orbax_file))
  finally:
    ckpt_lib.hide_orbax_info_logs(False)


def test_host_blocks_of_the_eval_set_are_equal_and_padded(monkeypatch):
  from laser_jax.models import hosts
  items = list("abcdefg")
  assert hosts.host_block(items) == (items, 7)
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  blocks = []
  for p in range(3):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    blocks.append(hosts.host_block(items))
  assert blocks == [(list("abc"), 3), (list("def"), 3), (list("gaa"), 1)]


def test_host_blocks_in_process_order_are_the_one_host_batches():
  """PromptIterator host blocks, joined in process order = the single-process batch sequence."""
  from laser_jax.data import iterator as iterator_lib
  from test_data import _global_batches
  items = list(range(203))
  one = iterator_lib.PromptIterator(items, 12, seed=3, num_epochs=2)
  hosts = [iterator_lib.PromptIterator(items, 3, seed=3, num_epochs=2, process_index=p, process_count=4)
           for p in range(4)]
  assert one.batches_per_epoch == hosts[0].batches_per_epoch == 203 // 12
  assert _global_batches(hosts, 2 * one.batches_per_epoch) == list(one)
  for h in hosts:
    with pytest.raises(StopIteration):
      next(h)


def test_non_finite_gradient_skips_the_update_and_is_counted(tmp_path):
  t = trainer.Trainer(tiny_config(tmp_path))
  state = t.init_state(t.initial_params())
  before = jax.device_get(state.params)
  roll = t.rollout(state.params, next(t.task.train_iterator()), jax.random.key(0))
  vectors, _ = t.batch_vectors(roll, step=1)
  (rows,) = t.update_rows(roll)
  batch, normalisers = t.update_batch(roll, vectors, rows)
  advantages = np.array(batch.advantages)
  advantages[0, 0] = np.nan  # A NaN advantage makes the gradient non-finite.
  state, m = t.update(state, batch.replace(advantages=advantages), normalisers, True)
  assert not np.isfinite(float(m["grad_norm"])) and int(state.skipped_updates) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)


def test_model_vocab_size_override(tmp_path):
  from laser_jax.training import tasks
  assert tasks.model_cfg_from_shape(tiny_config(tmp_path), 42).vocab_size == 42
  assert tasks.model_cfg_from_shape(tiny_config(tmp_path, **{"model.vocab_size": 1024}), 42).vocab_size == 1024
  with pytest.raises(config_check.ConfigError, match=r"config\.model\.vocab_size: 16 is smaller"):
    tasks.model_cfg_from_shape(tiny_config(tmp_path, **{"model.vocab_size": 16}), 42)


def test_pad_falls_back_to_eos_and_zc_is_checked_against_the_vocab():
  import types
  from laser_jax.data import synthetic
  from laser_jax.training import tasks
  llama_like = types.SimpleNamespace(pad_token_id=None)  # Llama-3 tokenizers define no pad token.
  assert tasks.pad_token_id(llama_like, (128001, 128009)) == 128001
  tok = synthetic.build_tokenizer()
  assert tasks.pad_token_id(tok, (tok.eos_token_id,)) == tok.pad_token_id
  assert tasks.resolve_token_id(tok, len(tok), -1, "<|zc|>", "") == synthetic.self_reward_token_id(tok)
  with pytest.raises(config_check.ConfigError, match=r"config\.laser\.self_reward_token_id: 99 is outside"):
    tasks.resolve_token_id(tok, len(tok), 99, "", "")
  with pytest.raises(config_check.ConfigError, match=r"config\.laser\.self_reward_token: '<\|nope\|>'"):
    tasks.resolve_token_id(tok, len(tok), -1, "<|nope|>", "")


def test_cli_malformed_training_file_is_one_line_with_file_and_line(tmp_path):
  bad = tmp_path / "train.jsonl"
  bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"\n')
  from tests import hf_fixtures
  ckpt = hf_fixtures.make_tiny_hf_checkpoint(str(tmp_path / "hf"), "qwen2")
  proc = _cli(["--config=configs/tiny_cpu.py", f"--config.workdir={tmp_path / 'run'}",
               "--config.data.task=files", f"--config.data.train_files={bad}", f"--config.model.hf_path={ckpt}",
               "--config.sft.steps=0", "--config.laser.self_reward_token_id=3"])
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 2
  last = out.strip().splitlines()[-1]
  assert last.startswith("error: ") and f"{bad}:2" in last, last


@pytest.mark.parametrize("kl_loss_coef,exact_score", [(0.0, False), (0.05, True)])
def test_aot_abstract_batches_match_what_the_trainer_feeds_its_programs(tmp_path, kl_loss_coef, exact_score):
  """laser_jax.aot compiles the update and log-prob programs from `programs.abstract_*_batch`:
  they must be the trainer's real batches (fields, shapes, dtypes, shardings)."""
  from laser_jax.training import programs
  c = tiny_config(tmp_path / "run", **{"loss.kl_loss_coef": kl_loss_coef,
                                       "laser.use_ref_model_score": exact_score})
  t = trainer.Trainer(c)
  state = t.init_state(t.initial_params())
  prompts = t.task.train_prompts[:c.batch_size]
  with jax.set_mesh(t.mesh):
    roll = t.rollout(state.params, prompts, t.step_key(state, salt=0), ref_params=state.params)
    vectors, _ = t.batch_vectors(roll, step=1)
    (rows,) = t.update_rows(roll)
    batch, _ = t.update_batch(roll, vectors, rows)  # complete, as _train_step feeds the update
  num_micro, _, seq_len = batch.sequences.tokens.shape
  spec = programs.abstract_update_batch(t.mesh, num_micro, c.micro_batch_size, seq_len,
                                        with_ref_logp=kl_loss_coef > 0, with_ref_score=exact_score)
  placed = t.programs.place_update_batch(batch)
  # The same record (fields present, pi_ref ones only where needed), shapes, dtypes and shardings.
  assert jax.tree.structure(placed) == jax.tree.structure(spec)
  for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(placed), jax.tree.leaves(spec)):
    assert (p.shape, p.dtype, p.sharding) == (s.shape, s.dtype, s.sharding), path
  # A prompt bucket of P tokens gives rows of P + max_new_tokens + 1 (what aot assumes).
  assert seq_len == roll.sample.prompt_tokens.shape[1] + c.rollout.max_new_tokens + 1
  logprob = programs.abstract_logprob_batch(t.mesh, c.micro_batch_size, seq_len)
  piece = t.programs.place_logprob_batch(jax.tree.map(lambda v: v[:c.micro_batch_size], roll.sequences))
  assert jax.tree.structure(piece) == jax.tree.structure(logprob)
  for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(piece), jax.tree.leaves(logprob)):
    assert (p.shape, p.dtype, p.sharding) == (s.shape, s.dtype, s.sharding), path


def test_rollout_layout_samples_the_same_tokens_and_scores(tmp_path):
  """rollout.tensor_parallel = 2 on 8 devices: the weights are copied onto a data 4 x tensor 2
  mesh for sampling; the samples equal those of the training layout (fsdp 8)."""
  results = {}
  for k in (0, 2):
    c = tiny_config(tmp_path / f"run{k}", **{"rollout.tensor_parallel": k})
    t = trainer.Trainer(c)
    state = t.init_state(t.initial_params())
    with jax.set_mesh(t.mesh):
      results[k] = t.rollout(state.params, t.task.train_prompts[:c.batch_size], jax.random.key(3)).sample
    if k:
      assert dict(t.programs.rollout_mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
      copy = t.programs.to_rollout_layout(state.params)
      up = copy["layers_0"]["mlp"]["up_proj"]["kernel"]
      assert up.sharding.mesh.shape == t.programs.rollout_mesh.shape
      # Whole rows on every device, the MLP features split over the 2-device tensor axis.
      assert up.sharding.shard_shape(up.shape) == (c.model.hidden_size, c.model.intermediate_size // 2)
  a, b = results[0], results[2]
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.finished, b.finished)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  np.testing.assert_allclose(a.self_reward_logprob, b.self_reward_logprob, atol=1e-5)

