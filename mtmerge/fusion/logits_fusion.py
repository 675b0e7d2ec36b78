r"""Dynamic Logits Fusion: a strong model steered by small task experts.

Fan et al., 2024, "On Giant's Shoulders: Effortless Weak to Strong by
Dynamic Logits Fusion" (NeurIPS 2024, arXiv:2406.15480); official code
github.com/Facico/Dynamic-Logit-Fusion.

Weak-to-strong transfer by logit arithmetic (as in proxy-tuning /
DExperts): the strong (large, untuned) model's logits `z_L` are shifted by
the logit differences of T small task experts `z_t` (fine-tuned) against
their untuned small model `z_S`,

    z_fused(w) = z_L + sum_t w_t (z_t - z_S),

with the fusion weights `w` chosen per example (per decoding step in
generation, `mtmerge.fusion.logits_generate`) by a KL-constrained problem.
Our reading of the paper's constraints: fine-tuning should move the strong
model as far as it moved the small one, and should leave the gap between
the two scales unchanged,

    KL(p_fused || p_L) ~ KL(p_t || p_S),   KL(p_fused || p_t) ~ KL(p_L || p_S),

enforced as squared residuals summed over the experts (`objective`); a
single expert is the single-task case. `solve_weights` searches a box
`[lo, hi]^T` (default [0, 2], around the fixed ratios 0.5-1.5 the paper
compares against): the exhaustive 0.1 grid when it has at most `max_grid`
points (one or two experts), else the coarsest product grid that fits plus
coordinate sweeps over the 0.1 grid; then, from the best few grid points,
golden-section refinement per coordinate and, for several experts,
projected gradient steps with a line search (a continuous optimum).

Paper vs. code, and what we follow: the stored snapshot of the official
repository holds only a README ("Coming Soon"): no released solver to
compare with, so we follow the paper. Its method section could not be
read in full from the stored copies either (abstract and summaries), so
the residual form (squared, summed over experts when multi-task) and the
box are our reading of its "KL-divergence constrained optimization", not
a verified transcription; `objective_fn` swaps in another reading.

Arrays: `strong` `[..., V]`, `experts` `[T, ..., V]` (the task axis first,
like `TaskVectors`), `base` `[..., V]` (or `[T, ..., V]` when each expert
has its own untuned small model), `weights` `[..., T]` or `[T]`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class FusionError(ValueError):
  """Inputs that cannot be fused (names the offending expert or model)."""


def kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """`KL(softmax(p) || softmax(q))` over the last axis.

  Args:
    p_logits, q_logits: logits `[..., V]` (broadcastable).

  Returns:
    KL divergences `[...]`.
  """
  lp = jax.nn.log_softmax(p_logits, axis=-1)
  lq = jax.nn.log_softmax(q_logits, axis=-1)
  return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def fuse(strong: jax.Array, experts: jax.Array, base: jax.Array,
         weights: jax.Array) -> jax.Array:
  """The fused logits `strong + sum_t w_t (experts_t - base)`.

  Args:
    strong: the strong model's logits `[..., V]`.
    experts: the experts' logits `[T, ..., V]`.
    base: the untuned small model's logits `[..., V]` or `[T, ..., V]`.
    weights: `[T]` (one weight per expert) or `[..., T]` (per example).

  Returns:
    Fused logits `[..., V]`.
  """
  delta = experts - base
  w = jnp.moveaxis(jnp.asarray(weights, delta.dtype), -1, 0)
  w = w.reshape(w.shape + (1,) * (delta.ndim - w.ndim))
  return strong + jnp.sum(w * delta, axis=0)


def objective(weights: jax.Array, strong: jax.Array, experts: jax.Array,
              base: jax.Array) -> jax.Array:
  """The per-example loss of fusion weights (see the module docstring).

  Args:
    weights: `[T]`.
    strong: `[V]` strong logits of one example (one decoding step).
    experts: `[T, V]`.
    base: `[V]` or `[T, V]`.

  Returns:
    `sum_t (KL(p_w || p_L) - KL(p_t || p_S))^2
           + (KL(p_w || p_t) - KL(p_L || p_S))^2`, a scalar.
  """
  fused = fuse(strong, experts, base, weights)
  shift_small = kl(experts, base)          # [T] what tuning did, small scale
  gap = kl(strong, base)                   # [] or [T] large vs small, untuned
  shift_large = kl(fused, strong)          # [] what fusion does, large scale
  gap_tuned = kl(fused, experts)           # [T] large vs small, tuned
  return jnp.sum((shift_large - shift_small) ** 2 + (gap_tuned - gap) ** 2)


_INVPHI = (math.sqrt(5.0) - 1.0) / 2.0


def _golden(f: Callable, w: jax.Array, t: int, a, b, iters: int) -> jax.Array:
  """`w` with coordinate t moved to a minimum of f on [a, b] (or kept)."""
  g = lambda x: f(w.at[t].set(x))
  c, d = b - _INVPHI * (b - a), a + _INVPHI * (b - a)

  def body(_, s):
    a, b, c, d, fc, fd = s
    left = fc < fd  # the minimum is in [a, d]
    a2, b2 = jnp.where(left, a, c), jnp.where(left, d, b)
    x = jnp.where(left, b2 - _INVPHI * (b2 - a2), a2 + _INVPHI * (b2 - a2))
    fx = g(x)
    c2, fc2 = jnp.where(left, x, d), jnp.where(left, fx, fd)
    d2, fd2 = jnp.where(left, c, x), jnp.where(left, fc, fx)
    return a2, b2, c2, d2, fc2, fd2
  a, b, c, d, fc, fd = jax.lax.fori_loop(0, iters, body,
                                         (a, b, c, d, g(c), g(d)))
  cand = jnp.stack([w[t], c, d])
  vals = jnp.stack([g(w[t]), fc, fd])
  return w.at[t].set(cand[jnp.argmin(vals)])  # never worse than the start


def _descend(f: Callable, w: jax.Array, lo, hi, step, iters: int
             ) -> jax.Array:
  """Projected gradient descent with a vectorized best-step line search.

  Coordinate refinement crawls along valleys of a non-separable
  objective; joint steps along the gradient do not. Each iteration tries
  moves of at most `step * 2**-k` (k = 0..19) on the largest coordinate
  and keeps the best, or stays put: the objective never increases.
  """
  shrink = 2.0 ** -jnp.arange(20, dtype=w.dtype)

  def body(_, w):
    fw, g = jax.value_and_grad(f)(w)
    scale = step / jnp.maximum(jnp.max(jnp.abs(g)), 1e-30)
    cand = jnp.clip(w[None] - (scale * shrink)[:, None] * g[None], lo, hi)
    vals = jax.vmap(f)(cand)
    k = jnp.argmin(vals)
    return jnp.where(vals[k] < fw, cand[k], w)
  return jax.lax.fori_loop(0, iters, body, w)


def _solve_one(strong, experts, base, *, lo, hi, num, max_grid, sweeps,
               iters, starts, objective_fn):
  """Weights `[T]` of one example (see `solve_weights`)."""
  t_count = experts.shape[0]
  f = lambda w: objective_fn(w, strong, experts, base)
  grid = jnp.linspace(lo, hi, num, dtype=strong.dtype)
  per_axis = num if num ** t_count <= max_grid else max(
      2, int(math.floor(max_grid ** (1.0 / t_count) + 1e-9)))
  # Exhaustive over the product grid when it fits, else over the coarser
  # product grid that fits (a global start), then coordinate sweeps.
  axis = grid if per_axis == num else jnp.linspace(lo, hi, per_axis,
                                                   dtype=strong.dtype)
  pts = jnp.stack([m.ravel() for m in jnp.meshgrid(
      *([axis] * t_count), indexing="ij")], axis=-1)
  vals = jax.vmap(f)(pts)
  # Several starts: the best grid points can sit in different basins
  # whose continuous minima rank differently from the grid values.
  starts = pts[jax.lax.top_k(-vals, min(int(starts), pts.shape[0]))[1]]
  step = (hi - lo) / max(num - 1, 1)

  # Loops stay loops (not unrolled per expert): small programs, fast
  # compiles; `t` is a traced coordinate index.
  def grid_sweep(i, w):
    cand = jnp.tile(w, (num, 1)).at[:, i % t_count].set(grid)
    return cand[jnp.argmin(jax.vmap(f)(cand))]

  def refine(i, w):
    t = i % t_count
    return _golden(f, w, t, jnp.maximum(lo, w[t] - step),
                   jnp.minimum(hi, w[t] + step), iters)

  def local(w):
    if per_axis != num:
      w = jax.lax.fori_loop(0, sweeps * t_count, grid_sweep, w)
    w = jax.lax.fori_loop(0, sweeps * t_count, refine, w)
    if t_count > 1:
      w = _descend(f, w, lo, hi, step, 2 * iters)
    return w
  ws = jax.vmap(local)(starts)
  w = ws[jnp.argmin(jax.vmap(f)(ws))]
  return w


@functools.partial(jax.jit, static_argnames=(
    "lo", "hi", "num", "max_grid", "sweeps", "iters", "starts",
    "objective_fn"))
def solve(strong, experts, base, *, lo, hi, num, max_grid, sweeps, iters,
          starts, objective_fn):
  """`solve_weights` without input checks or defaults (jittable inside
  other programs, e.g. a decoding loop); every option is static."""
  one = functools.partial(_solve_one, lo=lo, hi=hi, num=num,
                          max_grid=max_grid, sweeps=sweeps, iters=iters,
                          starts=starts, objective_fn=objective_fn)
  base_axis = 1 if base.ndim == experts.ndim else 0
  return jax.vmap(one, in_axes=(0, 1, base_axis))(strong, experts, base)


def solve_weights(strong: Any, experts: Any, base: Any, *, lo: float = 0.0,
                  hi: float = 2.0, num: int = 21, max_grid: int = 4096,
                  sweeps: int = 2, iters: int = 24, starts: int = 4,
                  objective_fn: Callable = objective,
                  names: Sequence[str] | None = None) -> jax.Array:
  """Per-example fusion weights: jitted, vmapped over examples.

  Args:
    strong: strong logits `[N, V]`.
    experts: expert logits `[T, N, V]` (or a list of T `[N, V]` arrays).
    base: untuned small logits `[N, V]` or `[T, N, V]`.
    lo, hi: the box of each weight.
    num: grid points per weight (21: step 0.1 on [0, 2]).
    max_grid: largest product grid searched exhaustively (`num ** T`);
      beyond it, a coarser product grid of at most `max_grid` points,
      then coordinate sweeps over the `num` grid.
    sweeps: coordinate sweeps (grid and refinement).
    iters: golden-section iterations per coordinate refinement.
    starts: local refinements run from the best `starts` grid points.
    objective_fn: `(weights [T], strong [V], experts [T, V], base) ->
      scalar`, default `objective`.
    names: expert names for error messages.

  Returns:
    Weights `[N, T]` (sharded like `strong` along N under jit).
  """
  strong, experts, base = check_inputs(strong, experts, base, names=names)
  return solve(strong, experts, base, lo=float(lo), hi=float(hi),
               num=int(num), max_grid=int(max_grid), sweeps=int(sweeps),
               iters=int(iters), starts=int(starts),
               objective_fn=objective_fn)


def check_inputs(strong: Any, experts: Any, base: Any, *,
                 names: Sequence[str] | None = None, vocab: str = "classes"
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(strong, experts [T, ...], base)` as arrays, or one `FusionError`.

  Args:
    strong, experts, base: as in `fuse` (experts may be a list).
    names: expert names for the message (default `expert 0`, ...).
    vocab: what the last axis holds, for the message.
  """
  if experts is None or len(experts) == 0:
    raise FusionError("no experts to fuse: the expert list is empty")
  strong = jnp.asarray(strong)
  label = lambda i: repr(names[i]) if names and i < len(names) else str(i)
  if isinstance(experts, (list, tuple)):
    for i, e in enumerate(experts):
      if np.shape(e)[-1:] != strong.shape[-1:]:
        raise FusionError(f"expert {label(i)} has {np.shape(e)[-1]} {vocab} "
                          f"but the strong model has {strong.shape[-1]}")
    experts = jnp.stack([jnp.asarray(e) for e in experts])
  experts = jnp.asarray(experts)
  if experts.shape[-1] != strong.shape[-1]:
    raise FusionError(f"experts have {experts.shape[-1]} {vocab} but the "
                      f"strong model has {strong.shape[-1]}")
  if experts.shape[1:] != strong.shape:
    raise FusionError(f"experts {experts.shape} do not stack over the strong "
                      f"logits {strong.shape} (want [T, *strong.shape])")
  base = jnp.asarray(base)
  if base.shape not in (strong.shape, experts.shape):
    raise FusionError(f"the untuned small model's logits {base.shape} have "
                      f"{base.shape[-1]} {vocab}; the strong model has "
                      f"{strong.shape[-1]} (want {strong.shape} or "
                      f"{experts.shape})")
  return strong, experts, base


def check_class_sets(strong: Sequence[str],
                     experts: Mapping[str, Sequence[str]],
                     what: str = "classes") -> None:
  """Refuses experts whose class set (or vocabulary) is not the strong one's.

  Logit arithmetic adds logits index by index, so every expert must score
  the same classes in the same order as the strong model.

  Args:
    strong: the strong model's class names in order.
    experts: expert name -> its class names in order.
    what: `classes` or `vocabulary`, for the message.

  Raises:
    FusionError: naming the first expert that differs.
  """
  if not experts:
    raise FusionError("no experts to fuse: the expert list is empty")
  for name, classes in experts.items():
    if tuple(classes) != tuple(strong):
      raise FusionError(f"expert {name!r} has {what} {tuple(classes)} but the "
                        f"strong model has {tuple(strong)}")
