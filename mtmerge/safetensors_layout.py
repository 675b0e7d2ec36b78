"""Where a safetensors checkpoint's tensors live: headers, no tensor data.

A checkpoint PATH is a `.safetensors` file, a directory holding
`model.safetensors`, or a Hugging Face directory of shards plus
`model.safetensors.index.json`. `read_layout` reads the headers into a
`Layout` (names, shapes, dtypes, files) so a writer can reproduce the base's
own layout; `mmap_file` gives memory-mapped views of one file's tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16",
              "BF16": "bfloat16", "I64": "int64", "I32": "int32",
              "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32",
              "U16": "uint16", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5",
                ".msgpack", ".gguf", ".index.json")
_SINGLE = "model.safetensors"


class CheckpointError(ValueError):
  """A checkpoint that is missing, unreadable, corrupt or inconsistent."""


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (safetensors' are long)."""
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def np_dtype(dtype: Any) -> np.dtype:
  """numpy dtype of e.g. 'float32', 'bfloat16' (ml_dtypes), jnp.bfloat16."""
  try:
    return np.dtype(dtype)
  except TypeError:
    return np.dtype(getattr(ml_dtypes, str(dtype)))


@dataclasses.dataclass
class Layout:
  """Where a checkpoint's tensors live, and their dtypes and shapes.

  Attributes:
    kind: 'file' (one .safetensors), 'dir' (a directory with one weight
      file) or 'sharded' (a directory of shards plus an index json).
    source: the path the checkpoint was read from.
    weight_map: tensor name -> file name (relative to the directory; the
      basename for 'file').
    dtypes: tensor name -> numpy dtype name ('bfloat16', 'float32', ...).
    shapes: tensor name -> shape.
    index_name: the index json's file name ('sharded' only).
    index_metadata: the index json's "metadata" ('sharded' only).
    file_metadata: file name -> the safetensors header's `__metadata__`.
  """
  kind: str
  source: str
  weight_map: dict[str, str]
  dtypes: dict[str, str]
  shapes: dict[str, tuple[int, ...]]
  index_name: str | None = None
  index_metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
  file_metadata: dict[str, dict[str, str]] = dataclasses.field(
      default_factory=dict)

  @property
  def files(self) -> list[str]:
    """Weight file names in first-use order."""
    return list(self.by_file())

  def by_file(self) -> dict[str, list[str]]:
    """File name -> the tensor names it holds."""
    out: dict[str, list[str]] = {}
    for k, file in self.weight_map.items():
      out.setdefault(file, []).append(k)
    return out

  @property
  def nbytes(self) -> int:
    """Bytes of all tensors (one full checkpoint, headers excluded)."""
    return int(sum(int(np.prod(s, dtype=np.int64)) * np_dtype(
        self.dtypes[k]).itemsize for k, s in self.shapes.items()))

  def path_of(self, file: str) -> str:
    return self.source if self.kind == "file" else os.path.join(
        self.source, file)


def _index_file(path: str) -> str | None:
  names = sorted(n for n in os.listdir(path)
                 if n.endswith(".safetensors.index.json"))
  if "model.safetensors.index.json" in names:
    return "model.safetensors.index.json"
  if len(names) > 1:
    raise CheckpointError(f"{path} holds several index files ({names}); pass "
                          "the directory of one model")
  return names[0] if names else None


def _read_header(layout: Layout, file: str, names: Sequence[str] | None):
  """Adds one file's tensors to `layout` (all, or the `names` listed)."""
  fpath = layout.path_of(file)
  if not os.path.isfile(fpath):
    raise CheckpointError(f"index {layout.index_name} in {layout.source} "
                          f"references missing shard {fpath}")
  try:
    with safe_open(fpath, "np") as f:
      ordered = list(f.keys())
      keys = set(ordered)
      layout.file_metadata[file] = dict(f.metadata() or {})
      for k in (ordered if names is None else names):
        if k not in keys:
          raise CheckpointError(f"shard {fpath} lacks tensor {k!r} listed in "
                                f"its index {layout.index_name}")
        sl = f.get_slice(k)
        layout.weight_map[k] = file
        layout.shapes[k] = tuple(int(d) for d in sl.get_shape())
        st = sl.get_dtype()
        layout.dtypes[k] = ST_DTYPES.get(st, st)
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{fpath} is not a readable safetensors file "
                          f"({first_line(e)})") from None
  if names is not None and len(keys) > len(names):
    extra = sorted(keys - set(names))
    if extra:
      raise CheckpointError(f"shard {fpath} holds tensor {extra[0]!r} missing "
                            f"from its index {layout.index_name}")


def read_layout(path: str) -> Layout:
  """Reads headers only (no tensor data): names, shapes, dtypes, files.

  Raises:
    CheckpointError: the path is missing, not safetensors, or inconsistent.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint {path} does not exist")
  if os.path.isfile(path):
    layout = Layout("file", path, {}, {}, {})
    _read_header(layout, os.path.basename(path), None)
    return layout
  index = _index_file(path)
  if index is None:
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if _SINGLE in files or len(files) == 1:
      layout = Layout("dir", path, {}, {}, {})
      _read_header(layout, _SINGLE if _SINGLE in files else files[0], None)
      return layout
    raise CheckpointError(f"{path} holds no {_SINGLE} or safetensors index "
                          f"json (found {len(files)} .safetensors files)")
  ipath = os.path.join(path, index)
  try:
    with open(ipath, encoding="utf-8") as f:
      data = json.load(f)
    weight_map = data["weight_map"]
    if not (isinstance(weight_map, dict) and all(
        isinstance(v, str) for v in weight_map.values())):
      raise TypeError("weight_map is not an object of file names")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{ipath} is not a valid safetensors index json "
                          f"({type(e).__name__}: {e})") from None
  layout = Layout("sharded", path, {}, {}, {}, index_name=index,
                  index_metadata=dict(data.get("metadata") or {}))
  index_only = Layout("sharded", path, dict(weight_map), {}, {})
  for file, names in index_only.by_file().items():
    _read_header(layout, file, names)
  return layout


def tensor_index(fpath: str) -> dict[str, tuple[np.dtype, tuple, int, int]]:
  """`{name: (dtype, shape, begin, end)}` of a safetensors file's tensors.

  `begin`/`end` are absolute byte offsets in the file. The header is
  validated against the file size, so a truncated file is a ValueError
  naming the tensor (callers wrap it into a `CheckpointError`).
  """
  size = os.path.getsize(fpath)
  with open(fpath, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= min(size - 8, 100 << 20):
      raise ValueError(f"header length {n} does not fit a {size}-byte file")
    header = json.loads(f.read(n))
  start = 8 + n
  out = {}
  for k, info in header.items():
    if k == "__metadata__":
      continue
    dtype = np_dtype(ST_DTYPES.get(info["dtype"], info["dtype"]))
    shape = tuple(int(d) for d in info["shape"])
    b, e = (int(o) for o in info["data_offsets"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if e - b != nbytes or start + e > size or b < 0:
      raise ValueError(f"tensor {k!r} ({info['dtype']} {list(shape)}) has "
                       f"data offsets [{b}, {e}] outside the file or of the "
                       "wrong size (truncated?)")
    out[k] = (dtype, shape, start + b, start + e)
  return out


def mmap_file(fpath: str) -> dict[str, np.ndarray]:
  """Read-only memory-mapped views of every tensor in one safetensors file.

  No tensor data is read here: each view pages in from the OS cache when an
  operation touches it, so a loader can subtract straight from the file into
  its own buffers (one pass, no intermediate copy). The header is validated
  against the file size (`tensor_index`), so a truncated file is an error
  naming it.
  """
  try:
    index = tensor_index(fpath)
    buf = (np.memmap(fpath, dtype=np.uint8, mode="r")
           if any(e > b for _, _, b, e in index.values()) else None)
    return {k: (buf[b:e].view(dtype).reshape(shape) if e > b
                else np.zeros(shape, dtype))
            for k, (dtype, shape, b, e) in index.items()}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"cannot read {fpath} ({first_line(e)})") from None


def iter_tensors(layout: Layout, copy: bool = True):
  """Yields `(file path, name, array)`; `copy=False` gives mmap views."""
  for file, names in layout.by_file().items():
    fpath = layout.path_of(file)
    views = mmap_file(fpath)
    for k in names:
      if k not in views:
        raise CheckpointError(f"{fpath} lacks tensor {k!r}")
      yield fpath, k, (np.array(views[k]) if copy else views[k])


def is_float(dtype: np.dtype) -> bool:
  """Floating dtypes (numpy's, bfloat16, float8): the merged tensors."""
  return dtype.kind in "fc" or dtype.name.startswith(("bfloat", "float8"))


def check_against(base: Layout, other: Layout, what: str) -> None:
  """`other` has exactly `base`'s tensor names and shapes (`what` names it)."""
  for k in base.weight_map:
    if k not in other.weight_map:
      raise CheckpointError(f"{what} lacks tensor {k!r} present in base")
    if other.shapes[k] != base.shapes[k]:
      raise CheckpointError(
          f"tensor {k!r} has shape {other.shapes[k]} in {what} but "
          f"{base.shapes[k]} in base ({base.source})")
  extra = [k for k in other.weight_map if k not in base.weight_map]
  if extra:
    raise CheckpointError(f"{what} has tensor {extra[0]!r} absent from base "
                          f"({base.source})")
