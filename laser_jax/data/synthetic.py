"""The embedded default task: small-integer arithmetic with a short worked answer.

A problem is "What is 37+45?"; its solution splits the computation by the place values of the
first operand and ends in a boxed answer:

    37+45=70+12=82\\n\\boxed{82}        137-45=100-10+2=92\\n\\boxed{92}      23*4=80+12=92\\n\\boxed{92}

The decomposition gives a tiny transformer intermediate steps it can learn in minutes on a CPU,
while the carries keep a short supervised warm start well short of 100% accuracy, so RL has signal.
Responses stay under ~30 tokens with the default sizes.

The task has its own word/character-level tokenizer (built with `tokenizers`, saved in the HF
format) with pad/bos/eos, chat-role tokens and a self-reward token `<|zc|>` that no text maps to.
Train and held-out problems are disjoint: the split of a problem is a stable hash of its text.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import numpy as np

from laser_jax.data import answers

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
ZC_TOKEN = "<|zc|>"  # the self-reward token z_c: special, so never produced by encoding text
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT, ZC_TOKEN]

# Pieces of text, longest alternatives first. Words carry their leading space (" reason") so the
# instruction costs one token per word; everything else is one character per token.
_PIECE_PATTERN = r"\\boxed\{\}|\\boxed\{| ?[A-Za-z]+|[\s\S]"
_WORDS = ["What", " is", "Please", " reason", " step", " by", " and", " put", " your", " final",
          " answer", " within"]
_CHARS = list("0123456789+-*=?,.{} \n")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% else %}<|assistant|>{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Difficulty of the arithmetic task.

  ops: operators to draw from ("+", "-", "*"). digits: max digits of both operands of + and -
  and of the first operand of *. mul_digits: max digits of the second operand of *.
  heldout_fraction: share of the problem space reserved for evaluation.
  """
  ops: str = "+-*"
  digits: int = 2
  mul_digits: int = 1
  heldout_fraction: float = 0.1


def build_tokenizer():
  """The task's tokenizer as a `transformers.PreTrainedTokenizerFast` with a chat template."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + _WORDS + _CHARS + ["\\boxed{", "\\boxed{}"])}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE_PATTERN), behavior="isolated")
  tok.decoder = decoders.Fuse()  # concatenate pieces: exact round trip, spaces included
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                               unk_token=UNK, additional_special_tokens=[USER, ASSISTANT, ZC_TOKEN])
  hf.chat_template = CHAT_TEMPLATE
  return hf


def save_tokenizer(directory: str | os.PathLike):
  """Builds the tokenizer and writes it to `directory` (HF format); returns it."""
  tokenizer = build_tokenizer()
  tokenizer.save_pretrained(str(directory))
  return tokenizer


def self_reward_token_id(tokenizer) -> int:
  """Id of z_c (`<|zc|>`) in the task tokenizer."""
  return tokenizer.convert_tokens_to_ids(ZC_TOKEN)


def solve(a: int, op: str, b: int) -> tuple[int, str]:
  """(answer, worked solution) for `a op b`, decomposed over the place values of `a`."""
  result = {"+": a + b, "-": a - b, "*": a * b}[op]
  places = [int(d) * 10**i for i, d in enumerate(reversed(str(a)))][::-1]  # 137 -> 100, 30, 7
  if op == "*":
    terms = [p * b for p in places]
  else:
    # Tens and above from `a` and `b` place by place, then the units: 137-45 = 100 + (30-40) + (7-5).
    b_places = [int(d) * 10**i for i, d in enumerate(reversed(str(b)))][::-1]
    b_places = [0] * (len(places) - len(b_places)) + b_places
    sign = 1 if op == "+" else -1
    terms = [p + sign * q for p, q in zip(places, b_places)] if len(b_places) == len(places) \
        else None
  if terms is None:  # b has more digits than a: no place-wise split, state the result directly.
    steps = ""
  else:
    terms = [t for t in terms if t != 0]
    expr = "".join(("+" if t >= 0 else "-") + str(abs(t)) for t in terms).lstrip("+")
    steps = f"={expr}" if len(terms) > 1 else ""
  return result, f"{a}{op}{b}{steps}={result}\n\\boxed{{{result}}}"


def _is_heldout(problem: str, fraction: float) -> bool:
  digest = hashlib.sha256(problem.encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def make_split(split: str, num_examples: int, seed: int = 0,
               config: SyntheticConfig = SyntheticConfig()) -> list[dict]:
  """`num_examples` distinct problems of `split` ("train" or "heldout"), deterministic in `seed`.

  Each record has "problem", "answer" (the integer as text) and "solution" (the worked answer).
  """
  if split not in ("train", "heldout"):
    raise ValueError(f"synthetic split must be 'train' or 'heldout', got {split!r}")
  bad_ops = set(config.ops) - set("+-*")
  if not config.ops or bad_ops:
    raise ValueError(f"SyntheticConfig.ops must be a non-empty subset of '+-*', got {config.ops!r}")
  space = sum((10**config.digits) * (10**(config.mul_digits if op == "*" else config.digits))
              for op in config.ops)
  share = config.heldout_fraction if split == "heldout" else 1 - config.heldout_fraction
  if num_examples > 0.5 * share * space:
    raise ValueError(f"synthetic {split}: {num_examples} examples requested but the split holds "
                     f"only ~{int(share * space)} problems; raise SyntheticConfig.digits")
  rng = np.random.default_rng([seed, split == "heldout"])
  seen, records = set(), []
  while len(records) < num_examples:
    op = config.ops[rng.integers(len(config.ops))]
    a = int(rng.integers(10**config.digits))
    b = int(rng.integers(10**(config.mul_digits if op == "*" else config.digits)))
    if op == "-" and b > a:
      a, b = b, a  # keep answers non-negative
    problem = f"What is {a}{op}{b}?"
    if problem in seen or _is_heldout(problem, config.heldout_fraction) != (split == "heldout"):
      continue
    seen.add(problem)
    answer, solution = solve(a, op, b)
    records.append({"problem": problem, "answer": str(answer), "solution": solution})
  return records


def synthetic_reward(response: str, reference: str) -> float:
  """1.0 iff the last boxed answer of `response` is the integer `reference` (exact match)."""
  boxed = answers.extract_last_boxed(response)
  if boxed is None or not re.fullmatch(r"\s*-?\d+\s*", boxed):
    return 0.0
  return float(int(boxed) == int(reference))
