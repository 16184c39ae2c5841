"""Synthetic arithmetic task: solutions, splits, tokenizer, reward, SFT corpus."""
import numpy as np
import pytest
from transformers import AutoTokenizer

from laser_jax.data import prompts as prompts_lib
from laser_jax.data import synthetic, verifier
from laser_jax.training import sft


@pytest.fixture(scope="module")
def tokenizer():
  return synthetic.build_tokenizer()


@pytest.mark.parametrize("a,op,b,solution", [
    (37, "+", 45, "37+45=70+12=82\n\\boxed{82}"),
    (93, "-", 27, "93-27=70-4=66\n\\boxed{66}"),
    (137, "-", 45, "137-45=100-10+2=92\n\\boxed{92}"),
    (64, "*", 9, "64*9=540+36=576\n\\boxed{576}"),
    (85, "-", 55, "85-55=30\n\\boxed{30}"),  # a single non-zero term: no split shown
    (5, "+", 37, "5+37=42\n\\boxed{42}"),  # b longer than a: no place-wise split
    (0, "*", 7, "0*7=0\n\\boxed{0}"),
])
def test_solve_hand_cases(a, op, b, solution):
  answer, text = synthetic.solve(a, op, b)
  assert text == solution and answer == eval(f"{a}{op}{b}")


def test_every_solution_step_is_arithmetically_true():
  for r in synthetic.make_split("train", 300, seed=5, config=synthetic.SyntheticConfig(digits=3)):
    body = r["solution"].split("\n")[0]
    parts = body.split("=")
    assert len({eval(p) for p in parts}) == 1, body  # every "=" joins equal values
    assert eval(parts[0]) == int(r["answer"]) and synthetic.synthetic_reward(r["solution"],
                                                                             r["answer"]) == 1.0


def test_splits_deterministic_disjoint_distinct():
  cfg = synthetic.SyntheticConfig()
  train = synthetic.make_split("train", 1500, seed=0, config=cfg)
  heldout = synthetic.make_split("heldout", 200, seed=0, config=cfg)
  assert train == synthetic.make_split("train", 1500, seed=0, config=cfg)
  assert train != synthetic.make_split("train", 1500, seed=1, config=cfg)
  train_problems = {r["problem"] for r in train}
  assert len(train_problems) == 1500 and len({r["problem"] for r in heldout}) == 200
  assert not train_problems & {r["problem"] for r in heldout}
  # Disjoint across seeds too: the split is a property of the problem, not of the draw.
  other = synthetic.make_split("heldout", 200, seed=9, config=cfg)
  assert not train_problems & {r["problem"] for r in other}
  assert {op for r in train for op in "+-*" if op in r["problem"]} == {"+", "-", "*"}
  with pytest.raises(ValueError, match="split holds only"):
    synthetic.make_split("heldout", 5000, config=cfg)
  with pytest.raises(ValueError, match="ops must be"):
    synthetic.make_split("train", 1, config=synthetic.SyntheticConfig(ops="/"))


def test_reward():
  assert synthetic.synthetic_reward("3+4=7\n\\boxed{7}", "7") == 1.0
  assert synthetic.synthetic_reward("\\boxed{7} no, \\boxed{8}", "7") == 0.0
  assert synthetic.synthetic_reward("\\boxed{07}", "7") == 1.0  # integer comparison
  assert synthetic.synthetic_reward("\\boxed{-3}", "-3") == 1.0
  assert synthetic.synthetic_reward("\\boxed{7.0}", "7") == 0.0  # exact integer answers only
  assert synthetic.synthetic_reward("7", "7") == 0.0
  assert synthetic.synthetic_reward("3+4=7\n\\boxed{7", "7") == 0.0  # truncated box
  assert verifier.get_reward_fn("synthetic")("\\boxed{12}", "12") == 1.0


def test_tokenizer_round_trip_and_special_tokens(tokenizer, tmp_path):
  synthetic.save_tokenizer(tmp_path)
  loaded = AutoTokenizer.from_pretrained(str(tmp_path))
  zc = synthetic.self_reward_token_id(loaded)
  assert zc == synthetic.self_reward_token_id(tokenizer)
  assert len(loaded) <= 64 and loaded.pad_token_id != loaded.eos_token_id
  assert {loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, zc,
          loaded.unk_token_id} == set(loaded.convert_tokens_to_ids(
              [synthetic.PAD, synthetic.BOS, synthetic.EOS, synthetic.ZC_TOKEN, synthetic.UNK]))
  records = synthetic.make_split("train", 200, seed=2)
  for r in records:
    prompt = prompts_lib.build_prompt(r["problem"], loaded)
    for text in (prompt, r["solution"]):
      ids = loaded(text, add_special_tokens=False)["input_ids"]
      assert loaded.unk_token_id not in ids and loaded.decode(ids) == text
      if text is r["solution"]:
        assert zc not in ids and len(ids) <= 24
  # The instruction is a handful of tokens, not one per character.
  assert len(loaded(prompts_lib.INSTRUCTION, add_special_tokens=False)["input_ids"]) <= 16
  assert prompts_lib.build_prompt("x", loaded) == prompts_lib.build_prompt("x", tokenizer)


def test_sft_corpus(tokenizer):
  records = synthetic.make_split("train", 8, seed=0)
  corpus = sft.build_sft_corpus(records, tokenizer)
  assert corpus.tokens.shape == corpus.loss_mask.shape == (8, corpus.lengths.max())
  for i, r in enumerate(records):
    n = corpus.lengths[i]
    prompt_ids = prompts_lib.encode_prompt(prompts_lib.build_prompt(r["problem"], tokenizer), tokenizer)
    target = np.flatnonzero(corpus.loss_mask[i])
    assert target[0] == len(prompt_ids) and target[-1] == n - 1 and len(target) == n - len(prompt_ids)
    assert corpus.tokens[i, :len(prompt_ids)].tolist() == prompt_ids
    assert corpus.tokens[i, n - 1] == tokenizer.eos_token_id
    assert tokenizer.decode(corpus.tokens[i, len(prompt_ids):n - 1]) == r["solution"]
    assert (corpus.tokens[i, n:] == tokenizer.pad_token_id).all()
  padded = sft.build_sft_corpus(records, tokenizer, max_len=64)
  assert padded.tokens.shape == (8, 64)
  with pytest.raises(ValueError, match="max_len 10"):
    sft.build_sft_corpus(records, tokenizer, max_len=10)
