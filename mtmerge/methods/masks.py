"""Mask-based methods: TALL masks, Consensus merging, EMR-Merging.

* TALL masks and Consensus: Wang et al. 2024, "Localizing Task Information
  for Improved Model Merging and Compression" (official nik-dim/tall_masks).
* EMR-Merging: Huang et al. 2024, "EMR-Merging: Tuning-Free High-Performance
  Model Merging" (official harveyhuang18/EMR_Merging).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtmerge import task_vectors
from mtmerge import transforms as tx
from mtmerge import tree as tree_lib
from mtmerge.methods import arithmetic
from mtmerge.methods import compressed
from mtmerge.methods import registry
from mtmerge.methods import validate as v

Tree = Any


def _base_vector(tvs, base_method, threshold, merge_func):
  if base_method == "task_arithmetic":
    return tx.run(tx.sum_tasks(), tvs)
  return arithmetic.ties_vector(tvs, threshold, merge_func)


def tall_masks(tvs: Tree, tau_mtl: Tree, tall_mask_lambda: Any) -> Tree:
  """`m_t = |tau_t| > lambda_t * |tau_MTL - tau_t|`, bool leaves `[T, ...]`.

  Args:
    tvs: stacked task vectors.
    tau_mtl: the multi-task vector (unscaled sum, or the TIES vector).
    tall_mask_lambda: lambda, one number or one per task.
  """
  T = task_vectors.num_tasks(tvs)
  lam = tx.check_coeffs(tall_mask_lambda, T, "tall_mask_lambda")
  lam = jnp.broadcast_to(lam, (T,))

  def one(x, m):
    x = x.astype(jnp.float32)
    lt = lam.reshape((T,) + (1,) * (x.ndim - 1))
    return jnp.abs(x) > lt * jnp.abs(m.astype(jnp.float32)[None] - x)
  return jax.tree.map(one, tvs, tau_mtl)


_LAMBDA = {"tall_mask_lambda": v.coeff("tall_mask_lambda", per_task=True)}
_BASE = {"base_method": v.choice("base_method", ("task_arithmetic", "ties")),
         "threshold": v.fraction("threshold"),
         "merge_func": v.choice("merge_func", ("mean", "sum", "max"))}


@registry.register("tall_mask", compressed=True,
                   static=("base_method", "threshold", "merge_func"),
                   validators={**_LAMBDA, **_BASE})
def tall_mask(base: Tree, tvs: Tree, tall_mask_lambda: Any = 0.6,
              base_method: str = "task_arithmetic", threshold: float = 0.2,
              merge_func: str = "sum") -> compressed.Compressed:
  """TALL masks: one merged vector + a bit-packed mask per task.

  Task t is served as `theta_0 + m_t * tau_MTL` (coefficient 1.0, as the
  paper) with `tau_MTL = sum_t tau_t` (or the unscaled TIES vector when
  `base_method='ties'`). The paper picks `tall_mask_lambda` per task on
  validation data from {0.2, ..., 0.6}; pass a list for per-task values.
  Unlike FusionBench, the left side is `|tau_t|` (the paper's equation).
  """
  del base
  tau = _base_vector(tvs, base_method, threshold, merge_func)
  return compressed.compress(tau, tall_masks(tvs, tau, tall_mask_lambda))


@registry.register("consensus",
                   static=("k", "base_method", "threshold", "merge_func"),
                   validators={**_LAMBDA, **_BASE, "k": v.integer("k", lo=0),
                               "scaling_factor": v.coeff("scaling_factor")})
def consensus(base: Tree, tvs: Tree, k: int = 2, tall_mask_lambda: Any = 0.6,
              scaling_factor: Any = 0.3, base_method: str = "task_arithmetic",
              threshold: float = 0.2, merge_func: str = "sum") -> Tree:
  """Consensus merging: keep entries that at least k TALL masks use.

  `theta_0 + lambda * 1{sum_t m_t >= k} * tau_base`, where `tau_base` is
  the TA sum or the TIES vector and the masks are built from that same
  vector. k=2 drops "selfish" (one task) and "catastrophic" (no task)
  weights.
  """
  tau = _base_vector(tvs, base_method, threshold, merge_func)
  masks = tall_masks(tvs, tau, tall_mask_lambda)
  keep = jax.tree.map(
      lambda m: jnp.sum(m.astype(jnp.int32), axis=0) >= k, masks)
  merged = jax.tree.map(lambda x, m: jnp.where(m, x, 0), tau, keep)
  return task_vectors.apply(base, merged, scaling_factor)


def emr_unified(x: jax.Array) -> jax.Array:
  """One leaf's tau_uni: the elected sign times the largest agreeing |tau_t|."""
  x = x.astype(jnp.float32)
  sign = jnp.where(jnp.sum(x, axis=0) > 0, 1.0, -1.0)
  mag = jnp.max(jnp.where(x * sign > 0, jnp.abs(x), 0.0), axis=0)
  return sign * mag


def emr_masks(x: jax.Array, u: jax.Array) -> jax.Array:
  """One leaf's task masks `M_t = (tau_t * tau_uni > 0)`, bool `[T, ...]`."""
  return x.astype(jnp.float32) * u[None] > 0


def emr_mean_abs(x: jax.Array, u: jax.Array, m: jax.Array):
  """One leaf's `(mean|tau_t|, mean|M_t * tau_uni|)`, each `[T]`."""
  def per_task_mean(y):  # [T, ...] -> [T]
    y = jnp.abs(y.astype(jnp.float32))
    if not jax.sharding.get_abstract_mesh().empty:
      # Under a mesh: reduce in place; flattening a sharded leaf gathers it.
      return jnp.mean(y, axis=tuple(range(1, y.ndim)))
    return jnp.mean(y.reshape(y.shape[0], -1), axis=1)
  return per_task_mean(x), per_task_mean(jnp.where(m, u[None], 0.0))


def emr_rescalers(num: jax.Array, den: jax.Array) -> jax.Array:
  """`num / den` per task from the model-wide sums of the leaves' means.

  A task whose mask is empty is served by the base model: rescaler 0.
  """
  return jnp.where(den == 0, 0.0, num / jnp.where(den == 0, 1.0, den))


def emr_compress(tvs: Tree) -> compressed.Compressed:
  """EMR's unified vector, per-task masks and rescalers.

  * sign: `sign(sum_t tau_t)`, a zero sum counting as -1 (official code);
  * tau_uni: that sign times the largest |tau_t| among tasks agreeing with
    it (`emr_unified`);
  * masks: `M_t = (tau_t * tau_uni > 0)` (`emr_masks`);
  * rescalers: `sum_leaves mean|tau_t| / sum_leaves mean|M_t * tau_uni|`
    (per-leaf partials `emr_mean_abs`, combined by `emr_rescalers`).
  """
  tau_uni = jax.tree.map(emr_unified, tvs)
  masks = jax.tree.map(emr_masks, tvs, tau_uni)
  parts = [emr_mean_abs(x, u, m) for x, u, m in zip(
      jax.tree.leaves(tvs), jax.tree.leaves(tau_uni), jax.tree.leaves(masks))]
  rescalers = emr_rescalers(sum(p[0] for p in parts),
                            sum(p[1] for p in parts))
  tau_uni = tree_lib.cast_like(tau_uni, jax.tree.map(lambda x: x[0], tvs))
  return compressed.compress(tau_uni, masks, rescalers)


@registry.register("emr_merging", compressed=True)
def emr_merging(base: Tree, tvs: Tree) -> compressed.Compressed:
  """EMR-Merging (tuning-free): unified vector + task masks + rescalers.

  Task t is served as `theta_0 + lambda_t * M_t * tau_uni`; inference needs
  the task id. See `emr_compress` for the equations.
  """
  del base
  return emr_compress(tvs)
