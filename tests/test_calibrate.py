"""laser_jax.calibrate: log pi_ref(z_c | x, y) statistics against a full forward, and the z_c warnings."""
import json

import numpy as np
import pytest

import hf_fixtures
from laser_jax import cli, config_check
from laser_jax.evaluation import calibrate
from laser_jax.evaluation import evaluator
from laser_jax.models import hf
from laser_jax.models import model as model_lib
from test_evaluate import eval_config, make_checkpoint, write_problems

PROBLEMS = [(f"Compute {a} * {b}.", str(a * b)) for a, b in [(2, 3), (4, 5), (6, 7), (8, 9)]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("calibrate")
  ckpt = make_checkpoint(tmp / "ckpt")
  config = eval_config(**{
      "model.hf_path": ckpt, "eval.input_file": write_problems(tmp / "p.jsonl", PROBLEMS),
      "eval.output_file": str(tmp / "out" / "eval.jsonl"), "eval.n": 4, "eval.max_new_tokens": 16,
      "eval.batch_size": 4, "eval.num_workers": 0, "eval.num_bootstrap": 10,
      "calibrate.num_problems": 0, "calibrate.scan_chunk": 16})
  return ckpt, config


def test_statistics_equal_numpy_over_full_forward(setup):
  ckpt, config = setup
  report = calibrate.run(config, progress=False, print_table=False)
  # The same config and seed make evaluate sample the same responses; recompute their z_c log-probs
  # with a plain full forward over prompt + response + EOS.
  evaluator.run(config, progress=False, print_table=False)
  cfg = hf.load_hf_config(ckpt)
  params = hf.load_hf_params(ckpt, cfg)
  ref = []
  for line in open(config.eval.output_file):
    r = json.loads(line)
    for ids, stop in zip(r["response_token_ids"], r["stop_token_ids"]):
      if stop is None:
        continue
      seq = np.array([r["prompt_token_ids"] + ids + [stop]], np.int32)
      logits = model_lib.forward(params, cfg, seq, np.arange(seq.shape[1])[None], np.ones(seq.shape, bool))
      last = np.asarray(logits[0, -1], np.float64)
      ref.append(last[hf_fixtures.ZC_ID] - np.log(np.exp(last - last.max()).sum()) - last.max())
  ref = np.array(ref)
  assert 0 < len(ref) < 16 and report["num_finished"] == len(ref) and report["num_responses"] == 16
  assert report["mean"] == pytest.approx(ref.mean(), abs=1e-4)
  assert report["std"] == pytest.approx(ref.std(), abs=1e-4)
  assert report["quantiles"]["0.5"] == pytest.approx(np.quantile(ref, 0.5), abs=1e-4)
  assert report["min"] == pytest.approx(ref.min(), abs=1e-4)
  assert report["forward_check_max_abs_diff"] < 1e-4
  assert report["max_logprob_in_text"] < config.calibrate.warn_logprob
  assert report["warnings"] == []  # <|vision_start|>: a dedicated special token
  with open(calibrate.calibration_path(config)) as f:
    on_disk = json.load(f)
  assert on_disk["mean"] == report["mean"] and on_disk["token_id"] == hf_fixtures.ZC_ID


def test_token_that_text_encodes_to_warns(setup, capsys):
  ckpt, config = setup
  tok = hf.load_hf_tokenizer(ckpt)
  (digit,) = tok("7", add_special_tokens=False)["input_ids"]
  config = eval_config(**{**_flat(config), "laser.self_reward_token_id": digit})
  report = calibrate.run(config, progress=False, print_table=True)
  captured = capsys.readouterr()
  assert any("occurs in normal text" in w for w in report["warnings"])
  assert any("not a special/added token" in w for w in report["warnings"])
  assert report["texts_encoding_to_token"] > 0 and not report["is_special_or_added"]
  assert "WARNING: z_c=" in captured.err and "suggested c_ref" in captured.out
  low, high = report["kl_coef_range"]
  assert low == pytest.approx(1.5 / -report["mean"]) and high == pytest.approx(0.25 / report["std"])
  assert f"keeping both targets reachable: [{low:.3g}, {high:.3g}]" in captured.out


def test_high_logprob_inside_text_warns():
  report = {"token_id": 3, "token": "<|x|>", "texts_encoding_to_token": 0, "num_texts_encoded": 5,
            "occurrences_in_encoded_text": 0, "in_tokenizer": True, "is_special_or_added": True,
            "max_logprob_in_text": -1.0, "kl_coef_range": [0.1, 0.5]}
  (warning,) = calibrate.warnings_for(report, warn_logprob=-4.6)
  assert "log-prob -1.00" in warning
  assert calibrate.warnings_for({**report, "max_logprob_in_text": -9.0}, -4.6) == []


def test_kl_coef_range_keeps_both_targets_reachable():
  # c_ref -15, std 0.5: beta_v >= 1.5 / 15 = 0.1 puts the correct target at log p <= -15 + 10 = -5;
  # beta_v <= 0.25 / 0.5 = 0.5 keeps two std of pi_ref's scores (2 * 0.5 * 0.5) within the 0.5 threshold.
  low, high = calibrate.kl_coef_range(-15.0, 0.5)
  assert (low, high) == pytest.approx((0.1, 0.5))
  assert low * 15.0 == pytest.approx(config_check.MIN_SCORE_RANGE)
  # The paper's Qwen2.5 setting (c_ref -23, beta_v 0.1) lies inside the range it gives for std 1.
  low, high = calibrate.kl_coef_range(-23.0, 1.0)
  assert low < 0.1 < high
  # A log-prob spread too wide for a constant c_ref: the range is empty and the report says so.
  low, high = calibrate.kl_coef_range(-3.0, 2.0)
  assert low > high
  report = {"token_id": 3, "token": "<|x|>", "texts_encoding_to_token": 0, "num_texts_encoded": 5,
            "occurrences_in_encoded_text": 0, "in_tokenizer": True, "is_special_or_added": True,
            "max_logprob_in_text": -9.0, "kl_coef_range": [low, high], "mean": -3.0, "std": 2.0}
  (warning,) = calibrate.warnings_for(report, warn_logprob=-4.6)
  assert "no beta_v keeps both targets reachable" in warning


def test_token_outside_vocab_is_a_one_line_error(setup, capsys):
  _, config = setup
  config = eval_config(**{**_flat(config), "laser.self_reward_token_id": 5000})
  with pytest.raises(SystemExit) as exc:
    cli.exit_on_bad_input(calibrate.run, config)
  err = capsys.readouterr().err.strip()
  assert exc.value.code == 2 and "config.laser.self_reward_token_id: 5000 is outside" in err
  assert "\n" not in err


def _flat(config, prefix=""):
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
