"""Supermasks: edge-popup scores, per-layer top-k masks, exclusive masks.

A supermask (Zhou et al. 2019; Ramanujan et al. 2020, "edge-popup";
Wortsman et al. 2020, SupSup) selects a subnetwork of fixed weights: every
weight `w` has a real score `s`, and the forward pass uses `w * m` with
`m = h(s)`, where `h` keeps the top `density` fraction of each layer's
entries (1) and drops the rest (0). `h` has zero gradient almost
everywhere, so edge-popup passes the gradient straight through:
`dL/ds := dL/dm = dL/d(w*m) * w`.

Which entries count as "top": edge-popup and SupSup describe `h(s)` over
the scores; the edge-popup code and the ExSSNeT code (`GetSubnet.apply(
scores.abs(), sparsity)`) rank `|s|`. We follow the code: rank `|s|`, so
the straight-through gradient also picks up `d|s|/ds = sign(s)`:
`dL/ds = dL/d(w*m) * w * sign(s)`. Per layer, the code zeroes the
`int((1 - density) * n)` lowest of the `n` entries and keeps the rest
(`keep_count`); we keep the same count, at the exact k-th largest `|s|`
(a sort for small layers, `mtmerge.selection`'s search for large ones).
Entries tied at the threshold are all kept (never happens for continuous
scores).

ExSSNeT's exclusivity (Yadav and Bansal 2023): when task t trains weights,
only those in its own mask and in no earlier task's mask may change,
`M_t & ~(M_1 | ... | M_{t-1})` (`exclusive`), so every earlier subnetwork
keeps exactly its weights. `apply_delta` makes this structural: the new
weights are `where(editable, w + delta, w)`, bit-for-bit `w` elsewhere
whatever the optimizer does.

Everything here is a per-leaf map over a pytree of kernels; stacked trees
carry a leading task axis `[T, ...]` like the rest of mtmerge.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import selection

Tree = Any


class MaskError(ValueError):
  """Bad supermask input (a density outside (0, 1))."""


def check_density(density: Any) -> float:
  """`density` as a float in the open interval (0, 1), else MaskError."""
  try:
    d = float(density)
  except (TypeError, ValueError):
    raise MaskError(f"mask density must be a number in (0, 1), got "
                    f"{density!r}") from None
  if not (math.isfinite(d) and 0.0 < d < 1.0):
    raise MaskError(f"mask density must be in (0, 1), got {density!r}")
  return d


def keep_count(n: int, density: float) -> int:
  """Entries a layer of `n` keeps: `n - int((1 - density) * n)` (the code's
  count), at least 1."""
  return int(min(max(n - int((1.0 - density) * n), 1), n))


def _fan_in(shape) -> int:
  return int(np.prod(shape[:-1])) if len(shape) > 1 else int(shape[0])


def init_scores(rng: np.random.Generator, weights: Tree) -> Tree:
  """Edge-popup score init: PyTorch's default `kaiming_uniform_(a=sqrt(5))`
  (the code's `mask_init`), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
  `[in, out]` kernels; host numpy (no compile per shape)."""
  return jax.tree.map(
      lambda w: (rng.uniform(-1.0, 1.0, np.shape(w)) /
                 np.sqrt(_fan_in(np.shape(w)))).astype(np.float32), weights)


def signed_constant(rng: np.random.Generator, like: Tree) -> Tree:
  """The code's `signed_constant` weight init: `+-sqrt(2)/sqrt(fan_in)`
  with random signs (ReLU gain, fan-in mode), shaped like `like` (arrays
  or `jax.ShapeDtypeStruct`s); host numpy."""
  def one(x):
    s = tuple(x.shape)
    sign = np.where(rng.random(s) < 0.5, 1.0, -1.0)
    return (sign * np.sqrt(2.0 / _fan_in(s))).astype(np.float32)
  return jax.tree.map(one, like)


# Layers up to this many entries per task find their threshold with a sort
# (cheap to compile); larger ones with mtmerge.selection's exact search
# (cheap to run: 10 ms instead of 90 ms for 384 x 1024 on 2 CPU cores).
SORT_MAX = 1 << 17


def _thresholds(tree: Tree, density: float) -> Tree:
  """Per task and leaf, the `keep_count`-th largest |entry| of stacked
  leaves `[T, ...]`, shaped `[T, 1, ..., 1]`."""
  leaves, treedef = jax.tree.flatten(tree)
  large = [i for i, x in enumerate(leaves)
           if int(np.prod(x.shape[1:])) > SORT_MAX]
  big = selection.topk_thresholds(
      [leaves[i] for i in large], density, "per_tensor",
      count=lambda n: keep_count(n, density)) if large else []
  out = []
  for i, x in enumerate(leaves):
    if i in large:
      out.append(big[large.index(i)])
      continue
    a = jnp.abs(x).astype(jnp.float32).reshape(x.shape[0], -1)
    n = a.shape[1]
    kth = jnp.sort(a, axis=1)[:, n - keep_count(n, density)]
    out.append(kth.reshape((x.shape[0],) + (1,) * (x.ndim - 1)))
  return jax.tree.unflatten(treedef, out)


def topk_masks(scores: Tree, density: float, stacked: bool = False) -> Tree:
  """Bool masks keeping each leaf's `keep_count` largest `|score|`.

  Args:
    scores: the scores, leaves `[...]` (one task) or `[T, ...]` (stacked).
    density: kept fraction per leaf, in (0, 1) (`check_density`).
    stacked: whether leaves carry a leading task axis (one mask per task).

  Returns:
    A bool tree like `scores`.
  """
  density = check_density(density)
  tree = scores if stacked else jax.tree.map(lambda s: s[None], scores)
  thr = _thresholds(tree, density)
  out = jax.tree.map(lambda s, t: jnp.abs(s).astype(jnp.float32) >= t,
                     tree, thr)
  return out if stacked else jax.tree.map(lambda m: m[0], out)


def host_masks(scores: Tree, density: float) -> Tree:
  """`topk_masks` of one task's scores on the host (numpy, no compile):
  the same exact threshold, found with `np.partition`."""
  density = check_density(density)

  def one(s):
    a = np.abs(np.asarray(s, np.float32))
    n = a.size
    kth = np.partition(a.ravel(), n - keep_count(n, density))[
        n - keep_count(n, density)]
    return a >= kth
  return jax.tree.map(one, scores)


def supermask(scores: Tree, density: float) -> Tree:
  """Float {0, 1} top-k masks of one task's scores with edge-popup's
  straight-through gradient: value `h(|s|)`, gradient `g * sign(s)`.

  The value is exact: `h + (|s| - stop_gradient(|s|))` adds an exact 0.
  """
  sg = jax.lax.stop_gradient
  hard = topk_masks(sg(scores), density)
  return jax.tree.map(
      lambda h, s: h.astype(s.dtype) + (jnp.abs(s) - sg(jnp.abs(s))),
      hard, scores)


def _xp(*trees):
  """numpy when every leaf is a host array (no dispatch, no compile), else
  jax.numpy (traced or device values)."""
  host = all(isinstance(x, (np.ndarray, np.generic, int, float, bool))
             for t in trees for x in jax.tree.leaves(t))
  return np if host else jnp


def masked(weights: Tree, masks: Tree) -> Tree:
  """`w` where the mask is on, exactly +0.0 elsewhere (bool masks)."""
  xp = _xp(weights, masks)
  return jax.tree.map(lambda w, m: xp.where(m, w, xp.zeros_like(w)),
                      weights, masks)


def union(stacked: Tree, count: Any) -> Tree:
  """`M_0 | ... | M_{count-1}` of stacked bool masks (`count` may be a
  traced int; 0 gives all-False)."""
  xp = _xp(stacked, count)

  def one(m):
    keep = (xp.arange(m.shape[0]) < count).reshape(
        (-1,) + (1,) * (m.ndim - 1))
    return xp.any(m & keep, axis=0)
  return jax.tree.map(one, stacked)


def exclusive(mask: Tree, earlier: Tree) -> Tree:
  """Weights task t may train: in its mask and in no earlier one."""
  return jax.tree.map(lambda m, e: m & ~e, mask, earlier)


def apply_delta(weights: Tree, delta: Tree, editable: Tree) -> Tree:
  """`where(editable, w + delta, w)`: non-editable entries stay bit-exact."""
  xp = _xp(weights, delta, editable)
  return jax.tree.map(lambda w, d, e: xp.where(e, w + d, w), weights,
                      delta, editable)


def fraction(masks: Tree) -> float:
  """Fraction of True entries over all leaves (host float)."""
  leaves = jax.tree.leaves(masks)
  on = sum(int(np.sum(np.asarray(m))) for m in leaves)
  return on / max(sum(int(np.size(m)) for m in leaves), 1)
