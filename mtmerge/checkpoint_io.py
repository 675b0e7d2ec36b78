"""safetensors checkpoints on disk: single files and sharded HF directories.

A checkpoint PATH is a `.safetensors` file, a directory holding
`model.safetensors`, or a Hugging Face directory of shards plus
`model.safetensors.index.json`. Tensors are kept as a flat dict
`{tensor_name: np.ndarray}` (a valid pytree for `mtmerge.methods`), and a
`Layout` remembers where each tensor lives so `save` writes the merge back in
the base's own layout and dtypes. Every write is atomic: it goes to a temp
file or directory next to the destination, swapped in with `os.replace`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import re
import shutil
import sys
import uuid
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from mtmerge import results

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16",
              "BF16": "bfloat16", "I64": "int64", "I32": "int32",
              "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32",
              "U16": "uint16", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5",
                ".msgpack", ".gguf", ".index.json")
_SINGLE = "model.safetensors"


class CheckpointError(ValueError):
  """A checkpoint that is missing, unreadable, corrupt or inconsistent."""


def _line(e: BaseException) -> str:
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
        layout.dtypes[k] = _ST_DTYPES.get(st, st)
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{fpath} is not a readable safetensors file "
                          f"({_line(e)})") from None
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
    dtype = np_dtype(_ST_DTYPES.get(info["dtype"], info["dtype"]))
    shape = tuple(int(d) for d in info["shape"])
    b, e = (int(o) for o in info["data_offsets"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if e - b != nbytes or start + e > size or b < 0:
      raise ValueError(f"tensor {k!r} ({info['dtype']} {list(shape)}) has "
                       f"data offsets [{b}, {e}] outside the file or of the "
                       "wrong size (truncated?)")
    out[k] = (dtype, shape, start + b, start + e)
  return out


def _mmap_file(fpath: str) -> dict[str, np.ndarray]:
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
    raise CheckpointError(f"cannot read {fpath} ({_line(e)})") from None


def _iter_tensors(layout: Layout, copy: bool = True):
  """Yields `(file path, name, array)`; `copy=False` gives mmap views."""
  for file, names in layout.by_file().items():
    fpath = layout.path_of(file)
    views = _mmap_file(fpath)
    for k in names:
      if k not in views:
        raise CheckpointError(f"{fpath} lacks tensor {k!r}")
      yield fpath, k, (np.array(views[k]) if copy else views[k])


def _is_float(dtype: np.dtype) -> bool:
  return dtype.kind in "fc" or dtype.name.startswith(("bfloat", "float8"))


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
  """Uninitialized float32 array whose data is 64-byte aligned."""
  n = int(np.prod(shape, dtype=np.int64))
  raw = np.empty(n * 4 + 64, np.uint8)
  off = (-raw.ctypes.data) % 64
  return raw[off:off + n * 4].view(np.float32).reshape(shape)


def _nonfinite_sum(x: np.ndarray) -> bool:
  """Exact NaN/Inf test for float32 `x`, fast when everything is finite.

  A sum is finite only if every term is (NaN and Inf propagate), so the
  elementwise test runs only when the sum is not finite (a NaN/Inf entry,
  or a rare float32 overflow of the sum).
  """
  acc = np.float64 if x.dtype == np.float64 else np.float32
  with np.errstate(over="ignore", invalid="ignore"):
    if np.isfinite(np.sum(x, dtype=acc)):
      return False
  return not bool(np.isfinite(x).all())


def _nonfinite(x: np.ndarray) -> bool:
  """True if a floating array holds NaN or Inf."""
  return _is_float(x.dtype) and _nonfinite_sum(x)


def load(path: str) -> tuple[dict[str, np.ndarray], Layout]:
  """Loads every tensor of a checkpoint, in its stored dtype.

  Args:
    path: a .safetensors file, or a directory (single file or sharded).

  Returns:
    `(flat, layout)`: `{tensor_name: np.ndarray}` and where each lives.
  """
  layout = read_layout(path)
  return {k: x for _, k, x in _iter_tensors(layout)}, layout


def _check_against(base: Layout, other: Layout, what: str) -> None:
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


def _progress(total: int, desc: str, enabled: bool):
  from tqdm import tqdm  # local: keeps `import mtmerge.checkpoint_io` light
  return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr,
              disable=not (enabled and sys.stderr.isatty()), leave=False)


def load_task_vectors(base_path: str, model_paths: Sequence[str],
                      progress: bool = True, as_jax: bool = False):
  """Loads base, then each model ONE AT A TIME into stacked task vectors.

  All headers are validated first (keys, shapes), so a bad input fails
  before any tensor data is read. Peak memory is about base + task vectors +
  one tensor.

  Args:
    base_path: the pretrained checkpoint.
    model_paths: T fine-tuned checkpoints (any layout each).
    progress: show a tqdm bar on stderr (only when it is a terminal).
    as_jax: return jax arrays, moved to the device one tensor at a time
      while the host copy is dropped (a whole-tree `device_put` would hold
      both copies: 2x the task vectors' memory).

  Returns:
    `(base_flat, tvs_flat, layout)`: base tensors in their dtype, float32
    task vectors `[T, *shape]` per floating tensor (integer tensors such
    as position ids are kept from the base, not merged), and the base's
    layout.

  Raises:
    CheckpointError: missing/corrupt files, mismatched keys or shapes, or
      NaN/Inf in the base or a task vector (naming file and tensor).
  """
  layout = read_layout(base_path)
  models = []
  for i, p in enumerate(model_paths):
    m = read_layout(p)
    _check_against(layout, m, f"model {i} ({m.source})")
    models.append(m)
  T = len(models)
  base, tvs = {}, {}
  bar = _progress(len(layout.shapes) * (T + 1), "loading", progress)
  with bar:
    for fpath, k, x in _iter_tensors(layout):
      if _nonfinite(x):
        raise CheckpointError(f"base ({fpath}) has NaN or Inf in tensor {k!r}")
      base[k] = x
      if _is_float(x.dtype):  # integer buffers (position ids) are not merged
        tvs[k] = _aligned_empty((T,) + x.shape)
      bar.update()
    base32 = {k: base[k].astype(np.float32, copy=False) for k in tvs}
    for i, m in enumerate(models):
      for fpath, k, x in _iter_tensors(m, copy=False):
        if k in tvs:
          # One pass from the page cache into the stacked buffer.
          slot = tvs[k][i, ...]  # a view, also for 0-d tensors
          np.subtract(x, base32[k], out=slot, dtype=np.float32)
          if _nonfinite_sum(slot):
            raise CheckpointError(f"model {i} ({fpath}) has NaN or Inf in "
                                  f"the task vector of tensor {k!r}")
        bar.update()
    del base32
  if as_jax:
    import jax  # local: keeps `import mtmerge.checkpoint_io` light
    for d in (tvs, base):
      for k in list(d):
        # 64-byte aligned host buffers are adopted by the CPU backend without
        # a copy; elsewhere this is one host->device transfer per tensor.
        d[k] = jax.device_put(d.pop(k))
  return base, tvs, layout


# ----------------------------------------------------------------------------
# Atomic writes.


def disk_bytes(path: str) -> int:
  """Size of a file, or of all files under a directory."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, n))
             for d, _, names in os.walk(path) for n in names)


def _sibling(dest: str, tag: str) -> str:
  head, name = os.path.split(dest)
  return os.path.join(head, f".{name}.{tag}-{os.getpid()}-"
                      f"{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # EPERM: alive, another user's
    return True
  return True


def _remove_stale_temps(dest: str) -> None:
  """Removes temp siblings of `dest` left by killed runs (dead pids only)."""
  head, name = os.path.split(dest)
  pat = re.compile(rf"^\.{re.escape(name)}\.tmp-(\d+)-[0-9a-f]{{8}}$")
  try:
    names = os.listdir(head)
  except OSError:
    return
  for n in names:
    m = pat.match(n)
    if m and int(m.group(1)) != os.getpid() and not _pid_alive(
        int(m.group(1))):
      _remove(os.path.join(head, n))


def _remove(path: str) -> None:
  """Best-effort removal of a temp file or directory; never raises."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    try:
      os.remove(path)
    except OSError:
      pass


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE).

  Returns:
    False where the call is unavailable (other systems, old kernels or
    file systems), and nothing was changed.
  """
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
        rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), b)


def free_bytes(path: str) -> int:
  """Free bytes on the file system holding `path` (its nearest parent)."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def _write_error(dest: str, e: OSError) -> CheckpointError:
  if e.errno == errno.ENOSPC:
    return CheckpointError(
        f"no space left on device writing {dest} ({free_bytes(dest) >> 20} "
        "MiB free there); nothing was written")
  return CheckpointError(f"cannot write {dest} ({_line(e)})")


def _atomic_write(dest: str, write, is_dir: bool) -> str:
  """Runs `write(tmp)` on a temp sibling of `dest`, then swaps it in.

  A run killed at any point leaves `dest` as it was (absent, or the old
  output); the hidden temp sibling it may leave is removed by the next
  write to the same destination. Replacing a directory swaps it atomically
  where the OS can (renameat2), else renames the old one aside first.
  """
  dest = os.path.abspath(os.fspath(dest))
  parent = os.path.dirname(dest)
  if not os.path.isdir(parent):
    raise CheckpointError(f"output directory {parent} does not exist")
  if not is_dir and os.path.isdir(dest):
    raise CheckpointError(f"output {dest} is a directory but the base is a "
                          "single .safetensors file")
  _remove_stale_temps(dest)
  tmp = _sibling(dest, "tmp")
  try:
    if is_dir:
      os.mkdir(tmp)
    write(tmp)
    if os.path.lexists(dest) and (is_dir or os.path.isdir(dest)):
      if _exchange(tmp, dest):
        _remove(tmp)  # now the old output
        return dest
      old = _sibling(dest, "old")
      os.rename(dest, old)
      try:
        os.replace(tmp, dest)
      except BaseException:
        os.rename(old, dest)
        raise
      _remove(old)
    else:
      os.replace(tmp, dest)
  except BaseException as e:
    _remove(tmp)
    if isinstance(e, OSError):
      raise _write_error(dest, e) from None
    raise
  return dest


def _cast(x: Any, dtype: np.dtype | None) -> np.ndarray:
  """`x` as a contiguous numpy array of `dtype` (None: keep its own)."""
  x = np.asarray(x)
  if dtype is not None and x.dtype != dtype:
    if dtype.kind in "iu" and _is_float(x.dtype):
      x = np.rint(x.astype(np.float32))
    x = x.astype(dtype)
  return x if x.flags.c_contiguous else x.copy(order="C")


umask_mode = results.umask_mode  # the mode a new output file gets


def _write_st(fpath: str, arrays: dict[str, np.ndarray],
              metadata: dict[str, str] | None) -> None:
  try:
    save_file(arrays, fpath, metadata=metadata or None)
  except SafetensorError as e:  # its I/O errors are not OSErrors
    text = _line(e)
    code = errno.ENOSPC if "os error 28" in text or (
        "No space left" in text) else errno.EIO
    raise OSError(code, text) from None
  os.chmod(fpath, umask_mode())  # safetensors creates files 0600
  with open(fpath, "rb") as f:
    os.fsync(f.fileno())


def _check_names(flat: Mapping[str, Any], layout: Layout, what: str,
                 floats_only: bool = False) -> None:
  missing = [k for k in layout.weight_map if k not in flat and not (
      floats_only and not _is_float(np_dtype(layout.dtypes[k])))]
  extra = [k for k in flat if k not in layout.weight_map]
  if missing:
    raise CheckpointError(f"{what} lacks tensor {missing[0]!r} of the base "
                          f"layout ({layout.source})")
  if extra:
    raise CheckpointError(f"{what} has tensor {extra[0]!r} absent from the "
                          f"base layout ({layout.source})")


def _copy_extras(src: str, dst: str) -> None:
  """Copies non-weight files (config.json, tokenizer files, ...)."""
  for n in sorted(os.listdir(src)):
    p = os.path.join(src, n)
    if os.path.isfile(p) and not n.startswith(".") and not n.endswith(
        _WEIGHT_EXTS):
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
    _check_names(flat, layout, "the tensors to save")
  want = dict(layout.dtypes) if layout is not None else {}
  want.update({k: np_dtype(v).name for k, v in (dtypes or {}).items()})

  def arrays(names):  # cast one file's tensors only when it is written
    return {k: _cast(flat[k], np_dtype(want[k]) if k in want else None)
            for k in names}

  def write(tmp):
    if layout is None or layout.kind == "file":
      _write_st(tmp, arrays(flat), layout and layout.file_metadata.get(
          layout.files[0]))
      return
    if os.path.isdir(layout.source):  # not for a file base written as a dir
      _copy_extras(layout.source, tmp)
    total = 0
    for file, names in layout.by_file().items():
      shard = arrays(names)
      total += sum(x.nbytes for x in shard.values())
      _write_st(os.path.join(tmp, file), shard, layout.file_metadata.get(file))
    if layout.kind == "sharded":
      index = {"metadata": {**layout.index_metadata, "total_size": total},
               "weight_map": dict(sorted(layout.weight_map.items()))}
      with open(os.path.join(tmp, layout.index_name), "w",
                encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")

  is_dir = layout is not None and layout.kind != "file"
  return disk_bytes(_atomic_write(path, write, is_dir=is_dir))


# ----------------------------------------------------------------------------
# Compressed one-model-per-task form (TALL masks, EMR-Merging).

_CJSON, _TAU, _MASKS = "compressed.json", "tau.safetensors", "masks.safetensors"


def compressed_meta(method: str, hparams: Mapping[str, Any], rescalers: Any,
                    base_layout: Layout) -> dict[str, Any]:
  """The `compressed.json` of a compressed merge (also the streamed one's)."""
  from mtmerge import __version__
  r = np.asarray(rescalers, np.float32).reshape(-1)
  return {"format": "mtmerge.compressed", "mtmerge_version": __version__,
          "method": method, "hparams": dict(hparams),
          "num_tasks": int(r.shape[0]), "rescalers": [float(x) for x in r],
          "base_dtypes": base_layout.dtypes}


def save_compressed(compressed: Any, base_layout: Layout, path: str,
                    method: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
  """Writes a `Compressed` as a directory: tau, packed masks, json.

  Args:
    compressed: `Compressed(tau, masks, rescalers)` with flat dict trees.
    base_layout: the base's layout (tau is cast to its dtypes).
    path: destination directory (replaced atomically if present).
    method, hparams: recorded in `compressed.json`.

  Returns:
    `{"bytes": size on disk, "full_bytes": T times the base's weight files,
    "ratio": bytes / full_bytes}`.
  """
  tau, masks = dict(compressed.tau), dict(compressed.masks)
  _check_names(tau, base_layout, "the compressed vector", floats_only=True)
  _check_names(masks, base_layout, "the compressed masks", floats_only=True)
  meta = compressed_meta(method, hparams, compressed.rescalers, base_layout)
  T = meta["num_tasks"]
  tau = {k: _cast(x, np_dtype(base_layout.dtypes[k])) for k, x in tau.items()}
  from mtmerge import task_vectors
  # Files hold the flat layout (`task_vectors.pack_mask`).
  masks = {k: _cast(task_vectors.relayout_packed(
      x, np.shape(tau[k]), 1, to_rows=False), np.dtype(np.uint8))
           for k, x in masks.items()}

  def write(tmp):
    _write_st(os.path.join(tmp, _TAU), tau, None)
    _write_st(os.path.join(tmp, _MASKS), masks, None)
    with open(os.path.join(tmp, _CJSON), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2, default=repr)
      f.write("\n")

  full = T * sum(os.path.getsize(base_layout.path_of(f))
                 for f in base_layout.files)
  nbytes = disk_bytes(_atomic_write(path, write, is_dir=True))
  return {"bytes": nbytes, "full_bytes": full, "ratio": nbytes / max(full, 1)}


def load_compressed(path: str) -> tuple[Any, dict[str, Any]]:
  """Reads what `save_compressed` wrote.

  Returns:
    `(Compressed(tau, masks, rescalers), meta)`, meta the json contents.
  """
  path = os.path.abspath(os.fspath(path))
  jpath = os.path.join(path, _CJSON)
  if not os.path.isdir(path):
    raise CheckpointError(f"compressed model {path} is not a directory"
                          if os.path.exists(path) else
                          f"compressed model {path} does not exist")
  try:
    with open(jpath, encoding="utf-8") as f:
      meta = json.load(f)
    T = int(meta["num_tasks"])
    rescalers = np.asarray(meta["rescalers"], np.float32).reshape(-1)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{jpath} is not a valid mtmerge compressed json "
                          f"({type(e).__name__}: {e})") from None
  tau, _ = load(os.path.join(path, _TAU))
  masks, _ = load(os.path.join(path, _MASKS))
  if rescalers.shape != (T,):
    raise CheckpointError(f"{jpath}: {rescalers.size} rescalers for {T} tasks")
  for k, x in tau.items():
    want = (T, -(-int(np.prod(x.shape, dtype=np.int64)) // 8))
    if k not in masks or masks[k].shape != want or masks[k].dtype != np.uint8:
      got = masks[k].shape if k in masks else "nothing"
      raise CheckpointError(f"{os.path.join(path, _MASKS)}: tensor {k!r} "
                            f"should be uint8 {want}, got {got}")
  if set(masks) - set(tau):
    raise CheckpointError(f"{os.path.join(path, _MASKS)} has tensor "
                          f"{sorted(set(masks) - set(tau))[0]!r} absent from "
                          f"{_TAU}")
  from mtmerge import task_vectors
  from mtmerge.methods.compressed import Compressed
  # Files hold the flat layout; in memory each row is packed on its own.
  masks = task_vectors.mask_flat_to_rows(masks, tau)
  return Compressed(tau, masks, rescalers), meta
