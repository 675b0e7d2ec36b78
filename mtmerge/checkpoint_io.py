"""safetensors checkpoints on disk: load and save whole checkpoints.

A checkpoint PATH is a `.safetensors` file, a directory holding
`model.safetensors`, or a Hugging Face directory of shards plus
`model.safetensors.index.json`. Tensors are kept as a flat dict
`{tensor_name: np.ndarray}` (a valid pytree for `mtmerge.methods`), and a
`Layout` (`mtmerge.safetensors_layout`) remembers where each tensor lives so
`save` writes the merge back in the base's own layout and dtypes. Every
write is atomic (`mtmerge.atomic_files`). Task vectors from checkpoints are
`mtmerge.task_vectors.from_checkpoints`; the compressed per-task form is
`mtmerge.compressed_io`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from typing import Any, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from mtmerge import atomic_files
from mtmerge import results
from mtmerge.safetensors_layout import CheckpointError  # also the API's
from mtmerge.safetensors_layout import Layout
from mtmerge.safetensors_layout import WEIGHT_EXTS
from mtmerge.safetensors_layout import first_line
from mtmerge.safetensors_layout import is_float
from mtmerge.safetensors_layout import iter_tensors
from mtmerge.safetensors_layout import np_dtype
from mtmerge.safetensors_layout import read_layout

def load(path: str) -> tuple[dict[str, np.ndarray], Layout]:
  """Loads every tensor of a checkpoint, in its stored dtype.

  Args:
    path: a .safetensors file, or a directory (single file or sharded).

  Returns:
    `(flat, layout)`: `{tensor_name: np.ndarray}` and where each lives.
  """
  layout = read_layout(path)
  return {k: x for _, k, x in iter_tensors(layout)}, layout


def cast(x: Any, dtype: np.dtype | None) -> np.ndarray:
  """`x` as a contiguous numpy array of `dtype` (None: keep its own)."""
  x = np.asarray(x)
  if dtype is not None and x.dtype != dtype:
    if dtype.kind in "iu" and is_float(x.dtype):
      x = np.rint(x.astype(np.float32))
    x = x.astype(dtype)
  return x if x.flags.c_contiguous else x.copy(order="C")


umask_mode = results.umask_mode  # the mode a new output file gets


def write_st(fpath: str, arrays: dict[str, np.ndarray],
             metadata: dict[str, str] | None) -> None:
  """Writes one safetensors file, fsynced, with the umask's permissions
  (safetensors' I/O errors become OSErrors, a full disk ENOSPC)."""
  try:
    save_file(arrays, fpath, metadata=metadata or None)
  except SafetensorError as e:  # its I/O errors are not OSErrors
    text = first_line(e)
    code = errno.ENOSPC if "os error 28" in text or (
        "No space left" in text) else errno.EIO
    raise OSError(code, text) from None
  os.chmod(fpath, umask_mode())  # safetensors creates files 0600
  with open(fpath, "rb") as f:
    os.fsync(f.fileno())


def check_names(flat: Mapping[str, Any], layout: Layout, what: str,
                floats_only: bool = False) -> None:
  """`flat` has exactly the layout's tensor names (floating ones only if
  `floats_only`); else a `CheckpointError` naming the first difference."""
  missing = [k for k in layout.weight_map if k not in flat and not (
      floats_only and not is_float(np_dtype(layout.dtypes[k])))]
  extra = [k for k in flat if k not in layout.weight_map]
  if missing:
    raise CheckpointError(f"{what} lacks tensor {missing[0]!r} of the base "
                          f"layout ({layout.source})")
  if extra:
    raise CheckpointError(f"{what} has tensor {extra[0]!r} absent from the "
                          f"base layout ({layout.source})")


def copy_extras(src: str, dst: str) -> None:
  """Copies non-weight files (config.json, tokenizer files, ...)."""
  for n in sorted(os.listdir(src)):
    p = os.path.join(src, n)
    if os.path.isfile(p) and not n.startswith(".") and not n.endswith(
        WEIGHT_EXTS):
      shutil.copyfile(p, os.path.join(dst, n))  # new file: umask mode


def save(flat: Mapping[str, Any], path: str, layout: Layout | None = None,
         dtypes: Mapping[str, Any] | None = None) -> int:
  """Writes tensors atomically, in `layout` (the base's) if given.

  Args:
    flat: `{tensor_name: array}` (numpy or JAX).
    path: destination; an existing file or directory there is replaced.
    layout: the base's layout: same kind, shard files, index json (new
      `total_size`), header metadata, and non-weight files copied from the
      base directory. None writes one .safetensors file.
    dtypes: tensor name -> dtype; default the layout's, else each array's.

  Returns:
    Bytes written.
  """
  flat = dict(flat)
  if layout is not None:
    check_names(flat, layout, "the tensors to save")
  want = dict(layout.dtypes) if layout is not None else {}
  want.update({k: np_dtype(v).name for k, v in (dtypes or {}).items()})

  def arrays(names):  # cast one file's tensors only when it is written
    return {k: cast(flat[k], np_dtype(want[k]) if k in want else None)
            for k in names}

  def write(tmp):
    if layout is None or layout.kind == "file":
      write_st(tmp, arrays(flat), layout and layout.file_metadata.get(
          layout.files[0]))
      return
    if os.path.isdir(layout.source):  # not for a file base written as a dir
      copy_extras(layout.source, tmp)
    total = 0
    for file, names in layout.by_file().items():
      shard = arrays(names)
      total += sum(x.nbytes for x in shard.values())
      write_st(os.path.join(tmp, file), shard, layout.file_metadata.get(file))
    if layout.kind == "sharded":
      index = {"metadata": {**layout.index_metadata, "total_size": total},
               "weight_map": dict(sorted(layout.weight_map.items()))}
      with open(os.path.join(tmp, layout.index_name), "w",
                encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")

  is_dir = layout is not None and layout.kind != "file"
  return atomic_files.disk_bytes(atomic_files.atomic_write(path, write,
                                                       is_dir=is_dir))
