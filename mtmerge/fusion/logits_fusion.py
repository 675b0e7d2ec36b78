r"""Dynamic Logits Fusion: a strong model steered by small task experts.

Fan et al., 2024, "On Giant's Shoulders: Effortless Weak to Strong by
Dynamic Logits Fusion" (NeurIPS 2024, arXiv:2406.15480); official code
github.com/Facico/Dynamic-Logit-Fusion.

Weak-to-strong transfer by logit arithmetic (as in proxy-tuning / EFT):
the large untuned model's logits `M^L` are shifted by the logit
differences of T small task experts `M^S_t` (fine-tuned) against their
untuned small model `M^S`,

    P~(w) = softmax(M^L + sum_t w_t (M^S_t - M^S)),

with the weights `w` chosen per example (per decoding step in generation,
`mtmerge.fusion.logits_generate`). Write P = softmax(M^L) (large, untuned),
Q = softmax(M^S) (small, untuned), Q_t = softmax(M^S_t) (expert t). The
paper asks the fused large distribution to move away from P exactly as
each expert moved away from Q, in both KL directions, and minimizes the
squared mismatch summed over the experts (main text, multi-expert
equation, and the pseudo-code's loss):

    L(w) = sum_t [ (KL(P~ || P) - KL(Q_t || Q))^2
                   + (KL(P || P~) - KL(Q || Q_t))^2 ]         (`objective`)

T = 1 is the single-task problem (the paper's Eq. 3). There are no other
constraints: only the search box. The paper's search (pseudo-code and
Sec. 5.2): a grid over [0, 2] with step 0.1 per weight; with several
experts it does NOT search the product grid (exponential in T) but only
one expert at a time, the others held at 0 ("perform alpha search only for
one task, for a total of T times"; "select a single expert for knowledge
transfer", O(nT) instead of O(n^T) evaluations): at each step one expert
is applied, with the best of its grid weights. That is `search="paper"`,
the default here: an exhaustive argmin over those `T * num` candidates
(ties: the first, i.e. the lowest weight of the lowest expert index).
`search="joint"` is ours, not the paper's: the product grid (exhaustive
when it has at most `max_grid` points, else a coarser product grid plus
coordinate sweeps), then golden-section refinement per coordinate and
projected gradient steps from the best few grid points: a continuous
optimum of the same objective over the whole box.

What was read, and where the sources disagree: the official repository's
stored snapshot holds only a README ("Coming Soon"), so there is no
released solver to compare with. The method is taken from a stored full
text of the paper (a markdown/LaTeX conversion, not the PDF: Sec. 3 with
the single-task equation and the multi-expert one, the efficiency
analysis, the appendix derivation for several experts and the pseudo-code
"Adaptive Logits-Arithmetic"). The main-text equations and the
pseudo-code agree on the pairing above. The appendix's last multi-expert
formula pairs the terms the other way (KL(P || P~) with KL(Q_t || Q), and
KL(P~ || P) with KL(Q || Q_t)); we follow the main text and the
pseudo-code. In that copy the single-task paragraph and its appendix
sketch are typeset differently from the rest and add claims (a unique
optimum; the optimum "typically found within 10-15 evaluations") that we
could not check against the published version; we use only the
equation, which is the multi-expert one at T = 1. An earlier version of
this module, written from the abstract alone, solved its own reading (the
second term as KL(P~ || Q_t) against KL(P || Q)); it is replaced.

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
  """The per-example loss of fusion weights (the paper's, see the module
  docstring).

  Args:
    weights: `[T]`.
    strong: `[V]` strong logits of one example (one decoding step).
    experts: `[T, V]`.
    base: `[V]` or `[T, V]`.

  Returns:
    `sum_t (KL(P~ || P) - KL(Q_t || Q))^2 + (KL(P || P~) - KL(Q || Q_t))^2`,
    a scalar.
  """
  fused = fuse(strong, experts, base, weights)
  fwd = kl(fused, strong) - kl(experts, base)    # [T]
  rev = kl(strong, fused) - kl(base, experts)    # [T]
  return jnp.sum(fwd ** 2 + rev ** 2)


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


def paper_candidates(t_count: int, lo: float, hi: float, num: int
                     ) -> np.ndarray:
  """The weight vectors the paper's search scores: `[T * num, T]`, expert
  t alone at each of the `num` grid values (the others 0), t-major."""
  grid = np.linspace(lo, hi, num, dtype=np.float32)
  pts = np.zeros((t_count, num, t_count), np.float32)
  for t in range(t_count):
    pts[t, :, t] = grid
  return pts.reshape(t_count * num, t_count)


def _solve_one(strong, experts, base, *, search, lo, hi, num, max_grid,
               sweeps, iters, starts, objective_fn):
  """Weights `[T]` of one example (see `solve_weights`)."""
  t_count = experts.shape[0]
  f = lambda w: objective_fn(w, strong, experts, base)
  if search == "paper":
    pts = jnp.asarray(paper_candidates(t_count, lo, hi, num), strong.dtype)
    return pts[jnp.argmin(jax.vmap(f)(pts))]
  if search != "joint":
    raise ValueError(f"search must be 'paper' or 'joint', not {search!r}")
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
    "search", "lo", "hi", "num", "max_grid", "sweeps", "iters", "starts",
    "objective_fn"))
def solve(strong, experts, base, *, search="paper", lo=0.0, hi=2.0, num=21,
          max_grid=4096, sweeps=2, iters=24, starts=8, objective_fn=None):
  """`solve_weights` without input checks (jittable inside other programs,
  e.g. a decoding loop); every option is static."""
  objective_fn = objective if objective_fn is None else objective_fn
  one = functools.partial(_solve_one, search=search, lo=lo, hi=hi, num=num,
                          max_grid=max_grid, sweeps=sweeps, iters=iters,
                          starts=starts, objective_fn=objective_fn)
  base_axis = 1 if base.ndim == experts.ndim else 0
  return jax.vmap(one, in_axes=(0, 1, base_axis))(strong, experts, base)


def solve_weights(strong: Any, experts: Any, base: Any, *,
                  search: str = "paper", lo: float = 0.0,
                  hi: float = 2.0, num: int = 21, max_grid: int = 4096,
                  sweeps: int = 2, iters: int = 24, starts: int = 8,
                  objective_fn: Callable = objective,
                  names: Sequence[str] | None = None) -> jax.Array:
  """Per-example fusion weights: jitted, vmapped over examples.

  Args:
    strong: strong logits `[N, V]`.
    experts: expert logits `[T, N, V]` (or a list of T `[N, V]` arrays).
    base: untuned small logits `[N, V]` or `[T, N, V]`.
    search: `"paper"` (default): the paper's grid, one expert at a time
      (`paper_candidates`; exhaustive for T = 1); `"joint"` (ours): the
      product grid plus continuous refinement over the whole box.
    lo, hi: the box of each weight.
    num: grid points per weight (21: step 0.1 on [0, 2]).
    max_grid: (joint) largest product grid searched exhaustively
      (`num ** T`); beyond it, a coarser product grid of at most
      `max_grid` points, then coordinate sweeps over the `num` grid.
    sweeps: (joint) coordinate sweeps (grid and refinement).
    iters: (joint) golden-section iterations per coordinate refinement.
    starts: (joint) local refinements from the best `starts` grid points.
    objective_fn: `(weights [T], strong [V], experts [T, V], base) ->
      scalar`, default `objective`.
    names: expert names for error messages.

  Returns:
    Weights `[N, T]` (sharded like `strong` along N under jit).
  """
  strong, experts, base = check_inputs(strong, experts, base, names=names)
  return solve(strong, experts, base, search=str(search), lo=float(lo),
               hi=float(hi), num=int(num), max_grid=int(max_grid),
               sweeps=int(sweeps), iters=int(iters), starts=int(starts),
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
