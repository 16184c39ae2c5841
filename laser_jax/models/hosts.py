"""Host-local rows of global batches, for multi-host runs (one process per TPU host).

Every batch that flows through a step (prompts, sampled rows, update and log-prob batches) is
split over the processes in blocks: process p holds rows [p * R / P, (p + 1) * R / P) of a batch of
R rows, which are the rows its own devices hold under the batch sharding (`row_block` checks
this). A host therefore samples, decodes and verifies only its own rows, and builds global arrays
from them with `jax.make_array_from_process_local_data`; the only cross-host traffic outside the
jitted programs is `gather_rows` of small per-row vectors (rewards, lengths, scores) for
statistics and advantages that span the whole batch. With one process every function here is
the identity (or a plain device_put / device_get).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding


def row_block(sharding: Sharding, shape: tuple[int, ...], axis: int = 0) -> tuple[int, int]:
  """[start, stop) of the rows along `axis` that this process's devices hold for a global array of
  `shape` under `sharding`; they must be one run, block `jax.process_index()` of P equal ones."""
  num_rows, p, count = shape[axis], jax.process_index(), jax.process_count()
  spans = {(s[axis].start or 0, num_rows if s[axis].stop is None else s[axis].stop)
           for s in sharding.addressable_devices_indices_map(tuple(shape)).values()}
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  covered = np.zeros(stop - start, bool)
  for a, b in spans:
    covered[a - start:b - start] = True
  expected = (p * num_rows // count, (p + 1) * num_rows // count)
  if not covered.all() or (start, stop) != expected:
    raise ValueError(f"process {p} of {count} holds rows {sorted(spans)} of a {num_rows}-row batch, not "
                     f"the block {expected}: the mesh must place each host's devices on its own "
                     f"batch rows, hosts in process order (sharding.make_mesh does)")
  return start, stop


def put_rows(local: np.ndarray, sharding: Sharding, axis: int = 0) -> jax.Array:
  """The global array whose rows along `axis` are every process's `local` rows, in process order
  (`row_block`); every process passes the same shape."""
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  shape = list(local.shape)
  shape[axis] *= jax.process_count()
  row_block(sharding, tuple(shape), axis)
  return jax.make_array_from_process_local_data(sharding, local, tuple(shape))


def local_rows(x: jax.Array, axis: int = 0) -> np.ndarray:
  """This process's rows along `axis` of a global array (`row_block`), as NumPy."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  start, stop = row_block(x.sharding, x.shape, axis)
  shape = list(x.shape)
  shape[axis] = stop - start
  out = np.empty(shape, x.dtype)
  for shard in x.addressable_shards:
    index = list(shard.index)
    rows = index[axis]
    index[axis] = slice((rows.start or 0) - start, (x.shape[axis] if rows.stop is None else rows.stop) - start)
    out[tuple(index)] = np.asarray(shard.data)
  return out


def gather_rows(local: np.ndarray) -> np.ndarray:
  """Every process's `local` rows (axis 0) concatenated in process order, on every process.
  For per-row vectors only (rewards, lengths, scores): never for token arrays."""
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def total(value: float) -> float:
  """The sum of a host scalar over the processes."""
  return float(np.sum(gather_rows(np.asarray([value], np.float64))))


def same_on_every_host(value: int, what: str) -> int:
  """`value` after checking that every process has the same one (a ValueError naming `what`)."""
  values = gather_rows(np.asarray([value], np.int64))
  if np.any(values != value):
    raise ValueError(f"{what} differs between hosts: {values.tolist()} (process order)")
  return int(value)


def host_max(value: int) -> int:
  """The largest of a host integer over the processes."""
  return int(np.max(gather_rows(np.asarray([value], np.int64))))


def host_block(items: list) -> tuple[list, int]:
  """This process's block of a list every host holds whole (the eval set): ceil(N / P) items per
  host, the last blocks padded with copies of the first item so that every host has as many.
  Returns (block, number of real items in it)."""
  p, count = jax.process_index(), jax.process_count()
  if count == 1:
    return list(items), len(items)
  per_host = -(-len(items) // count)
  block = list(items[p * per_host:(p + 1) * per_host])
  real = len(block)
  return block + [items[0]] * (per_host - real), real
