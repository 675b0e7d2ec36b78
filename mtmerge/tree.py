"""Pytree math and naming: `/`-joined parameter paths, regex rules, reductions.

Every merge in mtmerge is a map over the leaves of a parameter pytree. This
module holds the small pieces all of them share: stable `/`-joined names for
leaves (used in error messages, regex rules and on-disk keys), regex-addressed
groups where the first matching rule wins, and reductions over all leaves
(sums, dots, norms) that global statistics are built from.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Tree = Any


def _key_str(k) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return str(k.name)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(keypath: Sequence[Any]) -> str:
  """Joins a JAX key path into a `/`-separated name, e.g. `encoder/0/kernel`."""
  return "/".join(_key_str(k) for k in keypath)


def named_leaves(tree: Tree) -> list[tuple[str, Any]]:
  """Returns `[(path, leaf), ...]` in the tree's flattening order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), leaf) for p, leaf in flat]


def paths(tree: Tree) -> Tree:
  """A tree of the same structure whose leaves are their own path names."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def map_with_path(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
  """`jax.tree.map` where `fn(path, leaf, *others)` also receives the name."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest)


def from_flat_dict(flat: dict[str, Any], sep: str = "/") -> dict[str, Any]:
  """Builds a nested dict from `{"a/b/c": leaf}` (inverse of `to_flat_dict`)."""
  out: dict[str, Any] = {}
  for name, leaf in flat.items():
    node = out
    parts = name.split(sep)
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"parameter name {name!r} clashes with a leaf at {p!r}")
    node[parts[-1]] = leaf
  return out


def to_flat_dict(tree: Tree) -> dict[str, Any]:
  """`{"a/b/c": leaf}` for every leaf of `tree`."""
  return dict(named_leaves(tree))


# ----------------------------------------------------------------------------
# Regex-addressed groups (big_vision style): first match wins, no match is an
# error that names the uncovered path.


class UncoveredPathError(KeyError):
  """A parameter path that no `(regex, value)` rule matches."""

  def __str__(self) -> str:  # KeyError would print the repr of the message.
    return self.args[0]


def _compile(rules: Iterable[tuple[str, Any]]) -> list[tuple[re.Pattern, Any]]:
  compiled = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ValueError(f"a rule must be a (regex, value) pair, got {rule!r}")
    pattern, value = rule
    try:
      compiled.append((re.compile(pattern), value))
    except re.error as e:
      raise ValueError(f"bad regex {pattern!r} in rules: {e}") from None
  return compiled


def _uncovered(path: str, compiled) -> UncoveredPathError:
  return UncoveredPathError(
      f"parameter {path!r} is not covered by any rule "
      f"(patterns: {[p.pattern for p, _ in compiled]}); add a catch-all "
      "like ('.*', ...)")


def match_rules(rules: Iterable[tuple[str, Any]], path: str) -> Any:
  """Returns the value of the first rule whose regex fully matches `path`."""
  compiled = _compile(rules)
  for pattern, value in compiled:
    if pattern.fullmatch(path):
      return value
  raise _uncovered(path, compiled)


def tree_map_with_regex(rules: Iterable[tuple[str, Any]], tree: Tree,
                        fn: Callable[[str, Any, Any], Any] | None = None
                        ) -> Tree:
  """Maps each leaf to `fn(path, leaf, value)` of its first matching rule.

  With `fn=None` returns the tree of matched values (a "group tree"). Regexes
  are matched with `fullmatch` against `/`-joined paths; a leaf no rule covers
  raises `UncoveredPathError` naming it.
  """
  compiled = _compile(rules)

  def one(path, leaf):
    for pattern, value in compiled:
      if pattern.fullmatch(path):
        return value if fn is None else fn(path, leaf, value)
    raise _uncovered(path, compiled)

  return map_with_path(one, tree)


# ----------------------------------------------------------------------------
# Reductions over all leaves.


def tree_sum(tree: Tree) -> jax.Array:
  """Sum of all entries of all leaves."""
  return sum((jnp.sum(x) for x in jax.tree.leaves(tree)), jnp.zeros(()))


def tree_dot(a: Tree, b: Tree) -> jax.Array:
  """Inner product `<a, b>` over all leaves (float32 accumulation)."""
  return sum((jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
             jnp.zeros(()))


def tree_norm(tree: Tree) -> jax.Array:
  """Global L2 norm over all leaves."""
  return jnp.sqrt(tree_dot(tree, tree))


def tree_size(tree: Tree) -> int:
  """Total number of entries (a Python int; works on abstract values)."""
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def tree_bytes(tree: Tree) -> int:
  """Total bytes of all leaves (works on abstract values)."""
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def cast_like(tree: Tree, like: Tree) -> Tree:
  """Casts each leaf of `tree` to the dtype of the matching leaf of `like`."""
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def check_same_structure(a: Tree, b: Tree, what_a: str = "a",
                         what_b: str = "b", *, lead_b: int = 0) -> None:
  """Raises a ValueError naming the first path or shape that differs.

  Args:
    a, b: trees to compare (arrays or anything with `.shape`).
    what_a, what_b: names used in the message (e.g. file names).
    lead_b: number of leading axes of `b`'s leaves to ignore (1 for stacked
      task vectors compared against a base model).
  """
  fa, fb = to_flat_dict(a), to_flat_dict(b)
  missing = [k for k in fa if k not in fb]
  extra = [k for k in fb if k not in fa]
  if missing:
    raise ValueError(f"{what_b} lacks parameter {missing[0]!r} present in "
                     f"{what_a} ({len(missing)} missing in all)")
  if extra:
    raise ValueError(f"{what_b} has parameter {extra[0]!r} absent from "
                     f"{what_a} ({len(extra)} extra in all)")
  for k, x in fa.items():
    sa, sb = tuple(np.shape(x)), tuple(np.shape(fb[k]))[lead_b:]
    if sa != sb:
      raise ValueError(f"parameter {k!r}: shape {sa} in {what_a} but {sb} "
                       f"in {what_b}")
