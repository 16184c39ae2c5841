"""Every shipped config loads, documents its launch command and passes start-up validation."""
import os

import pytest

from laser_jax import config_check, default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Training configs and the device count they are written for (v4-64 = 32 chips).
TRAINING = {"tiny_cpu.py": 1, "colab_small.py": 1, "tpu_v4.py": 32, "orz_7b.py": 32,
            "octothinker_3b.py": 32}


def test_every_config_file_is_listed():
  assert sorted([*TRAINING, "eval.py"]) == sorted(f for f in os.listdir(os.path.join(REPO, "configs"))
                                                  if f.endswith(".py"))


@pytest.mark.parametrize("name,devices", sorted(TRAINING.items()))
def test_training_config_validates(name, devices):
  path = os.path.join(REPO, "configs", name)
  config = default_config.load_config_file(path)
  config_check.validate(config, num_devices=devices)
  assert f"--config=configs/{name}" in open(path).read()  # The docstring gives the launch command.


def test_reference_settings_follow_the_spec():
  c = default_config.load_config_file(os.path.join(REPO, "configs", "tpu_v4.py"))
  assert (c.batch_size, c.rollout.n, c.rollout.temperature, c.rollout.top_p) == (128, 8, 1.0, 1.0)
  assert (c.data.max_prompt_len, c.rollout.max_new_tokens, c.optim.lr) == (2048, 8192, 1e-6)
  assert (c.optim.weight_decay, c.optim.grad_clip, c.mini_batch_size) == (0.01, 1.0, 128)
  assert (c.laser.loss_coef, c.laser.kl_coef, c.laser.ref_constant) == (0.1, 0.1, -23.0)
  assert (c.laser.adv_integration_coef, c.laser.adv_filter_threshold) == (0.1, 0.1)
  assert (c.laser.reasoning_warmup_steps, c.laser.self_rewarding_warmup_steps) == (200, 200)
  assert c.laser.self_reward_token_id == 151652 and c.loss.kl_loss_coef == 0.0
  assert (c.eval_every, c.eval.n, c.data.eval_set) == (20, 2, "math500")
  o = default_config.load_config_file(os.path.join(REPO, "configs", "octothinker_3b.py"))
  assert (o.laser.self_reward_token_id, o.laser.ref_constant) == (128002, -25.0)


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_shipped_configs_keep_both_self_reward_targets_reachable(name):
  config = default_config.load_config_file(os.path.join(REPO, "configs", name))
  assert config_check.warnings(config) == []


def test_unreachable_correct_target_warns_naming_the_keys(caplog):
  c = default_config.get_config()
  c.laser.kl_coef, c.laser.ref_constant = 0.1, -9.0  # largest score 0.9 < 1: target log p = +1
  (warning,) = config_check.warnings(c)
  assert "config.laser.kl_coef" in warning and "config.laser.ref_constant" in warning
  assert "0.9 < 1.5" in warning and "raise kl_coef to >= 0.167" in warning and "\n" not in warning
  config_check.validate(c, num_devices=1)
  assert warning in caplog.text  # validate logs it (one line) and goes on
  c.laser.kl_coef = 0.2  # 1.8 >= 1.5
  assert config_check.warnings(c) == []
  c.laser.kl_coef, c.laser.use_ref_model_score = 0.1, True  # the exact score has no c_ref
  assert config_check.warnings(c) == []
  c.laser.use_ref_model_score, c.laser.ref_constant = False, 0.0
  (warning,) = config_check.warnings(c)
  assert "config.laser.ref_constant = 0 >= 0" in warning
