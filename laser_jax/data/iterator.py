"""`PromptIterator`: per-host batches with a seeded shuffle per epoch and a small JSON state, so
that training resumes at exactly the next batch (on any host count with the same global batch)."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np


class PromptIterator:
  """Per-host batches over `items`, reshuffled each epoch, with exact resume.

  Each epoch draws one global permutation from (seed, epoch), identical on every host, and cuts
  it into global batches of G = batch_size * P items (P hosts); host p takes block p of each,
  items [p * batch_size, (p + 1) * batch_size) of the global batch, so the hosts' batches in
  process order are the global batch (`laser_jax.models.hosts`). The incomplete last global batch of an
  epoch is dropped. `num_epochs=None` repeats forever.

  `get_state()` returns {"epoch", "batch", "seed", "num_items", "process_count",
  "global_batch_size"}; a new iterator given `set_state(state)` yields exactly the batches the
  saved one would have yielded next. The position is host-count independent: global batch b of
  an epoch is positions [b * G, (b + 1) * G) of the epoch's permutation, and an epoch holds
  floor(N / G) batches, for every P. So a state saved on P hosts restores on any host count with
  the same global batch.
  """

  def __init__(self, items: Sequence[Any], batch_size: int, seed: int = 0,
               num_epochs: int | None = 1, shuffle: bool = True, process_index: int = 0,
               process_count: int = 1):
    if batch_size <= 0:
      raise ValueError(f"PromptIterator: batch_size must be > 0, got {batch_size}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"PromptIterator: process_index {process_index} not in [0, {process_count})")
    self.items = items
    self.batch_size = batch_size
    self.seed = seed
    self.num_epochs = num_epochs
    self.shuffle = shuffle
    self.process_index = process_index
    self.process_count = process_count
    self.batches_per_epoch = len(items) // (batch_size * process_count)
    if self.batches_per_epoch == 0:
      raise ValueError(f"PromptIterator: {len(items)} items are fewer than one global batch of "
                       f"{batch_size} x {process_count} host(s)")
    self._epoch = 0
    self._batch = 0
    self._order: np.ndarray | None = None  # this host's item order for self._epoch

  def _host_order(self, epoch: int) -> np.ndarray:
    n = len(self.items)
    order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
             else np.arange(n))
    batches = order[:self.batches_per_epoch * self.batch_size * self.process_count]
    return batches.reshape(self.batches_per_epoch, self.process_count, self.batch_size)[:, self.process_index].reshape(-1)

  def __iter__(self) -> Iterator[list[Any]]:
    return self

  def __next__(self) -> list[Any]:
    if self._batch == self.batches_per_epoch:
      self._epoch, self._batch, self._order = self._epoch + 1, 0, None
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    if self._order is None:
      self._order = self._host_order(self._epoch)
    start = self._batch * self.batch_size
    batch = [self.items[int(j)] for j in self._order[start:start + self.batch_size]]
    self._batch += 1
    return batch

  @property
  def epoch(self) -> int:
    """The epoch of the next batch (completed epochs so far)."""
    return self._epoch + (self._batch == self.batches_per_epoch)

  def get_state(self) -> dict:
    """A JSON-able position: the next batch is batch `batch` of epoch `epoch`."""
    return {"epoch": int(self._epoch), "batch": int(self._batch), "seed": int(self.seed),
            "num_items": len(self.items), "process_count": int(self.process_count),
            "global_batch_size": int(self.batch_size * self.process_count)}

  def set_state(self, state: dict) -> None:
    """Restores a position saved by `get_state`: same data, seed and global batch size; the
    host count may differ (class docstring). A state without "global_batch_size" (saved before
    it was recorded) needs the same host count."""
    mine = {"seed": self.seed, "num_items": len(self.items)}
    if "global_batch_size" in state:
      mine["global_batch_size"] = self.batch_size * self.process_count
    else:
      mine["process_count"] = self.process_count
    for key, value in mine.items():
      if state.get(key) != value:
        raise ValueError(f"PromptIterator.set_state: state {key}={state.get(key)!r} does not "
                         f"match this iterator's {key}={value!r}")
    if not 0 <= state["batch"] <= self.batches_per_epoch:
      raise ValueError(f"PromptIterator.set_state: batch {state['batch']} not in "
                       f"[0, {self.batches_per_epoch}]")
    self._epoch, self._batch, self._order = int(state["epoch"]), int(state["batch"]), None
