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
from mtmerge import task_vectors
from mtmerge.methods import registry
from mtmerge.methods import validate as v

Tree = Any


def _rest(x, lead):
  """The axes after the `lead` leading ones. Statistics reduce over them
  in place: flattening a sharded leaf first would gather it."""
  return tuple(range(lead, x.ndim))


def _task_min_max(tree, lead=1):
  """Per-(leading index) min and max over all entries of all leaves."""
  leaves = jax.tree.leaves(tree)
  mn = jnp.min(jnp.stack([jnp.min(x, axis=_rest(x, lead)) for x in leaves]),
               axis=0)
  mx = jnp.max(jnp.stack([jnp.max(x, axis=_rest(x, lead)) for x in leaves]),
               axis=0)
  return mn, mx


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


def _paper_scores(tvs, T):
  tv32 = jax.tree.map(lambda x: x.astype(jnp.float32), tvs)
  sq_min, sq_max = _task_min_max(jax.tree.map(lambda x: x * x, tv32))
  # Pairwise products [T, T, ...]: normalized and softmaxed per pair (i, j).
  pair_min, pair_max = _task_min_max(
      jax.tree.map(lambda x: x[:, None] * x[None, :], tv32), lead=2)
  il = jax.tree.map(lambda x: intra_logits(x, sq_min, sq_max, T), tv32)
  pl = jax.tree.map(lambda x: inter_logits(x, pair_min, pair_max), tv32)
  _, intra_max = _task_min_max(il)
  _, inter_max = _task_min_max(pl, lead=2)
  st = PaperStats(sq_min, sq_max, pair_min, pair_max, intra_max,
                  sum(exp_sum(x, intra_max) for x in jax.tree.leaves(il)),
                  inter_max,
                  sum(exp_sum(x, inter_max, 2) for x in jax.tree.leaves(pl)))
  return jax.tree.map(lambda x: paper_beta(x, st, T), tv32), tv32


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
  tv32 = jax.tree.map(lambda x: x.astype(jnp.float32), tvs)
  k_lo, k_hi, k_q = official_ranks(sum(
      int(np.prod(x.shape[1:], dtype=np.int64))
      for x in jax.tree.leaves(tv32)), ratio)
  lo = selection.kth_largest(tv32, lambda n: k_lo)
  hi = selection.kth_largest(tv32, lambda n: k_hi)
  a = jax.tree.map(lambda x: official_clip(x, lo, hi), tv32)
  a_min, a_max = _task_min_max(a)
  score = jax.tree.map(lambda x, c: official_score(x, c, a_min, a_max, T),
                       tv32, a)
  # Scores are signed: the quantile is a signed k-th largest.
  q = selection.kth_largest_signed(score, lambda n: k_q)
  s_min, s_max = _task_min_max(score)
  return jax.tree.map(
      lambda x, c, sc: official_merge(x, c, sc, q, s_min, s_max), tv32, a,
      score)


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
  beta, vecs = _paper_scores(tvs, T)
  thr = selection.topk_thresholds(beta, ratio, "global")
  beta = jax.tree.map(lambda b, t: jnp.where(b >= t, b, 0.0), beta, thr)
  return task_vectors.apply(base, jax.tree.map(paper_merge, beta, vecs),
                            scaling_factor)
