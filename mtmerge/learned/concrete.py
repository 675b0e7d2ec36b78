"""Concrete subspace learning: a shared mask over task-vector entries.

"Concrete Subspace Learning based Interference Elimination for Multi-task
Model Fusion" (Tang et al., 2023; tanganke/subspace_fusion). One mask logit
per entry of every parameter leaf, shared by all tasks and initialized to 0,
defines a binary concrete (relaxed Bernoulli, Maddison et al. 2017; Jang et
al. 2017) distribution with temperature 0.5. Every step draws

  m = sigmoid((logits + log u - log(1 - u)) / temperature),  u ~ U(0, 1),

rescales it per leaf to mean 1 (m / mean(m)) and merges the masked task
vectors m * tau_t; the logits minimize the prediction entropy of the merged
model on unlabeled test batches (summed over tasks), with Adam lr 1e-3.

* Concrete Task Arithmetic: theta_0 + lambda sum_t m * tau_t, lambda 0.3,
  2000 steps.
* Concrete AdaMerging: the mask is meta-learned against AdaMerging
  coefficients (first-order bi-level, as in the official code): every step
  the coefficients restart from their init, take one inner Adam step (lr 1)
  on the entropy of one batch under one mask sample, and the mask logits
  take a gradient step on the entropy of the next batch under a fresh
  sample, through the updated (fixed) coefficients, clamped to [0, 1]. The
  official code keeps the inner Adam's moments across steps; here each
  inner step starts from fresh moments, so it is lr * g / (|g| + 1e-8).
  Then AdaMerging (`mtmerge.learned.adamerging`) learns the coefficients of
  the masked task vectors (1000 + 1000 steps in the paper's setting).

The final merge uses the deterministic mask `logits > 0` (p > 0.5), rescaled
per leaf to mean 1 like the samples (a leaf with no kept entry keeps
theta_0). The official scripts evaluate with one mask sample instead.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import sharding
from mtmerge import task_vectors
from mtmerge import train
from mtmerge.learned import adamerging
from mtmerge.learned import common
from mtmerge.learned import problem as problem_lib

Tree = Any
TRAIN_DEFAULTS = dict(steps=2000, optimizer="adam", lr=1e-3)
MASK_DEFAULTS = dict(steps=1000, optimizer="adam", lr=1e-3)
ADAMERGING_DEFAULTS = dict(steps=1000, optimizer="adam", lr=1e-3)


def relaxed_bernoulli(logits: jax.Array, uniform: jax.Array,
                      temperature: float) -> jax.Array:
  """A binary concrete sample from uniform noise in (0, 1)."""
  noise = jnp.log(uniform) - jnp.log1p(-uniform)
  return jax.nn.sigmoid((logits + noise) / temperature)


def sample_mask(logits: Tree, rng: jax.Array, temperature: float) -> Tree:
  """A relaxed-Bernoulli sample of every leaf (one key of `split` per leaf).

  The uniforms come from the "rbg" PRNG seeded by `rng` (as BERT's dropout
  here): XLA:CPU compiles threefry's per-leaf hashes slowly, e.g. MiniLM's
  96 leaves took 20 s instead of 10 s.
  """
  leaves, treedef = jax.tree.flatten(logits)
  rng = jax.random.key(jax.random.bits(rng, dtype=jnp.uint32), impl="rbg")
  eps = float(np.finfo(np.float32).eps)  # u in [eps, 1 - eps], as torch
  uniform = lambda k, x: jax.random.uniform(k, x.shape, jnp.float32, eps,
                                            1 - eps)
  return jax.tree.unflatten(treedef, [
      relaxed_bernoulli(x, uniform(k, x), temperature)
      for k, x in zip(jax.random.split(rng, len(leaves)), leaves)])


def rescale(mask: Tree) -> Tree:
  """m / mean(m) per leaf (an all-zero leaf stays zero); numpy in, numpy out."""
  def one(m):
    xp = np if isinstance(m, (np.ndarray, np.bool_)) else jnp
    m = xp.asarray(m, xp.float32)
    return m / xp.maximum(xp.mean(m), np.finfo(np.float32).tiny)
  return jax.tree.map(one, mask)


def hard_mask(logits: Tree) -> Tree:
  """The deterministic mask: logits > 0 (bool)."""
  return jax.tree.map(lambda x: np.asarray(x) > 0, logits)


def masked_tvs(tvs: Tree, mask: Tree) -> Tree:
  """tau_t * rescale(mask), the mask shared across the task axis."""
  return jax.tree.map(lambda v, m: np.asarray(v) * m[None].astype(v.dtype),
                      tvs, rescale(jax.tree.map(np.asarray, mask)))


def _merge(base, tvs, mask, coeffs):
  """theta_0 + m * sum_t c_t tau_t (c: `[T]` or a tree of `[T]`)."""
  if not isinstance(coeffs, dict):
    coeffs = jax.tree.map(lambda _: coeffs, base)
  return task_vectors.apply(base, jax.tree.map(
      lambda v, m, c: m * common.task_mix(c, v), tvs, mask, coeffs))


def _entropy(problem, heads, params, batch):
  """Sum over tasks of the mean prediction entropy, one task at a time
  (`common.task_by_task`: one compiled forward and backward for every task
  instead of T unrolled copies)."""
  task_entropy = lambda p, head, x: common.entropy(
      common.task_logits(problem, head, p, x))
  return common.task_by_task(task_entropy, params, common.pad_heads(heads),
                             batch)


def mask_objective(problem: problem_lib.MergeProblem, tvs: Tree,
                   coeffs: Tree, temperature: float = 0.5,
                   inner_lr: float | None = None,
                   clamp: tuple[float, float] | None = None) -> train.Objective:
  """The mask-logit objective.

  Args:
    problem: the merge problem.
    tvs: stacked task vectors `[T, ...]`.
    coeffs: fixed coefficients (`[T]` or a tree of `[T]`), or the inner
      loop's init with `inner_lr`.
    temperature: the concrete temperature.
    inner_lr: None: batches are `{task: inputs}` and `coeffs` stay fixed
      (Concrete TA). Otherwise batches are `{"inner": ..., "outer": ...}`
      and the coefficients take one fresh-Adam step of size `inner_lr` on
      the inner batch before the outer loss (Concrete AdaMerging).
    clamp: bounds of the coefficients in the merge (None: none).
  """
  consts = {"base": problem.base, "tvs": tvs, "heads": problem.heads,
            "coeffs": coeffs}
  clip = adamerging.clipper(clamp)

  def loss(logits, k, batch, rng):
    r1, r2 = jax.random.split(rng)
    coeffs = k["coeffs"]
    if inner_lr is not None:
      m1 = jax.lax.stop_gradient(rescale(sample_mask(logits, r1, temperature)))
      g = jax.grad(lambda c: _entropy(problem, k["heads"], _merge(
          k["base"], k["tvs"], m1, clip(c)), batch["inner"])[0])(coeffs)
      coeffs = jax.lax.stop_gradient(jax.tree.map(
          lambda c, d: c - inner_lr * d / (jnp.abs(d) + 1e-8), coeffs, g))
      batch = batch["outer"]
    m = rescale(sample_mask(logits, r2, temperature))
    total, per_task = _entropy(problem, k["heads"], _merge(
        k["base"], k["tvs"], m, clip(coeffs)), batch)
    return total, {f"entropy/{t}": h for t, h in per_task.items()}
  return train.Objective(jax.tree.map(
      lambda x: np.zeros(np.shape(x), np.float32), problem.base), loss, consts)


def _fit_mask(objective, batches, cfg, mesh, rules, workdir, desc,
              fingerprint, progress):
  mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
  # Logits and their Adam moments are model-sized: shard them like theta_0.
  param_sh = common.const_shardings(mesh, {"base": objective.init},
                                    rules)["base"]
  return train.fit(
      objective, batches, cfg, mesh=mesh, param_shardings=param_sh,
      const_shardings=common.const_shardings(mesh, objective.consts, rules),
      workdir=workdir, fingerprint=fingerprint, desc=desc, progress=progress)


def concrete_task_arithmetic(
    problem: problem_lib.MergeProblem, *, scaling_factor: float = 0.3,
    temperature: float = 0.5, batch_size: int = 16, split: str = "test",
    limit: int | None = None, train_config: dict | None = None, mesh=None,
    rules: Sequence[tuple[str, Any]] | None = None,
    workdir: str | None = None, progress: bool = True
) -> common.LearnedResult:
  """Learns a Concrete mask for task arithmetic; returns the merged params.

  Args:
    problem: the merge problem.
    scaling_factor: task arithmetic's lambda.
    temperature: the concrete temperature.
    batch_size: unlabeled examples per task per step.
    split: the split adapted on (the paper: `test`, inputs only).
    limit: use only the first `limit` examples of each split.
    train_config: `TrainConfig` overrides (default 2000 Adam steps, 1e-3).
    mesh, rules, workdir, progress: as in `adamerging.adamerging`.

  Returns:
    `LearnedResult(merged, mask logits, log, extra={"mask": bool tree})`.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  cfg = common.train_config(TRAIN_DEFAULTS, train_config)
  # One lambda for all tasks: sum_t m * tau_t = m * sum_t tau_t.
  tv_sum = jax.tree.map(lambda v: v.sum(0, keepdims=True), problem.tvs)
  scale = np.full((1,), scaling_factor, np.float32)
  objective = mask_objective(problem, tv_sum, scale, temperature)
  batches = common.task_batches(problem, split, batch_size, seed=cfg.seed,
                                limit=limit)
  res = _fit_mask(objective, batches, cfg, mesh, rules, workdir,
                  "concrete task arithmetic",
                  dict(method="concrete_task_arithmetic",
                       scaling_factor=scaling_factor, temperature=temperature,
                       batch_size=batch_size, split=split, limit=limit,
                       tasks=problem.tasks), progress)
  mask = hard_mask(res.params)
  merged = jax.tree.map(np.asarray, jax.jit(_merge)(
      problem.base, tv_sum, rescale(mask), scale))
  return common.LearnedResult(merged, res.params, res.log, {"mask": mask})


def concrete_adamerging(
    problem: problem_lib.MergeProblem, *, granularity: str = "layer",
    init: float = 0.3, clamp: Sequence[float] | None = (0.0, 1.0),
    temperature: float = 0.5, inner_lr: float = 1.0, batch_size: int = 16,
    split: str = "test", limit: int | None = None,
    mask_train_config: dict | None = None, train_config: dict | None = None,
    mesh=None, rules: Sequence[tuple[str, Any]] | None = None,
    workdir: str | None = None, progress: bool = True
) -> common.LearnedResult:
  """Concrete AdaMerging: meta-learned mask, then AdaMerging under it.

  Args:
    problem: the merge problem.
    granularity: AdaMerging's `task` or `layer` coefficients.
    init: the coefficients' init (both phases).
    clamp: coefficient bounds (both phases; None: none).
    temperature: the concrete temperature.
    inner_lr: the mask phase's inner step size (the official code: 1).
    batch_size: unlabeled examples per task per batch (the mask phase reads
      two batches per step).
    split, limit: the data adapted on.
    train_config: `TrainConfig` overrides of the AdaMerging phase (default
      1000 Adam steps at 1e-3) and, unless `mask_train_config` is given, of
      the mask phase (default the same).
    mask_train_config: the mask phase's overrides instead.
    mesh, rules, progress: as in `adamerging.adamerging`.
    workdir: checkpoints of the phases go to `workdir/mask` and
      `workdir/adamerging` (resumable).

  Returns:
    `LearnedResult(merged, {"logits", "coeffs"}, log of both phases,
    extra={"mask": bool tree})`.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if clamp is not None and (len(clamp) != 2 or clamp[0] > clamp[1]):
    raise ValueError(f"clamp must be (low, high) with low <= high, got "
                     f"{clamp}")
  clamp = None if clamp is None else tuple(clamp)
  mask_cfg = common.train_config(MASK_DEFAULTS, train_config if
                                 mask_train_config is None else
                                 mask_train_config)
  cfg = common.train_config(ADAMERGING_DEFAULTS, train_config)
  coeffs = adamerging.init_coeffs(problem.base, problem.num_tasks,
                                  granularity, init)
  objective = mask_objective(problem, problem.tvs, coeffs, temperature,
                             inner_lr, clamp)
  tb = common.task_batches(problem, split, batch_size, seed=mask_cfg.seed,
                           limit=limit)
  sub = lambda name: None if workdir is None else os.path.join(workdir, name)
  common_fp = dict(granularity=granularity, init=init, clamp=clamp,
                   temperature=temperature, batch_size=batch_size,
                   split=split, limit=limit, tasks=problem.tasks)
  res = _fit_mask(objective, lambda s: {"inner": tb(2 * s),
                                        "outer": tb(2 * s + 1)},
                  mask_cfg, mesh, rules, sub("mask"), "concrete mask",
                  dict(method="concrete_adamerging/mask", inner_lr=inner_lr,
                       **common_fp), progress)
  mask = hard_mask(res.params)
  tvs = masked_tvs(problem.tvs, mask)
  ada = adamerging.entropy_objective(problem, tvs, coeffs, clamp)
  mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
  res2 = train.fit(
      ada, common.task_batches(problem, split, batch_size, seed=cfg.seed,
                               limit=limit), cfg, mesh=mesh,
      const_shardings=common.const_shardings(mesh, ada.consts, rules),
      workdir=sub("adamerging"), desc="concrete adamerging",
      fingerprint=dict(method="concrete_adamerging/adamerging",
                       mask_train=dataclasses.asdict(mask_cfg),
                       inner_lr=inner_lr, **common_fp), progress=progress)
  merged = jax.tree.map(np.asarray, jax.jit(common.weighted_merge)(
      problem.base, tvs, res2.params))
  log = ([dict(r, phase="mask") for r in res.log]
         + [dict(r, phase="adamerging") for r in res2.log])
  return common.LearnedResult(merged, {"logits": res.params,
                                       "coeffs": res2.params}, log,
                              {"mask": mask})
