"""The `MergeTransform` protocol and its combinators (optax style).

A merge is a chain of small transforms over stacked task vectors:
TIES = trim_by_magnitude(k) -> elect_sign -> disjoint_merge -> scale(lambda).
Each transform is an `(init, apply)` pair, exactly like an optax
`GradientTransformation`: `init(tvs)` builds state (empty for training-free
steps, coefficients for learned ones), and `apply(tree, state)` returns the
transformed tree and the new state. Trees flowing through a chain keep the
leading task axis `[T, ...]` until a reduction (e.g. `disjoint_merge`,
`sum_tasks`) removes it.

References: optax `base.py` / `_combining.py` (the design this mirrors).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

Tree = Any
State = Any


class EmptyState(NamedTuple):
  """State of a transform that keeps none."""


class MergeTransform(NamedTuple):
  """A pure merge step: `init(tvs) -> state`, `apply(tree, state) -> (tree, state)`."""
  init: Callable[[Tree], State]
  apply: Callable[[Tree, State], tuple[Tree, State]]


def stateless(fn: Callable[[Tree], Tree]) -> MergeTransform:
  """Wraps a pure `tree -> tree` function as a `MergeTransform`."""
  return MergeTransform(lambda _: EmptyState(),
                        lambda tree, state: (fn(tree), state))


def chain(*transforms: MergeTransform) -> MergeTransform:
  """Applies transforms in order; the state is the tuple of their states.

  `init` sees the input task vectors for every member (like optax, state
  shapes are fixed at init); a member after a reduction whose state depends
  on the reduced shapes should be initialized by the caller.
  """
  def init(tvs):
    return tuple(t.init(tvs) for t in transforms)

  def apply(tree, state):
    new_state = []
    for t, s in zip(transforms, state):
      tree, s = t.apply(tree, s)
      new_state.append(s)
    return tree, tuple(new_state)

  return MergeTransform(init, apply)


def run(transform: MergeTransform, tvs: Tree) -> Tree:
  """`transform.apply(tvs, transform.init(tvs))[0]`: one training-free pass."""
  out, _ = transform.apply(tvs, transform.init(tvs))
  return out


def masked(inner: MergeTransform, mask: Tree | Callable[[Tree], Tree]
           ) -> MergeTransform:
  """Applies a shape-preserving `inner` only to leaves where `mask` is True.

  Leaves where the mask is False pass through untouched, as in
  `optax.masked`. `mask` is a bool tree (or prefix), or a callable returning
  one from the tree, e.g. `lambda t: tree.tree_map_with_regex(rules, t)`.

  Raises:
    ValueError: if `inner` changes the shape of a selected leaf (a
      reduction cannot be masked: unselected leaves would keep the task axis).
  """
  def split(tree):
    m = mask(tree) if callable(mask) else mask
    m = jax.tree.broadcast(m, tree)
    sel = jax.tree.map(lambda x, b: x if b else None, tree, m)
    return m, sel

  def init(tvs):
    _, sel = split(tvs)
    return inner.init(sel)

  def apply(tree, state):
    m, sel = split(tree)
    out, state = inner.apply(sel, state)
    def merge(x, b, y):
      if not b:
        return x
      if y.shape != x.shape:
        raise ValueError("masked() needs a shape-preserving transform; got "
                         f"{x.shape} -> {y.shape}")
      return y
    flat_x, treedef = jax.tree.flatten(tree)
    flat_m = treedef.flatten_up_to(m)
    flat_y = treedef.flatten_up_to(out)
    return treedef.unflatten(
        [merge(x, b, y) for x, b, y in zip(flat_x, flat_m, flat_y)]), state

  return MergeTransform(init, apply)
