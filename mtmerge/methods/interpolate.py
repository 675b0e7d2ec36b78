"""Geometric merges mergekit users expect: SLERP and Model Stock.

* SLERP (Shoemake 1985; as used for LLM merging by mergekit): per tensor,
  spherical interpolation between two models, falling back to linear
  interpolation when they are nearly colinear.
* Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few
  fine-tuned models"): per tensor, `t = N cos / (1 + (N - 1) cos)` with cos
  the mean pairwise cosine between task vectors, then
  `theta = t * mean_t theta_t + (1 - t) * theta_0`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtmerge import task_vectors
from mtmerge.methods import registry
from mtmerge.methods import validate as v

Tree = Any

_DOT_THRESHOLD = 0.9995


def slerp_tensors(a: jax.Array, b: jax.Array, t: Any, epsilon: float = 1e-8
                  ) -> jax.Array:
  """Spherical interpolation from `a` (t=0) to `b` (t=1), float32.

  The angle is measured between the flattened, normalized tensors; when
  `|cos| > 0.9995` it returns the linear interpolation (mergekit's rule).
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
  an = jnp.where(na > epsilon, a / jnp.where(na > epsilon, na, 1.0), a)
  bn = jnp.where(nb > epsilon, b / jnp.where(nb > epsilon, nb, 1.0), b)
  return slerp_mix(a, b, t, jnp.sum(an * bn))


def slerp_mix(a: jax.Array, b: jax.Array, t: Any, dot: jax.Array
              ) -> jax.Array:
  """SLERP of float32 `a`, `b` given the cosine `dot` of their directions.

  Shared by `slerp_tensors` and the streamed executor, which sums `dot`
  over row blocks.
  """
  lerp = (1.0 - t) * a + t * b
  theta0 = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
  sin0 = jnp.sin(theta0)
  safe = jnp.where(jnp.abs(dot) > _DOT_THRESHOLD, 1.0, sin0)
  s0 = jnp.sin(theta0 - theta0 * t) / safe
  s1 = jnp.sin(theta0 * t) / safe
  return jnp.where(jnp.abs(dot) > _DOT_THRESHOLD, lerp, s0 * a + s1 * b)


@registry.register("slerp", min_tasks=1, max_tasks=2,
                   validators={"t": v.number("t", 0.0, 1.0),
                               "epsilon": v.number("epsilon", 0.0)})
def slerp(base: Tree, tvs: Tree, t: Any = 0.5, epsilon: float = 1e-8) -> Tree:
  """SLERP per tensor: base -> model (one model) or model 1 -> model 2 (two).

  With one fine-tuned model this is mergekit's `slerp` (t=0 gives the base);
  with two it interpolates between them (t=0 gives the first).
  """
  task_vectors.num_tasks(tvs)  # checks the task axis

  def one(b, x):
    a, c = slerp_ends(b, x)
    return slerp_tensors(a, c, t, epsilon).astype(b.dtype)
  return jax.tree.map(one, base, tvs)


def slerp_ends(b: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The float32 end points of `slerp`: (base, model) or (model 1, model 2)."""
  b32 = b.astype(jnp.float32)
  if x.shape[0] == 1:
    return b32, b32 + x[0].astype(jnp.float32)
  return b32 + x[0].astype(jnp.float32), b32 + x[1].astype(jnp.float32)


def _pairwise_mean_cos(x: jax.Array, eps: float) -> jax.Array:
  """Mean cosine over task pairs i < j of the task vectors `x` [T, ...].

  Each cosine divides by `max(|x_i| |x_j|, eps)` and is clipped to [-1, 1]
  (mergekit's convention).
  """
  # Reduced over the leaf's axes in place (flattening would gather a
  # sharded leaf), in float32 from x as it is (bf16 products are exact in
  # float32), so no float32 copy of the leaf is made.
  axes = tuple(range(1, x.ndim))
  gram = jnp.tensordot(x, x, axes=(axes, axes),
                       preferred_element_type=jnp.float32)
  return mean_cos_from_gram(gram, jnp.sqrt(jnp.diagonal(gram)), eps)


def mean_cos_from_gram(gram: jax.Array, norms: jax.Array, eps: float
                       ) -> jax.Array:
  """Mean pairwise cosine (i < j) from a Gram matrix `[T, T]` and norms.

  Shared by `model_stock` and the streamed executor (which sums the Gram
  matrix over row blocks).
  """
  T = gram.shape[0]
  gram = gram / jnp.maximum(norms[:, None] * norms[None, :], eps)
  iu = jnp.triu_indices(T, k=1)
  return jnp.mean(jnp.clip(gram[iu], -1.0, 1.0))


@registry.register("model_stock", min_tasks=2,
                   validators={"epsilon": v.number("epsilon", 0.0)})
def model_stock(base: Tree, tvs: Tree, epsilon: float = 1e-6) -> Tree:
  """Model Stock per tensor: `theta_0 + t * mean_t tau_t`.

  `t = N cos / (1 + (N - 1) cos)`, cos = mean pairwise cosine similarity of
  the flattened task vectors of that tensor (norm products floored at
  `epsilon`, as mergekit).
  """
  def one(b, x):
    return model_stock_apply(b, x, _pairwise_mean_cos(x, epsilon))
  return jax.tree.map(one, base, tvs)


def model_stock_apply(b: jax.Array, x: jax.Array, cos: jax.Array
                      ) -> jax.Array:
  """`theta_0 + t * mean_t tau_t`, t from the mean cosine (rows or whole)."""
  n = x.shape[0]
  t = n * cos / (1.0 + (n - 1) * cos)
  out = b.astype(jnp.float32) + t * jnp.mean(x.astype(jnp.float32), axis=0)
  return out.astype(b.dtype)
