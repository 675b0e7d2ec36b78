"""Scaling transforms: one scalar, per task, per regex group, per leaf.

Coefficients are prefix-broadcastable pytrees (see DESIGN.md): a scalar, a
`[T]` vector applied along the leading task axis, a tree with one value (or
one `[T]` vector, as in layer-wise AdaMerging / aTLAS) per leaf, or a list of
`(regex, value)` rules over parameter paths where the first match wins.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from mtmerge import tree as tree_lib
from mtmerge.transforms import base

Tree = Any


def _mul(x, c):
  c = jnp.asarray(c, jnp.float32)
  if c.ndim:  # a per-task vector scales the leading task axis
    if c.shape[0] != x.shape[0]:
      raise ValueError(f"per-task coefficients of shape {c.shape} do not "
                       f"match a task axis of size {x.shape[0]}")
    c = c.reshape(c.shape + (1,) * (x.ndim - c.ndim))
  return (x.astype(jnp.float32) * c).astype(x.dtype)


def scale(coeff: Any) -> base.MergeTransform:
  """Multiplies every leaf by `coeff` (a scalar or a `[T]` per-task vector)."""
  return base.stateless(lambda t: jax.tree.map(lambda x: _mul(x, coeff), t))


def scale_per_task(coeffs: Sequence[float] | jax.Array) -> base.MergeTransform:
  """Scales task t's vector by `coeffs[t]` (task-wise coefficients)."""
  c = jnp.asarray(coeffs, jnp.float32)
  if c.ndim != 1:
    raise ValueError(f"per-task coefficients must be 1-D, got shape {c.shape}")
  return scale(c)


def scale_per_leaf(coeffs: Tree) -> base.MergeTransform:
  """Scales each leaf by its own coefficient (scalar or `[T]` per leaf)."""
  def fn(tree):
    return jax.tree.map(_mul, tree, coeffs)
  return base.stateless(fn)


def scale_by_regex(rules: Sequence[tuple[str, Any]]) -> base.MergeTransform:
  """Scales each leaf by the value of the first `(regex, value)` that matches.

  Raises `tree.UncoveredPathError` naming any leaf no rule covers.
  """
  rules = list(rules)
  return base.stateless(lambda tree: tree_lib.tree_map_with_regex(
      rules, tree, lambda _, x, c: _mul(x, c)))


def check_coeffs(coeffs: Any, T: int, name: str = "scaling_factor"):
  """A scalar or length-T coefficient as float32 (shape-checked, jit-safe)."""
  c = jnp.asarray(coeffs, jnp.float32)
  if c.ndim > 1 or (c.ndim == 1 and c.shape[0] != T):
    raise ValueError(f"{name} must be a number or a list of {T} numbers (one "
                     f"per task), got shape {c.shape}")
  return c
