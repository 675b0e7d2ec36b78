"""PCB-Merging: Parameter Competition Balancing (Du et al. 2024, "Parameter
Competition Balancing for Model Merging"; official duguodong7/pcb-merging).

Each entry of each task vector gets a balancing score from its own magnitude
(intra-balancing) and its agreement with the other tasks (inter-balancing);
the lowest-scoring entries are dropped and the rest averaged weighted by
their scores. Statistics are taken over each task's whole (flattened) task
vector, computed as reductions over leaves, never by concatenating them.

Two variants (`variant=`):

* `paper` (default), the paper's Eqs.:
  `intra_i = softmax(T * norm(tau_i * tau_i))`,
  `inter_i = sum_j softmax(norm(tau_i * tau_j))`, `beta_i = intra_i * inter_i`,
  keep the top `ratio` of `beta_i`, `tau_m = sum_i beta_i tau_i / sum_i beta_i`.
  `norm` is min-max normalization over the task's entries and the softmax
  runs over all entries of the task vector (the paper leaves both implicit;
  min-max is what the official code's `normalize` does).
* `official`, the released code: |tau| clipped at its 1e-4 and 1 - 1e-4
  quantiles, `intra = exp(T * minmax(|tau|)^2)`,
  `inter = tanh(tau_i * sum_j tau_j)`, scores below the `1 - ratio`
  quantile set to 0 and the rest min-max rescaled, the clipped vectors
  averaged with those weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import selection
from mtmerge import sharding
from mtmerge import task_vectors
from mtmerge.methods import registry
from mtmerge.methods import validate as v

Tree = Any


def _rest(x, lead):
  """The axes after the `lead` leading ones. Statistics reduce over them
  in place: flattening a sharded leaf first would gather it."""
  return tuple(range(lead, x.ndim))


def _min_max(x, axes):
  """`(min, max)` of x over `axes` as one (variadic) reduction.

  One reduction reads x once: XLA fuses x's producer into it. Two
  reductions share the producer, which XLA:CPU then materializes (its
  library reductions take no fused producers) and, scheduling all maxima
  before all minima, keeps alive for every leaf (PCB's `[T, T, ...]`
  pairwise products: 30 GiB per device at 7B x 8 on 64 devices).
  """
  return jax.lax.reduce(
      (x, x), (jnp.array(np.inf, x.dtype), jnp.array(-np.inf, x.dtype)),
      lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])),
      axes)


def _task_min_max(tree, lead=1):
  """Per-(leading index) min and max over all entries of all leaves."""
  parts = [_min_max(x, _rest(x, lead)) for x in jax.tree.leaves(tree)]
  return (jnp.min(jnp.stack([p[0] for p in parts]), axis=0),
          jnp.max(jnp.stack([p[1] for p in parts]), axis=0))


def _b(s, x, lead):
  """Per-(leading index) statistic `s` broadcast against leaf `x`."""
  return s.reshape(s.shape + (1,) * (x.ndim - lead))


def norm_leaf(x, mn, mx, lead=1):
  """Min-max normalization of one leaf given the model-wide min and max."""
  rng = jnp.where(mx > mn, mx - mn, 1.0)
  return (x - _b(mn, x, lead)) / _b(rng, x, lead)


def exp_leaf(x, mx, lead=1):
  """`exp(x - max)`: a softmax's numerator given the model-wide max."""
  return jnp.exp(x - _b(mx, x, lead))


def exp_sum(x, mx, lead=1):
  """One leaf's part of a softmax's denominator."""
  return jnp.sum(exp_leaf(x, mx, lead), axis=_rest(x, lead))


def intra_logits(x, sq_min, sq_max, T):
  """`T * norm(tau * tau)` of one float32 leaf (the paper's intra logits)."""
  return T * norm_leaf(x * x, sq_min, sq_max)


def inter_logits(x, pair_min, pair_max):
  """`norm(tau_i * tau_j)` `[T, T, ...]` of one float32 leaf."""
  return norm_leaf(x[:, None] * x[None, :], pair_min, pair_max, lead=2)


class PaperStats(NamedTuple):
  """The paper variant's model-wide statistics, per task (or task pair).

  `sq_*`: min/max of tau^2 `[T]`; `pair_*`: of tau_i tau_j `[T, T]`;
  `intra_*`/`inter_*`: max and exp-sum of the logits (the softmaxes).
  """
  sq_min: Any
  sq_max: Any
  pair_min: Any
  pair_max: Any
  intra_max: Any
  intra_sum: Any
  inter_max: Any
  inter_sum: Any


def with_softmax_maxima(st: PaperStats, T) -> PaperStats:
  """`st` with the softmax maxima taken from the min/max statistics.

  A logit is a monotone (non-decreasing, correctly rounded) function of
  its product, so the largest logit is the logit of the largest product:
  `T * norm(max tau^2)` and `norm(max tau_i tau_j)` (T and 1, or 0 for a
  constant task), without a pass over the logits. For bf16 task vectors
  (exact products) a pass would find the same values; for float32 ones
  XLA may contract a product and its subtraction into one FMA, and a pass
  would find a value an ulp away. Either is a valid shift: a softmax is
  shift-invariant, and its numerators and its sum use the same one.
  """
  return st._replace(
      intra_max=T * norm_leaf(st.sq_max, st.sq_min, st.sq_max),
      inter_max=norm_leaf(st.pair_max, st.pair_min, st.pair_max, lead=2))


def paper_stats(leaves: list, T) -> PaperStats:
  """The paper variant's model-wide statistics of stacked leaves.

  Two passes over the leaves, the second read after the first's
  statistics (`sharding.pass_view`): a whole-model program would otherwise
  keep every leaf's `[T, T, ...]` pairwise terms alive from the softmax
  sums to the merge.
  """
  xs = [x.astype(jnp.float32) for x in leaves]
  sq_min, sq_max = _task_min_max([x * x for x in xs])
  # Pairwise products [T, T, ...]: normalized and softmaxed per pair (i, j).
  pair_min, pair_max = _task_min_max([x[:, None] * x[None, :] for x in xs],
                                     lead=2)
  st = with_softmax_maxima(PaperStats(sq_min, sq_max, pair_min, pair_max,
                                      None, None, None, None), T)
  xs = [sharding.pass_view(x, pair_max).astype(jnp.float32) for x in leaves]
  return st._replace(
      intra_sum=sum(exp_sum(intra_logits(x, sq_min, sq_max, T),
                            st.intra_max) for x in xs),
      inter_sum=sum(exp_sum(inter_logits(x, pair_min, pair_max),
                            st.inter_max, 2) for x in xs))


def paper_beta(x, st: PaperStats, T):
  """`beta = intra * inter` of one float32 leaf `[T, ...]` given `st`."""
  il = intra_logits(x, st.sq_min, st.sq_max, T)
  intra = exp_leaf(il, st.intra_max) / _b(st.intra_sum, il, 1)
  pl = inter_logits(x, st.pair_min, st.pair_max)
  inter = jnp.sum(exp_leaf(pl, st.inter_max, 2) / _b(st.inter_sum, pl, 2),
                  axis=1)
  return intra * inter


def paper_merge(b, x):
  """`sum_i beta_i tau_i / sum_i beta_i` of one leaf (kept `beta`)."""
  den = jnp.maximum(jnp.sum(b, axis=0), 1e-12)
  return jnp.sum(b * x, axis=0) / den


def _paper(tvs, T, ratio):
  """The paper variant's merged task vector. On one device the balancing
  scores are computed once; under a mesh (`jax.set_mesh`) they are
  recomputed in each pass (the top-k counts, then the merge, read after
  the threshold), so no whole-model copy of the task vectors, in float32 or
  `[T, T]`-fold, is ever held (aot_check, 7B x 8 tasks on 64 devices:
  32.2 GiB per device before, 2.86 GiB now)."""
  leaves, treedef = jax.tree.flatten(tvs)
  st = paper_stats(leaves, T)
  beta_of = lambda x: paper_beta(x.astype(jnp.float32), st, T)
  if sharding.under_mesh():
    thr = selection.flat_thresholds(tvs, ratio, "global", values=beta_of)
    xs = [sharding.pass_view(x, thr) for x in leaves]
    betas = [beta_of(x) for x in xs]
  else:
    xs, betas = leaves, [beta_of(x) for x in leaves]
    thr = selection.flat_thresholds(betas, ratio, "global")
  thr = thr.reshape((T,))
  return jax.tree.unflatten(treedef, [
      paper_merge(jnp.where(b >= _b(thr, b, 1), b, 0.0),
                  x.astype(jnp.float32)) for x, b in zip(xs, betas)])


# The official variant, leaf by leaf given its model-wide statistics (the
# in-memory merge below and the streamed one in `streaming.recipes_lowrank`
# share these functions).


def official_ranks(n: int, ratio: float) -> tuple[int, int, int]:
  """k-th largest ranks over a task's n entries: |tau|'s clip bounds (its
  ascending order statistics at int(n 1e-4) and int(n (1 - 1e-4)) - 1)
  and the score quantile at ascending index int(n (1 - ratio))."""
  return (n - int(n * 1e-4), n - (int(n * (1 - 1e-4)) - 1),
          n - int(n * (1 - ratio)))


def official_clip(x, lo, hi):
  """`a = clip(|tau|, lo, hi)` of one float32 leaf `[T, ...]`."""
  return jnp.clip(jnp.abs(x), _b(lo, x, 1), _b(hi, x, 1))


def official_score(x, a, a_min, a_max, T):
  """`exp(T minmax(a)^2) * tanh(tau_i sum_j tau_j)` of one leaf."""
  na = norm_leaf(a, a_min, a_max)
  intra = jnp.exp(T * na * na)
  return intra * jnp.tanh(x * jnp.sum(x, axis=0)[None])


def official_merge(x, a, score, q, s_min, s_max):
  """The score-weighted average of the clipped vectors `sign(tau) a`: scores
  raised to the quantile `q`, min-max scaled with the raised scores' range
  (`max(min score, q)`, `max(max score, q)`: exact)."""
  raised = jnp.maximum(score, _b(q, score, 1))
  beta = norm_leaf(raised, jnp.maximum(s_min, q), jnp.maximum(s_max, q))
  return paper_merge(beta, jnp.sign(x) * a)


def _official(tvs, T, ratio):
  """The official variant's merged task vector, one statistic per pass.

  The clipped vectors and the scores are recomputed from the task vectors
  in every pass (each pass reads them after the statistic it waits on,
  `sharding.pass_view`), never held for the whole model; the order
  statistics count in 64-bit pairs past 2**32 entries per task or under a
  mesh (`selection.kth_largest`).
  """
  leaves, treedef = jax.tree.flatten(tvs)
  f32 = lambda x: x.astype(jnp.float32)
  k_lo, k_hi, k_q = official_ranks(selection.entries_per_task(leaves),
                                   ratio)
  lo = selection.kth_largest(leaves, lambda n: k_lo)
  hi = selection.kth_largest(leaves, lambda n: k_hi)
  clip = lambda x: official_clip(f32(x), lo, hi)
  a_min, a_max = _task_min_max(
      [clip(sharding.pass_view(x, (lo, hi))) for x in leaves])
  score_of = lambda x: official_score(f32(x), clip(x), a_min, a_max, T)
  # Scores are signed: the quantile is a signed k-th largest.
  # (The leaves go in as they are: the search's loop would hold a viewed
  # copy of the whole model as its operand.)
  q = selection.kth_largest_signed(leaves, lambda n: k_q, values=score_of)
  s_min, s_max = _task_min_max(
      [score_of(sharding.pass_view(x, q)) for x in leaves])
  xs = [sharding.pass_view(x, (s_min, s_max)) for x in leaves]
  return jax.tree.unflatten(treedef, [
      official_merge(f32(x), clip(x), score_of(x), q, s_min, s_max)
      for x in xs])


@registry.register("pcb_merging", static=("ratio", "variant"),
                   validators={"ratio": v.fraction("ratio"),
                               "variant": v.choice("variant",
                                                   ("paper", "official")),
                               "scaling_factor": v.coeff("scaling_factor")})
def pcb_merging(base: Tree, tvs: Tree, ratio: float = 0.1,
                scaling_factor: Any = 1.0, variant: str = "paper") -> Tree:
  """PCB-Merging: balance scores, drop the lowest, score-weighted average.

  Args:
    ratio: fraction of entries kept per task (the paper's r = 0.1).
    scaling_factor: lambda (paper/official search 0.8-1.3 for vision).
    variant: `paper` equations or the `official` code (module docstring).
  """
  T = task_vectors.num_tasks(tvs)
  if variant == "official":
    return task_vectors.apply(base, _official(tvs, T, ratio), scaling_factor)
  return task_vectors.apply(base, _paper(tvs, T, ratio), scaling_factor)
