"""Sign election and reductions over the task axis.

* `elect_sign` — TIES' sign consensus (Yadav et al. 2023): the elected sign
  of an entry is sign(sum_t tau_t) ("sum", the paper) or the sign of the
  count of positive minus negative tasks ("count", mergekit option); entries
  of each task that disagree with it are zeroed.
* `disjoint_merge` — TIES' disjoint mean / sum / max over agreeing tasks.
* `trimmed_disjoint_merge` — trim, elect and merge fused in two passes, for
  use inside a jit; `ties_apply` — the same plus `theta_0 + lambda * tau`,
  run eagerly as per-leaf kernels compiled once per leaf shape.
* `sum_tasks` / `mean_tasks` — task arithmetic and weight averaging.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import selection
from mtmerge import sharding
from mtmerge import tree as tree_lib
from mtmerge.transforms import base

Tree = Any


def task_sum(x: jax.Array) -> jax.Array:
  """`sum(x, axis=0)` over the (small, static) task axis, unrolled.

  XLA:CPU's default reduce fusion makes `jnp.sum(x, axis=0)` on a
  `[8, 3072, 768]` leaf ~30x slower than `x[0] + ... + x[7]` (measured in
  benchmarks/merge_bench.py); the unrolled form is one elementwise fusion.
  """
  out = x[0]
  for t in range(1, x.shape[0]):
    out = out + x[t]
  return out


def _check_sign_args(method: str, zero_sign: str) -> None:
  if method not in ("sum", "count"):
    raise ValueError(f"sign method must be 'sum' or 'count', got {method!r}")
  if zero_sign not in ("majority", "positive"):
    raise ValueError(f"zero_sign must be 'majority' or 'positive', got "
                     f"{zero_sign!r}")


def _check_merge_func(merge_func: str) -> None:
  if merge_func not in ("mean", "sum", "max"):
    raise ValueError(f"merge_func must be mean, sum or max, got "
                     f"{merge_func!r}")


def vote_signs(x: jax.Array, method: str = "sum") -> jax.Array:
  """One leaf's votes (+1, -1 or 0, float32) before zero votes are filled."""
  x = x.astype(jnp.float32)
  return jnp.sign(task_sum(x if method == "sum" else jnp.sign(x)))


def elected_signs(tvs: Tree, method: str = "sum",
                  zero_sign: str = "majority", total: Any = None) -> Tree:
  """The elected sign (+1/-1) of every entry, a tree without the task axis.

  Args:
    tvs: stacked task vectors `[T, ...]` (usually already trimmed).
    method: `sum` = sign of the sum over tasks (TIES paper); `count` = sign
      of (#positive - #negative).
    zero_sign: where the vote is 0: `majority` = the sign of the sum of all
      elected signs over the whole tree (official TIES code's
      `resolve_zero_signs`), `positive` = +1 (mergekit).
    total: the sum of all votes of the whole model when `tvs` is only part
      of it (a streamed block); None sums the votes of `tvs`.
  """
  _check_sign_args(method, zero_sign)
  votes = jax.tree.map(lambda x: vote_signs(x, method), tvs)
  if zero_sign == "positive":
    fill = jnp.ones((), jnp.float32)
  else:
    fill = jnp.sign(tree_lib.tree_sum(votes) if total is None else total)
    fill = jnp.where(fill == 0, 1.0, fill)
  return jax.tree.map(lambda s: jnp.where(s == 0, fill, s), votes)


def elect_sign(method: str = "sum", zero_sign: str = "majority",
               total: Any = None) -> base.MergeTransform:
  """Zeroes each task's entries whose sign disagrees with the elected sign.

  `total`: the model-wide vote sum when the tree is one block of a model
  (`elected_signs`).
  """
  def fn(tvs):
    signs = elected_signs(tvs, method, zero_sign, total)
    return jax.tree.map(
        lambda x, s: jnp.where(jnp.sign(x) == s.astype(x.dtype), x, 0),
        tvs, signs)
  return base.stateless(fn)


def _weights(weights, T):
  if weights is None:
    return None
  w = jnp.asarray(weights, jnp.float32)
  if w.shape != (T,):
    raise ValueError(f"weights must have shape ({T},), got {w.shape}")
  return w


def disjoint_merge(merge_func: Literal["mean", "sum", "max"] = "mean",
                   weights: Sequence[float] | None = None
                   ) -> base.MergeTransform:
  """Reduces the task axis over nonzero (sign-agreeing) entries.

  Args:
    merge_func: `mean` = sum of nonzero entries / number of them (0 where
      none), `sum`, or `max` = the entry of largest magnitude (with its sign).
    weights: optional per-task weights for the `mean` denominator
      (mergekit's `sum_t w_t tau_t m_t / sum_t w_t m_t`; the numerator is
      expected to be weighted already, e.g. by `scale_per_task`).
  """
  _check_merge_func(merge_func)

  def fn(tvs):
    def one(x):
      xf = x.astype(jnp.float32)
      if merge_func == "sum":
        out = task_sum(xf)
      elif merge_func == "max":
        idx = jnp.argmax(jnp.abs(xf), axis=0)
        out = jnp.take_along_axis(xf, idx[None], axis=0)[0]
      else:
        nz = (xf != 0).astype(jnp.float32)
        w = _weights(weights, x.shape[0])
        if w is not None:
          nz = nz * w.reshape((-1,) + (1,) * (x.ndim - 1))
        den = task_sum(nz)
        out = task_sum(xf) / jnp.where(den == 0, 1.0, den)
      return out.astype(x.dtype)
    return jax.tree.map(one, tvs)
  return base.stateless(fn)


def sum_tasks() -> base.MergeTransform:
  """`sum_t tau_t` (task arithmetic's tau_MTL), accumulated in float32."""
  return base.stateless(lambda tvs: jax.tree.map(
      lambda x: task_sum(x.astype(jnp.float32)).astype(x.dtype), tvs))


def mean_tasks() -> base.MergeTransform:
  """`mean_t tau_t` (weight averaging expressed on task vectors)."""
  return base.stateless(lambda tvs: jax.tree.map(
      lambda x: (task_sum(x.astype(jnp.float32)) / x.shape[0]).astype(x.dtype),
      tvs))


def _trim(xt, th, wt):
  """One task's slice, trimmed at `th` (kept where `|x| >= th`) and weighted.

  The weighted slice is rounded back to x's dtype as the primitive chain's
  `scale_per_task` does.
  """
  y = jnp.where(jnp.abs(xt.astype(jnp.float32)) >= th, xt, 0)
  if wt is not None:
    y = (y.astype(jnp.float32) * wt).astype(xt.dtype)
  return y


def _fold(x, term, add, view=None):
  """`add(...add(term(0, x[0]), term(1, x[1]))..., term(T-1, x[T-1]))`.

  The per-task terms of a stacked leaf combined in task order: one
  elementwise kernel. `view` ('uint' or 'int') reads the slices through a
  bitcast of x to integers of its width (exact). A whole-model TIES program
  reads pass 1 through one view and pass 2 through the other: with plain
  slices XLA shares pass 1's per-task slices `x[t]` with pass 2 (as
  float32 round trips, on CPU) and keeps every leaf's slices alive across
  the model-wide vote sum; through different views they are different
  values, each fused into its own pass.
  """
  if view is None:
    read = lambda t: x[t]
  else:
    bits = sharding.integer_view(x, view)
    read = lambda t: jax.lax.bitcast_convert_type(bits[t], x.dtype)
  acc = term(0, read(0))
  for t in range(1, x.shape[0]):
    acc = add(acc, term(t, read(t)))
  return acc


def _task_slice(x, thr, w, prep, t, xt):
  """Task t's slice `xt` of leaf `x` as both passes use it: prepared
  (`prep(t, xt)`), trimmed at its threshold (`thr[t]` for per-task
  thresholds, else `thr`) and weighted."""
  xt = xt if prep is None else prep(t, xt)
  th = thr[t] if thr.ndim and thr.shape[0] == x.shape[0] else thr
  return _trim(xt, th, None if w is None else w[t])


def _leaf_vote(x, thr, w, sign_method, split=False, prep=None):
  """Pass 1 on one leaf: float32 sign (+1, -1 or 0) of the trimmed vote,
  the votes summed in task order; `split`: read x apart from pass 2
  (`_fold`); `prep(t, x[t])`: each slice before the trim."""
  def term(t, xt):
    y = _task_slice(x, thr, w, prep, t, xt).astype(jnp.float32)
    return y if sign_method == "sum" else jnp.sign(y)
  return jnp.sign(_fold(x, term, jnp.add, "uint" if split else None))


def _fill(total, zero_sign):
  """The sign given to zero votes: +1, or the sign of the summed votes."""
  if zero_sign == "positive":
    return jnp.ones((), jnp.float32)
  fill = jnp.sign(total)
  return jnp.where(fill == 0, 1.0, fill)


def _leaf_merge(x, thr, s, w, merge_func, split=False, prep=None):
  """Pass 2 on one leaf: disjoint merge of entries agreeing with signs `s`,
  accumulated in task order; `split`: read x apart from pass 1 (`_fold`);
  `prep` as `_leaf_vote`."""
  def term(t, xt):
    y = _task_slice(x, thr, w, prep, t, xt)
    yf = jnp.where(jnp.sign(y) == s.astype(y.dtype), y, 0).astype(
        jnp.float32)
    if merge_func != "mean":
      return (yf,)
    return yf, (yf != 0).astype(jnp.float32) * (1.0 if w is None else w[t])

  def add(acc, new):
    if merge_func == "max":  # first task wins ties, like argmax
      (best,), (yf,) = acc, new
      return (jnp.where(jnp.abs(yf) > jnp.abs(best), yf, best),)
    return tuple(a + b for a, b in zip(acc, new))

  acc = _fold(x, term, add, "int" if split else None)
  if merge_func == "mean":
    num, den = acc
    out = num / jnp.where(den == 0, 1.0, den)
  else:
    out = acc[0]
  return out.astype(x.dtype)


def trimmed_disjoint_merge(tvs: Tree, thresholds: Tree,
                           sign_method: str = "sum",
                           zero_sign: str = "majority",
                           merge_func: Literal["mean", "sum", "max"] = "mean",
                           weights: Sequence[float] | None = None,
                           prep: Tree | None = None) -> Tree:
  """TIES' trim -> (weight) -> elect sign -> disjoint merge in two passes.

  Computes exactly `chain(trim(thresholds), scale_per_task(weights),
  elect_sign, disjoint_merge)` but reads the stacked task vectors only
  twice and never materializes a `[T, ...]` intermediate: pass 1 forms each
  entry's vote from the trimmed per-task slices, pass 2 re-trims and
  accumulates the agreeing entries. On the 8 x 88M benchmark this replaced
  ~7.8 s of chained passes by ~1 s. Traced whole, this unrolls over every
  leaf and task (~15 s of XLA compilation at 152 leaves x 8 tasks);
  `ties_apply` runs the same passes with kernels compiled per leaf shape.

  Args:
    tvs: stacked task vectors `[T, ...]` (untrimmed).
    thresholds: per-leaf `[T, 1, ...]` (or broadcastable) float32 magnitude
      thresholds; an entry of task t is kept when `|x| >= thr[t]`.
    sign_method, zero_sign: as `elected_signs`.
    merge_func, weights: as `disjoint_merge`; weights also scale each task's
      trimmed vector before the vote (mergekit's `ties`).
    prep: optional tree (like `tvs`) of functions `f(t, x[t])` applied to
      each task's slice before the trim, in both passes (DARE-TIES' drop:
      the survivors are recomputed in each pass from a bool mask instead of
      being kept as a second copy of the task vectors).

  Returns:
    The merged vector (no task axis), in each leaf's dtype.
  """
  _check_sign_args(sign_method, zero_sign)
  _check_merge_func(merge_func)
  w = _weights(weights, jax.tree.leaves(tvs)[0].shape[0])
  xs, treedef = jax.tree.flatten(tvs)
  ths = treedef.flatten_up_to(thresholds)
  preps = [None] * len(xs) if prep is None else treedef.flatten_up_to(prep)
  votes = [_leaf_vote(x, thr, w, sign_method, split=True, prep=f)
           for x, thr, f in zip(xs, ths, preps)]
  fill = _fill(tree_lib.tree_sum(votes), zero_sign)
  return jax.tree.unflatten(treedef, [
      _leaf_merge(x, thr, jnp.where(v == 0, fill, v), w, merge_func,
                  split=True, prep=f)
      for x, thr, v, f in zip(xs, ths, votes, preps)])


# Kernels of `ties_apply`, one program per (leaf shape, dtype, sharding,
# static args): jax.jit's own cache keys on exactly these.

def _leaf_thr(thr, off, x):
  """The leaf's thresholds: `thr` itself, or its slice of a flat vector."""
  return thr if off is None else selection.leaf_thresholds(thr, off, x.shape)


@functools.partial(jax.jit, static_argnames=("sign_method", "split"))
def _vote_kernel(x, thr, off, w, total, sign_method, split=False):
  """int8 votes of one leaf, and `total` plus their (exact) sum."""
  thr = _leaf_thr(thr, off, x)
  # The barrier makes the sum read the int8 votes back (1 byte per entry)
  # rather than fuse a second copy of the vote, which re-reads all tasks.
  v = jax.lax.optimization_barrier(
      _leaf_vote(x, thr, w, sign_method, split).astype(jnp.int8))
  # int32 sums are exact; as float32 they equal `tree_sum`'s per-leaf sums
  # (exact below 2**24 entries), added in the same leaf order.
  part = jnp.sum(v.astype(jnp.int32)).astype(jnp.float32)
  return v, total + part


@functools.partial(jax.jit, static_argnames=("sign_method", "zero_sign",
                                             "merge_func", "split"))
def _apply_kernel(b, x, thr, off, v, total, w, scale, sign_method, zero_sign,
                  merge_func, split=False):
  """`theta_0 + scale * tau` of one leaf, tau from its votes (pass 2).

  With `v=None` (zero votes go positive, so no model-wide sum is needed) it
  also forms the votes: one kernel and one read of the leaf.
  """
  thr = _leaf_thr(thr, off, x)
  if v is None:
    v = _leaf_vote(x, thr, w, sign_method, split)
  s = jnp.where(v == 0, _fill(total, zero_sign), v.astype(jnp.float32))
  tau = _leaf_merge(x, thr, s, w, merge_func, split)
  out = b.astype(jnp.float32) + scale * tau.astype(jnp.float32)
  return out.astype(b.dtype)


def ties_apply(base: Tree, tvs: Tree, thresholds: Tree, scale: Any = 1.0,
               sign_method: str = "sum", zero_sign: str = "majority",
               merge_func: Literal["mean", "sum", "max"] = "mean",
               weights: Sequence[float] | None = None,
               offsets: Sequence[int] | None = None) -> Tree:
  """`base + scale * trimmed_disjoint_merge(...)`, one leaf at a time.

  Same arithmetic as `task_vectors.apply(base, trimmed_disjoint_merge(tvs,
  thresholds, ...), scale)`, but each pass is a small jitted kernel called
  per leaf, so XLA compiles one program per distinct leaf shape (10 for a
  ViT-B/32's 152 leaves) instead of one program unrolled over all leaves,
  and the kernels are reused by every later merge of a model with those
  shapes. Between the passes only int8 votes (1 byte per entry) and one
  scalar, the sum of all votes for `zero_sign='majority'`, are kept; pass 2
  adds the merged leaf to `base` in the same kernel. With
  `zero_sign='positive'` nothing is model-wide, so each leaf takes one
  kernel that votes and merges in one pass. Called eagerly, the
  kernels keep their inputs' shardings; under an outer `jax.jit` they are
  inlined like any nested jit.

  Args:
    base: pretrained params (leaves without the task axis).
    tvs: stacked task vectors `[T, ...]`, same structure as `base`.
    thresholds: as `trimmed_disjoint_merge`, or with `offsets` the vector
      of `selection.flat_thresholds` (global or per_tensor scope).
    scale: lambda, a number (traced: a new value reuses the kernels).
    sign_method, zero_sign, merge_func, weights: as `trimmed_disjoint_merge`.
    offsets: `selection.threshold_offsets` for a flat `thresholds`; each
      kernel slices its leaf's entries (a traced offset: no recompiles).

  Returns:
    Merged params with the structure and dtypes of `base`.
  """
  _check_sign_args(sign_method, zero_sign)
  _check_merge_func(merge_func)
  xs, treedef = jax.tree.flatten(tvs)
  bs = treedef.flatten_up_to(base)
  if offsets is None:
    ths, offs = treedef.flatten_up_to(thresholds), [None] * len(xs)
  else:
    ths, offs = [thresholds] * len(xs), [np.int32(o) for o in offsets]
  w = _weights(weights, xs[0].shape[0])
  scale = jnp.asarray(scale, jnp.float32)
  total = jnp.zeros((), jnp.float32)
  votes = [None] * len(xs)
  # Traced inside a whole-model program, the passes read the task vectors
  # through different views (`_fold`): the same values, but no per-task
  # slices kept live across the model-wide sum. Called eagerly, each leaf
  # is its own program and nothing is shared.
  split = any(isinstance(x, jax.core.Tracer) for x in xs)
  if zero_sign != "positive":  # pass 1: votes and their model-wide sum
    for i, (x, thr, off) in enumerate(zip(xs, ths, offs)):
      votes[i], total = _vote_kernel(x, thr, off, w, total,
                                     sign_method=sign_method, split=split)
  out = []
  fused_sign = sign_method if zero_sign == "positive" else None
  for i, (b, x, thr, off) in enumerate(zip(bs, xs, ths, offs)):
    v, votes[i] = votes[i], None  # free each leaf's votes once used
    out.append(_apply_kernel(b, x, thr, off, v, total, w, scale,
                             sign_method=fused_sign, zero_sign=zero_sign,
                             merge_func=merge_func, split=split))
  return jax.tree.unflatten(treedef, out)
