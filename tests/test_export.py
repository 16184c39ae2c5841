"""laser_jax.export: a training checkpoint exported as an HF directory gives transformers the same
logits, carries its self-reward constants (laser_jax.json) and a model card, and evaluating the
export gives the scores of evaluating the checkpoint; the README's transformers snippet reproduces
those scores with torch; HF inputs without constants are one-line errors, never defaults; the hub
upload goes through huggingface_hub's HfApi (substituted here: no network)."""
import json
import os
import pathlib
import re

import numpy as np
import pytest
import torch
import transformers

import hf_fixtures
from laser_jax import cli
from laser_jax import default_config
from laser_jax.config_check import ConfigError
from laser_jax.data import prompts as prompts_lib
from laser_jax.evaluation import evaluator, export
from laser_jax.evaluation import loading
from laser_jax.models import hf, model as model_lib
from laser_jax.training import checkpoint
from laser_jax.training import trainer
from tests.test_trainer import tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent
# Evaluation settings shared by the checkpoint and its export: same problems, same seed.
EVAL = {"eval.input_file": "synthetic", "eval.limit": 8, "eval.reward_fn": "synthetic", "eval.num_workers": 0,
        "eval.n": 4, "eval.max_new_tokens": 16, "eval.batch_size": 8, "eval.num_bootstrap": 10, "eval.seed": 3}


def _eval_config(**overrides):
  c = default_config.load_config_file(str(REPO / "configs" / "eval.py"))
  return default_config.apply_overrides(c, overrides)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A one-step tiny training run, exported in float32 with its own constants."""
  tmp = tmp_path_factory.mktemp("export")
  cfg = tiny_config(tmp / "run", total_steps=1, eval_every=0)
  trainer.train(cfg, progress=False)
  # The run wrote its config next to the checkpoints: no training-config flag is needed.
  assert (tmp / "run" / "config.json").exists()
  export.run(_eval_config(**{"model.checkpoint_dir": str(tmp / "run"), "export.output_dir": str(tmp / "hf"),
                             "export.dtype": "float32"}))
  return cfg, tmp


def _evaluate(tmp, name, **model_keys):
  config = _eval_config(**EVAL, **model_keys, **{"eval.output_file": str(tmp / f"{name}.jsonl")})
  summary = evaluator.run(config, progress=False, print_table=False)
  return summary, [json.loads(line) for line in open(config.eval.output_file)]


@pytest.fixture(scope="module")
def evaluations(run):
  """(summary, rows) of evaluating the checkpoint and of evaluating its export, same seed."""
  _, tmp = run
  return (_evaluate(tmp, "checkpoint", **{"model.checkpoint_dir": str(tmp / "run")}),
          _evaluate(tmp, "export", **{"model.hf_path": str(tmp / "hf")}))


def test_export_round_trips_through_transformers(run):
  cfg, tmp = run
  t = trainer.Trainer(cfg)
  ckpt = checkpoint.Checkpointer(str(tmp / "run"))
  state, _ = ckpt.restore(1, t.abstract_state())
  ckpt.close()
  tokens = np.array([[5, 9, 12, 7, 3, 20]], np.int32)
  mask = np.ones_like(tokens, bool)
  ours = model_lib.forward(state.params, t.model_cfg, tokens, model_lib.default_positions(mask), mask)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "hf"), dtype=torch.float32)
  with torch.no_grad():
    theirs = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4)
  # Reloaded, the task's custom tokenizer gives the ids the model was trained on (transformers 5's
  # AutoTokenizer would swap in Qwen2Tokenizer for this qwen2 config and change them).
  tok = hf.load_hf_tokenizer(str(tmp / "hf"))
  assert tok.convert_tokens_to_ids("<|zc|>") == t.zc_id
  prompt = t.task.eval_prompts[0]
  text = t.tokenizer.decode(prompt.token_ids)
  assert tok(text, add_special_tokens=False)["input_ids"] == prompt.token_ids

  # laser_jax.json holds the run's constants and prompt format, as its training config has them.
  meta = json.loads((tmp / "hf" / "laser_jax.json").read_text())
  assert meta["self_reward_token"] == "<|zc|>" and meta["self_reward_token_id"] == t.zc_id
  assert (meta["kl_coef"], meta["ref_constant"]) == (cfg.laser.kl_coef, cfg.laser.ref_constant) == (0.1, -4.0)
  assert meta["use_ref_model_score"] is False and meta["reference_model"] == ""
  assert meta["eos_token_id"] == t.tokenizer.eos_token_id and meta["eos_token_ids"] == list(t.eos_ids)
  assert meta["prompt"] == {"template": "chat", "instruction": prompts_lib.INSTRUCTION,
                            "chat_template": t.tokenizer.chat_template}
  assert meta["constants_source"] == f"training config {tmp / 'run' / 'config.json'}"
  generation = json.loads((tmp / "hf" / "generation_config.json").read_text())
  assert generation["eos_token_id"] in (list(t.eos_ids), *t.eos_ids)


def test_evaluating_the_export_gives_the_checkpoints_scores(evaluations):
  (ckpt_summary, ckpt_rows), (export_summary, export_rows) = evaluations
  assert len(ckpt_rows) == len(export_rows) == 8
  scored = 0
  for a, b in zip(ckpt_rows, export_rows):
    assert a["prompt_token_ids"] == b["prompt_token_ids"] and a["response_token_ids"] == b["response_token_ids"]
    assert a["stop_token_ids"] == b["stop_token_ids"]
    for x, y in zip(a["self_rewarding_scores"], b["self_rewarding_scores"]):
      assert (x is None) == (y is None)
      if x is not None:
        assert y == pytest.approx(x, abs=1e-5)
        scored += 1
  assert scored > 0
  for key in ("self_reward_token_id", "kl_coef", "ref_constant", "template"):
    assert ckpt_summary[key] == export_summary[key], key
  assert export_summary["constants_source"].endswith("laser_jax.json")
  assert export_summary["overridden_constants"] == ckpt_summary["overridden_constants"] == []


def test_eval_config_overrides_the_exports_constants_and_says_so(run):
  _, tmp = run
  config = _eval_config(**{"model.hf_path": str(tmp / "hf"), "laser.ref_constant": -23.0})
  model = loading.load_model(config)
  assert (model.kl_coef, model.ref_constant, model.template) == (0.1, -23.0, "chat")
  assert model.overrides == ("config.laser.ref_constant=-23.0 (the model's own: -4.0)",)
  # Same for a checkpoint: its training config's values unless the eval config sets them.
  config = _eval_config(**{"model.checkpoint_dir": str(tmp / "run"), "laser.kl_coef": 0.2})
  model = loading.load_model(config)
  assert (model.kl_coef, model.ref_constant) == (0.2, -4.0)
  assert model.overrides == ("config.laser.kl_coef=0.2 (the model's own: 0.1)",)


def _readme_snippet() -> str:
  readme = (REPO / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
  snippet = [b for b in blocks if 'cached_file(MODEL, "laser_jax.json")' in b]
  assert len(snippet) == 1, "README.md: expected one python block reading laser_jax.json"
  return snippet[0]


def test_readme_snippet_computes_the_evaluators_scores_with_torch(run, evaluations, capsys):
  _, tmp = run
  snippet = _readme_snippet()
  assert snippet == export.SCORE_SNIPPET  # the model card carries the same code
  namespace = {}
  exec(compile(export.score_snippet(str(tmp / "hf")), "README.md snippet", "exec"), namespace)
  assert re.fullmatch(r"\[-?[0-9.e-]+\]\n", capsys.readouterr().out)  # its example line ran
  tokenizer = namespace["tokenizer"]
  _, (_, rows) = evaluations
  pairs, expected = [], []
  for row in rows:
    assert namespace["training_prompt"](row["problem"]) == row["prompt"]
    for ids, score in zip(row["response_token_ids"], row["self_rewarding_scores"]):
      # Text in: the sampled ids as text (a random model's responses hold special tokens, so they are
      # kept), where that text encodes back to the same ids (BPE may merge pieces differently).
      text = tokenizer.decode(ids)
      if score is not None and tokenizer(text, add_special_tokens=False).input_ids == ids:
        pairs.append((row["prompt"], text))
        expected.append(score)
  assert len(pairs) >= 3, len(pairs)
  np.testing.assert_allclose(namespace["self_reward_scores"](pairs), expected, atol=1e-4)


def test_model_card_says_how_to_read_the_score(run):
  _, tmp = run
  card = (tmp / "hf" / "README.md").read_text()
  meta = json.loads((tmp / "hf" / "laser_jax.json").read_text())
  assert card.startswith("---\nlibrary_name: transformers\n")
  assert "r_s = beta_v * (log p(z_c | x, y, EOS) - c_ref)" in card
  assert f"`<\\|zc\\|>`, id {meta['self_reward_token_id']}" in card  # pipes escaped in the table
  assert card.count("\n# hf\n") == 1  # titled by the directory's name
  assert "| beta_v (`kl_coef`) | 0.1 |" in card and "c_ref = -4.0" in card
  assert export.score_snippet(str(tmp / "hf")) in card
  assert "prompt_logprobs" in card and "untested until a GPU run checks it" in card


def _tiny_hf(tmp_path) -> str:
  path = hf_fixtures.make_tiny_hf_checkpoint(str(tmp_path / "tiny"), "qwen2")
  return path


@pytest.mark.parametrize("missing, key", [
    ({"laser.kl_coef": 0.1, "laser.ref_constant": -9.0}, "config.laser.self_reward_token_id"),
    ({"laser.self_reward_token_id": hf_fixtures.ZC_ID, "laser.ref_constant": -9.0}, "config.laser.kl_coef"),
    ({"laser.self_reward_token": "<|vision_start|>", "laser.kl_coef": 0.1}, "config.laser.ref_constant"),
])
def test_hf_model_without_laser_json_needs_every_constant(tmp_path, capsys, missing, key):
  """No defaults: evaluate and export of a plain HF directory name the unset key, exit 2, write nothing."""
  path = _tiny_hf(tmp_path)
  out = tmp_path / "out"
  for fn, keys in ((evaluator.run, {"eval.input_file": "synthetic", "eval.output_file": str(out / "e.jsonl")}),
                   (export.run, {"export.output_dir": str(out / "hf")})):
    config = _eval_config(**{"model.hf_path": path, **missing, **keys})
    with pytest.raises(SystemExit) as exc:
      cli.exit_on_bad_input(fn, config)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the fixture's progress bar
    assert err.startswith(f"error: {key}: ") and "laser_jax.json" in err and "\n" not in err, err
    assert not out.exists()


def test_calibrate_needs_only_zc(tmp_path):
  path = _tiny_hf(tmp_path)
  model = loading.load_model(_eval_config(**{"model.hf_path": path, "laser.self_reward_token_id": 3}),
                             score=False)
  assert model.zc_id == 3 and model.kl_coef is None and model.ref_constant is None


def test_hf_export_takes_the_eval_configs_constants_and_pushes_to_the_hub(tmp_path, monkeypatch):
  """An HF input's constants come from the eval config; the upload is create_repo + upload_folder
  of the written directory (HfApi's methods substituted: no network)."""
  import huggingface_hub
  calls = []
  monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                      lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)) or
                      f"https://huggingface.co/{repo_id}")
  monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                      lambda self, **kw: calls.append(("upload_folder", sorted(os.listdir(kw["folder_path"])), kw)))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setenv("HF_TOKEN", "hf_test_token")
  path = _tiny_hf(tmp_path)
  out = tmp_path / "hf"
  config = _eval_config(**{"model.hf_path": path, "laser.self_reward_token": "<|vision_start|>",
                           "laser.kl_coef": 0.25, "laser.ref_constant": -7.5, "eval.template": "base",
                           "export.output_dir": str(out), "export.push_to_hub": "my-org/tiny-laser",
                           "export.hub_private": True})
  export.run(config)
  meta = json.loads((out / "laser_jax.json").read_text())
  assert (meta["self_reward_token"], meta["self_reward_token_id"]) == ("<|vision_start|>", hf_fixtures.ZC_ID)
  assert (meta["kl_coef"], meta["ref_constant"], meta["constants_source"]) == (0.25, -7.5, "eval config")
  assert meta["prompt"] == {"template": "base", "instruction": prompts_lib.INSTRUCTION, "chat_template": None}
  assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
  assert calls[0][1] == "my-org/tiny-laser" and calls[0][2]["private"] is True
  assert {"README.md", "laser_jax.json", "config.json", "model.safetensors", "tokenizer.json"} <= set(calls[1][1])
  assert calls[1][2]["repo_id"] == "my-org/tiny-laser" and calls[1][2]["folder_path"] == str(out)
  card = (out / "README.md").read_text()
  assert "# my-org/tiny-laser" in card and export.score_snippet("my-org/tiny-laser") in card
  assert "plain text" in card and "c_ref = -7.5" in card
  # The export evaluates with those constants and no eval-config laser.* keys.
  model = loading.load_model(_eval_config(**{"model.hf_path": str(out)}))
  assert (model.zc_id, model.kl_coef, model.ref_constant, model.template) == (hf_fixtures.ZC_ID, 0.25, -7.5, "base")


@pytest.mark.parametrize("target, env, message", [
    ("no-slash", {"HF_TOKEN": "x"}, "expected 'org/name'"),
    ("bad//id", {"HF_TOKEN": "x"}, "is not a hub repo id"),
    ("org/name", {}, "no Hugging Face token"),
])
def test_bad_push_target_fails_before_anything_is_written(tmp_path, monkeypatch, target, env, message):
  import huggingface_hub
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  monkeypatch.delenv("HF_TOKEN", raising=False)
  # No stored token either (the paths are read when huggingface_hub is imported).
  monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
  monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  config = _eval_config(**{"model.hf_path": "/nonexistent", "export.output_dir": str(tmp_path / "out"),
                           "export.push_to_hub": target})
  with pytest.raises(ConfigError, match=f"config.export.push_to_hub: .*{message}"):
    export.run(config)
  assert not (tmp_path / "out").exists()


def test_export_without_output_dir_is_a_one_line_error():
  ec = _eval_config(**{"model.checkpoint_dir": "/nonexistent"})
  with pytest.raises(ConfigError, match="config.export.output_dir") as e:
    export.run(ec)
  assert "\n" not in str(e.value)


def _with_laser_json(path, **fields):
  meta = {"self_reward_token": "<|vision_start|>", "self_reward_token_id": hf_fixtures.ZC_ID, "kl_coef": 0.1,
          "ref_constant": None, "use_ref_model_score": True, "reference_model": "", "eos_token_id": 0,
          "prompt": {"template": "chat"}, **fields}
  (pathlib.Path(path) / "laser_jax.json").write_text(json.dumps(meta))
  return path


def test_export_of_an_exact_score_run_needs_its_reference(tmp_path):
  """An export trained with the exact score scores against its recorded reference model; without
  one recorded (a random-init run's initial policy) evaluation names config.laser.ref_hf_path,
  and a c_ref set in the eval config replaces the exact score (noted)."""
  path = _with_laser_json(_tiny_hf(tmp_path))
  with pytest.raises(ConfigError, match=r"^config\.laser\.ref_hf_path: .*laser_jax\.json says the model was trained "
                                        r"with the exact score"):
    loading.load_model(_eval_config(**{"model.hf_path": path}))
  model = loading.load_model(_eval_config(**{"model.hf_path": path, "laser.ref_constant": -9.0}))
  assert (model.ref_params, model.ref_constant, model.use_ref_model_score) == (None, -9.0, False)
  assert model.overrides == ("config.laser.ref_constant=-9.0 (the model was trained with the exact score, "
                             "against its initial policy)",)
  reference = hf_fixtures.make_tiny_hf_checkpoint(str(tmp_path / "ref"), "qwen2", seed=1)
  _with_laser_json(path, reference_model=reference)
  model = loading.load_model(_eval_config(**{"model.hf_path": path}))
  assert model.use_ref_model_score and model.ref_source == reference and model.ref_params is not None
  np.testing.assert_array_equal(model.ref_params["final_norm"]["scale"],
                                hf.load_hf_params(reference, model.cfg)["final_norm"]["scale"])


def test_laser_json_naming_another_token_than_the_tokenizers_is_an_error(tmp_path):
  path = _with_laser_json(_tiny_hf(tmp_path), self_reward_token="<|im_end|>", use_ref_model_score=False,
                          ref_constant=-9.0)
  with pytest.raises(ConfigError, match=r"names z_c '<\|im_end\|>' with id 3, but the tokenizer there has "
                                        r"'<\|vision_start\|>' at that id"):
    loading.load_model(_eval_config(**{"model.hf_path": path}))


@pytest.mark.parametrize("content, message", [
    ("{not json", "corrupt .*laser_jax.json: JSONDecodeError"),
    ('{"self_reward_token": "<|vision_start|>"}', "corrupt .*laser_jax.json: no 'self_reward_token_id'"),
])
def test_corrupt_laser_json_is_a_one_line_error(tmp_path, content, message):
  path = _tiny_hf(tmp_path)
  (pathlib.Path(path) / "laser_jax.json").write_text(content)
  with pytest.raises(ConfigError, match=f"^config.model.hf_path: {message}"):
    loading.load_model(_eval_config(**{"model.hf_path": path}))
