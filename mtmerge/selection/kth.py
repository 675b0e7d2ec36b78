"""The k-th largest |x| (or signed value) of a whole tree, as one threshold."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge.selection.groups import _flat_group, _view3
from mtmerge.selection.scopes import Tree, _global_thresholds


def _kth_largest_views(leaves: list, k: jax.Array, n: int) -> jax.Array:
  """Exact k-th largest (k: uint32 `[T]`, 1 <= k) of non-negative leaves."""
  groups = _flat_group(leaves)
  thr = _global_thresholds(groups, k, n)[None, :, None, None]
  mags = [jnp.abs(a) for a in groups.arrays]
  mins = [jnp.min(jnp.where(a >= thr, a, jnp.inf), axis=(0, 2, 3))
          for a in mags]
  return jnp.min(jnp.stack(mins), axis=0)


def _entries(leaves: list, what: str) -> int:
  """Entries per task; refuses counts a uint32 cannot hold, by name."""
  n = sum(int(np.prod(x.shape[1:], dtype=np.int64)) for x in leaves)
  if n >= 2 ** 32:
    raise ValueError(
        f"{what}: {n} entries per task; the in-memory k-th largest counts "
        f"in uint32 (fewer than 2**32 entries per task). Merge files with "
        f"the streamed executor (`mtmerge merge`, "
        f"`streaming.merge_files`), which counts in 64 bits")
  return n


def kth_largest(tvs: Tree, count: Callable[[int], int]) -> jax.Array:
  """Exact k-th largest |x| per task over all leaves (global scope), `[T]`.

  `count(n)` gives k (1 <= k <= n) for n entries per task. One extra pass
  after the threshold search: the smallest magnitude that is kept.
  """
  leaves = jax.tree.leaves(tvs)
  n = _entries(leaves, "kth_largest")
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


def kth_largest_signed(tree: Tree, count: Callable[[int], int]) -> jax.Array:
  """Exact k-th largest signed value per task over all leaves, `[T]`.

  Splits the search by sign so it stays exact (no shifting, which would
  round): the k-th largest is among the positives if there are at least k,
  zero if the non-negatives reach k, else the j-th largest negative, which
  is minus the (n_neg - j + 1)-th largest magnitude among the negatives
  (`signed_ranks`, `signed_kth`).
  """
  leaves = jax.tree.leaves(tree)
  T = leaves[0].shape[0]
  n = _entries(leaves, "kth_largest_signed")
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
