"""TSV-Merge: Task Singular Vectors (Gargiulo et al. 2025, "Task Singular
Vectors: Reducing Task Interference in Model Merging"; official
AntoAndGar/task_singular_vectors).

Per 2-D leaf, each task's update is truncated to its top `k = min(m, n) // T`
singular triplets; the concatenated left and right singular vectors are
decorrelated by replacing each with its orthogonal polar factor, and the
merged update is `U_perp diag(S) V_perp^T`. Other leaves are averaged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtmerge import task_vectors
from mtmerge.methods import registry
from mtmerge.methods import validate as v

Tree = Any


def polar_factor(a: jax.Array) -> jax.Array:
  """The orthogonal polar factor `P Q^T` of `a = P S Q^T` (thin SVD)."""
  p, _, qt = jnp.linalg.svd(a, full_matrices=False)
  return p @ qt


def tsv_matrix(x: jax.Array) -> jax.Array:
  """TSV-merged update of one stacked 2-D leaf `[T, m, n]` (float32)."""
  T, m, n = x.shape
  k = max(min(m, n) // T, 1)
  u, s, vt = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=False)
  u, s, vt = u[:, :, :k], s[:, :k], vt[:, :k, :]
  # Concatenate along the rank axis: U [m, T k], S [T k], V^T [T k, n].
  u_cat = jnp.transpose(u, (1, 0, 2)).reshape(m, T * k)
  s_cat = s.reshape(T * k)
  vt_cat = vt.reshape(T * k, n)
  u_perp = polar_factor(u_cat)
  vt_perp = polar_factor(vt_cat.T).T
  return (u_perp * s_cat[None, :]) @ vt_perp


@registry.register("tsv_merging", validators={"alpha": v.coeff("alpha")})
def tsv_merging(base: Tree, tvs: Tree, alpha: Any = 1.0) -> Tree:
  """TSV-M: per 2-D leaf low-rank, decorrelated merge; `theta_0 + alpha * delta`.

  Args:
    alpha: global scaling (paper searches 0.1-3.0; FusionBench default 1.0).

  Leaves that are not matrices (biases, norms, 3-D+ kernels) get the mean
  task vector, as in the official code.
  """
  def one(x):
    if x.ndim == 3:
      return tsv_matrix(x).astype(x.dtype)
    return jnp.mean(x.astype(jnp.float32), axis=0).astype(x.dtype)
  return task_vectors.apply(base, jax.tree.map(one, tvs), alpha)
