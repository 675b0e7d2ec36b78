"""Streamed output in the base's layout: preallocated shards, written by offset.

The base's layout fixes every output tensor's name, shape, dtype and
therefore its byte offset before any data exists, so each safetensors file
is created whole up front (header written, data area preallocated with
`ftruncate`) and every block is written with `os.pwrite` at its own offset.
Blocks may therefore arrive in any order and from several processes: with
`jax.distributed`, process 0 creates the files, every process writes the
rows its devices computed into the same temp files (a filesystem all hosts
share), and process 0 renames the finished output into place
(`atomic_write`). `Output` writes into the temp path that
`atomic_files.atomic_write` gives it, so the finished file or directory
appears under its final name only once every shard is complete and synced.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import numpy as np

from mtmerge import checkpoint_io
from mtmerge import safetensors_layout as st_layout

_ST_NAME = {v: k for k, v in st_layout.ST_DTYPES.items()}


def _nbytes(shape, dtype: np.dtype) -> int:
  return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


class ShardWriter:
  """One safetensors file, preallocated; tensors written by entry offset.

  Args:
    path: the file.
    names: tensor names in data order.
    shapes, dtypes: name -> shape, name -> numpy dtype.
    metadata: the header's `__metadata__` (str -> str), or None.
    create: True writes the header and preallocates the data (one process
      does); False opens the file another process created.
  """

  def __init__(self, path: str, names, shapes: Mapping[str, tuple],
               dtypes: Mapping[str, np.dtype], metadata=None,
               create: bool = True):
    header, off = {}, 0
    if metadata:
      header["__metadata__"] = dict(metadata)
    self.slots = {}  # name -> (data offset, bytes)
    for k in names:
      n = _nbytes(shapes[k], dtypes[k])
      header[k] = {"dtype": _ST_NAME[dtypes[k].name],
                   "shape": list(shapes[k]), "data_offsets": [off, off + n]}
      self.slots[k] = (off, n)
      off += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(8 + len(text))) % 8)  # 8-byte aligned data
    self.path, self.dtypes, self.nbytes = path, dtypes, off
    self.data0 = 8 + len(text)
    self.written = {k: 0 for k in names}
    if create:
      self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
      head = len(text).to_bytes(8, "little") + text
      if os.pwrite(self._fd, head, 0) != len(head):
        raise OSError(f"short write of the header of {path}")
      os.ftruncate(self._fd, self.data0 + off)
    else:
      self._fd = os.open(path, os.O_WRONLY)

  def write_at(self, name: str, first: int, x: np.ndarray) -> None:
    """Writes `x` (cast by the caller) from entry `first` of tensor `name`."""
    x = np.ascontiguousarray(x, self.dtypes[name]).reshape(-1)
    off, n = self.slots[name]
    pos = first * self.dtypes[name].itemsize
    if pos < 0 or pos + x.nbytes > n:
      raise RuntimeError(f"{self.path}: entries {first}..{first + x.size} "
                         f"are outside tensor {name!r}")
    view, at = memoryview(x.view(np.uint8)), self.data0 + off + pos
    while view.nbytes:
      got = os.pwrite(self._fd, view, at)
      view, at = view[got:], at + got
    self.written[name] += x.nbytes

  def incomplete(self) -> str | None:
    """A tensor this writer has written fewer bytes of than it holds."""
    for k, (_, n) in self.slots.items():
      if self.written[k] < n:
        return k
    return None

  def close(self, check: bool = True) -> None:
    """Checks completeness (one writer only), syncs and closes the file."""
    if check and self.incomplete():
      raise RuntimeError(f"{self.path}: tensor {self.incomplete()!r} "
                         "incomplete")
    os.fsync(self._fd)
    os.close(self._fd)
    self._fd = -1
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(self.path, 0o666 & ~umask)  # as a new file: the umask's mode

  def abort(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1


class Output:
  """All output shards of a base layout, preallocated and written by offset.

  Args:
    layout: the output's layout (kind, files, names, shapes, metadata): the
      base's, or `cli_output.output_layout`'s conversion of it.
    tmp: where to write: a file path ('file' kind) or an existing empty
      directory (the atomic writer's temp sibling).
    fill: name -> array for tensors that are not streamed (integer
      buffers, empty tensors), written at once by the creating process.
    streamed: names whose data arrives through `write`.
    create: True on the one process that creates the files (and fills and
      indexes them); False on the others, which open them.
    single: True when this process writes every streamed entry (then
      `close` checks that each tensor is complete).
  """

  def __init__(self, layout: checkpoint_io.Layout, tmp: str,
               fill: Callable[[str], np.ndarray], streamed=None,
               create: bool = True, single: bool = True):
    self.layout, self.tmp, self.single = layout, tmp, single
    self.create = create
    self.dtypes = {k: checkpoint_io.np_dtype(v)
                   for k, v in layout.dtypes.items()}
    if create and layout.kind != "file" and os.path.isdir(layout.source):
      checkpoint_io.copy_extras(layout.source, tmp)
    self.shards: dict[str, ShardWriter] = {}
    self.where: dict[str, ShardWriter] = {}
    try:
      for file, names in layout.by_file().items():
        path = tmp if layout.kind == "file" else os.path.join(tmp, file)
        w = ShardWriter(path, names, layout.shapes, self.dtypes,
                        layout.file_metadata.get(file), create)
        self.shards[file] = w
        for k in names:
          self.where[k] = w
          if k not in (streamed if streamed is not None else ()):
            if create:
              w.write_at(k, 0, np.asarray(fill(k)).astype(self.dtypes[k],
                                                         copy=False))
            else:
              w.written[k] = w.slots[k][1]
    except BaseException:
      self.abort()
      raise
    self.total = sum(w.nbytes for w in self.shards.values())

  def write(self, name: str, first: int, x: np.ndarray) -> None:
    """Writes entries `first, first + 1, ...` of tensor `name` (cast)."""
    self.where[name].write_at(name, first, np.asarray(x).astype(
        self.dtypes[name], copy=False))

  def close(self) -> int:
    """Syncs every shard (and writes the index); returns the bytes."""
    for w in self.shards.values():
      w.close(check=self.single)
    if self.create and self.layout.kind == "sharded":
      index = {"metadata": {**self.layout.index_metadata,
                            "total_size": self.total},
               "weight_map": dict(sorted(self.layout.weight_map.items()))}
      with open(os.path.join(self.tmp, self.layout.index_name), "w",
                encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return self.total

  def abort(self) -> None:
    for w in self.shards.values():
      w.abort()
