"""Streamed output in the base's layout: shard by shard, block by block.

The base's layout fixes every output tensor's name, shape and dtype before
any data exists, so each safetensors header is written first (offsets
known) and the data follows in blocks, appended in order: nothing but the
current block is ever held. `Output` writes into the temp path that
`checkpoint_io._atomic_write` gives it, so the finished file or directory
appears under its final name only once every shard is complete and synced.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import numpy as np

from mtmerge import checkpoint_io

_ST_NAME = {v: k for k, v in checkpoint_io._ST_DTYPES.items()}


def _nbytes(shape, dtype: np.dtype) -> int:
  return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


class ShardWriter:
  """One safetensors file whose tensors arrive in order, in blocks.

  Args:
    path: the file to create.
    names: tensor names in data order.
    shapes, dtypes: name -> shape, name -> numpy dtype.
    metadata: the header's `__metadata__` (str -> str), or None.
  """

  def __init__(self, path: str, names, shapes: Mapping[str, tuple],
               dtypes: Mapping[str, np.dtype], metadata=None):
    header, off = {}, 0
    if metadata:
      header["__metadata__"] = dict(metadata)
    self.todo = []  # (name, bytes still to write)
    for k in names:
      n = _nbytes(shapes[k], dtypes[k])
      header[k] = {"dtype": _ST_NAME[dtypes[k].name],
                   "shape": list(shapes[k]), "data_offsets": [off, off + n]}
      self.todo.append([k, n])
      off += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(8 + len(text))) % 8)  # 8-byte aligned data
    self.path, self.dtypes, self.nbytes = path, dtypes, off
    self._f = open(path, "wb")
    self._f.write(len(text).to_bytes(8, "little"))
    self._f.write(text)

  @property
  def expected(self) -> str | None:
    """The tensor whose data comes next (None when all are written)."""
    while self.todo and self.todo[0][1] == 0 and len(self.todo) > 1:
      self.todo.pop(0)  # zero-size tensors have no data
    return self.todo[0][0] if self.todo else None

  def write(self, name: str, x: np.ndarray) -> None:
    """Appends the next rows of `name` (cast to its dtype by the caller)."""
    if self.expected != name:
      raise RuntimeError(f"{self.path}: got {name!r}, expected "
                         f"{self.expected!r}")
    x = np.ascontiguousarray(x, self.dtypes[name]).reshape(-1)
    if x.nbytes > self.todo[0][1]:
      raise RuntimeError(f"{self.path}: too much data for {name!r}")
    self._f.write(x.view(np.uint8).data)
    self.todo[0][1] -= x.nbytes
    if self.todo[0][1] == 0:
      self.todo.pop(0)

  def close(self) -> None:
    """Checks completeness, then flushes and syncs the file."""
    self.todo = [t for t in self.todo if t[1]]
    if self.todo:
      raise RuntimeError(f"{self.path}: tensor {self.todo[0][0]!r} incomplete")
    self._f.flush()
    os.fsync(self._f.fileno())
    self._f.close()
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(self.path, 0o666 & ~umask)  # as a new file: the umask's mode

  def abort(self) -> None:
    self._f.close()


class Output:
  """All output shards of a base layout, written in the layout's order.

  Args:
    layout: the output's layout (kind, files, names, shapes, metadata): the
      base's, or `cli_output.output_layout`'s conversion of it.
    tmp: where to write: a file path ('file' kind) or an existing empty
      directory (the atomic writer's temp sibling).
    fill: name -> array for tensors that are not streamed (integer
      buffers, empty tensors): written when their turn comes.
  """

  def __init__(self, layout: checkpoint_io.Layout, tmp: str,
               fill: Callable[[str], np.ndarray]):
    self.layout, self.tmp, self.fill = layout, tmp, fill
    self.dtypes = {k: checkpoint_io.np_dtype(v)
                   for k, v in layout.dtypes.items()}
    self._files = list(layout.by_file().items())
    self._shard: ShardWriter | None = None
    self.total = 0
    if layout.kind != "file" and os.path.isdir(layout.source):
      checkpoint_io._copy_extras(layout.source, tmp)

  def _next_shard(self) -> None:
    if self._shard is not None:
      self._shard.close()
      self.total += self._shard.nbytes
      self._shard = None
    if self._files:
      file, names = self._files.pop(0)
      path = self.tmp if self.layout.kind == "file" else os.path.join(
          self.tmp, file)
      self._shard = ShardWriter(path, names, self.layout.shapes, self.dtypes,
                                self.layout.file_metadata.get(file))

  def _advance(self, until: str | None) -> None:
    """Writes filled tensors until `until` is the one expected."""
    while True:
      if self._shard is None or self._shard.expected is None:
        if not self._files:
          if until is not None:
            raise RuntimeError(f"no output slot left for tensor {until!r}")
          if self._shard is not None:
            self._next_shard()
          return
        self._next_shard()
        continue
      k = self._shard.expected
      if k == until:
        return
      self._shard.write(k, self.fill(k))

  def write(self, name: str, x: np.ndarray) -> None:
    """Writes the next block of tensor `name` (any float dtype: cast)."""
    self._advance(name)
    self._shard.write(name, np.asarray(x).astype(self.dtypes[name],
                                                 copy=False))

  def close(self) -> int:
    """Writes the remaining filled tensors and the index; returns bytes."""
    self._advance(None)
    if self.layout.kind == "sharded":
      index = {"metadata": {**self.layout.index_metadata,
                            "total_size": self.total},
               "weight_map": dict(sorted(self.layout.weight_map.items()))}
      with open(os.path.join(self.tmp, self.layout.index_name), "w",
                encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return self.total

  def abort(self) -> None:
    if self._shard is not None:
      self._shard.abort()
