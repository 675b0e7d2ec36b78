"""Streamed blocks on a device mesh, over one or several JAX processes.

With a mesh, every block of rows is one global `jax.Array` sharded over all
mesh axes along its rows (`P(axes)` for the base rows, `P(None, axes)` for
the models' `[T, rows, ...]` stack), so the kernels of `kernels` run as
SPMD programs with no device holding the whole block. A block whose rows
the mesh does not divide (a tensor's last `rows % devices` rows, odd 1-D
tensors, scalars) is replicated; `reader.plan(..., row_multiple=n)` makes
those tails small.

Several processes (`jax.distributed`, e.g. one per TPU host): each process
reads only the rows its own devices hold (`local_rows`, a contiguous range
because `jax.make_mesh` orders devices host by host) and builds the global
array from them (`jax.make_array_from_callback`); 1-D and replicated blocks
are read whole by every process. Outputs come back per addressable shard
(`pieces`, replica 0 only, so each entry is written by exactly one
process), and host-side statistics are summed over processes
(`allreduce_int`). This is the data-loading recipe of JAX's
`distributed_data_loading` guide applied to checkpoint rows.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mtmerge import sharding as sharding_lib


def make(mesh: Any = None, shard_rows: int = 1) -> "Placement | None":
  """A `Placement` from a mesh argument, or None for one device.

  Args:
    mesh: None (all devices when there are more than one), a
      `jax.sharding.Mesh`, a spec such as `'data:-1'` or `[('data', -1)]`
      (`sharding.make_mesh`), or False / 1 / `'none'` for one device.
    shard_rows: a block is split over the devices only if each device's
      rows are a multiple of this (packed masks: 8, so every shard packs
      into whole bytes); others are replicated.

  Raises:
    ValueError: a spec that does not fit the devices (one line).
  """
  if mesh is False or mesh == 1 or (isinstance(mesh, str) and
                                    mesh.strip().lower() in ("none", "1")):
    return None
  if mesh is None:
    if jax.device_count() <= 1:
      return None
    mesh = [("data", -1)]
  if not isinstance(mesh, jax.sharding.Mesh):
    mesh = sharding_lib.make_mesh(mesh)
  if mesh.size <= 1 and jax.process_count() == 1:
    return None
  return Placement(mesh, shard_rows)


def _rows(blk) -> int:
  """Length of the block's sharded axis (0 for a 0-D tensor)."""
  if len(blk.shape) >= 2:
    return blk.r1 - blk.r0
  return blk.shape[0] if blk.shape else 0


def block_shape(blk) -> tuple[int, ...]:
  """The shape of a block's base rows."""
  if len(blk.shape) >= 2:
    return (blk.r1 - blk.r0,) + tuple(blk.shape[1:])
  return tuple(blk.shape)


class Placement:
  """Where a block's arrays live on `mesh`, and this process's part of it."""

  def __init__(self, mesh: jax.sharding.Mesh, shard_rows: int = 1):
    self.mesh = mesh
    self.shard_rows = int(shard_rows)
    self.axes = tuple(mesh.axis_names)
    self.size = mesh.size
    self.replicated = NamedSharding(mesh, P())
    self.multi = jax.process_count() > 1

  def sharded(self, blk) -> bool:
    """True if the block's rows are split over the mesh."""
    n = _rows(blk)
    return n > 0 and n % (self.size * self.shard_rows) == 0

  def shardings(self, blk) -> tuple[NamedSharding, NamedSharding]:
    """`(base rows, stacked model rows)` shardings of a block."""
    if not self.sharded(blk):
      return self.replicated, self.replicated
    return (NamedSharding(self.mesh, P(self.axes)),
            NamedSharding(self.mesh, P(None, self.axes)))

  def local_rows(self, blk) -> tuple[int, int]:
    """The row range `[lo, hi)` (within the block) this process reads.

    All rows for replicated blocks and 1-D/0-D tensors (read whole: they
    are at most a few thousand entries).
    """
    n = _rows(blk)
    if len(blk.shape) < 2 or not self.sharded(blk):
      return 0, (n if len(blk.shape) >= 2 else 1)
    sb, _ = self.shardings(blk)
    idx = sb.addressable_devices_indices_map(block_shape(blk)).values()
    return (min(i[0].start or 0 for i in idx),
            max(n if i[0].stop is None else i[0].stop for i in idx))

  def local_block(self, blk):
    """The sub-block of `blk` this process reads (a `reader.Block`)."""
    if len(blk.shape) < 2:
      return blk
    lo, hi = self.local_rows(blk)
    return type(blk)(blk.name, blk.leaf, blk.r0 + lo, blk.r0 + hi, blk.shape)

  def put(self, blk, b: np.ndarray, ms: np.ndarray) -> tuple[jax.Array, ...]:
    """Global arrays of a block from this process's rows `b`, `ms`."""
    sb, sm = self.shardings(blk)
    lo = self.local_rows(blk)[0] if len(blk.shape) >= 2 else 0
    shape = block_shape(blk)
    return (_assemble(b, sb, shape, 0, lo),
            _assemble(ms, sm, (ms.shape[0],) + shape, 1, lo))

  def pieces(self, blk, x: jax.Array, axis: int = 0
             ) -> Iterator[tuple[int, np.ndarray]]:
    """`(first entry in the tensor, host data)` of this process's shards.

    Only replica 0 of each distinct piece is yielded, so over all
    processes every entry of the block comes exactly once.

    Args:
      blk: the block.
      x: an array of the block's rows on `axis` (`axis=1`: a `[T, rows,
        ...]` stack such as packed masks' bool source).
      axis: where the block's rows are in `x`.
    """
    inner = int(np.prod(blk.shape[1:], dtype=np.int64)) if len(
        blk.shape) >= 2 else 1
    start = blk.r0 * inner if len(blk.shape) >= 2 else 0
    for s in x.addressable_shards:
      if s.replica_id != 0:
        continue
      first = (s.index[axis].start or 0) if x.ndim > axis else 0
      yield start + first * inner, np.asarray(s.data)

  def host_parts(self, x: jax.Array) -> list[np.ndarray]:
    """This process's distinct shards of a block-shaped array, on the host.

    For host-side statistics (histograms) whose partials add up: no device
    ever holds the whole block.
    """
    return [np.asarray(s.data) for s in x.addressable_shards
            if s.replica_id == 0]


def _assemble(local: np.ndarray, s: NamedSharding, shape: tuple, axis: int,
              lo: int) -> jax.Array:
  """A global array of `shape` from this process's rows `[lo, ...)`."""
  def cb(index):
    if len(shape) <= axis:
      return local
    idx = list(index)
    r = idx[axis]
    idx[axis] = slice((r.start or 0) - lo,
                      (shape[axis] if r.stop is None else r.stop) - lo)
    return local[tuple(idx)]
  return jax.make_array_from_callback(shape, s, cb)


def host(x: jax.Array) -> np.ndarray:
  """A replicated (or single-device) result on the host, any process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(x.addressable_data(0))


def allreduce_int(x: np.ndarray) -> np.ndarray:
  """Sum of an int64 host array over processes (exact, 64-bit safe).

  JAX runs 32-bit by default, so the 64-bit counts travel as two 32-bit
  halves (high, low) and are recombined after the gather.
  """
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  x = np.asarray(x, np.int64)
  hi = (x >> 32).astype(np.int32)
  lo = (x & 0xffffffff).astype(np.uint32).view(np.int32)
  g = multihost_utils.process_allgather(np.stack([hi, lo]))
  g = np.asarray(g)  # [P, 2, ...]
  parts = (g[:, 0].astype(np.int64) << 32) + g[:, 1].view(np.uint32).astype(
      np.int64)
  return parts.sum(axis=0)
