"""Skill localization: sparse per-task grafts of the fine-tuned weights.

"Task-Specific Skill Localization in Fine-tuned Language Models"
(Panigrahi et al., ICML 2023; official code Skill-Localization-by-grafting):
for a task with task vector tau = theta_ft - theta_0, find a sparse binary
mask gamma such that the grafted model theta_0 + gamma * tau performs
almost as well as theta_ft. The search relaxes gamma to

    gamma = gamma_base + (1 - 2 gamma_base) * sigmoid(S - b)

with gamma_base the "highest movement" base patch (the top `sparsity`
fraction of |tau| over the whole model), S learned scores initialized
uniform in [0, 1) (official `rand_like`) and b = `sigmoid_bias` (10), so
that gamma starts within e^-10 of gamma_base and an entry flips only where
the cross-entropy gradient d L / d S = (1 - 2 gamma_base) sigmoid'(S - b)
(grad_theta L * tau) pushes S across b. The official graft trainer does
plain gradient descent on S with lr 1e7 (the sigmoid' factor is ~4.5e-5),
one step per epoch of a few batches of the task's training data; we run
`mtmerge.train.fit` with SGD and that learning rate, one step per batch.
The mask is then rounded: gamma > 0.5. Rounding bounds nothing by itself;
the graft stays near the base patch's sparsity because few entries move S
by b. The step that flips an entry is large (sigmoid' grows 5000x near b),
so flips come in bursts that can hurt; the official code keeps the epoch
whose rounded mask has the best train + validation accuracy. We keep, per
task, the better of the final mask and the base patch on those splits
(`select_on`). The useful lr scales like 1 / |grad * tau|: on the default
MiniLM benchmark (40-step fine-tuning) ~1e9 flips the top 1e-4 of entries
within 20 steps; 1e7 flips none.

All tasks are learned in one `fit`: the loss is the sum over tasks of each
task's cross-entropy of theta_0 + gamma_t * tau_t, which is separable in
the per-task scores S_t, so with a per-coordinate optimizer (SGD, Adam) and
no global-norm clipping this equals T separate runs, at one compile.

Multi-task: the paper finds the grafts of different tasks of a multi-task
model almost disjoint; for independently fine-tuned models we merge their
union theta_0 + sum_t mask_t * tau_t (overlaps add, as task arithmetic at
lambda 1 on sparse vectors). Each task can also be served alone as
theta_0 + mask_t * tau_t (`graft`), stored as 1-bit masks plus the kept
values.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import encoders
from mtmerge import selection
from mtmerge import sharding
from mtmerge import task_vectors
from mtmerge import train
from mtmerge import tree as tree_lib
from mtmerge.learned import common
from mtmerge.learned import problem as problem_lib

Tree = Any
TRAIN_DEFAULTS = dict(steps=100, optimizer="sgd", lr=1e7)


def check_sparsity(sparsity) -> None:
  """Raises ValueError unless `sparsity` is a number in (0, 1)."""
  ok = (isinstance(sparsity, (int, float, np.floating))
        and not isinstance(sparsity, bool) and 0 < float(sparsity) < 1)
  if not ok:
    raise ValueError(f"sparsity must be a fraction in (0, 1) (the kept "
                     f"fraction of parameters), got {sparsity!r}")


# One program for the whole threshold search: compiles in ~2 s where the
# eager search compiles ~150 small ones (~8 s on the 2-core CPU).
_topk_mask = jax.jit(lambda tvs, s: selection.topk_mask(tvs, s, "global"),
                     static_argnums=1)


def base_patch(tvs: Tree, sparsity: float) -> Tree:
  """gamma_base: per task, the top `sparsity` fraction of |tau| (global).

  Args:
    tvs: stacked task vectors `[T, ...]`.
    sparsity: kept fraction of each task's entries, in (0, 1); the count is
      `selection.keep_count` (round half up, at least 1), ties at the
      threshold all kept.

  Returns:
    Bool masks `[T, ...]`.
  """
  check_sparsity(sparsity)
  return _topk_mask(tvs, float(sparsity))


def graft_fraction(scores: jax.Array, gbase: jax.Array,
                   sigmoid_bias: float) -> jax.Array:
  """gamma = gamma_base + (1 - 2 gamma_base) sigmoid(S - b), elementwise."""
  g = gbase.astype(jnp.float32)
  return g + (1 - 2 * g) * jax.nn.sigmoid(scores - sigmoid_bias)


def round_masks(scores: Tree, gbase: Tree, sigmoid_bias: float) -> Tree:
  """The binary grafts gamma > 1/2, i.e. base entries with S < b and
  non-base entries with S > b (torch.round's half-to-even gives 0 at 1/2)."""
  def one(s, g):  # graft_fraction in host numpy
    g = np.asarray(g, np.float64)
    z = np.asarray(s, np.float64) - sigmoid_bias
    return g + (1 - 2 * g) * 0.5 * (1 + np.tanh(z / 2)) > 0.5  # sigmoid
  return jax.tree.map(one, scores, gbase)


def graft(base: Tree, tvs: Tree, masks: Tree, t: int) -> Tree:
  """Task t's grafted model theta_0 + mask_t * tau_t (base's dtypes)."""
  T = task_vectors.num_tasks(masks)
  if not 0 <= int(t) < T:
    raise ValueError(f"task index {t} out of range: {T} grafts (0..{T - 1})")
  return _graft(base, tvs, masks, jnp.asarray(t, jnp.int32))


@jax.jit
def _graft(base, tvs, masks, t):
  return jax.tree.map(lambda b, v, m: (b.astype(jnp.float32) + jnp.where(
      m[t], v[t].astype(jnp.float32), 0)).astype(b.dtype), base, tvs, masks)


@jax.jit
def union(base: Tree, tvs: Tree, masks: Tree) -> Tree:
  """The multi-task graft theta_0 + sum_t mask_t * tau_t."""
  return task_vectors.apply(base, jax.tree.map(
      lambda v, m: jnp.sum(jnp.where(m, v.astype(jnp.float32), 0), axis=0),
      tvs, masks))


def storage_bytes(masks: Tree) -> int:
  """Bytes of all grafts: 1-bit masks plus the kept float32 values."""
  nnz = sum(int(np.sum(np.asarray(m))) for m in jax.tree.leaves(masks))
  return tree_lib.tree_bytes(task_vectors.pack_mask(masks)) + 4 * nnz


def _density(masks: Tree) -> np.ndarray:
  """Per-task kept fraction `[T]`."""
  leaves = [np.asarray(m).reshape(m.shape[0], -1) for m in
            jax.tree.leaves(masks)]
  return sum(m.sum(1) for m in leaves) / sum(m.shape[1] for m in leaves)


def _select(problem, masks, gbase, splits, limit, batch_size=64):
  """Per task, the learned mask or the base patch, whichever has the higher
  summed accuracy over `splits` (the official trainer keeps the epoch with
  the best train + validation accuracy); returns masks and the scores."""
  feats = jax.jit(problem.features)
  out, scores = [], []
  for t, task in enumerate(problem.tasks):
    acc = []
    for cand in (masks, gbase):
      params = graft(problem.base, problem.tvs, cand, t)
      hits = []
      for split in splits:
        for b in problem.data(task, split, batch_size, limit=limit,
                              tight=True).epoch(0):
          z = encoders.logits(problem.heads[task],
                              feats(params, problem_lib.inputs_of(b)))
          pred = np.argmax(np.asarray(z), -1)
          hits.append((pred == b["label"])[b.get("mask", np.ones(len(pred),
                                                                bool))])
      acc.append(float(np.mean(np.concatenate(hits))))
    out.append(acc[0] >= acc[1])
    scores.append({"learned": acc[0], "base_patch": acc[1]})
  pick = np.asarray(out)
  return jax.tree.map(lambda m, g: np.where(
      pick.reshape((-1,) + (1,) * (m.ndim - 1)), m, g), masks, gbase), scores


def graft_objective(problem: problem_lib.MergeProblem, gbase: Tree,
                    scores: Tree, sigmoid_bias: float) -> train.Objective:
  """Sum over tasks of the cross-entropy of theta_0 + gamma_t * tau_t."""
  consts = {"base": problem.base, "tvs": problem.tvs, "gbase": gbase,
            "heads": problem.heads}
  index = {t: i for i, t in enumerate(problem.tasks)}

  def task_ce(base, v, sc, g, head, b):
    params = jax.tree.map(
        lambda x, vv, ss, gg: (x.astype(jnp.float32) + graft_fraction(
            ss, gg, sigmoid_bias) * vv.astype(jnp.float32)).astype(x.dtype),
        base, v, sc, g)
    logits = common.task_logits(problem, head, params, b)
    return common.cross_entropy(logits, b["label"], b.get("mask"))

  def loss(s, k, batch, rng):
    del rng
    tasks = list(batch)
    at = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
    if sorted(tasks) != sorted(problem.tasks) or not common.one_signature(
        [batch[t] for t in tasks]):
      per_task = {t: task_ce(k["base"], at(k["tvs"], index[t]),
                             at(s, index[t]), at(k["gbase"], index[t]),
                             k["heads"][t], batch[t]) for t in tasks}
    else:
      # Every task in one compiled body (a loop over the task axis): the
      # unrolled loop compiled T copies of the forward and backward pass.
      heads = common.pad_heads(k["heads"])
      xs = (k["tvs"], s, k["gbase"],
            common.stack_trees([heads[t] for t in problem.tasks]),
            common.stack_trees([batch[t] for t in problem.tasks]))
      vals = jax.lax.map(lambda x: task_ce(k["base"], *x), xs)
      per_task = {t: vals[i] for i, t in enumerate(problem.tasks)}
    return sum(per_task.values()), {f"ce/{t}": v for t, v in per_task.items()}
  return train.Objective(scores, loss, consts)


def skill_localization(problem: problem_lib.MergeProblem, *,
                       sparsity: float = 0.01, sigmoid_bias: float = 10.0,
                       batch_size: int = 16, split: str = "train",
                       limit: int | None = None,
                       select_on: Sequence[str] | None = ("train",
                                                          "validation"),
                       select_limit: int | None = 256,
                       train_config: dict | None = None, mesh=None,
                       rules: Sequence[tuple[str, Any]] | None = None,
                       workdir: str | None = None, progress: bool = True
                       ) -> common.LearnedResult:
  """Learns one sparse graft per task; returns their union and the grafts.

  Args:
    problem: the merge problem.
    sparsity: base-patch fraction of parameters in (0, 1) (the paper uses
      ~1e-4 on RoBERTa; 0.01 suits small models).
    sigmoid_bias: b in sigmoid(S - b) (official default 10).
    batch_size: labeled examples per task per step.
    split: the labeled split the grafts are learned on.
    limit: use only the first `limit` examples of the split.
    select_on: splits on which each task's learned mask must match its
      base patch's summed accuracy, else the base patch is kept (a cheap
      stand-in for the official best-epoch selection: SGD at lr 1e7 flips
      entries in bursts once S nears b); None keeps the learned masks.
    select_limit: examples per split used for that choice.
    train_config: `TrainConfig` overrides (default 100 SGD steps, lr 1e7,
      as the official graft trainer).
    mesh, rules, workdir, progress: as in `adamerging` (scores, masks and
      task vectors are sharded like the task vectors).

  Returns:
    `LearnedResult(params=theta_0 + sum_t mask_t tau_t, learned=masks
    (bool `[T, ...]`), log, extra)`; extra: `reconstruct` (`t -> task t's
    grafted params`), `storage_bytes`, `density` (per task), `base_density`,
    `overlap` (fraction of kept entries kept by 2+ tasks), `scores` (S),
    `selection` (per task accuracies of both candidates on `select_on`).
  """
  check_sparsity(sparsity)
  cfg = common.train_config(TRAIN_DEFAULTS, train_config)
  gbase = jax.tree.map(np.asarray, base_patch(problem.tvs, sparsity))  # bool
  rng = np.random.default_rng(cfg.seed)  # host: no compile per leaf shape
  scores = jax.tree.map(lambda g: rng.random(g.shape, np.float32), gbase)
  objective = graft_objective(problem, gbase, scores, sigmoid_bias)
  mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
  c_sh = common.const_shardings(
      mesh, {k: v for k, v in objective.consts.items() if k != "gbase"}, rules)
  c_sh["gbase"] = c_sh["tvs"]  # same shapes: shard like the task vectors
  batches = common.task_batches(problem, split, batch_size, seed=cfg.seed,
                                limit=limit, labels=True)
  res = train.fit(
      objective, batches, cfg, mesh=mesh, const_shardings=c_sh,
      param_shardings=c_sh["tvs"], workdir=workdir,
      fingerprint=dict(method="skill_localization", sparsity=sparsity,
                       sigmoid_bias=sigmoid_bias, batch_size=batch_size,
                       split=split, limit=limit, tasks=problem.tasks),
      desc="skill_localization", progress=progress)
  masks = round_masks(res.params, gbase, sigmoid_bias)
  selection_scores = None
  if select_on:
    masks, selection_scores = _select(
        problem, masks, gbase, tuple(select_on), select_limit)
  merged = jax.tree.map(np.asarray, union(problem.base, problem.tvs, masks))
  kept = [np.asarray(m).reshape(m.shape[0], -1) for m in
          jax.tree.leaves(masks)]
  shared = sum(int(np.sum(m.sum(0) >= 2)) for m in kept)
  any_kept = sum(int(np.sum(m.any(0))) for m in kept)
  extra = {
      "reconstruct": functools.partial(graft, problem.base, problem.tvs,
                                       masks),
      "storage_bytes": storage_bytes(masks),
      "density": _density(masks).tolist(),
      "base_density": _density(gbase).tolist(),
      "overlap": shared / max(any_kept, 1), "scores": res.params,
      "selection": selection_scores}
  return common.LearnedResult(merged, masks, res.log, extra)
