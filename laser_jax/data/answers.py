"""Final answers of responses: the last boxed answer and its voting key.

Shared by the verifier, the synthetic task's reward, the evaluator and the notebooks.
"""
from __future__ import annotations

import re

_BOXED_COMMANDS = ("\\boxed", "\\fbox")


def extract_last_boxed(text: str) -> str | None:
  """Returns the content of the last `\\boxed{...}` / `\\fbox{...}` / `\\boxed x` in `text`.

  Nested braces are matched. `\\boxed 5` (no braces) yields the text up to the next `$` or
  whitespace. Returns None when there is no (complete) boxed answer.
  """
  start = max(text.rfind(cmd) for cmd in _BOXED_COMMANDS)
  if start < 0:
    return None
  cmd = next(c for c in _BOXED_COMMANDS if text.startswith(c, start))
  rest = text[start + len(cmd):]
  if rest.startswith(" "):  # "\boxed 5": the argument is a single token.
    token = rest.lstrip(" ").split("$")[0].split()
    return token[0] if token else None
  if not rest.startswith("{"):
    return None
  depth = 0
  for i, ch in enumerate(rest):
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
      if depth == 0:
        return rest[1:i]
  return None  # Unbalanced: the response was cut off inside the box.


_SPACES = re.compile(r"\s+")


def canonical_answer(boxed: str | None) -> str | None:
  """The voting key of an extracted answer: spelling variants that never change the value removed."""
  if boxed is None:
    return None
  text = _SPACES.sub("", boxed)
  text = text.replace("\\left", "").replace("\\right", "")
  text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  text = text.rstrip(".")
  return text or None
