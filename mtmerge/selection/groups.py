"""How the stacked leaves are laid out for the counting passes.

Leaves are viewed as `[T, rows, cols]` (`_view3`) and stacked by view shape
into few large float32 groups (`_group`), or concatenated into one flat
group for the global scope (`_flat_group`); under a mesh (`_sharded`) each
leaf is counted where it lies, unstacked and in its own dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def entries_per_task(leaves) -> int:
  """Entries per task of stacked leaves `[T, ...]` (a Python int: may
  exceed 2**32)."""
  return sum(int(np.prod(x.shape[1:], dtype=np.int64)) for x in leaves)


def _view3(x: jax.Array) -> jax.Array:
  """`[T, rows, cols]` view of a stacked leaf, cols = the param's last dim."""
  if x.ndim <= 2:
    return x.reshape(x.shape[0], 1, -1)
  return x.reshape(x.shape[0], -1, x.shape[-1])


class _Groups(NamedTuple):
  """Leaves stacked by view shape: far fewer, larger fusions.

  XLA:CPU pays a per-fusion cost that dominates a counting pass over ~150
  leaves (measured 3.4x slower than over 4 stacked groups), so each search
  pass runs over `arrays[g]` `[G, T, rows, cols]` (float32 x, signed),
  built once. Passes take `|x|` on the fly: stacking `|x|` instead made XLA
  emit one abs fusion and one temporary per leaf. `members[g]` lists the
  leaf indices stacked in group g.
  """
  arrays: list
  members: list


def _sharded() -> bool:
  """True while tracing under `jax.set_mesh` (a sharded program).

  There the searches count each leaf where it lies, in its own dtype: a
  stacked float32 copy of the task vectors (1-2x their size per device)
  and a concatenation of sharded leaves (a gather) are what one device's
  XLA:CPU program wants, not a mesh's.
  """
  return not jax.sharding.get_abstract_mesh().empty


def _upper(arrays: list, axis) -> jax.Array:
  """An upper bound of `|a|` for the search's bracket (`[T]` or `[G, T]`).

  One device: the exact max (a tight bracket when the sample's misses).
  Under a mesh: the largest finite float32, since a full-size max pass is
  a per-device copy of every leaf on XLA:CPU and the sampled bracket
  almost always holds; the search then bisects the float range. The kept
  entries are the same either way (`count(|x| >= thr) >= k`, maximal).
  """
  if _sharded():
    shape = tuple(d for i, d in enumerate(arrays[0].shape)
                  if i not in axis)
    return jnp.full(shape, np.finfo(np.float32).max, jnp.float32)
  return jnp.max(jnp.stack([jnp.max(jnp.abs(a), axis=axis).astype(
      jnp.float32) for a in arrays]), axis=0)


def _in_loop(arrays: list, bits: jax.Array) -> list:
  """`arrays`, made to look loop-variant inside the search's while loop.

  Under a mesh only: otherwise XLA hoists `abs(convert(leaf))` out of the
  loop as an invariant and carries a float32 copy of every task vector
  through it (measured: 2x the bf16 task vectors per device).
  """
  if not _sharded():
    return arrays
  return list(jax.lax.optimization_barrier((arrays, bits))[0])


def _unstacked(leaves) -> _Groups:
  """One group per leaf, `[1, T, rows, cols]` views, no copies."""
  return _Groups([_view3(x)[None] for x in leaves],
                 [[i] for i in range(len(leaves))])


def _group(leaves) -> _Groups:
  if _sharded():
    return _unstacked(leaves)
  arrays, members = [], []
  for idx in _members([x.shape for x in leaves]):
    arrays.append(jnp.stack([_view3(leaves[i]).astype(jnp.float32)
                             for i in idx]))
    members.append(idx)
  # Without the barrier XLA rewrites every reduction and strided sample of a
  # stack into one per leaf (reduce(concat) -> concat(reduce)): ~370 more
  # fusions at 152 leaves, each costing compile time, for no run-time gain.
  return _Groups(list(jax.lax.optimization_barrier(arrays)), members)


_FLAT_COLS = 2 ** 14  # row length of the global search's flat view


def _flat_group(leaves) -> _Groups:
  """All leaves as one group `[1, T, R, C]`: the global search's layout.

  The global scope needs no row structure, so every leaf is flattened and
  concatenated per task (zero-padded to R * C entries; zeros are never
  counted). One group means one counting fusion per pass instead of one per
  distinct leaf shape, which cuts the search's XLA compile time ~3x at 152
  leaves; it is the same single copy of the task vectors as `_group`'s.
  """
  T = leaves[0].shape[0]
  n = entries_per_task(leaves)
  rows = max(1, -(-n // _FLAT_COLS))
  cols = max(1, -(-n // rows))  # padding < rows entries per task
  parts = [x.reshape(T, -1).astype(jnp.float32) for x in leaves]
  if rows * cols > n:
    parts.append(jnp.zeros((T, rows * cols - n), jnp.float32))
  flat = jnp.concatenate(parts, axis=1).reshape(1, T, rows, cols)
  return _Groups([jax.lax.optimization_barrier(flat)],
                 [list(range(len(leaves)))])


def _members(shapes) -> list[list[int]]:
  """Leaf indices grouped by view shape, in `_group`'s order."""
  by_shape: dict = {}
  for i, s in enumerate(shapes):
    by_shape.setdefault(_view3_shape(s), []).append(i)
  return list(by_shape.values())


def _view3_shape(shape) -> tuple[int, ...]:
  """The shape of `_view3` of a stacked leaf of this shape."""
  if len(shape) <= 2:
    return (shape[0], 1, int(np.prod(shape[1:], dtype=np.int64)))
  return (shape[0], int(np.prod(shape[1:-1], dtype=np.int64)), shape[-1])
