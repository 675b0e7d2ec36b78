"""Sparsifying transforms over stacked task vectors `[T, ...]`.

* `trim_by_magnitude` — keep the top-k fraction by |tau| (TIES, Yadav et al.
  2023, "Resolving Interference When Merging Models"; global, per-tensor or
  per-row scope, exact k-th value via `mtmerge.selection`).
* `drop_and_rescale` — DARE (Yu et al. 2024, "Language Models are Super
  Mario"): drop each entry with probability p, rescale survivors by 1/(1-p).
* `remove_outliers_and_trim` — Model Breadcrumbs (Davari & Belilovsky 2024):
  drop the largest `top_remove` fraction and everything below the next
  `density` fraction.
* `magnitude_rank_drop` — DELLA's MagPrune (Deep et al. 2024): per row keep
  probability rises linearly with the magnitude rank; survivors rescaled by
  1/keep_probability.
* `apply_mask` — multiply by a given (possibly bit-unpacked) mask tree.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtmerge import selection, sharding
from mtmerge.transforms import base

Tree = Any


def check_fraction(name: str, value: float, *, allow_zero: bool = False) -> None:
  """Raises ValueError unless `value` is a fraction in (0, 1] (or [0, 1))."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number, got {value!r}") from None
  ok = (0.0 <= v < 1.0) if allow_zero else (0.0 < v <= 1.0)
  if not ok:
    rng = "[0, 1)" if allow_zero else "(0, 1]"
    raise ValueError(f"{name} must be in {rng}, got {value!r}")


def trim_by_magnitude(fraction: float, scope: selection.Scope = "global"
                      ) -> base.MergeTransform:
  """Zeroes all but the top `fraction` of each task vector by magnitude.

  Args:
    fraction: fraction of entries KEPT, in (0, 1] (TIES' k, e.g. 0.2).
    scope: `global` (over the whole task vector, the TIES paper),
      `per_tensor` (mergekit) or `row` (last axis).
  """
  check_fraction("threshold", fraction)

  def fn(tvs):
    if fraction >= 1.0:
      return tvs
    thr = selection.topk_thresholds(tvs, fraction, scope)
    return jax.tree.map(
        lambda x, t: jnp.where(jnp.abs(x).astype(jnp.float32) >= t, x, 0),
        tvs, thr)
  return base.stateless(fn)


def _leaf_keys(key: jax.Array, tree: Tree) -> Tree:
  leaves, treedef = jax.tree.flatten(tree)
  keys = [jax.random.fold_in(key, i) for i in range(len(leaves))]
  return jax.tree.unflatten(treedef, keys)


def drop_and_rescale(drop_rate: float, key: jax.Array,
                     rescale: bool = True) -> base.MergeTransform:
  """DARE: `tau * Bernoulli(1 - p) / (1 - p)` with an explicit PRNG key.

  Each leaf gets `fold_in(key, leaf_index)`, so results depend only on the
  key and the tree structure, not on sharding.
  """
  check_fraction("drop_rate", drop_rate, allow_zero=True)
  keep = 1.0 - drop_rate

  def fn(tvs):
    def one(x, k):
      return keep_rescaled(x, jax.random.bernoulli(k, keep, x.shape), keep,
                           rescale)
    return jax.tree.map(one, tvs, _leaf_keys(key, tvs))
  return base.stateless(fn)


def drop_and_rescale_slices(drop_rate: float, key: jax.Array, tvs: Tree,
                            rescale: bool = True) -> Tree:
  """`drop_and_rescale` as per-slice functions `f(t, x[t])` (a tree like
  `tvs`), for `combine.trimmed_disjoint_merge(prep=...)`.

  The same Bernoulli masks (same keys and shapes), kept as bools (1 byte
  per entry); each pass recomputes the survivors of the slice it reads
  instead of holding a dropped copy of the task vectors.
  """
  check_fraction("drop_rate", drop_rate, allow_zero=True)
  keep = 1.0 - drop_rate

  def one(x, k):
    kept = jax.random.bernoulli(k, keep, x.shape)
    return lambda t, xt: keep_rescaled(xt, kept[t], keep, rescale)
  return jax.tree.map(one, tvs, _leaf_keys(key, tvs))


def keep_rescaled(x: jax.Array, kept: jax.Array, keep: float,
                  rescale: bool = True) -> jax.Array:
  """DARE's survivors: `x` where `kept`, divided by the keep probability.

  Shared by `drop_and_rescale` and the streamed executor (which draws the
  same Bernoulli mask block by block).
  """
  y = jnp.where(kept, x, 0)
  return (y / keep).astype(x.dtype) if rescale else y


def remove_outliers_and_trim(density: float, top_remove: float,
                             scope: str = "row", rounding: str = "round"
                             ) -> base.MergeTransform:
  """Model Breadcrumbs mask: keep ranks (top_remove, top_remove + density].

  Counts per group of n entries: removed = round(top_remove * n) (may be
  0), kept = round(density * n) (may be 0 for tiny groups), rounding half
  up (`rounding='floor'`: both rounded down, as mergekit).

  Args:
    density: fraction kept after removing outliers (the paper's ~0.1).
    top_remove: fraction of largest-magnitude entries removed (~0.006).
    scope: `row` (per row of the last axis, the paper / official code) or
      `per_tensor` (mergekit's `breadcrumbs`, gamma = top_remove).
    rounding: `round` (half up) or `floor` (mergekit's `int(x * n)`).
  """
  check_fraction("density", density)
  check_fraction("top_remove", top_remove, allow_zero=True)
  if density + top_remove > 1.0 + 1e-9:
    raise ValueError(f"density + top_remove must be <= 1, got {density} + "
                     f"{top_remove}")

  removed, kept_or_removed = breadcrumbs_counts(density, top_remove,
                                                rounding)

  def fn(tvs):
    # Entries ranked (removed, removed + kept] by magnitude survive.
    upper = selection.topk_thresholds(tvs, 1.0, scope, count=removed)
    lower = selection.topk_thresholds(tvs, 1.0, scope, count=kept_or_removed)
    def one(x, lo, hi):
      a = jnp.abs(x).astype(jnp.float32)
      return jnp.where((a >= lo) & (a < hi), x, 0)
    return jax.tree.map(one, tvs, lower, upper)
  return base.stateless(fn)


class RankCount(NamedTuple):
  """`n -> k`, the number of entries in a group of n at or above a rank.

  A hashable value (a static argument of jitted callers): `kind` is `keep`
  (`selection.keep_count(a, n)`, at least 1), `removed` (`a * n`, may be 0)
  or `kept_or_removed` (`min(b * n + a * n, n)`), each product rounded
  half up (`rounding='round'`) or down (`'floor'`: mergekit's
  `int(density * n)`).
  """
  kind: str
  a: float
  b: float = 0.0
  rounding: str = "round"

  def _r(self, x: float) -> int:
    return int(x) if self.rounding == "floor" else int(math.floor(x + 0.5))

  def __call__(self, n: int) -> int:
    if self.kind == "keep":
      if self.rounding == "floor":
        return min(max(int(self.a * n), 1), n)
      return selection.keep_count(self.a, n)
    if self.kind == "removed":
      return self._r(self.a * n)
    return min(self._r(self.b * n) + self._r(self.a * n), n)


def check_rounding(rounding: str) -> None:
  if rounding not in ("round", "floor"):
    raise ValueError(f"count must be 'round' or 'floor', got {rounding!r}")


def breadcrumbs_counts(density: float, top_remove: float,
                       rounding: str = "round"
                       ) -> tuple[RankCount, RankCount]:
  """Breadcrumbs' (removed, removed + kept) counts per group of n entries."""
  check_rounding(rounding)
  return (RankCount("removed", top_remove, rounding=rounding),
          RankCount("kept_or_removed", density, top_remove, rounding))


def _ascending_rank_fraction(a: jax.Array) -> jax.Array:
  """r in [0, 1]: rank of each |entry| within its row, 0 = smallest."""
  n = a.shape[-1]
  order = jnp.argsort(a, axis=-1, stable=True)
  if not jax.sharding.get_abstract_mesh().empty:
    # Under a mesh the scatter below is not partitioned (XLA replicates it
    # with its full index arrays: 3 GiB per device for 50M params x 8
    # tasks); a second sort inverts the permutation row by row in place.
    return jnp.argsort(order, axis=-1).astype(jnp.float32) / max(n - 1, 1)
  # The inverse permutation by one scatter, not a second sort (1.7x faster
  # on CPU for MiniLM's rows, same ranks).
  positions = jnp.broadcast_to(jnp.arange(n, dtype=order.dtype), a.shape)
  ranks = jnp.put_along_axis(jnp.zeros_like(order), order, positions,
                             axis=-1, inplace=False).astype(jnp.float32)
  return ranks / max(n - 1, 1)


def magnitude_rank_drop(drop_rate: float, epsilon: float, key: jax.Array,
                        rescale: bool = True) -> base.MergeTransform:
  """DELLA MagPrune: keep prob `(1 - p - eps) + 2 eps r`, r = ascending rank.

  Rows are the last axis of each leaf (a 0-D/1-D param is one row). Ranks
  need a per-row sort; rows are short (<= hidden size), so this is cheap.
  """
  check_fraction("drop_rate", drop_rate, allow_zero=True)
  if not 0.0 <= epsilon <= min(drop_rate, 1.0 - drop_rate) + 1e-12:
    raise ValueError(f"epsilon must be in [0, min(p, 1-p)] so keep "
                     f"probabilities stay in [0, 1]; got epsilon={epsilon}, "
                     f"drop_rate={drop_rate}")

  def fn(tvs):
    return jax.tree.map(
        lambda x, k: magprune_drawn(x, k, drop_rate, epsilon, rescale),
        tvs, _leaf_keys(key, tvs))
  return base.stateless(fn)


def magprune_drawn(x: jax.Array, key: jax.Array, drop_rate: float,
                   epsilon: float, rescale: bool = True) -> jax.Array:
  """`magprune` of one leaf with its uniform draws from `key` (the leaf's
  key from `_leaf_keys`, as `magnitude_rank_drop` gives it)."""
  u = jax.random.uniform(key, della_rows(x).shape)
  return magprune(x, u, drop_rate, epsilon, rescale)


def della_rows(x: jax.Array) -> jax.Array:
  """A leaf `[T, ...]` as DELLA's rows `[T, rows, last axis]` (a view)."""
  return x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim > 2 else (
      x.reshape(x.shape[0], 1, -1))


def magprune(x: jax.Array, u: jax.Array, drop_rate: float, epsilon: float,
             rescale: bool = True) -> jax.Array:
  """DELLA's MagPrune of one leaf `[T, ...]` given its uniform draws `u`.

  `u` has the shape of `della_rows(x)`; the in-memory transform draws it
  for the whole leaf, the streamed executor the same floats block by block
  (rows are never split, so a block's ranks are the leaf's).
  """
  # Each row's ranks need the whole row: under a mesh, rows go to devices
  # whole (split by rows instead of along them).
  x2 = sharding.rows_sharded(della_rows(x), 1, whole_rows=True)
  r = _ascending_rank_fraction(jnp.abs(x2).astype(jnp.float32))
  p_keep = jnp.clip((1.0 - drop_rate - epsilon) + 2.0 * epsilon * r, 0, 1)
  kept = u < p_keep
  y = x2.astype(jnp.float32)
  if rescale:
    y = y / jnp.where(p_keep > 0, p_keep, 1.0)
  return jnp.where(kept, y, 0).astype(x.dtype).reshape(x.shape)


def apply_mask(mask: Tree) -> base.MergeTransform:
  """Multiplies by a bool mask tree of the same shapes (or broadcastable)."""
  return base.stateless(lambda tvs: jax.tree.map(
      lambda x, m: jnp.where(m, x, 0), tvs, mask))
