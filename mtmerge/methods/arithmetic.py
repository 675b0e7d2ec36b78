"""Task arithmetic and its sparsified variants: TA, TIES, DARE, magnitude.

All are chains of `mtmerge.transforms` primitives followed by
`theta_0 + tau_merged`; see each docstring for the paper. TIES runs its
chain as a fused two-pass kernel, and `ties_merging` is orchestrated
(`registry.register(..., jit=False)`): one jitted threshold search, then
per-leaf kernels compiled once per leaf shape, so a first-ever merge of a
152-leaf ViT compiles in seconds instead of ~20 s.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtmerge import selection
from mtmerge import task_vectors
from mtmerge import transforms as tx
from mtmerge.methods import registry
from mtmerge.methods import validate as v
from mtmerge.transforms import combine
from mtmerge.transforms import sparsify

Tree = Any


@registry.register("weight_averaging")
def weight_averaging(base: Tree, tvs: Tree) -> Tree:
  """Uniform average of the fine-tuned models (model soup, "Free Lunch").

  `mean_t theta_t = theta_0 + mean_t tau_t` (Wortsman et al. 2022, "Model
  soups").
  """
  return task_vectors.apply(base, tx.run(tx.mean_tasks(), tvs))


@registry.register("task_arithmetic", validators={
    "scaling_factor": v.coeff("scaling_factor", per_task=True)})
def task_arithmetic(base: Tree, tvs: Tree, scaling_factor: Any = 0.3) -> Tree:
  """`theta_0 + lambda * sum_t tau_t` (Ilharco et al. 2023).

  Args:
    scaling_factor: lambda, a number or one per task (FusionBench: 0.3).
  """
  T = task_vectors.num_tasks(tvs)
  chain = tx.chain(tx.scale(tx.check_coeffs(scaling_factor, T)),
                   tx.sum_tasks())
  return task_vectors.apply(base, tx.run(chain, tvs))


# The threshold search over all leaves as one program per (shapes, fraction,
# scope), returning one flat vector (~1 s to compile at 152 leaves).
_flat_thresholds = jax.jit(selection.flat_thresholds,
                           static_argnames=("fraction", "scope", "count"))


def _ties_thresholds(tvs: Tree, threshold: float, scope: str) -> Tree:
  """Per-leaf TIES thresholds; all zero (keep everything) at threshold 1."""
  tx.check_fraction("threshold", threshold)
  if threshold >= 1.0:
    zero = jnp.zeros((), jnp.float32)
    return jax.tree.map(lambda x: zero, tvs)
  return selection.topk_thresholds(tvs, threshold, scope)


def _ties_flat_thresholds(tvs: Tree, threshold: float, scope: str,
                          count: str = "round"):
  """`(flat thresholds, per-leaf offsets)` from one jitted search."""
  tx.check_fraction("threshold", threshold)
  offsets = selection.threshold_offsets(tvs, scope)
  if threshold >= 1.0:  # keep everything
    T = task_vectors.num_tasks(tvs)
    return jnp.zeros((T,), jnp.float32), [0] * len(offsets)
  k = None if count == "round" else sparsify.RankCount(
      "keep", float(threshold), rounding=count)
  return _flat_thresholds(tvs, fraction=threshold, scope=scope,
                          count=k), offsets


def ties_vector(tvs: Tree, threshold: float = 0.2, merge_func: str = "sum",
                scope: str = "global", sign_method: str = "sum",
                zero_sign: str = "majority", weights: Any = None,
                prep: Tree | None = None) -> Tree:
  """The unscaled TIES vector: trim -> (weight) -> elect sign -> disjoint merge.

  Runs as `selection.topk_thresholds` plus one fused two-pass kernel
  (`transforms.trimmed_disjoint_merge`), equal to the primitive chain
  `trim_by_magnitude -> scale_per_task -> elect_sign -> disjoint_merge`.
  `prep` (threshold 1 only: the search would read the raw slices) as
  `trimmed_disjoint_merge`.
  """
  if prep is not None and threshold < 1.0:
    raise ValueError("ties_vector: prep needs threshold=1.0")
  T = task_vectors.num_tasks(tvs)
  if weights is not None:
    weights = tx.check_coeffs(weights, T, "weights")
  thr = _ties_thresholds(tvs, threshold, scope)
  return tx.trimmed_disjoint_merge(tvs, thr, sign_method, zero_sign,
                                   merge_func, weights, prep)


_TIES_STATIC = ("threshold", "merge_func", "scope", "sign_method",
                "zero_sign")
_TIES_VALIDATORS = {
    "threshold": v.fraction("threshold"),
    "merge_func": v.choice("merge_func", ("mean", "sum", "max")),
    "scope": v.choice("scope", ("global", "per_tensor")),
    "sign_method": v.choice("sign_method", ("sum", "count")),
    "zero_sign": v.choice("zero_sign", ("majority", "positive")),
    "scaling_factor": v.coeff("scaling_factor"),
}


@registry.register("ties_merging", static=_TIES_STATIC + ("count",),
                   validators={**_TIES_VALIDATORS, "count": v.choice(
                       "count", ("round", "floor"))}, jit=False)
def ties_merging(base: Tree, tvs: Tree, scaling_factor: Any = 0.3,
                 threshold: float = 0.2, merge_func: str = "sum",
                 scope: str = "global", sign_method: str = "sum",
                 zero_sign: str = "majority", weights: Any = None,
                 count: str = "round") -> Tree:
  """TIES-Merging: trim, elect sign, disjoint merge (Yadav et al. 2023).

  Args:
    scaling_factor: lambda applied to the merged vector. Consistent pairs:
      (`merge_func='sum'`, 0.3) as FusionBench / AdaMerging code, or
      (`'mean'`, ~1.0) as the paper.
    threshold: fraction of each task vector's entries KEPT (paper's k=20%).
    merge_func: disjoint `mean`, `sum` or `max` over agreeing tasks.
    scope: `global` (top-k over the whole task vector, the paper) or
      `per_tensor` (mergekit).
    sign_method: `sum` (paper) or `count` votes.
    zero_sign: a zero vote becomes the overall `majority` sign (official
      code) or `positive` (mergekit).
    weights: optional per-task weights applied before the vote, with the
      disjoint mean divided by the agreeing weights (mergekit's `ties`).
    count: entries kept of n: `round` = round(threshold * n) half up, at
      least 1 (default), or `floor` = max(1, int(threshold * n)) (mergekit).

  Runs orchestrated (`jit=False`): the jitted threshold search, then
  `combine.ties_apply`'s per-leaf kernels, which add `scaling_factor * tau`
  to `base` leaf by leaf; equal to `task_vectors.apply(base,
  ties_vector(...), scaling_factor)`.
  """
  T = task_vectors.num_tasks(tvs)
  if weights is not None:
    weights = tx.check_coeffs(weights, T, "weights")
  thr, offsets = _ties_flat_thresholds(tvs, threshold, scope, count)
  return combine.ties_apply(base, tvs, thr, scaling_factor, sign_method,
                            zero_sign, merge_func, weights, offsets)


@registry.register("magnitude_prune", static=("threshold", "scope"),
                   validators={"threshold": v.fraction("threshold"),
                               "scope": v.choice("scope", (
                                   "global", "per_tensor", "row")),
                               "scaling_factor": v.coeff("scaling_factor",
                                                         per_task=True)})
def magnitude_prune(base: Tree, tvs: Tree, threshold: float = 0.2,
                    scope: str = "per_tensor", scaling_factor: Any = 1.0
                    ) -> Tree:
  """Magnitude-pruned task arithmetic (mergekit's `magnitude` sparsification).

  Keeps the top `threshold` fraction of each task vector by magnitude
  (per tensor by default), then `theta_0 + lambda * sum_t tau_t`.
  """
  T = task_vectors.num_tasks(tvs)
  chain = tx.chain(tx.trim_by_magnitude(threshold, scope),
                   tx.scale(tx.check_coeffs(scaling_factor, T)),
                   tx.sum_tasks())
  return task_vectors.apply(base, tx.run(chain, tvs))


_DARE_VALIDATORS = {"drop_rate": v.fraction("drop_rate", allow_zero=True),
                    "scaling_factor": v.coeff("scaling_factor", per_task=True),
                    "seed": v.integer("seed")}


@registry.register("dare", static=("drop_rate", "rescale"),
                   validators=_DARE_VALIDATORS)
def dare(base: Tree, tvs: Tree, drop_rate: float = 0.5,
         scaling_factor: Any = 0.3, seed: int = 0, rescale: bool = True
         ) -> Tree:
  """DARE + task arithmetic (Yu et al. 2024, "Language Models are Super Mario").

  Drops each task-vector entry with probability `drop_rate`, rescales the
  survivors by `1 / (1 - drop_rate)`, then `theta_0 + lambda * sum_t tau_t`.
  The PRNG key is `jax.random.key(seed)`, folded per leaf.
  """
  T = task_vectors.num_tasks(tvs)
  chain = tx.chain(
      tx.drop_and_rescale(drop_rate, jax.random.key(seed), rescale),
      tx.scale(tx.check_coeffs(scaling_factor, T)), tx.sum_tasks())
  return task_vectors.apply(base, tx.run(chain, tvs))


@registry.register(
    "dare_ties", static=("drop_rate", "rescale") + _TIES_STATIC,
    validators={**_DARE_VALIDATORS, **_TIES_VALIDATORS})
def dare_ties(base: Tree, tvs: Tree, drop_rate: float = 0.5,
              scaling_factor: Any = 0.3, threshold: float = 1.0,
              merge_func: str = "sum", scope: str = "global",
              sign_method: str = "sum", zero_sign: str = "majority",
              weights: Any = None, seed: int = 0, rescale: bool = True
              ) -> Tree:
  """DARE followed by TIES (Yu et al. 2024).

  With `threshold=1.0` (default) the random drop replaces TIES' magnitude
  trim, as in mergekit's `dare_ties`, and each TIES pass recomputes the
  survivors from the bool drop masks (no dropped copy of the task vectors
  is kept across the model-wide vote); a threshold < 1 trims the dropped
  vectors as well.
  """
  key = jax.random.key(seed)
  if threshold >= 1.0:
    prep = sparsify.drop_and_rescale_slices(drop_rate, key, tvs, rescale)
    return task_vectors.apply(base, ties_vector(
        tvs, threshold, merge_func, scope, sign_method, zero_sign, weights,
        prep), scaling_factor)
  dropped = tx.run(tx.drop_and_rescale(drop_rate, key, rescale), tvs)
  tau = ties_vector(dropped, threshold, merge_func, scope, sign_method,
                    zero_sign, weights)
  return task_vectors.apply(base, tau, scaling_factor)
