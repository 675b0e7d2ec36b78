"""Inputs of a streamed merge: base + T models, read by blocks of rows.

Nothing is loaded up front. Headers are validated once (`checkpoint_io`:
names, shapes, dtypes, offsets inside the file), and a *block* is a range
of rows (the first axis) of one tensor: `read` copies exactly those bytes
from each file with `os.preadv` into a fresh 64-byte-aligned buffer, which
the CPU backend adopts without a further copy. A pass over the model reads
each file once and keeps nothing; a later pass reads the same bytes again
(from the OS page cache when it has room, else disk). `prefetch` reads the
next block on a background thread while the current one is computed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from mtmerge import checkpoint_io
from mtmerge import safetensors_layout as st_layout


@dataclasses.dataclass(frozen=True)
class Block:
  """Rows `[r0, r1)` of tensor `name` (the whole tensor for 0-D/1-D ones).

  Attributes:
    name: the tensor name (the base's).
    leaf: the tensor's index among the merged (floating) tensors in sorted
      name order, i.e. its leaf index in the in-memory path's flat dict.
    r0, r1: the row range; `(0, 1)` for a 0-D tensor.
    shape: the whole tensor's shape.
  """
  name: str
  leaf: int
  r0: int
  r1: int
  shape: tuple[int, ...]

  @property
  def first(self) -> int:
    """Flat index of the block's first entry within its tensor."""
    if len(self.shape) < 2:
      return 0
    return self.r0 * int(np.prod(self.shape[1:], dtype=np.int64))

  @property
  def whole(self) -> bool:
    """True if the block is the whole tensor."""
    return len(self.shape) < 2 or (self.r0 == 0 and self.r1 == self.shape[0])

  @property
  def numel(self) -> int:
    if len(self.shape) < 2:
      return int(np.prod(self.shape, dtype=np.int64))
    return (self.r1 - self.r0) * int(np.prod(self.shape[1:], dtype=np.int64))


class Inputs:
  """The base and T fine-tuned checkpoints, validated and memory-mapped.

  Args:
    base: the pretrained checkpoint (file, dir or sharded HF dir).
    models: T fine-tuned checkpoints (any layout each).

  Raises:
    CheckpointError: a missing or corrupt file, or names/shapes that differ
      from the base's (naming the tensor and file).
  """

  def __init__(self, base: str, models: Sequence[str]):
    self.layout = checkpoint_io.read_layout(base)
    self.model_layouts = []
    for i, p in enumerate(models):
      m = checkpoint_io.read_layout(p)
      st_layout.check_against(self.layout, m, f"model {i} ({m.source})")
      self.model_layouts.append(m)
    self._files: dict[str, tuple] = {}
    lay = self.layout
    self.floats = sorted(k for k in lay.weight_map if st_layout.is_float(
        checkpoint_io.np_dtype(lay.dtypes[k])))
    self.leaf = {k: i for i, k in enumerate(self.floats)}
    for i, m in enumerate(self.model_layouts):
      for k in lay.weight_map:
        a, b = m.dtypes[k], lay.dtypes[k]
        if a != b and k not in self.leaf:
          raise checkpoint_io.CheckpointError(
              f"tensor {k!r} is {a} in model {i} ({m.source}) but {b} in "
              "base: non-floating tensors are copied from the base and must "
              "match it")

  @property
  def num_models(self) -> int:
    return len(self.model_layouts)

  def _entry(self, layout: checkpoint_io.Layout, name: str):
    """(fd, dtype, shape, absolute data offset) of tensor `name`."""
    fpath = layout.path_of(layout.weight_map[name])
    if fpath not in self._files:
      self._files[fpath] = _open(fpath)
    fd, entries = self._files[fpath]
    if name not in entries:
      raise checkpoint_io.CheckpointError(f"{fpath} lacks tensor {name!r}")
    return (fd,) + entries[name]

  def source(self, model: int, name: str) -> str:
    """The file holding `name` in model `model` (-1: the base)."""
    lay = self.layout if model < 0 else self.model_layouts[model]
    return lay.path_of(lay.weight_map[name])

  def _read(self, layout, blk: Block, out: np.ndarray | None = None
            ) -> np.ndarray:
    """`blk`'s rows of one checkpoint, into `out` or a fresh aligned array."""
    fd, dtype, shape, off = self._entry(layout, blk.name)
    if len(shape) >= 2:
      row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
      off, shape = off + blk.r0 * row, (blk.r1 - blk.r0,) + shape[1:]
    if out is None or out.dtype != dtype:
      buf = _aligned(shape, dtype)
    else:
      buf = out
    n = buf.nbytes
    got = os.preadv(fd, [buf.reshape(-1).view(np.uint8)], off) if n else 0
    if got != n:
      raise checkpoint_io.CheckpointError(
          f"short read of tensor {blk.name!r} from "
          f"{layout.path_of(layout.weight_map[blk.name])}")
    if out is not None and buf is not out:
      out[...] = buf.astype(out.dtype)  # mixed model dtypes: float32
    return buf

  def read(self, blk: Block, check: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """`(base rows, models' rows stacked [T, rows, ...])`, fresh arrays.

    The stack has the models' common dtype (float32 if they differ, an
    exact widening). `check=True` raises CheckpointError naming the file
    and tensor if an input holds NaN or Inf.
    """
    b = self._read(self.layout, blk)
    dts = {m.dtypes[blk.name] for m in self.model_layouts}
    dt = checkpoint_io.np_dtype(dts.pop() if len(dts) == 1 else "float32")
    stack = _aligned((self.num_models,) + b.shape, dt)
    for t, m in enumerate(self.model_layouts):
      self._read(m, blk, stack[t, ...])  # a view, also when 0-D
    if check:
      for i, x in [(-1, b)] + list(enumerate(stack)):
        if not _finite(x):
          who = "base" if i < 0 else f"model {i}"
          what = "tensor" if i < 0 else "the task vector of tensor"
          raise checkpoint_io.CheckpointError(
              f"{who} ({self.source(i, blk.name)}) has NaN or Inf in {what} "
              f"{blk.name!r}")
    return b, stack

  def prefetch(self, blocks: Sequence[Block], check: Callable[[Block], bool]
               ) -> Iterator[tuple[Block, np.ndarray, np.ndarray]]:
    """`(block, base rows, stacked model rows)`, reading one block ahead.

    `check(block)` says whether to test that block for NaN/Inf (on the
    reading thread, overlapping the caller's compute).
    """
    def read(blk):
      return self.read(blk, check(blk))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      nxt = pool.submit(read, blocks[0]) if blocks else None
      for i, blk in enumerate(blocks):
        b, ms = nxt.result()
        nxt = pool.submit(read, blocks[i + 1]) if i + 1 < len(
            blocks) else None
        yield blk, b, ms

  def whole(self, name: str) -> np.ndarray:
    """The base's whole tensor `name`, e.g. an integer buffer."""
    shape = self.layout.shapes[name]
    return self._read(self.layout, Block(name, -1, 0, shape[0] if len(
        shape) >= 2 else 1, shape))

  def close(self) -> None:
    """Closes the input files."""
    for fd, _ in self._files.values():
      os.close(fd)
    self._files.clear()


def _aligned(shape: tuple, dtype: np.dtype) -> np.ndarray:
  """An uninitialized array whose data is 64-byte aligned."""
  n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(n + 64, np.uint8)
  a = (-raw.ctypes.data) % 64
  return raw[a:a + n].view(dtype).reshape(shape)


_EXP = {2: (np.uint16, {"bfloat16": 0x7f80, "float16": 0x7c00}),
        4: (np.uint32, {"float32": 0x7f800000}),
        8: (np.uint64, {"float64": 0x7ff0000000000000})}


def _finite(x: np.ndarray) -> bool:
  """True unless a floating `x` holds NaN or Inf (exponent bits all ones)."""
  if not st_layout.is_float(x.dtype):
    return True
  uint, masks = _EXP.get(x.dtype.itemsize, (None, {}))
  mask = masks.get(x.dtype.name)
  if mask is None:
    return bool(np.isfinite(x.astype(np.float32)).all())
  # All-ones exponents are the largest masked value: one and, one max.
  bits = np.bitwise_and(x.reshape(-1).view(uint), uint(mask))
  return bits.size == 0 or int(bits.max()) != mask


def _open(fpath: str):
  """`(fd, {name: (dtype, shape, absolute offset)})`, offsets validated."""
  try:
    index = st_layout.tensor_index(fpath)
    out = {k: (dtype, shape, b) for k, (dtype, shape, b, _) in index.items()}
    return os.open(fpath, os.O_RDONLY), out
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise checkpoint_io.CheckpointError(
        f"cannot read {fpath} ({st_layout.first_line(e)})") from None


def plan(inputs: Inputs, bytes_per_entry: int, max_memory: int,
         layout: checkpoint_io.Layout | None = None,
         row_multiple: int = 1) -> list[Block]:
  """Blocks of every merged tensor, in the base's file order.

  A tensor whose `numel * bytes_per_entry` exceeds `max_memory` is split
  into row ranges of (near) equal size; 0-D and 1-D tensors are never split.
  With `row_multiple=n` (a mesh of n devices) every block's row count is a
  multiple of n, except one tail block of the last `rows % n` rows.

  Args:
    inputs: the opened checkpoints.
    bytes_per_entry: memory one tensor entry costs while its block is
      processed (all models' inputs, float32 task vectors, outputs).
    max_memory: the budget for one block, in bytes.
    layout: the output's layout (default the base's): its file order.
    row_multiple: the number of devices a block's rows are split over.

  Returns:
    Blocks in write order (shard by shard, tensor by tensor, row by row).
  """
  out = []
  for file_names in (layout or inputs.layout).by_file().values():
    for k in file_names:
      if k not in inputs.leaf:
        continue
      shape = inputs.layout.shapes[k]
      if int(np.prod(shape, dtype=np.int64)) == 0:
        continue  # no data: the writer copies the (empty) base tensor
      if len(shape) < 2:
        out.append(Block(k, inputs.leaf[k], 0, 1, shape))
        continue
      rows, m = shape[0], max(1, int(row_multiple))
      main = rows - rows % m if rows >= m else rows  # rows in full blocks
      row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * bytes_per_entry
      per = max(1, min(main, max_memory // max(row_bytes, 1)))
      n = -(-main // per)
      per = -(-main // n)  # near-equal blocks: at most two shapes
      if m > 1 and rows >= m:  # within the budget, but at least m rows
        per = max(m, per // m * m)  # rows a multiple of the device count
      for r0 in range(0, main, per):
        out.append(Block(k, inputs.leaf[k], r0, min(main, r0 + per), shape))
      if main < rows:  # the tail the mesh does not divide
        out.append(Block(k, inputs.leaf[k], main, rows, shape))
  return out
