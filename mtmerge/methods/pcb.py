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

from mtmerge import selection
from mtmerge import task_vectors
from mtmerge.methods import registry
from mtmerge.methods import validate as v

Tree = Any


def _flat(x):
  return x.reshape(x.shape[0], -1)


def _task_min_max(tree, lead=1):
  """Per-(leading index) min and max over all entries of all leaves."""
  leaves = jax.tree.leaves(tree)
  shp = lambda x: x.reshape(x.shape[:lead] + (-1,))
  mn = jnp.min(jnp.stack([jnp.min(shp(x), axis=-1) for x in leaves]), axis=0)
  mx = jnp.max(jnp.stack([jnp.max(shp(x), axis=-1) for x in leaves]), axis=0)
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
  return jnp.sum(exp_leaf(x, mx, lead).reshape(x.shape[:lead] + (-1,)),
                 axis=-1)


def _minmax(tree, lead=1):
  mn, mx = _task_min_max(tree, lead)
  return jax.tree.map(lambda x: norm_leaf(x, mn, mx, lead), tree)


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


def _official_scores(tvs, T, ratio):
  tv32 = jax.tree.map(lambda x: x.astype(jnp.float32), tvs)
  # Ascending order statistics at index int(n * 1e-4) and int(n * (1-1e-4)) - 1
  # are the (n - i)-th largest.
  lo = selection.kth_largest(tv32, lambda n: n - int(n * 1e-4))
  hi = selection.kth_largest(tv32, lambda n: n - (int(n * (1 - 1e-4)) - 1))
  def clip(x):
    s = (-1,) + (1,) * (x.ndim - 1)
    return jnp.clip(jnp.abs(x), lo.reshape(s), hi.reshape(s))
  a = jax.tree.map(clip, tv32)
  clipped = jax.tree.map(lambda x, c: jnp.sign(x) * c, tv32, a)
  intra = jax.tree.map(lambda x: jnp.exp(T * x * x), _minmax(a))
  total = jax.tree.map(lambda x: jnp.sum(x, axis=0), tv32)
  inter = jax.tree.map(lambda x, s: jnp.tanh(x * s[None]), tv32, total)
  score = jax.tree.map(jnp.multiply, intra, inter)
  # Quantile q at ascending index int(n (1 - ratio)), i.e. the
  # (n - index)-th largest; scores are signed.
  q = selection.kth_largest_signed(score, lambda n: n - int(n * (1 - ratio)))
  raised = jax.tree.map(
      lambda x: jnp.maximum(x, q.reshape((-1,) + (1,) * (x.ndim - 1))), score)
  return _minmax(raised), clipped


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
  if variant == "paper":
    beta, vecs = _paper_scores(tvs, T)
    thr = selection.topk_thresholds(beta, ratio, "global")
    beta = jax.tree.map(lambda b, t: jnp.where(b >= t, b, 0.0), beta, thr)
  else:
    beta, vecs = _official_scores(tvs, T, ratio)
  return task_vectors.apply(base, jax.tree.map(paper_merge, beta, vecs),
                            scaling_factor)
