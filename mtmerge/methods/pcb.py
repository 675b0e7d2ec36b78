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

from typing import Any

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


def _minmax(tree, lead=1):
  mn, mx = _task_min_max(tree, lead)
  rng = jnp.where(mx > mn, mx - mn, 1.0)
  def one(x):
    s = mn.shape + (1,) * (x.ndim - lead)
    return (x - mn.reshape(s)) / rng.reshape(s)
  return jax.tree.map(one, tree)


def _softmax(logits, lead=1):
  """Softmax over all entries of all leaves, per leading index."""
  _, mx = _task_min_max(logits, lead)
  def ex(x):
    return jnp.exp(x - mx.reshape(mx.shape + (1,) * (x.ndim - lead)))
  e = jax.tree.map(ex, logits)
  z = sum(jnp.sum(x.reshape(x.shape[:lead] + (-1,)), axis=-1)
          for x in jax.tree.leaves(e))
  return jax.tree.map(lambda x: x / z.reshape(z.shape + (1,) * (x.ndim - lead)),
                      e)


def _paper_scores(tvs, T):
  tv32 = jax.tree.map(lambda x: x.astype(jnp.float32), tvs)
  intra = _softmax(jax.tree.map(lambda x: T * x, _minmax(
      jax.tree.map(lambda x: x * x, tv32))))
  # Pairwise products [T, T, ...]: normalized and softmaxed per pair (i, j).
  pair = jax.tree.map(lambda x: x[:, None] * x[None, :], tv32)
  inter = jax.tree.map(lambda s: jnp.sum(s, axis=1),
                       _softmax(_minmax(pair, lead=2), lead=2))
  return jax.tree.map(jnp.multiply, intra, inter), tv32


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
  def merge(b, x):
    den = jnp.maximum(jnp.sum(b, axis=0), 1e-12)
    return jnp.sum(b * x, axis=0) / den
  return task_vectors.apply(base, jax.tree.map(merge, beta, vecs),
                            scaling_factor)
