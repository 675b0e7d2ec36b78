"""The k-th largest |x| (or signed value) of a whole tree, as one threshold."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mtmerge import sharding
from mtmerge.selection.groups import (_flat_group, _sharded, _view3,
                                      entries_per_task)
from mtmerge.selection.scopes import (Tree, _global_thresholds,
                                      _wide_global_thresholds)
from mtmerge.selection.search import wide_count


def _kth_largest_views(leaves: list, k: jax.Array, n: int) -> jax.Array:
  """Exact k-th largest (k: uint32 `[T]`, 1 <= k) of non-negative leaves."""
  groups = _flat_group(leaves)
  thr = _global_thresholds(groups, k, n)[None, :, None, None]
  mags = [jnp.abs(a) for a in groups.arrays]
  mins = [jnp.min(jnp.where(a >= thr, a, jnp.inf), axis=(0, 2, 3))
          for a in mags]
  return jnp.min(jnp.stack(mins), axis=0)


def _wide(leaves: list) -> bool:
  """Count leaf by leaf in wide pairs: 2**32 or more entries per task, or
  a sharded program (no concatenated copy, no gather)."""
  return entries_per_task(leaves) >= 2 ** 32 or _sharded()


def _wide_kth(leaves: list, kn: int, n: int, values=None) -> jax.Array:
  """`_kth_largest_views` counted leaf by leaf (`_wide_global_thresholds`):
  the threshold search, then the smallest kept magnitude, `values` (a
  positionwise map, as `flat_thresholds` takes) recomputed in each pass."""
  thr = _wide_global_thresholds(leaves, kn, n, values)
  mins = []
  for x in leaves:
    x = sharding.pass_view(x, thr)  # not shared with other passes
    a = jnp.abs(x if values is None else values(x)).astype(jnp.float32)
    t = thr.reshape((-1,) + (1,) * (a.ndim - 1))
    mins.append(jnp.min(jnp.where(a >= t, a, jnp.inf),
                        axis=tuple(range(1, a.ndim))))
  return jnp.min(jnp.stack(mins), axis=0)


def kth_largest(tvs: Tree, count: Callable[[int], int],
                values: Callable | None = None) -> jax.Array:
  """Exact k-th largest |x| per task over all leaves (global scope), `[T]`.

  `count(n)` gives k (1 <= k <= n) for n entries per task. One extra pass
  after the threshold search: the smallest magnitude that is kept.
  `values`: rank `|values(leaf)|` (a positionwise map, see
  `flat_thresholds`); with 2**32 or more entries per task, or under a
  mesh, the search counts leaf by leaf in 64-bit pairs and recomputes
  `values` in each pass.
  """
  leaves = jax.tree.leaves(tvs)
  if _wide(leaves):
    n = entries_per_task(leaves)
    return _wide_kth(leaves, int(count(n)), n, values)
  if values is not None:
    leaves = [values(x) for x in leaves]
  n = entries_per_task(leaves)
  k = jnp.full((leaves[0].shape[0],), int(count(n)), jnp.uint32)
  return _kth_largest_views(leaves, k, n)


def signed_ranks(k, n, n_pos, n_neg, xp=jnp):
  """The two magnitude selects behind a signed k-th largest over n entries
  with `n_pos` positive and `n_neg` negative ones (per task).

  Returns `(rank among max(v, 0), rank among max(-v, 0))`, each clipped to
  a valid rank. `xp` is `jnp` in programs or `np` on the host (int64 counts
  beyond 2**32, `streaming.recipes_pcb`).
  """
  n_nonneg = n - n_neg
  j = xp.where(k > n_nonneg, k - n_nonneg, 1)
  return (xp.clip(k, 1, xp.maximum(n_pos, 1)),
          xp.clip(n_neg - j + 1, 1, xp.maximum(n_neg, 1)))


def signed_kth(k, n, n_pos, n_neg, pos, neg, xp=jnp):
  """The signed k-th largest from `signed_ranks`' two selects: among the
  positives if there are at least k, zero if the non-negatives reach k,
  else minus the selected magnitude among the negatives."""
  return xp.where(k <= n_pos, pos, xp.where(k <= n - n_neg, 0.0, -neg))


def _wide_kth_signed(leaves: list, count, values) -> jax.Array:
  """`kth_largest_signed` counted leaf by leaf in wide pairs.

  The two selects need no counts: where the answer is positive
  (`k <= n_pos`) it is the k-th largest of `max(v, 0)`, and where it is
  negative (`k > n - n_neg`) the (n - k + 1)-th largest of `max(-v, 0)`
  (`signed_ranks` gives exactly these ranks there), so only the branch
  tests compare the 64-bit counts with static numbers.
  """
  n = entries_per_task(leaves)
  k = int(count(n))
  val = (lambda x: x.astype(jnp.float32)) if values is None else (
      lambda x: values(x).astype(jnp.float32))
  pos = _wide_kth(leaves, k, n, lambda x: jnp.maximum(val(x), 0.0))
  neg = _wide_kth(leaves, n - k + 1, n, lambda x: jnp.maximum(-val(x), 0.0))

  def sign_counts(x):
    # One (variadic) reduction: two would share `val(x)`, which XLA then
    # materializes for every leaf.
    v = val(x)
    u = lambda b: b.astype(jnp.uint32)
    return jax.lax.reduce((u(v > 0), u(v < 0)),
                          (jnp.uint32(0), jnp.uint32(0)),
                          lambda a, b: (a[0] + b[0], a[1] + b[1]),
                          tuple(range(1, x.ndim)))
  counts = [sign_counts(x) for x in leaves]
  n_pos, n_neg = (wide_count(jnp.stack([c[i] for c in counts], axis=-1))
                  for i in (0, 1))
  ge = lambda a, c: (a[..., 0] > (c >> 16)) | (
      (a[..., 0] == (c >> 16)) & (a[..., 1] >= (c & 0xffff)))
  # k <= n_pos; k <= n - n_neg, i.e. not n_neg >= n - k + 1.
  return jnp.where(ge(n_pos, k), pos,
                   jnp.where(ge(n_neg, n - k + 1), -neg, 0.0))


def kth_largest_signed(tree: Tree, count: Callable[[int], int],
                       values: Callable | None = None) -> jax.Array:
  """Exact k-th largest signed value per task over all leaves, `[T]`.

  Splits the search by sign so it stays exact (no shifting, which would
  round): the k-th largest is among the positives if there are at least k,
  zero if the non-negatives reach k, else the j-th largest negative, which
  is minus the (n_neg - j + 1)-th largest magnitude among the negatives
  (`signed_ranks`, `signed_kth`). `values`: of a positionwise map of the
  leaves, recomputed in each pass under a mesh (see `kth_largest`); with
  2**32 or more entries per task, or under a mesh, the counts are 64-bit
  pairs.
  """
  leaves = jax.tree.leaves(tree)
  if _wide(leaves):
    return _wide_kth_signed(leaves, count, values)
  if values is not None:  # one device: the mapped values computed once
    leaves = [values(x) for x in leaves]
  T = leaves[0].shape[0]
  n = entries_per_task(leaves)
  k = jnp.full((T,), int(count(n)), jnp.uint32)
  views = [_view3(x).astype(jnp.float32) for x in leaves]
  n_pos = sum(jnp.sum((v > 0).reshape(T, -1), axis=1, dtype=jnp.uint32)
              for v in views)
  n_neg = sum(jnp.sum((v < 0).reshape(T, -1), axis=1, dtype=jnp.uint32)
              for v in views)
  k_pos, k_neg = signed_ranks(k, jnp.uint32(n), n_pos, n_neg)
  pos = _kth_largest_views([jnp.maximum(v, 0.0) for v in views], k_pos, n)
  neg = _kth_largest_views([jnp.maximum(-v, 0.0) for v in views], k_neg, n)
  return signed_kth(k, jnp.uint32(n), n_pos, n_neg, pos, neg)
