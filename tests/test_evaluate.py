"""laser_jax.evaluate end to end on a tiny random HF checkpoint, checked against independent references:
transformers (torch) forwards for the self-reward log-probs, the reward function applied to the decoded
responses, and a NumPy re-implementation of the summary metrics computed from the output file."""
import json
import math
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

import hf_fixtures
import numpy_reference
from laser_jax import cli
from laser_jax import config_check
from laser_jax import default_config
from laser_jax.data import answers
from laser_jax.data import prompts as prompts_lib
from laser_jax.evaluation import evaluator
from laser_jax.evaluation import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, MAX_NEW, BETA, C_REF = 4, 24, 1.0, -9.5
PROBLEMS = [(f"What is {a} + {b}?", str(a + b)) for a, b in [(1, 2), (3, 4), (5, 6), (7, 9), (2, 8)]]


def length_parity_reward(response: str, reference: str) -> float:
  """A reward a random model scores non-trivially on (its responses are never math)."""
  del reference
  return float(len(response) % 2 == 0)


def eval_config(**overrides):
  c = default_config.load_config_file(os.path.join(REPO, "configs", "eval.py"))
  return default_config.apply_overrides(c, overrides)


def make_checkpoint(path) -> str:
  """A tiny random qwen2 checkpoint whose generation_config adds "\\n" as a second EOS, so that a
  random model finishes some responses (and truncates others) within a few tokens."""
  hf_fixtures.make_tiny_hf_checkpoint(str(path), "qwen2")
  tok = hf_fixtures.make_tiny_tokenizer(str(path))
  newline = tok("\n", add_special_tokens=False)["input_ids"]
  assert len(newline) == 1
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [hf_fixtures.EOS_ID, newline[0]]}, f)
  # The self-reward constants a laser_jax export carries (z_c = <|vision_start|>, the paper's beta_v
  # and c_ref): a plain HF directory would need them as config.laser.* keys (tests/test_export.py).
  with open(os.path.join(path, "laser_jax.json"), "w") as f:
    json.dump({"self_reward_token": "<|vision_start|>", "self_reward_token_id": hf_fixtures.ZC_ID,
               "kl_coef": 0.1, "ref_constant": -23.0, "use_ref_model_score": False, "reference_model": "",
               "eos_token_id": hf_fixtures.EOS_ID, "prompt": {"template": "chat"}}, f)
  return str(path)


def write_problems(path, problems=PROBLEMS) -> str:
  with open(path, "w") as f:
    for problem, answer in problems:
      f.write(json.dumps({"problem": problem, "answer": answer}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return make_checkpoint(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="module")
def run_output(ckpt, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("eval")
  config = eval_config(**{
      "model.hf_path": ckpt, "eval.input_file": write_problems(tmp / "problems.jsonl"),
      "eval.output_file": str(tmp / "out" / "result.jsonl"), "eval.n": N,
      "eval.max_new_tokens": MAX_NEW, "eval.batch_size": 2, "eval.num_workers": 0,
      "eval.reward_fn": "test_evaluate:length_parity_reward", "eval.num_bootstrap": 50,
      "eval.bootstrap_seed": 3, "laser.kl_coef": BETA, "laser.ref_constant": C_REF})
  summary = evaluator.run(config, progress=False, print_table=False)
  with open(config.eval.output_file) as f:
    rows = [json.loads(line) for line in f]
  return config, summary, rows


def test_output_rows_have_all_fields_and_consistent_values(run_output, ckpt):
  from tokenizers import Tokenizer
  config, _, rows = run_output
  # The reference is the raw tokenizer.json (transformers 5's AutoTokenizer would swap in
  # Qwen2Tokenizer for this qwen2 checkpoint and tokenize a custom vocabulary differently).
  raw = Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
  tok = lambda text, add_special_tokens: {"input_ids": raw.encode(text, add_special_tokens=add_special_tokens).ids}
  tok.decode = lambda ids, skip_special_tokens: raw.decode(ids, skip_special_tokens=skip_special_tokens)
  assert [(r["problem"], r["answer"]) for r in rows] == PROBLEMS
  finished_count = 0
  for r in rows:
    for key in ("responses", "pred_answers", "acc_list", "self_rewarding_scores", "self_rewarding_logprobs",
                "response_token_ids", "stop_token_ids", "score_after_truncation", "mean_token_logprobs"):
      assert len(r[key]) == N, key
    assert prompts_lib.INSTRUCTION in r["prompt"] and r["problem"] in r["prompt"]
    assert r["prompt_token_ids"] == tok(r["prompt"], add_special_tokens=False)["input_ids"]
    for i in range(N):
      ids, lp, stop = r["response_token_ids"][i], r["self_rewarding_logprobs"][i], r["stop_token_ids"][i]
      assert r["responses"][i] == tok.decode(ids, skip_special_tokens=True)
      assert r["pred_answers"][i] == answers.extract_last_boxed(r["responses"][i])
      assert r["acc_list"][i] == length_parity_reward(r["responses"][i], r["answer"])
      if stop is None:  # truncated: the full budget, no EOS, scored after an appended EOS
        assert len(ids) == MAX_NEW and r["score_after_truncation"][i] is True
      else:
        finished_count += 1
        assert len(ids) < MAX_NEW and stop in (0, tok("\n", add_special_tokens=False)["input_ids"][0])
        assert stop not in ids and r["score_after_truncation"][i] is False  # EOS excluded from the ids
      # Every response has a score, the official evaluation's r_s = beta_v (log pi(z_c) - c_ref).
      assert r["self_rewarding_scores"][i] == pytest.approx(BETA * (lp - C_REF), abs=1e-6)
  assert 0 < finished_count < len(rows) * N  # both finished and truncated responses occur
  assert len({a for r in rows for a in r["acc_list"]}) == 2  # both verdicts occur


def test_self_reward_logprobs_match_transformers_forward(run_output, ckpt):
  """Finished responses: the sampler's in-loop log pi(z_c) after the EOS it emitted; truncated
  ones: the extra forward's, after an appended EOS (the model's first EOS id) -- each equal to a
  transformers forward over prompt + response + that EOS, read at its last position."""
  import torch
  import transformers
  _, _, rows = run_output
  model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
  checked = {"finished": 0, "truncated": 0}
  for r in rows:
    for ids, stop, lp, mean_lp in zip(r["response_token_ids"], r["stop_token_ids"], r["self_rewarding_logprobs"],
                                      r["mean_token_logprobs"]):
      kind = "finished" if stop is not None else "truncated"
      if checked[kind] >= 4:
        continue
      seq = torch.tensor([r["prompt_token_ids"] + ids + [hf_fixtures.EOS_ID if stop is None else stop]])
      with torch.no_grad():
        all_logprobs = torch.log_softmax(model(seq).logits[0].double(), -1)
      ref = all_logprobs[-1, hf_fixtures.ZC_ID].item()
      assert lp == pytest.approx(ref, abs=1e-4), kind
      # The likelihood baseline's signal (temperature 1): the mean token log-prob of the response,
      # its EOS included when it emitted one (not the EOS appended for the score).
      targets = seq[0, len(r["prompt_token_ids"]):len(r["prompt_token_ids"]) + len(ids) + (stop is not None)]
      token_logprobs = all_logprobs[len(r["prompt_token_ids"]) - 1:-1][torch.arange(len(targets)), targets]
      assert mean_lp == pytest.approx(token_logprobs.mean().item(), abs=1e-4), kind
      checked[kind] += 1
  assert checked == {"finished": 4, "truncated": 4}


def test_exact_score_subtracts_the_reference_models_logprob(ckpt, tmp_path):
  """laser.ref_hf_path: each score is beta_v * (log pi - log pi_ref), and log pi_ref equals a
  transformers forward of the reference checkpoint over prompt + response + EOS."""
  import torch
  import transformers
  ref_ckpt = hf_fixtures.make_tiny_hf_checkpoint(str(tmp_path / "ref"), "qwen2", seed=1)
  config = eval_config(**{
      "model.hf_path": ckpt, "laser.ref_hf_path": ref_ckpt, "eval.input_file": write_problems(tmp_path / "p.jsonl"),
      "eval.output_file": str(tmp_path / "out.jsonl"), "eval.n": N, "eval.max_new_tokens": MAX_NEW,
      "eval.batch_size": 2, "eval.num_workers": 0, "eval.reward_fn": "test_evaluate:length_parity_reward",
      "eval.num_bootstrap": 10, "laser.kl_coef": BETA, "laser.ref_constant": C_REF})
  summary = evaluator.run(config, progress=False, print_table=False)
  assert summary["reference_model"] == ref_ckpt and summary["ref_constant"] is None
  rows = [json.loads(line) for line in open(config.eval.output_file)]
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(ref_ckpt, dtype=torch.float32).eval()
  checked = []
  for r in rows:
    for i, (ids, stop, lp) in enumerate(zip(r["response_token_ids"], r["stop_token_ids"],
                                            r["self_rewarding_logprobs"])):
      ref_lp, score = r["self_rewarding_ref_logprobs"][i], r["self_rewarding_scores"][i]
      # A truncated response is scored after an appended EOS by pi_ref too (the official score).
      assert r["score_after_truncation"][i] == (stop is None)
      stop = hf_fixtures.EOS_ID if stop is None else stop
      with torch.no_grad():
        logits = ref_model(torch.tensor([r["prompt_token_ids"] + ids + [stop]])).logits[0, -1].double()
      assert ref_lp == pytest.approx(torch.log_softmax(logits, -1)[hf_fixtures.ZC_ID].item(), abs=1e-4)
      assert abs(ref_lp - lp) > 1e-3  # Another model: not the policy's own log-prob.
      assert score == pytest.approx(BETA * (lp - ref_lp), abs=1e-6)
      checked.append(r["score_after_truncation"][i])
  assert set(checked) == {True, False}  # finished and truncated responses both checked
  # A reference with another architecture is a one-line error naming the field.
  other = hf_fixtures.make_tiny_hf_checkpoint(str(tmp_path / "other"), "qwen2", vocab_size=512)
  config.laser.ref_hf_path = other
  with pytest.raises(config_check.ConfigError,
                     match=r"config\.laser\.ref_hf_path: .* vocab_size is 512 there, 384"):
    evaluator.run(config, progress=False, print_table=False)


def _canon(a):
  if a is None:
    return None
  s = "".join(a.split()).replace("\\left", "").replace("\\right", "")
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")
  return s or None


def reference_metrics(rows, threshold, num_bootstrap, seed):
  """The summary metrics written directly from their definitions (tts.py / SPEC.md), in NumPy."""
  acc = np.array([r["acc_list"] for r in rows], float)
  scores = np.array([[np.nan if s is None else s for s in r["self_rewarding_scores"]] for r in rows])
  num_problems, n = acc.shape
  out = {"reward/mean": acc.mean()}
  # Official conventions (SPEC "Test time"): every response, unscored = predicted "incorrect".
  official = numpy_reference.self_verification_official(scores.ravel(), acc.ravel(), threshold)
  out.update(zip([f"self_verification/{k}" for k in ("acc_correct", "acc_incorrect", "acc", "f1", "num_correct",
                                                     "num_incorrect")], official))
  out["self_verification/auroc"] = numpy_reference.auroc_unscored_lowest(scores.ravel(), acc.ravel())
  out["self_verification/ece"] = numpy_reference.ece_unscored_zero(scores.ravel(), acc.ravel())
  # Finished responses only (a stop token), an empty class NaN.
  fin = np.array([[t is not None for t in r["stop_token_ids"]] for r in rows])
  truth, pred = acc[fin] > 0.5, scores[fin] > threshold
  c_acc = pred[truth].mean() if truth.any() else np.nan
  i_acc = (~pred[~truth]).mean() if (~truth).any() else np.nan
  out.update({"self_verification/acc_correct_finished": c_acc, "self_verification/acc_incorrect_finished": i_acc,
              "self_verification/acc_finished": (pred == truth).mean() if truth.size else np.nan,
              "self_verification/f1_finished": 2 * c_acc * i_acc / (c_acc + i_acc) if c_acc + i_acc > 0 else np.nan,
              "self_verification/num_correct_finished": truth.sum(),
              "self_verification/num_incorrect_finished": (~truth).sum(),
              "self_verification/num_unscored": np.isnan(scores).sum(), "truncated_frac": 1 - fin.mean(),
              "self_verification/score/mean": np.nanmean(scores) if (~np.isnan(scores)).any() else np.nan,
              # response tokens with the EOS of finished ones (as training counts them)
              "response_length/mean": np.mean([len(t) + (s is not None) for r in rows
                                               for t, s in zip(r["response_token_ids"], r["stop_token_ids"])])})
  lps = np.array([[np.nan if s is None else s for s in r["self_rewarding_logprobs"]] for r in rows])
  out["z_logprob/mean"] = np.nanmean(lps)
  out["z_logprob/std"] = np.nanstd(lps)
  # Within a problem: pairwise AUROC over its scored responses (ties 1/2), problems with both classes.
  within = []
  for a_row, s_row in zip(acc, scores):
    pos = [s for a, s in zip(a_row, s_row) if a > 0.5 and not np.isnan(s)]
    neg = [s for a, s in zip(a_row, s_row) if a <= 0.5 and not np.isnan(s)]
    if pos and neg:
      within.append(np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x in pos for y in neg]))
  out["self_verification/within_auroc"] = np.mean(within) if within else np.nan
  out["self_verification/within_auroc_problems"] = len(within)
  out["reward/variance_explained_by_problem"] = acc.mean(1).var() / acc.var() if acc.var() > 0 else np.nan
  if all("responses" in r for r in rows):
    for name, pick in (("correct", lambda a: a > 0.5), ("incorrect", lambda a: a <= 0.5)):
      texts = [(i, t) for i, r in enumerate(rows) for t, a in zip(r["responses"], r["acc_list"]) if pick(a)]
      out[f"distinct_frac/{name}"] = len(set(texts)) / len(texts) if texts else np.nan
  ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= n]
  rng = np.random.default_rng(seed)
  sums = defaultdict(float)
  # The likelihood baselines: exp(mean token log-prob) weights, the highest mean token log-prob.
  with_likelihood = all("mean_token_logprobs" in r for r in rows)
  names = ("maj", "self_weighted_maj", "best") + (("likelihood_weighted_maj", "best_by_likelihood")
                                                  if with_likelihood else ())
  for p, r in enumerate(rows):
    answers = [_canon(a) for a in r["pred_answers"]]
    order = {a: i for i, a in reversed(list(enumerate(answers)))}  # first appearance
    for k in ks:
      draws = rng.integers(n, size=(num_bootstrap, k))
      for name in names:
        total = 0.0
        for d in draws:
          if name in ("best", "best_by_likelihood"):
            s = [-math.inf if np.isnan(scores[p, j]) else scores[p, j] for j in d] if name == "best" \
                else [r["mean_token_logprobs"][j] for j in d]
            total += acc[p, d[int(np.argmax(s))]]
            continue
          tally = {}
          for j in d:
            if answers[j] is not None:
              # Self-reward weights are max(r_s, 0), no score 0 (README "Evaluation").
              w = (1.0 if name == "maj" else math.exp(r["mean_token_logprobs"][j])
                   if name == "likelihood_weighted_maj" else
                   0.0 if np.isnan(scores[p, j]) else max(scores[p, j], 0.0))
              tally[answers[j]] = tally.get(answers[j], 0.0) + w
          if tally:
            best = max(tally.values())
            winner = min((a for a, v in tally.items() if v == best), key=order.get)
            total += acc[p, next(j for j in d if answers[j] == winner)]
        sums[f"{name}@{k}"] += total / num_bootstrap
  out.update({key: v / num_problems for key, v in sums.items()})
  return out


def _assert_metrics_match(summary, ref):
  for key, want in ref.items():
    got = summary[key]
    if want is None or (isinstance(want, float) and np.isnan(want)):
      assert got is None or np.isnan(got), key
    else:
      # Self-verification comes from the training metrics' implementation, in float32.
      assert got == pytest.approx(float(want), abs=1e-6 if key.startswith("self_verification/") else 1e-9), key


def test_summary_json_matches_numpy_recomputation(run_output):
  config, summary, rows = run_output
  with open(report.summary_path(config.eval.output_file)) as f:
    on_disk = json.load(f)
  assert on_disk == summary
  assert config.eval.output_file.endswith("result.jsonl")
  assert report.summary_path(config.eval.output_file).endswith("result.summary.json")
  ref = reference_metrics(rows, 0.5, num_bootstrap=50, seed=3)
  _assert_metrics_match(summary, ref)
  assert summary["num_problems"] == len(PROBLEMS) and summary["n"] == N
  assert {"maj@4", "self_weighted_maj@4", "best@4"} <= set(summary)
  assert summary["config"]["eval"]["n"] == N
  # The README's table of summary keys is every key of a summary (@k as written there), and no other.
  import re
  from test_trainer import readme_metric_names
  assert readme_metric_names("eval-summary-names") == {re.sub(r"@\d+$", "@k", k) for k in summary}


def test_metrics_on_handmade_rows_with_votes():
  """Voting needs answers: rows written by hand, canonical spellings merged, NaN/None handled."""
  rows = [
      {"pred_answers": ["\\frac{1}{2}", "\\dfrac{1}{2}", "3", "3", None],
       "acc_list": [1.0, 1.0, 0.0, 0.0, 0.0],
       "self_rewarding_scores": [0.9, None, 0.1, 0.2, 0.7],
       "self_rewarding_logprobs": [-20.0, None, -22.0, -21.0, -19.0],
       "response_token_ids": [[1], [2, 3], [4], [5, 6, 7], [8]],
       "stop_token_ids": [0, None, 0, 0, 0]},  # the second truncated and not scored
      {"pred_answers": ["x + 1", "x+1", "\\left(2\\right)", "(2)", "7."],
       "acc_list": [0.0, 0.0, 1.0, 1.0, 0.0],
       "self_rewarding_scores": [0.3, 0.3, 0.8, 0.6, None],
       "self_rewarding_logprobs": [-22.0, -22.0, -20.0, -21.0, None],
       "response_token_ids": [[1], [2], [3], [4], [5]],
       "stop_token_ids": [0, 0, 0, None, None]},  # the fourth truncated, scored after truncation
  ]
  assert answers.canonical_answer("\\left(2\\right)") == answers.canonical_answer("(2)")
  assert answers.canonical_answer("x + 1") == "x+1" and answers.canonical_answer(None) is None
  summary = report.metrics_from_rows(rows, threshold=0.5, num_bootstrap=200, seed=7)
  _assert_metrics_match(summary, reference_metrics(rows, 0.5, 200, 7))
  assert summary["self_verification/num_unscored"] == 2 and summary["truncated_frac"] == pytest.approx(0.3)
  # The unscored correct response counts as a miss officially; the finished-only figures leave
  # out all three truncated responses.
  assert summary["self_verification/acc_correct"] == 3 / 4 and summary["self_verification/acc_correct_finished"] == 1.0
  assert 0 < summary["maj@4"] < 1 and summary["self_weighted_maj@4"] != summary["maj@4"]


def test_cli_prints_table_and_exits_zero(ckpt, tmp_path):
  out = tmp_path / "cli.jsonl"
  cmd = [sys.executable, "-m", "laser_jax.evaluate", "--config=configs/eval.py",
         f"--config.model.hf_path={ckpt}", f"--config.eval.input_file={write_problems(tmp_path / 'p.jsonl', PROBLEMS[:2])}",
         f"--config.eval.output_file={out}", "--config.eval.n=2", "--config.eval.max_new_tokens=8",
         "--config.eval.num_workers=1", "--config.eval.num_bootstrap=20", "--config.mesh.fsdp=1",
         "--config.mesh.data=-1", "--config.eval.score_truncated=false"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "mean@2 accuracy" in proc.stdout and "self_weighted_maj@k" in proc.stdout
  assert "F1" in proc.stdout and "sampling" in proc.stderr  # the table, and the progress bar
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 2 and all(len(r["responses"]) == 2 for r in rows)
  assert all(a == 0.0 for r in rows for a in r["acc_list"])  # math verifier: junk is never right
  assert os.path.isfile(report.summary_path(str(out)))
  summary = json.loads(open(report.summary_path(str(out))).read())
  # score_truncated off: a truncated response (no stop token) has no score and counts as unscored.
  stops = [t for r in rows for t in r["stop_token_ids"]]
  assert [s is None for r in rows for s in r["self_rewarding_scores"]] == [t is None for t in stops]
  assert not any(a for r in rows for a in r["score_after_truncation"])
  assert summary["self_verification/num_unscored"] == stops.count(None)
  # One class only (nothing is correct): AUROC undefined; the reliability plot sits beside it.
  assert summary["self_verification/auroc"] is None and "AUROC of the score" in proc.stdout
  assert summary["reliability_plot"] == str(tmp_path / "cli.reliability.png")
  assert os.path.isfile(summary["reliability_plot"])


def test_malformed_input_file_is_a_one_line_error(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"problem": "What is 1+1?", "answer": "2"}\n{"problem": "oops"\n')
  cmd = [sys.executable, "-m", "laser_jax.evaluate", "--config=configs/eval.py",
         "--config.model.hf_path=/nonexistent", f"--config.eval.input_file={bad}",
         f"--config.eval.output_file={tmp_path / 'o.jsonl'}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert f"{bad}:2" in proc.stderr and "Traceback" not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_wrong_config_key_fails_at_parsing(tmp_path):
  cmd = [sys.executable, "-m", "laser_jax.evaluate", "--config=configs/eval.py", "--config.eval.nn=3"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "nn" in proc.stderr


@pytest.mark.parametrize("overrides, message", [
    ({"eval.input_file": "/nonexistent/problems.jsonl"}, "file not found: /nonexistent/problems.jsonl"),
    ({"laser.self_reward_token_id": 100000}, "config.laser.self_reward_token_id: 100000 is outside"),
    ({"laser.self_reward_token": "<|nope|>"}, "config.laser.self_reward_token: '<|nope|>'"),
    ({"model.checkpoint_dir": "/tmp/x"}, "set exactly one"),
    ({"model.hf_path": "", "model.checkpoint_dir": "/nonexistent/run"},
     "config.model.checkpoint_dir: '/nonexistent/run' does not exist"),
    ({"eval.n": 0}, "config.eval.n"),
    ({"eval.reward_fn": "nope"}, "config.eval.reward_fn"),
])
def test_bad_input_one_line_errors(ckpt, tmp_path, capsys, overrides, message):
  config = eval_config(**{"model.hf_path": ckpt, "eval.output_file": str(tmp_path / "o.jsonl"),
                          "eval.input_file": write_problems(tmp_path / "p.jsonl"), **overrides})
  with pytest.raises(SystemExit) as exc:
    cli.exit_on_bad_input(evaluator.run, config)
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err
  assert not (tmp_path / "o.jsonl").exists()  # nothing written


@pytest.mark.slow
def test_evaluate_trainer_checkpoint(tmp_path):
  """Train one step, evaluate its checkpoint; scores equal a forward with the trainer's own restore."""
  import jax
  from laser_jax.models import model as model_lib
  from laser_jax.training import checkpoint as ckpt_lib
  from laser_jax.training import trainer
  from test_trainer import tiny_config
  train_cfg = tiny_config(tmp_path / "run", total_steps=1, eval_every=0)
  trainer.train(train_cfg, progress=False)
  (tmp_path / "train_config.json").write_text(train_cfg.to_json())
  config = eval_config(**{
      "model.checkpoint_dir": str(tmp_path / "run"), "model.train_config": str(tmp_path / "train_config.json"),
      "eval.input_file": "synthetic", "eval.limit": 4, "eval.reward_fn": "synthetic",
      "eval.num_workers": 0, "eval.n": 2, "eval.max_new_tokens": 12, "eval.batch_size": 4,
      "eval.output_file": str(tmp_path / "eval.jsonl"), "eval.num_bootstrap": 10,
      "laser.ref_constant": -4.0})
  summary = evaluator.run(config, progress=False, print_table=False)
  assert summary["num_problems"] == 4 and "checkpoints/1/state" in summary["model"]
  rows = [json.loads(line) for line in open(config.eval.output_file)]
  # Reference: the trainer's own full-state restore of the same step.
  t = trainer.Trainer(train_cfg)
  state, _ = ckpt_lib.Checkpointer(str(tmp_path / "run"), async_save=False).restore(1, t.abstract_state())
  zc = t.zc_id
  checked = 0
  for r in rows:
    for ids, stop, lp in zip(r["response_token_ids"], r["stop_token_ids"], r["self_rewarding_logprobs"]):
      seq = np.array([r["prompt_token_ids"] + ids + ([stop] if stop is not None else [])], np.int32)
      logits = model_lib.forward(state.params, t.model_cfg, seq, np.arange(seq.shape[1])[None],
                                 np.ones(seq.shape, bool))
      if lp is not None:
        ref = float(jax.nn.log_softmax(logits[0, -1])[zc])
        assert lp == pytest.approx(ref, abs=1e-4)
        checked += 1
  assert checked > 0
  # The wrong training config (the default, larger model) is a one-line error naming the tensor.
  config.model.train_config = os.path.join(REPO, "configs", "tiny_cpu.py")
  with pytest.raises(config_check.ConfigError, match=r"params\['embed'\]\['embedding'\] has shape"):
    evaluator.run(config, progress=False, print_table=False)


@pytest.mark.slow
def test_checkpoint_of_an_exact_score_run_is_evaluated_against_its_reference(tmp_path, monkeypatch):
  """A run trained with the exact score (random init + warm start, no HF model) is evaluated with
  it: pi_ref is the run's initial policy, read from the copy the run saved (the warm start does
  not run again), whose log-probs the records hold."""
  import jax
  from laser_jax.models import model as model_lib
  from laser_jax.training import sft, trainer
  from test_trainer import tiny_config
  train_cfg = tiny_config(tmp_path / "run", total_steps=1, eval_every=0,
                          **{"laser.use_ref_model_score": True, "sft.steps": 3, "sft.batch_size": 8})
  trainer.train(train_cfg, progress=False)
  t = trainer.Trainer(train_cfg)
  initial = jax.device_get(t.initial_params())

  def no_warm_start(*args, **kwargs):
    raise AssertionError("the evaluator ran the warm start again")
  monkeypatch.setattr(sft, "warm_start", no_warm_start)
  config = eval_config(**{
      "model.checkpoint_dir": str(tmp_path / "run"), "eval.input_file": "synthetic", "eval.limit": 8,
      "eval.reward_fn": "synthetic", "eval.num_workers": 0, "eval.n": 8, "eval.max_new_tokens": 32,
      "eval.batch_size": 8, "eval.output_file": str(tmp_path / "eval.jsonl"), "eval.num_bootstrap": 10})
  summary = evaluator.run(config, progress=False, print_table=False)
  assert summary["reference_model"].startswith("initial policy of")
  checked = 0
  for r in map(json.loads, open(config.eval.output_file)):
    for ids, stop, lp, ref_lp, score in zip(r["response_token_ids"], r["stop_token_ids"], r["self_rewarding_logprobs"],
                                            r["self_rewarding_ref_logprobs"], r["self_rewarding_scores"]):
      if lp is None:
        continue
      seq = np.array([r["prompt_token_ids"] + ids + [stop]], np.int32)
      logits = model_lib.forward(initial, t.model_cfg, seq, np.arange(seq.shape[1])[None], np.ones(seq.shape, bool))
      assert ref_lp == pytest.approx(float(jax.nn.log_softmax(logits[0, -1])[t.zc_id]), abs=1e-4)
      assert score == pytest.approx(train_cfg.laser.kl_coef * (lp - ref_lp), abs=1e-6)
      checked += 1
  assert checked > 0
