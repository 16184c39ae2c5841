"""A training checkpoint exported as an HF directory gives transformers the same logits."""
import os

import numpy as np
import torch
import transformers

from laser_jax import checkpoint, default_config, evaluate, export, hf, model as model_lib, trainer
from tests.test_trainer import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eval_config():
  return default_config.load_config_file(os.path.join(REPO, "configs", "eval.py"))


def test_export_training_checkpoint_round_trips_through_transformers(tmp_path):
  cfg = tiny_config(tmp_path / "run", total_steps=1, eval_every=0)
  trainer.train(cfg, progress=False)
  # The run wrote its config next to the checkpoints: no training-config flag is needed.
  assert (tmp_path / "run" / "config.json").exists()
  ec = _eval_config()
  ec.model.checkpoint_dir = str(tmp_path / "run")
  ec.export.output_dir = str(tmp_path / "hf")
  ec.export.dtype = "float32"
  export.run(ec)

  t = trainer.Trainer(cfg)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run"))
  state, _ = ckpt.restore(1, t.abstract_state())
  ckpt.close()
  tokens = np.array([[5, 9, 12, 7, 3, 20]], np.int32)
  mask = np.ones_like(tokens, bool)
  ours = model_lib.forward(state.params, t.model_cfg, tokens, model_lib.default_positions(mask), mask)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
  with torch.no_grad():
    theirs = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4)
  # Reloaded, the task's custom tokenizer gives the ids the model was trained on (transformers 5's
  # AutoTokenizer would swap in Qwen2Tokenizer for this qwen2 config and change them).
  tok = hf.load_hf_tokenizer(str(tmp_path / "hf"))
  assert tok.convert_tokens_to_ids("<|zc|>") == t.zc_id
  prompt = t.task.eval_prompts[0]
  text = t.tokenizer.decode(prompt.token_ids)
  assert tok(text, add_special_tokens=False)["input_ids"] == prompt.token_ids

  # The evaluator scores a checkpoint with the run's own beta_v and c_ref unless told otherwise.
  loaded = evaluate.load_model(ec)
  assert (loaded.kl_coef, loaded.ref_constant) == (cfg.laser.kl_coef, cfg.laser.ref_constant) == (0.1, -4.0)
  ec.laser.ref_constant = -23.0
  assert evaluate.load_model(ec).ref_constant == -23.0


def test_export_without_output_dir_is_a_one_line_error():
  ec = _eval_config()
  ec.model.checkpoint_dir = "/nonexistent"
  try:
    export.run(ec)
  except ValueError as e:
    assert "config.export.output_dir" in str(e) and "\n" not in str(e)
  else:
    raise AssertionError("expected an error")
