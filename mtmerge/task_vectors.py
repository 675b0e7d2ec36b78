"""Task vectors as ONE pytree with a leading task axis, and bit-packed masks.

`tau_t = theta_t - theta_0` ("Editing Models with Task Arithmetic", Ilharco et
al., 2023). mtmerge never keeps a Python list of models: the T task vectors are
stacked leaf by leaf into a tree whose leaves have shape `[T, *param.shape]`,
so reductions over tasks are `axis=0` ops and the task axis can be sharded.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
# Bit-packed masks: 1 bit per entry (8x smaller than bool, 32x than float32).
# A packed leaf of a mask with shape [*lead, *param_shape] has shape
# [*lead, ceil(prod(param_shape) / 8)] (big-endian bit order, as np.packbits).


def pack_mask(mask: Tree, lead: int = 1) -> Tree:
  """Packs a bool mask tree into uint8 bytes along the flattened param dims.

  Args:
    mask: bool leaves with `lead` leading axes (1 for a per-task mask).
    lead: number of leading axes kept as they are.
  """
  def one(m):
    flat = m.reshape(m.shape[:lead] + (-1,)).astype(jnp.bool_)
    return jnp.packbits(flat, axis=-1)
  return jax.tree.map(one, mask)


def unpack_mask(packed: Tree, like: Tree, lead: int = 1) -> Tree:
  """Inverse of `pack_mask`; `like` gives each leaf's param shape.

  `like` is the un-stacked param tree (e.g. the base model or its
  `jax.eval_shape`), so masks never store their shapes twice.
  """
  def one(p, ref):
    n = int(np.prod(ref.shape, dtype=np.int64))
    bits = jnp.unpackbits(p, axis=-1, count=n)
    return bits.reshape(p.shape[:lead] + tuple(ref.shape)).astype(jnp.bool_)
  return jax.tree.map(one, packed, like)
