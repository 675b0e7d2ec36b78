"""Exact top-k thresholds by scope: over the whole model, per tensor, per row.

`flat_thresholds` returns every leaf's thresholds as one vector
(`threshold_offsets` says where each leaf's start), `topk_thresholds` as a
tree, `topk_mask` the kept entries; `keep_count` is the round-half-up count.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge.selection.search import (
    _bracket, _float, _row_counts, _sample_sorted, _search, wide_count)
from mtmerge.selection.groups import (
    _Groups, _flat_group, _group, _in_loop, _members, _sharded, _unstacked,
    _upper, _view3_shape, entries_per_task)


Tree = Any


Scope = Literal["global", "per_tensor", "row"]


def keep_count(fraction: float, n: int) -> int:
  """Number of entries kept for a kept-fraction: round-half-up, in [1, n]."""
  return int(min(max(math.floor(fraction * n + 0.5), 1), n))


_GLOBAL_SAMPLE = 2 ** 16  # per task, over the whole model


_TENSOR_SAMPLE = 2 ** 11  # per task and tensor


def _global_thresholds(groups: _Groups, k: jax.Array, n: int) -> jax.Array:
  """`[T]` thresholds over all groups; k uint32 `[T]`, n entries per task."""
  T = groups.arrays[0].shape[1]

  def count_fn(bits):
    thr = _float(bits)[None, :, None, None]
    return sum(jnp.sum(_row_counts(jnp.abs(a), thr), axis=(0, 2)).astype(
        jnp.uint32) for a in groups.arrays)
  maxval = jnp.max(jnp.stack([jnp.max(jnp.abs(a), axis=(0, 2, 3))
                              for a in groups.arrays]), axis=0)
  samples = []
  for a in groups.arrays:
    G, _, R, C = a.shape
    m = max(1, int(_GLOBAL_SAMPLE * R * C / n))
    s = _sample_sorted(a, m)                       # [G, T, m_g]
    samples.append(jnp.transpose(s, (1, 0, 2)).reshape(T, -1))
  sample = jnp.sort(jnp.concatenate(samples, axis=1), axis=1)
  lo, hi = _bracket(sample, k, n)
  return _search(count_fn, k, maxval, lo, hi)


def _wide_global_thresholds(leaves, kn: int, n: int,
                            values=None) -> jax.Array:
  """`[T]` global thresholds counted leaf by leaf in wide pairs.

  For a model of 2**32 or more entries per task, or a sharded program:
  every leaf is counted where it lies (no concatenated copy, no gather),
  each leaf's uint32 count split into a `wide_count` pair, so the model
  may hold up to 2**48 entries per task (one leaf: under 2**32).
  `values` (see `flat_thresholds`) is recomputed in every counting pass.
  """
  T = leaves[0].shape[0]
  for x in leaves:
    if int(np.prod(x.shape[1:], dtype=np.int64)) >= 2 ** 32:
      raise ValueError(f"a leaf of shape {x.shape[1:]} has 2**32 or more "
                       "entries per task; split it")
  if n >= 2 ** 48:
    raise ValueError(f"global top-k over {n} entries per task: at most "
                     "2**48 are counted exactly")
  groups = _unstacked(leaves)
  mag = jnp.abs if values is None else (
      lambda a: jnp.abs(values(a[0]))[None])

  def count_fn(bits):
    thr = _float(bits)[None, :, None, None]
    per_leaf = [jnp.sum(_row_counts(mag(a), thr), axis=(0, 2),
                        dtype=jnp.uint32)
                for a in _in_loop(groups.arrays, bits)]
    return wide_count(jnp.stack(per_leaf, axis=-1))       # [T, 2]
  maxval = _upper([mag(a) for a in groups.arrays], (0, 2, 3))
  samples = []
  for a in groups.arrays:
    _, _, R, C = a.shape
    m = max(1, int(_GLOBAL_SAMPLE * R * C / n))
    samples.append(_sample_sorted(a, m, values)[0])        # [T, m_leaf]
  sample = jnp.sort(jnp.concatenate(samples, axis=1), axis=1)
  k = jnp.broadcast_to(jnp.asarray([kn >> 16, kn & 0xffff], jnp.uint32),
                       (T, 2))
  lo, hi = _bracket(sample, jnp.full((T,), float(kn), jnp.float32), n)
  return _search(count_fn, k, maxval, lo, hi, wide=True)


def threshold_offsets(tvs: Tree, scope: Scope = "global") -> list[int]:
  """Where each leaf's thresholds start in `flat_thresholds`' vector.

  Leaf i (in `jax.tree.leaves` order) owns `T` entries (global,
  per_tensor; one per task) or `T * rows` (row) from `offsets[i]`; every
  leaf shares entries 0..T-1 for the global scope. Shapes only, no JAX work.
  """
  shapes = [np.shape(x) for x in jax.tree.leaves(tvs)]
  if scope == "global":
    return [0] * len(shapes)
  offsets, start = [0] * len(shapes), 0
  for idx in _members(shapes):
    v = _view3_shape(shapes[idx[0]])
    size = v[0] * (v[1] if scope == "row" else 1)
    for j, i in enumerate(idx):
      offsets[i] = start + j * size
    start += len(idx) * size
  return offsets


def flat_thresholds(tvs: Tree, fraction: float | Tree,
                    scope: Scope = "global",
                    count: Callable[[int], int] | None = None,
                    values: Callable | None = None) -> jax.Array:
  """`topk_thresholds` as one float32 vector; see `threshold_offsets`.

  A jitted caller gets one output instead of one per leaf: at 152 leaves the
  per-leaf outputs of a per-tensor search are ~150 slicing fusions, which
  take most of its XLA compile time.

  `values` (global scope): a positionwise map of a stacked leaf
  `[T, ...] -> [T, ...]` (each output entry a function of the T entries at
  its position) whose magnitudes are ranked instead of the leaves'. Under
  a mesh it is recomputed in every counting pass, so the mapped values are
  never held for the whole model (PCB's balancing scores); on one device
  they are computed once.
  """
  leaves = jax.tree.leaves(tvs)
  if not leaves:
    raise ValueError("topk_thresholds got an empty tree")
  if scope not in ("global", "per_tensor", "row"):
    raise ValueError(f"unknown scope {scope!r}; expected global, per_tensor "
                     "or row")
  fracs = (jax.tree.leaves(fraction) if not isinstance(fraction, (int, float))
           else [fraction] * len(leaves))
  T = leaves[0].shape[0]
  if count is None:
    kf = [lambda n, f=float(f): keep_count(f, n) for f in fracs]
  else:
    kf = [count] * len(leaves)

  if values is not None and scope != "global":
    raise ValueError(f"values= ranks mapped entries over the global scope "
                     f"only, not {scope!r}")
  if scope == "global":
    n = entries_per_task(leaves)
    kn = int(kf[0](n))
    if kn <= 0:
      return jnp.full((T,), jnp.inf, jnp.float32)
    if n < 2 ** 32 and not _sharded():
      if values is not None:
        leaves = [values(x) for x in leaves]
      return _global_thresholds(_flat_group(leaves),
                                jnp.full((T,), kn, jnp.uint32), n)
    return _wide_global_thresholds(leaves, kn, n, values)

  # Per-tensor and per-row searches run jointly over one flat vector of
  # search groups, so one pass counts every group of every leaf.
  groups = _group(leaves)
  per_tensor = scope == "per_tensor"
  ks, maxes, los, his, shapes = [], [], [], [], []
  for a, idx in zip(groups.arrays, groups.members):
    G, _, R, C = a.shape
    n = R * C if per_tensor else C
    k = jnp.asarray(np.array([kf[i](n) for i in idx], np.int32))
    if per_tensor:
      k = jnp.broadcast_to(k[:, None], (G, T))
      mx = _upper([a], (2, 3))
      lo, hi = _bracket(_sample_sorted(a, _TENSOR_SAMPLE).reshape(G * T, -1),
                        jnp.maximum(k, 1).reshape(-1), n)
    else:  # rows are short: search the full range
      k = jnp.broadcast_to(k[:, None, None], (G, T, R))
      mx = jnp.max(jnp.abs(a), axis=3).astype(jnp.float32)
      lo = jnp.zeros((G * T * R,), jnp.float32)
      hi = jnp.full((G * T * R,), jnp.inf, jnp.float32)
    ks.append(k.reshape(-1)); maxes.append(mx.reshape(-1))
    los.append(lo); his.append(hi); shapes.append(k.shape)
  splits = np.cumsum([int(np.prod(s)) for s in shapes])[:-1].tolist()

  def count_fn(bits):
    out = []
    for a, b, shp in zip(_in_loop(groups.arrays, bits),
                         jnp.split(bits, splits), shapes):
      thr = _float(b).reshape(shp)
      if per_tensor:
        out.append(jnp.sum(_row_counts(jnp.abs(a), thr[..., None, None]),
                           axis=2))
      else:
        out.append(_row_counts(jnp.abs(a), thr[..., None]))
    return jnp.concatenate([c.reshape(-1) for c in out])

  kk = jnp.concatenate(ks)
  thr = _search(count_fn, jnp.maximum(kk, 1), jnp.concatenate(maxes),
                jnp.concatenate(los), jnp.concatenate(his))
  return jnp.where(kk <= 0, jnp.inf, thr)


def leaf_thresholds(flat: jax.Array, offset: Any, shape) -> jax.Array:
  """One leaf's thresholds from `flat_thresholds`, broadcastable to it.

  Args:
    flat: the vector from `flat_thresholds` (global or per_tensor scope).
    offset: the leaf's entry of `threshold_offsets` (an int, or a traced
      int32 scalar so one compiled kernel serves every leaf of a shape).
    shape: the stacked leaf's shape `[T, ...]`.

  Returns:
    `[T, 1, ..., 1]` float32.
  """
  T = shape[0]
  if isinstance(offset, int):
    part = flat[offset:offset + T]
  else:
    part = jax.lax.dynamic_slice(flat, (offset,), (T,))
  return part.reshape((T,) + (1,) * (len(shape) - 1))


def topk_thresholds(tvs: Tree, fraction: float | Tree,
                    scope: Scope = "global",
                    count: Callable[[int], int] | None = None,
                    values: Callable | None = None) -> Tree:
  """Per-leaf magnitude thresholds keeping the top `fraction` of entries.

  Args:
    tvs: stacked task vectors, leaves `[T, ...]`.
    fraction: kept fraction in (0, 1] (a float, or for `per_tensor`/`row`
      a tree of floats matching `tvs`).
    scope: `global` = one threshold per task over all leaves (TIES paper);
      `per_tensor` = one per task and leaf (mergekit); `row` = one per task
      and row of the leaf's last axis (Model Breadcrumbs).
    count: optional `n -> k` giving the number kept out of a group of `n`
      entries, overriding `fraction`'s `keep_count`; k = 0 keeps nothing
      (threshold +inf).
    values: rank `|values(leaf)|` instead of `|leaf|` (global scope; see
      `flat_thresholds`).

  Returns:
    A tree whose leaves are float32 thresholds broadcastable against the
    leaf: `[T, 1, ..., 1]` (global, per_tensor) or `[T, ..., 1]` (row).
    Keep `|tau| >= thr`.
  """
  leaves, treedef = jax.tree.flatten(tvs)
  flat = flat_thresholds(tvs, fraction, scope, count, values)
  out = []
  for x, off in zip(leaves, threshold_offsets(tvs, scope)):
    if scope != "row" or x.ndim <= 2:
      out.append(leaf_thresholds(flat, off, x.shape))
    else:
      size = int(np.prod(x.shape[:-1], dtype=np.int64))
      out.append(flat[off:off + size].reshape(x.shape[:-1] + (1,)))
  return jax.tree.unflatten(treedef, out)


def topk_mask(tvs: Tree, fraction: float | Tree,
              scope: Scope = "global") -> Tree:
  """Bool mask of the top `fraction` entries by magnitude (see thresholds)."""
  thr = topk_thresholds(tvs, fraction, scope)
  return jax.tree.map(
      lambda x, t: (jnp.abs(x).astype(jnp.float32) >= t) & (x != 0), tvs, thr)
