"""Task vectors as ONE pytree with a leading task axis, and bit-packed masks.

`tau_t = theta_t - theta_0` ("Editing Models with Task Arithmetic", Ilharco et
al., 2023). mtmerge never keeps a Python list of models: the T task vectors are
stacked leaf by leaf into a tree whose leaves have shape `[T, *param.shape]`,
so reductions over tasks are `axis=0` ops and the task axis can be sharded.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import safetensors_layout as st_layout
from mtmerge import sharding
from mtmerge import tree as tree_lib

Tree = Any


def num_tasks(tvs: Tree) -> int:
  """Size of the leading task axis (checked to agree across leaves)."""
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(tvs)}
  if not sizes:
    raise ValueError("task vectors are an empty tree")
  if None in sizes or len(sizes) != 1:
    bad = [(p, np.shape(x)) for p, x in tree_lib.named_leaves(tvs)]
    raise ValueError(f"task vectors must share one leading task axis; got "
                     f"leaf shapes {bad[:4]}")
  return sizes.pop()


def stack(trees: Sequence[Tree]) -> Tree:
  """Stacks T same-structured trees into one tree with leaves `[T, ...]`."""
  if not trees:
    raise ValueError("stack needs at least one tree")
  for i, t in enumerate(trees[1:], 1):
    tree_lib.check_same_structure(trees[0], t, "tree 0", f"tree {i}")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tvs: Tree) -> list[Tree]:
  """Inverse of `stack`: a list of T trees."""
  return [jax.tree.map(lambda x, i=i: x[i], tvs) for i in range(num_tasks(tvs))]


def index(tvs: Tree, t) -> Tree:
  """Task `t`'s vector (`t` may be traced)."""
  return jax.tree.map(lambda x: x[t], tvs)


def from_models(base: Tree, models: Sequence[Tree],
                dtype: Any = None) -> Tree:
  """Stacked task vectors `[theta_t - theta_0]_t`.

  Args:
    base: pretrained params theta_0.
    models: T fine-tuned param trees with the same structure as `base`.
    dtype: dtype of the task vectors; default float32 for floating leaves
      narrower than float32 (bf16 differences lose precision), else the
      leaf's own dtype.

  Returns:
    A tree with leaves `[T, *shape]`.
  """
  if not models:
    raise ValueError("from_models needs at least one fine-tuned model")
  for i, m in enumerate(models):
    tree_lib.check_same_structure(base, m, "base", f"model {i}")

  def one(b, *ms):
    dt = dtype or jnp.promote_types(b.dtype, jnp.float32)
    return jnp.stack([m.astype(dt) - b.astype(dt) for m in ms])

  return jax.tree.map(one, base, *models)


# Task vectors of checkpoints on disk, loaded one model at a time.


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
  return st_layout.is_float(x.dtype) and _nonfinite_sum(x)


def _progress(total: int, desc: str, enabled: bool):
  from tqdm import tqdm  # local: only for loading
  return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr,
              disable=not (enabled and sys.stderr.isatty()), leave=False)


def from_checkpoints(base_path: str, model_paths: Sequence[str],
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
  layout = st_layout.read_layout(base_path)
  models = []
  for i, p in enumerate(model_paths):
    m = st_layout.read_layout(p)
    st_layout.check_against(layout, m, f"model {i} ({m.source})")
    models.append(m)
  T = len(models)
  base, tvs = {}, {}
  bar = _progress(len(layout.shapes) * (T + 1), "loading", progress)
  with bar:
    for fpath, k, x in st_layout.iter_tensors(layout):
      if _nonfinite(x):
        raise st_layout.CheckpointError(
            f"base ({fpath}) has NaN or Inf in tensor {k!r}")
      base[k] = x
      if st_layout.is_float(x.dtype):  # integer buffers (position ids) stay
        tvs[k] = _aligned_empty((T,) + x.shape)
      bar.update()
    base32 = {k: base[k].astype(np.float32, copy=False) for k in tvs}
    for i, m in enumerate(models):
      for fpath, k, x in st_layout.iter_tensors(m, copy=False):
        if k in tvs:
          # One pass from the page cache into the stacked buffer.
          slot = tvs[k][i, ...]  # a view, also for 0-d tensors
          np.subtract(x, base32[k], out=slot, dtype=np.float32)
          if _nonfinite_sum(slot):
            raise st_layout.CheckpointError(
                f"model {i} ({fpath}) has NaN or Inf in the task vector "
                f"of tensor {k!r}")
        bar.update()
    del base32
  if as_jax:
    for d in (tvs, base):
      for k in list(d):
        # 64-byte aligned host buffers are adopted by the CPU backend without
        # a copy; elsewhere this is one host->device transfer per tensor.
        d[k] = jax.device_put(d.pop(k))
  return base, tvs, layout


def apply(base: Tree, tv: Tree, scale: Any = 1.0) -> Tree:
  """`theta_0 + scale * tau`, computed in float32 and cast to base's dtype."""
  def one(b, t):
    out = b.astype(jnp.float32) + jnp.asarray(scale, jnp.float32) * t.astype(
        jnp.float32)
    return out.astype(b.dtype)
  return jax.tree.map(one, base, tv)


def check_finite(tvs: Tree, what: str = "task vector") -> None:
  """Raises ValueError naming the first leaf (and task) holding NaN or Inf.

  Runs eagerly (host round trip of one bool per leaf and task); call it at
  the boundary, before the jitted merge.
  """
  for path, x in tree_lib.named_leaves(tvs):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      continue
    bad = ~jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1) if x.ndim else (
        ~jnp.isfinite(x))[None]
    bad = np.asarray(bad)
    if bad.any():
      t = int(np.argmax(bad))
      raise ValueError(f"{what} {t} has NaN or Inf in parameter {path!r} "
                       f"(shape {tuple(x.shape[1:])})")


# ----------------------------------------------------------------------------
# Bit-packed masks: 1 bit per entry (8x smaller than bool, 32x than float32),
# big-endian bit order, as np.packbits. Two layouts of a mask with shape
# [*lead, *param_shape]:
#   flat (`rows=False`, the files' layout): [*lead, ceil(prod(param_shape) / 8)]
#   rows (`rows=True`): [*lead, *param_shape[:-1], ceil(param_shape[-1] / 8)],
#     packed along the last axis only, so the packed leaf keeps the
#     parameter's leading axes and shards like it (no gather under a mesh).
# When the last axis is a multiple of 8 (and for 0-d and 1-D params) both
# hold the same bytes in the same order.


def pack_mask(mask: Tree, lead: int = 1, rows: bool = False) -> Tree:
  """Packs a bool mask tree into uint8 bytes (see the layouts above).

  Args:
    mask: bool leaves with `lead` leading axes (1 for a per-task mask).
    lead: number of leading axes kept as they are.
    rows: pack each row (last axis) on its own instead of the flattened
      param dims.
  """
  def one(m):
    m = m.astype(jnp.bool_)
    if not rows or m.ndim <= lead + 1:
      return jnp.packbits(m.reshape(m.shape[:lead] + (-1,)), axis=-1)
    return sharding.rows_sharded(
        jnp.packbits(sharding.rows_sharded(m, lead), axis=-1), lead)
  return jax.tree.map(one, mask)


def unpack_mask(packed: Tree, like: Tree, lead: int = 1) -> Tree:
  """Inverse of `pack_mask` (either layout); `like` gives each param shape.

  `like` is the un-stacked param tree (e.g. the base model or its
  `jax.eval_shape`), so masks never store their shapes twice.
  """
  def one(p, ref):
    shape = tuple(ref.shape)
    if len(shape) >= 2 and p.ndim == lead + len(shape):  # rows layout
      bits = jnp.unpackbits(p, axis=-1, count=shape[-1])
    else:
      n = int(np.prod(shape, dtype=np.int64))
      bits = jnp.unpackbits(p, axis=-1, count=n)
    return bits.reshape(p.shape[:lead] + shape).astype(jnp.bool_)
  return jax.tree.map(one, packed, like)


def relayout_packed(p: np.ndarray, shape: tuple[int, ...], lead: int,
                 to_rows: bool) -> np.ndarray:
  """One packed leaf in the other layout (NumPy; a reshape when rows of
  the last axis are whole bytes)."""
  p = np.asarray(p)
  shape = tuple(shape)
  lead_shape = p.shape[:lead]
  if len(shape) < 2:  # 0-d and 1-D params: the layouts coincide
    return p
  is_rows = p.ndim == lead + len(shape)
  if is_rows == to_rows:
    return p
  if shape[-1] % 8 == 0:
    return p.reshape(lead_shape + (shape[:-1] + (shape[-1] // 8,)
                                   if to_rows else (-1,)))
  n = int(np.prod(shape, dtype=np.int64))
  if to_rows:
    bits = np.unpackbits(p, axis=-1, count=n).reshape(lead_shape + shape)
    return np.packbits(bits, axis=-1)
  bits = np.unpackbits(p, axis=-1, count=shape[-1])
  return np.packbits(bits.reshape(lead_shape + (-1,)), axis=-1)


def mask_rows_to_flat(packed: Tree, like: Tree, lead: int = 1) -> Tree:
  """Packed masks (either layout) in the flat layout, as NumPy arrays."""
  return jax.tree.map(lambda p, r: relayout_packed(p, r.shape, lead, False),
                      packed, like)


def mask_flat_to_rows(packed: Tree, like: Tree, lead: int = 1) -> Tree:
  """Packed masks (either layout) in the rows layout, as NumPy arrays."""
  return jax.tree.map(lambda p, r: relayout_packed(p, r.shape, lead, True),
                      packed, like)
