"""Verifiable rewards: boxed-answer extraction, math-verify checking, a batch verifier.

`math_reward` follows the official LaSeR release: the last `\\boxed{}` of the response is
compared with the reference answer by math-verify's `parse` / `verify`.

`Verifier` checks a batch of (response, reference) pairs in worker *processes*. math-verify's
own timeouts use SIGALRM, which only works on the main thread of a process, so they cannot
protect a training loop that verifies from a background thread. Here each worker is a separate
process with a wall-clock deadline per answer: a worker that overruns is killed and replaced, and
the answer gets reward 0 and is counted as a timeout. Workers are started with 'forkserver' (or
'spawn'), never 'fork', because forking a process that runs JAX's threads is unsafe.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import multiprocessing
import multiprocessing.connection
import threading
import time
from typing import Callable, Sequence

import numpy as np

from laser_jax.data import answers
from laser_jax.data import synthetic

RewardFn = Callable[[str, str], float]
STARTUP_TIMEOUT_S = 300.0  # A worker's import and warm-up, before its answers are timed.

@functools.lru_cache(maxsize=1)
def _extraction_config():
  # Imported lazily: math-verify pulls in sympy (~1 s), which workers of the synthetic task
  # and the data pipeline never need.
  from math_verify import ExprExtractionConfig, LatexExtractionConfig
  # Boxed content first (priority 0); plain expressions ("14/3") as a fallback. The default
  # normalization handles \frac43, units, \text{}, degrees and \$.
  return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def _math_verify_timeout() -> int | None:
  # math-verify raises if given a signal timeout off the main thread; there the caller
  # (e.g. `Verifier`) must enforce the time limit.
  return 5 if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=1)
def _gold_extraction_config():
  from math_verify import LatexExtractionConfig
  # LaTeX only: with the plain-expression fallback a gold that is not parseable LaTeX (prose such
  # as "No solutions exist for x > 0.") parses as the first number inside it, and a wrong answer
  # such as \boxed{0} would match it.
  return [LatexExtractionConfig(boxed_match_priority=0)]


def clean_reference(reference: str) -> str:
  """A reference answer without surrounding space and trailing sentence punctuation
  ("(-\\infty, 0) \\cup\\{1\\}." -> "(-\\infty, 0) \\cup\\{1\\}")."""
  return str(reference).strip().rstrip(".,;:").rstrip()


@functools.lru_cache(maxsize=4096)
def _parse_gold(reference: str):
  from math_verify import parse
  timeout = _math_verify_timeout()
  gold = parse("\\boxed{" + reference + "}", _gold_extraction_config(), parsing_timeout=timeout)
  if not gold:
    gold = parse("$" + reference + "$", _gold_extraction_config(), parsing_timeout=timeout)
  return gold


def _same_text(a: str, b: str) -> bool:
  return " ".join(a.split()) == " ".join(b.split())


def math_reward(response: str, reference: str) -> float:
  """1.0 iff the last boxed answer of `response` equals `reference` under math-verify (the
  reference parsed as LaTeX only, after `clean_reference`), or is the same text."""
  from math_verify import parse, verify
  predicted = answers.extract_last_boxed(response)
  if predicted is None or not predicted.strip():
    return 0.0
  reference = clean_reference(reference)
  if _same_text(clean_reference(predicted), reference):  # also for prose no parser reads
    return 1.0
  timeout = _math_verify_timeout()
  gold = _parse_gold(reference)
  pred = parse("\\boxed{" + predicted + "}", _extraction_config(), parsing_timeout=timeout)
  if not gold or not pred:
    return 0.0
  return float(verify(gold, pred, timeout_seconds=timeout))


def _synthetic_reward(response: str, reference: str) -> float:
  return synthetic.synthetic_reward(response, reference)


_REGISTRY: dict[str, RewardFn] = {"math": math_reward, "synthetic": _synthetic_reward}


def get_reward_fn(name: str) -> RewardFn:
  """Returns the reward function `name`: "math", "synthetic" or "package.module:function"."""
  if name in _REGISTRY:
    return _REGISTRY[name]
  if ":" not in name:
    raise ValueError(f"unknown reward function {name!r}: expected one of "
                     f"{sorted(_REGISTRY)} or 'package.module:function'")
  module_name, fn_name = name.split(":", 1)
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"reward function {name!r}: cannot import module {module_name!r}: {e}") from e
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise ValueError(f"reward function {name!r}: module {module_name!r} has no callable {fn_name!r}")
  return fn


@dataclasses.dataclass(frozen=True)
class VerifyResult:
  """Rewards of one batch; timed-out and failed answers have reward 0 and are counted."""
  rewards: np.ndarray  # float32 [N]
  num_timeouts: int
  num_errors: int
  timed_out: np.ndarray  # bool [N]


def _worker_main(conn, reward_fn_name: str) -> None:
  """Worker process loop: warms up and says "ready", then receives (index, response,
  reference) and answers (index, reward, error)."""
  reward_fn = get_reward_fn(reward_fn_name)
  if reward_fn is math_reward:  # Import math-verify / sympy and build the parsers now, off the clock.
    math_reward("\\boxed{1}", "1")
  conn.send("ready")
  while True:
    try:
      task = conn.recv()
    except EOFError:
      return
    if task is None:
      return
    index, response, reference = task
    try:
      conn.send((index, float(reward_fn(response, reference)), None))
    except Exception as e:  # pylint: disable=broad-except
      conn.send((index, 0.0, f"{type(e).__name__}: {e}"))


class _Worker:
  """One worker process and the parent end of its pipe."""

  def __init__(self, ctx, reward_fn_name: str):
    self.conn, child_conn = ctx.Pipe()
    self.process = ctx.Process(target=_worker_main, args=(child_conn, reward_fn_name), daemon=True)
    self.process.start()
    child_conn.close()
    self.task: int | None = None  # index of the answer being checked
    self.deadline = 0.0

  def wait_ready(self, timeout_s: float) -> None:
    """Blocks until the worker has imported and warmed up its reward function, so that the
    per-answer clock never counts start-up (sympy's import alone took seconds on a busy host)."""
    if not self.conn.poll(timeout_s):
      self.kill()
      raise RuntimeError(f"Verifier: a worker process did not start within {timeout_s:.0f} s")
    message = self.conn.recv()
    if message != "ready":
      raise RuntimeError(f"Verifier: a worker process sent {message!r} instead of 'ready'")

  def kill(self) -> None:
    self.process.kill()
    self.process.join()
    self.conn.close()


def _default_context() -> str:
  return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class Verifier:
  """Checks batches of (response, reference) pairs in parallel with a per-answer time limit.

  Args:
    reward_fn: a name accepted by `get_reward_fn` (resolved again inside each worker, so it must
      be importable there: a registry name or "module:function").
    num_workers: worker processes; 0 runs in the calling process with no enforced time limit
      (for fast rewards such as the synthetic task).
    timeout_s: wall-clock limit per answer, measured from when a started, warmed-up worker picks
      it up (start-up never counts).
    start_method: multiprocessing start method, 'forkserver' (default on Linux) or 'spawn'.

  Workers start lazily on the first call and persist; call `close()` (or use `with`).
  """

  def __init__(self, reward_fn: str = "math", num_workers: int = 4, timeout_s: float = 10.0,
               start_method: str | None = None):
    if num_workers < 0:
      raise ValueError(f"Verifier: num_workers must be >= 0, got {num_workers}")
    if timeout_s <= 0:
      raise ValueError(f"Verifier: timeout_s must be > 0, got {timeout_s}")
    start_method = start_method or _default_context()
    if start_method == "fork":
      raise ValueError("Verifier: start_method 'fork' is unsafe with JAX threads; "
                       "use 'forkserver' or 'spawn'")
    self._reward_fn_name = reward_fn
    self._reward_fn = get_reward_fn(reward_fn)  # Fail fast on a bad name, in the caller.
    self.num_workers = num_workers
    self.timeout_s = timeout_s
    self._ctx = multiprocessing.get_context(start_method)
    self._workers: list[_Worker] = []
    self.num_restarts = 0  # workers killed after a timeout or a crash

  def __enter__(self) -> "Verifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Stops all worker processes."""
    for w in self._workers:
      try:
        w.conn.send(None)
      except (OSError, BrokenPipeError):
        pass
    for w in self._workers:
      w.process.join(timeout=1.0)
      if w.process.is_alive():
        w.process.kill()
        w.process.join()
      w.conn.close()
    self._workers = []

  def __call__(self, responses: Sequence[str], references: Sequence[str]) -> VerifyResult:
    """Rewards of `responses[i]` against `references[i]`."""
    if len(responses) != len(references):
      raise ValueError(f"Verifier: {len(responses)} responses but {len(references)} references")
    n = len(responses)
    rewards = np.zeros(n, np.float32)
    timed_out = np.zeros(n, bool)
    if self.num_workers == 0:
      for i, (resp, ref) in enumerate(zip(responses, references)):
        rewards[i] = self._reward_fn(resp, ref)
      return VerifyResult(rewards, 0, 0, timed_out)

    new = [_Worker(self._ctx, self._reward_fn_name) for _ in range(self.num_workers - len(self._workers))]
    for w in new:
      w.wait_ready(STARTUP_TIMEOUT_S)
    self._workers += new
    pending = list(range(n))[::-1]  # popped from the end: index order
    busy: dict[int, _Worker] = {}  # id(conn) -> worker
    num_errors = 0
    while pending or busy:
      for w in self._workers:
        if w.task is None and pending:
          w.task = pending.pop()
          w.conn.send((w.task, responses[w.task], references[w.task]))
          w.deadline = time.monotonic() + self.timeout_s
          busy[id(w.conn)] = w
      next_deadline = min(w.deadline for w in busy.values())
      ready = multiprocessing.connection.wait(
          [w.conn for w in busy.values()], timeout=max(0.0, next_deadline - time.monotonic()))
      for conn in ready:
        w = busy.pop(id(conn))
        try:
          index, reward, error = conn.recv()
        except (EOFError, OSError):  # The worker died (e.g. out of memory): reward 0.
          index, reward, error = w.task, 0.0, "worker died"
          self._replace(w)
        rewards[index] = reward
        num_errors += error is not None
        w.task = None
      now = time.monotonic()
      for key, w in list(busy.items()):
        if w.deadline <= now and w.task is not None:
          timed_out[w.task] = True
          busy.pop(key)
          self._replace(w)
    return VerifyResult(rewards, int(timed_out.sum()), num_errors, timed_out)

  def _replace(self, worker: _Worker) -> None:
    worker.kill()
    fresh = _Worker(self._ctx, self._reward_fn_name)
    fresh.wait_ready(STARTUP_TIMEOUT_S)
    self._workers[self._workers.index(worker)] = fresh
    self.num_restarts += 1
