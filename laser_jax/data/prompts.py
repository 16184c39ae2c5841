"""Prompts: the instruction, the chat or base template, tokenization and the length filter."""
from __future__ import annotations

import dataclasses
from typing import Sequence

@dataclasses.dataclass(frozen=True)
class Prompt:
  """A tokenized prompt and the reference answer its responses are verified against: what the
  sampling pipeline (`rl.scoring.generate`) takes, from the trainer and the evaluator alike."""
  token_ids: list[int]
  answer: str
  problem: str = ""


INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def build_prompt(problem: str, tokenizer=None, template: str = "chat") -> str:
  """The prompt text for `problem`.

  "chat": the tokenizer's chat template with one user turn `problem + "\\n" + INSTRUCTION` and
  the generation prompt. "base": plain text `problem + "\\n" + INSTRUCTION + "\\n"`.
  """
  content = problem + "\n" + INSTRUCTION
  if template == "base":
    return content + "\n"
  if template != "chat":
    raise ValueError(f"unknown prompt template {template!r}: expected 'chat' or 'base'")
  if tokenizer is None or not getattr(tokenizer, "chat_template", None):
    raise ValueError("prompt template 'chat' needs a tokenizer with a chat_template; "
                     "use template='base' for tokenizers without one")
  return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                       add_generation_prompt=True)


def encode_prompt(prompt: str, tokenizer, template: str = "chat") -> list[int]:
  """Token ids of a prompt. The chat template already writes BOS where the model wants one, so
  special tokens are only added for the base template (e.g. Llama's BOS; Qwen adds none)."""
  return list(tokenizer(prompt, add_special_tokens=(template == "base"))["input_ids"])


@dataclasses.dataclass(frozen=True)
class PreparedPrompts:
  items: list[dict]  # records + "prompt" (str) + "prompt_ids" (list[int]) + "index" (source row)
  num_filtered: int  # records dropped for being longer than max_prompt_len tokens

  @property
  def prompts(self) -> list[Prompt]:
    """The items as the sampling pipeline takes them."""
    return [Prompt(item["prompt_ids"], item["answer"], item["problem"]) for item in self.items]


def prepare_prompts(records: Sequence[dict], tokenizer, template: str = "chat",
                    max_prompt_len: int | None = None) -> PreparedPrompts:
  """Builds and tokenizes prompts; drops (and counts) prompts over `max_prompt_len` tokens."""
  items, num_filtered = [], 0
  for i in range(len(records)):
    record = records[i]
    prompt = build_prompt(record["problem"], tokenizer, template)
    ids = encode_prompt(prompt, tokenizer, template)
    if max_prompt_len is not None and len(ids) > max_prompt_len:
      num_filtered += 1
      continue
    items.append({**record, "prompt": prompt, "prompt_ids": ids, "index": i})
  return PreparedPrompts(items, num_filtered)
