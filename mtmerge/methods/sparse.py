"""Deterministic and magnitude-aware sparsification: Breadcrumbs and DELLA.

* Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling
  Multi-Task Model Merging with Sparse Masks"; official rezazzr/breadcrumbs).
* DELLA-Merging (Deep et al. 2024, "DELLA-Merging: Reducing Interference in
  Model Merging through Magnitude-Based Sampling"; declare-lab/della).
"""

from __future__ import annotations

from typing import Any

import jax

from mtmerge import task_vectors
from mtmerge import transforms as tx
from mtmerge.methods import registry
from mtmerge.methods import validate as v

Tree = Any


@registry.register(
    "breadcrumbs", static=("threshold", "gamma", "scope", "count"),
    validators={"threshold": v.fraction("threshold"),
                "gamma": v.fraction("gamma", allow_zero=True),
                "scope": v.choice("scope", ("row", "per_tensor")),
                "scaling_factor": v.coeff("scaling_factor", per_task=True),
                "count": v.choice("count", ("round", "floor"))})
def breadcrumbs(base: Tree, tvs: Tree, threshold: float = 0.15,
                gamma: float = 0.006, scaling_factor: Any = 0.2,
                scope: str = "row", count: str = "round") -> Tree:
  """Model Breadcrumbs: drop outliers and small entries, then task arithmetic.

  Per row of the last axis (`scope='row'`, the official code; mergekit uses
  `per_tensor`), the largest `gamma` fraction of |tau_t| is removed and the
  next `threshold` fraction kept. Defaults are the official search's start
  point (kept 0.15, removed 0.006, lambda 0.2). Counts round half up
  (`count='round'`) or down (`'floor'`, mergekit's `int(fraction * n)`).
  """
  T = task_vectors.num_tasks(tvs)
  chain = tx.chain(tx.remove_outliers_and_trim(threshold, gamma, scope,
                                               count),
                   tx.scale(tx.check_coeffs(scaling_factor, T)),
                   tx.sum_tasks())
  return task_vectors.apply(base, tx.run(chain, tvs))


@registry.register(
    "della", static=("drop_rate", "epsilon", "rescale"),
    validators={"drop_rate": v.fraction("drop_rate", allow_zero=True),
                "epsilon": v.number("epsilon", 0.0, 0.5),
                "scaling_factor": v.coeff("scaling_factor"),
                "seed": v.integer("seed")})
def della(base: Tree, tvs: Tree, drop_rate: float = 0.3,
          epsilon: float = 0.07, scaling_factor: Any = 1.1, seed: int = 0,
          rescale: bool = True) -> Tree:
  """DELLA: MagPrune, then TIES sign election and disjoint mean.

  Per row, entries are kept with probability `(1 - p - eps) + 2 eps r`
  (r = ascending magnitude rank in [0, 1]) and rescaled by its inverse;
  then the sign is elected, disagreeing entries dropped, the rest averaged,
  and `theta_0 + lambda * tau`. Defaults follow the paper's example.
  """
  steps = tx.chain(
      tx.magnitude_rank_drop(drop_rate, epsilon, jax.random.key(seed),
                             rescale),
      tx.elect_sign("sum"), tx.disjoint_merge("mean"))
  return task_vectors.apply(base, tx.run(steps, tvs), scaling_factor)
