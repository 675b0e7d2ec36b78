"""Memory-mapped inputs of a streamed merge: base + T models, read by blocks.

Nothing is loaded up front: every tensor is a read-only `np.memmap` view of
its safetensors file (`checkpoint_io._mmap_file`, which validates each
header against the file size), and a *block* is a range of rows (the first
axis) of one tensor. Slicing a view reads only those rows' pages, so a pass
over the model touches each file once and keeps nothing; a later pass reads
the same pages again (from the OS page cache when it has room, else disk).
Those pages are file-backed memory the kernel can reclaim at any time, not
the process's own (anonymous) memory.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mtmerge import checkpoint_io


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
      checkpoint_io._check_against(self.layout, m, f"model {i} ({m.source})")
      self.model_layouts.append(m)
    self._views: dict[str, dict[str, np.ndarray]] = {}
    lay = self.layout
    self.floats = sorted(k for k in lay.weight_map if checkpoint_io._is_float(
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

  def _view(self, layout: checkpoint_io.Layout, name: str) -> np.ndarray:
    fpath = layout.path_of(layout.weight_map[name])
    if fpath not in self._views:
      self._views[fpath] = checkpoint_io._mmap_file(fpath)
    views = self._views[fpath]
    if name not in views:
      raise checkpoint_io.CheckpointError(f"{fpath} lacks tensor {name!r}")
    return views[name]

  def source(self, model: int, name: str) -> str:
    """The file holding `name` in model `model` (-1: the base)."""
    lay = self.layout if model < 0 else self.model_layouts[model]
    return lay.path_of(lay.weight_map[name])

  def base_block(self, blk: Block) -> np.ndarray:
    """The base's rows of `blk`: a memory-mapped view (no copy)."""
    return _rows(self._view(self.layout, blk.name), blk)

  def model_blocks(self, blk: Block) -> list[np.ndarray]:
    """Each model's rows of `blk`: memory-mapped views (no copy)."""
    return [_rows(self._view(m, blk.name), blk) for m in self.model_layouts]

  def whole(self, name: str) -> np.ndarray:
    """The base's whole tensor `name` (a view), e.g. an integer buffer."""
    return self._view(self.layout, name)

  def close(self) -> None:
    """Drops the memory maps (they close when the last view is freed)."""
    self._views.clear()


def _rows(x: np.ndarray, blk: Block) -> np.ndarray:
  if x.ndim < 2:
    return x
  return x[blk.r0:blk.r1]


def plan(inputs: Inputs, bytes_per_entry: int, max_memory: int
         ) -> list[Block]:
  """Blocks of every merged tensor, in the base's file order.

  A tensor whose `numel * bytes_per_entry` exceeds `max_memory` is split
  into row ranges of (near) equal size; 0-D and 1-D tensors are never split.

  Args:
    inputs: the opened checkpoints.
    bytes_per_entry: memory one tensor entry costs while its block is
      processed (all models' inputs, float32 task vectors, outputs).
    max_memory: the budget for one block, in bytes.

  Returns:
    Blocks in write order (shard by shard, tensor by tensor, row by row).
  """
  out = []
  for file_names in inputs.layout.by_file().values():
    for k in file_names:
      if k not in inputs.leaf:
        continue
      shape = inputs.layout.shapes[k]
      if int(np.prod(shape, dtype=np.int64)) == 0:
        continue  # no data: the writer copies the (empty) base tensor
      if len(shape) < 2:
        out.append(Block(k, inputs.leaf[k], 0, 1, shape))
        continue
      rows = shape[0]
      row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * bytes_per_entry
      per = max(1, min(rows, max_memory // max(row_bytes, 1)))
      n = -(-rows // per)
      per = -(-rows // n)  # near-equal blocks: at most two shapes
      for r0 in range(0, rows, per):
        out.append(Block(k, inputs.leaf[k], r0, min(rows, r0 + per), shape))
  return out
