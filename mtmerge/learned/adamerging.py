"""AdaMerging: merge coefficients learned by test-time entropy minimization.

"AdaMerging: Adaptive Model Merging for Multi-Task Learning" (Yang et al.,
ICLR 2024): theta = theta_0 + sum_t lambda_t tau_t with one coefficient per
task (task-wise) or one per task per parameter tensor (layer-wise), learned
by minimizing the Shannon entropy of the merged model's predictions on
unlabeled test batches of every task (summed over tasks). Coefficients start
at 0.3 and are kept in [0, 1]; Adam with lr 1e-3, betas (0.9, 0.999).

Two ways to keep them in bounds (`clamp_mode`):

* "project" (default): projected gradient descent; the stored coefficients
  are clipped after every step.
* "merge": the official code's (and FusionBench's `clamp_weights=True`)
  way: the merge uses `clip(lambda)` and the stored coefficients are raw,
  so a coefficient past a bound gets no gradient through the clip and
  stays at the bound in the merge (its raw value drifts on with Adam's
  decaying momentum).

The two agree until a coefficient reaches a bound. "AdaMerging++" applies
the same search to TIES-processed task vectors (each trimmed to its top
20% by magnitude, entries disagreeing with the elected sign dropped).

The whole loop is `mtmerge.train.fit`: sharded over the mesh (task vectors
along its `task` axis, batches along `data`), checkpointed and resumable.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import encoders
from mtmerge import sharding
from mtmerge import train
from mtmerge import transforms
from mtmerge.learned import common
from mtmerge.learned import problem as problem_lib

Tree = Any
GRANULARITIES = ("task", "layer")
CLAMP_MODES = ("project", "merge")
TRAIN_DEFAULTS = dict(steps=500, optimizer="adam", lr=1e-3)


@functools.partial(jax.jit, static_argnums=1)
def ties_processed(tvs: Tree, threshold: float = 0.2) -> Tree:
  """AdaMerging++'s task vectors: TIES trim + sign election, per task.

  Each task vector keeps its top `threshold` fraction of entries by
  magnitude (over the whole vector), then entries whose sign disagrees with
  the elected sign (sign of the sum over tasks) are zeroed. Unlike TIES no
  disjoint mean is taken: the tasks stay separate for their coefficients.
  One jitted program (eager, the threshold search alone dispatched ~150
  small programs: ~20 s of the default benchmark's AdaMerging++ row).
  """
  trimmed = transforms.run(transforms.trim_by_magnitude(threshold), tvs)
  signs = transforms.elected_signs(trimmed)
  return jax.tree.map(
      lambda x, s: jnp.where(jnp.sign(x) == s[None].astype(x.dtype), x, 0),
      trimmed, signs)


def init_coeffs(base: Tree, num_tasks: int, granularity: str,
                init: float = 0.3) -> Tree:
  """Initial coefficients: `[T]` (task) or a tree of `[T]` (layer)."""
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got "
                     f"{granularity!r}")
  c = np.full((num_tasks,), init, np.float32)
  if granularity == "task":
    return c
  return jax.tree.map(lambda _: c.copy(), base)


def clipper(clamp: tuple[float, float] | None):
  """`c -> c` clipped to `clamp` leaf by leaf (identity for None)."""
  if clamp is None:
    return lambda c: c
  lo, hi = clamp
  return lambda c: jax.tree.map(lambda x: jnp.clip(x, lo, hi), c)


def entropy_objective(problem: problem_lib.MergeProblem, tvs: Tree,
                      coeffs: Tree, clamp: tuple[float, float] | None,
                      groups: Tree | None = None,
                      clamp_mode: str = "project") -> train.Objective:
  """Sum over tasks of the merged model's mean prediction entropy.

  `clamp_mode` "project" clips the coefficients after each step; "merge"
  clips them inside the merge only (see the module docstring).
  """
  if clamp_mode not in CLAMP_MODES:
    raise ValueError(f"clamp_mode must be one of {CLAMP_MODES}, got "
                     f"{clamp_mode!r}")
  consts = {"base": problem.base, "tvs": tvs, "heads": problem.heads}
  if groups is not None:
    consts["groups"] = groups
  clip = clipper(clamp)
  in_merge = clip if clamp_mode == "merge" else (lambda c: c)

  def loss(c, k, batch, rng):
    del rng
    merged = common.weighted_merge(k["base"], k["tvs"], in_merge(c),
                                   k.get("groups"))
    task_entropy = lambda p, head, inputs: common.entropy(
        encoders.logits(head, problem.features(p, inputs)))
    total, per_task = common.task_by_task(
        task_entropy, merged, common.pad_heads(k["heads"]), batch)
    return total, {f"entropy/{t}": h for t, h in per_task.items()}

  project = clip if clamp is not None and clamp_mode == "project" else None
  return train.Objective(coeffs, loss, consts, project)


def adamerging(problem: problem_lib.MergeProblem, *,
               granularity: str = "layer", plus: bool = False,
               init: float = 0.3, clamp: Sequence[float] | None = (0.0, 1.0),
               clamp_mode: str = "project", batch_size: int = 16,
               split: str = "test",
               limit: int | None = None, ties_threshold: float = 0.2,
               train_config: dict | None = None, mesh=None,
               rules: Sequence[tuple[str, Any]] | None = None,
               workdir: str | None = None, progress: bool = True
               ) -> common.LearnedResult:
  """Learns AdaMerging coefficients; returns the merged params.

  Args:
    problem: the merge problem.
    granularity: `task` (one lambda per task) or `layer` (one per task per
      parameter tensor).
    plus: AdaMerging++ (TIES-processed task vectors).
    init: initial coefficient.
    clamp: `(low, high)` bounds of the coefficients (None: off).
    clamp_mode: "project" (clip the coefficients after every step) or
      "merge" (clip them in the merge only, as the official code does).
    batch_size: unlabeled examples per task per step.
    split: the split adapted on (the paper: `test`, inputs only).
    limit: use only the first `limit` examples of each split.
    ties_threshold: AdaMerging++'s kept fraction.
    train_config: `mtmerge.train.TrainConfig` overrides (default 500 Adam
      steps at lr 1e-3).
    mesh: device mesh (default from the train config).
    rules: parameter sharding rules for theta_0 and the task vectors.
    workdir: checkpoint directory (resumable; None: none).
    progress: progress bar.

  Returns:
    `LearnedResult` with the merged params and the coefficients the merge
    uses (clipped, in "merge" mode).
  """
  cfg = common.train_config(TRAIN_DEFAULTS, train_config)
  if clamp is not None and (len(clamp) != 2 or clamp[0] > clamp[1]):
    raise ValueError(f"clamp must be (low, high) with low <= high, got "
                     f"{clamp}")
  coeffs = init_coeffs(problem.base, problem.num_tasks, granularity, init)
  tvs = ties_processed(problem.tvs, ties_threshold) if plus else problem.tvs
  clamp = None if clamp is None else tuple(clamp)
  objective = entropy_objective(problem, tvs, coeffs, clamp,
                                clamp_mode=clamp_mode)
  mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
  batches = common.task_batches(problem, split, batch_size, seed=cfg.seed,
                                limit=limit)
  res = train.fit(
      objective, batches, cfg, mesh=mesh,
      const_shardings=common.const_shardings(mesh, objective.consts, rules),
      workdir=workdir, desc=f"adamerging {granularity}{'++' if plus else ''}",
      fingerprint=dict(method="adamerging", granularity=granularity,
                       plus=plus, init=init, clamp=clamp,
                       batch_size=batch_size, split=split, limit=limit,
                       ties_threshold=ties_threshold, tasks=problem.tasks,
                       # Only when set, so runs from before the option
                       # still resume.
                       **({} if clamp_mode == "project" else
                          {"clamp_mode": clamp_mode})),
      progress=progress)
  learned = jax.tree.map(np.asarray, clipper(clamp)(res.params))
  # One jitted merge, left on device (no host copy of the merged model).
  merged = jax.jit(common.weighted_merge)(problem.base, tvs, learned)
  return common.LearnedResult(merged, learned, res.log, {})
