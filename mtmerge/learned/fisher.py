"""Fisher merging: a per-entry average weighted by diagonal Fisher information.

"Merging Models with Fisher-Weighted Averaging" (Matena & Raffel, NeurIPS
2022) treats each fine-tuned model theta_t as the mean of a Gaussian
posterior whose precision is the diagonal Fisher F_t, and merges to the
maximizer of their joint likelihood:

  theta = sum_t l_t F_t theta_t / sum_t l_t F_t      (per entry)

F_t is the model's own (not the data's labels') Fisher, with the exact
expectation over classes:

  F_t = mean_x sum_y p(y|x) (d log p(y|x) / d theta)^2.

Per-example gradients come from `jax.vmap` over examples of one `jax.vjp`
per example, whose pullback is applied to each class's one-hot cotangent in
a `fori_loop`; examples run in chunks of `chunk_size` under a `lax.scan`,
so memory stays at about `chunk_size` copies of the params whatever the
batch size or number of classes. (FusionBench squares the gradient of a
whole batch's sum instead, which mixes examples; here the per-example
definition of the paper is computed.)

Tasks are made comparable by normalizing each Fisher before the merge;
`floor` keeps every weight positive so entries no task's data touches fall
back to a plain average.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import encoders
from mtmerge.learned import problem as problem_lib

Tree = Any
NORMALIZE = ("mean", "l2", "none")  # True means "mean", False "none"


def _make_step(features, chunk_size: int):
  """Jitted `(acc, params, head, inputs, w) -> acc + sum_x w_x F(x)`."""

  def per_example(params, head, x, w):
    x1 = jax.tree.map(lambda a: a[None], x)

    def log_probs(p):
      logits = encoders.logits(head, features(p, x1))[0]
      return jax.nn.log_softmax(logits.astype(jnp.float32))
    logp, pullback = jax.vjp(log_probs, params)
    prob = jnp.exp(logp) * w
    num_classes = logp.shape[0]

    def add_class(y, acc):
      (g,) = pullback(jax.nn.one_hot(y, num_classes, dtype=logp.dtype))
      return jax.tree.map(
          lambda a, gi: a + prob[y] * jnp.square(gi.astype(jnp.float32)),
          acc, g)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return jax.lax.fori_loop(0, num_classes, add_class, zeros)

  def step(acc, params, head, inputs, w):
    chunked = jax.tree.map(
        lambda a: a.reshape((-1, chunk_size) + a.shape[1:]), (inputs, w))

    def body(acc, xs):
      x, wc = xs
      f = jax.vmap(per_example, in_axes=(None, None, 0, 0))(params, head, x,
                                                           wc)
      return jax.tree.map(lambda a, fi: a + jnp.sum(fi, axis=0), acc, f), None
    return jax.lax.scan(body, acc, chunked)[0]
  return jax.jit(step, donate_argnums=0)


def _pad_rows(tree, n: int):
  """Pads every leaf's leading axis to `n` rows by repeating row 0."""
  def pad(a):
    a = np.asarray(a)
    extra = n - a.shape[0]
    return a if extra == 0 else np.concatenate([a, np.repeat(a[:1], extra,
                                                              axis=0)])
  return jax.tree.map(pad, tree)


def _diagonal(problem, t, step, chunk_size, num_examples, batch_size, split):
  task = problem.tasks[t]
  params = problem.task_params(t)
  acc = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  count = 0
  for inputs, w in problem_lib.weighted_batches(problem, task, split,
                                                batch_size, num_examples):
    rows = len(w)
    n = -(-rows // chunk_size) * chunk_size
    w = np.concatenate([w, np.zeros(n - rows, np.float32)])
    acc = step(acc, params, problem.heads[task], _pad_rows(inputs, n), w)
    count += int(w.sum())
  if count == 0:
    raise ValueError(f"task {task!r} has no {split!r} examples to compute "
                     "its Fisher from")
  return jax.tree.map(lambda a: a / count, acc)


def fisher_diagonal(problem: problem_lib.MergeProblem, t: int, *,
                    num_examples: int = 256, batch_size: int = 32,
                    split: str = "validation", chunk_size: int = 8) -> Tree:
  """The diagonal Fisher of task `t`'s fine-tuned model with its head.

  Args:
    problem: the merge problem.
    t: task index (position in `problem.tasks`).
    num_examples: the first this many examples of the split are used.
    batch_size: examples read (and compiled for) per step.
    split: the data split, unlabeled use only.
    chunk_size: examples whose per-example gradients are held at once.

  Returns:
    float32 `F_t`, the structure of `problem.base` (unnormalized).
  """
  if num_examples < 1 or batch_size < 1 or chunk_size < 1:
    raise ValueError("num_examples, batch_size and chunk_size must be >= 1; "
                     f"got {num_examples}, {batch_size}, {chunk_size}")
  step = _make_step(problem.features, chunk_size)
  return _diagonal(problem, t, step, chunk_size, num_examples, batch_size,
                   split)


def _affine(fisher: Tree, normalize, floor: float, what: str):
  """`(a, c)` with the normalized Fisher F' = a F + c (scalars)."""
  leaves = jax.tree.leaves(fisher)
  if normalize == "none":
    return 1.0, floor
  if normalize == "mean":
    mean = float(sum(jnp.sum(f) for f in leaves) /
                 sum(f.size for f in leaves))
    if not mean > 0:
      raise ValueError(f"the Fisher of {what} is zero everywhere (its "
                       "predictions do not depend on the merged params)")
    return 1.0 / mean, floor
  # FusionBench's weighting: (F + floor) / (||F||_2 + floor).
  norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(f)) for f in leaves)))
  return 1.0 / (norm + floor), floor / (norm + floor)


def _check(num, fishers, scaling, floor, normalize):
  if num == 0 or len(fishers) != num:
    raise ValueError(f"need one Fisher per model: {num} models, "
                     f"{len(fishers)} Fishers")
  mode = {True: "mean", False: "none"}.get(normalize) if isinstance(
      normalize, bool) else normalize
  if mode not in NORMALIZE:
    raise ValueError(f"normalize must be True, False or one of {NORMALIZE}, "
                     f"got {normalize!r}")
  if not floor > 0:
    raise ValueError(f"floor must be > 0 (it keeps the weights positive), "
                     f"got {floor}")
  scaling = np.ones(num) if scaling is None else np.asarray(scaling, float)
  if scaling.shape != (num,) or (scaling < 0).any() or not scaling.sum() > 0:
    raise ValueError(f"scaling must be {num} nonnegative numbers, not all "
                     f"zero; got {np.ravel(scaling).tolist()}")
  affine = [_affine(f, mode, floor, f"model {t}")
            for t, f in enumerate(fishers)]
  return scaling, affine


def _weighted_mean(get, fishers, scaling, affine):
  """`sum_t l_t F'_t get(t) / sum_t l_t F'_t` for one leaf."""
  top = bottom = 0.0
  for t, (f, l, (a, c)) in enumerate(zip(fishers, scaling, affine)):
    w = l * (a * f + c)
    top, bottom = top + w * get(t).astype(jnp.float32), bottom + w
  return top / bottom


def merge_with_fishers(params: Sequence[Tree], fishers: Sequence[Tree], *,
                       scaling: Sequence[float] | None = None,
                       floor: float = 1e-6, normalize=True) -> Tree:
  """`sum_t l_t F'_t theta_t / sum_t l_t F'_t` per entry.

  Args:
    params: theta_t per task (same structure).
    fishers: F_t per task (same structure as params).
    scaling: l_t per task; default 1 each.
    floor: added to every normalized Fisher entry (must be > 0).
    normalize: `True`/`"mean"`: F'_t = F_t / mean(F_t) + floor, the mean
      over every entry of every leaf, so each task's Fisher averages 1;
      `"l2"`: F'_t = (F_t + floor) / (||F_t||_2 + floor), FusionBench's
      `normalize_fisher_weight`; `False`/`"none"`: F'_t = F_t + floor.

  Returns:
    The merged params, structure and dtypes of `params[0]`.
  """
  scaling, affine = _check(len(params), fishers, scaling, floor, normalize)
  return jax.tree.map(
      lambda *xs: _weighted_mean(lambda t: xs[t], xs[len(params):], scaling,
                                 affine).astype(xs[0].dtype),
      *params, *fishers)


def fisher_merging(problem: problem_lib.MergeProblem, *,
                   num_examples: int = 256, batch_size: int = 32,
                   scaling: Sequence[float] | None = None,
                   floor: float = 1e-6, normalize=True,
                   split: str = "validation", chunk_size: int = 8) -> Tree:
  """Fisher-weighted averaging of the tasks' fine-tuned models.

  Args:
    problem: the merge problem; in tangent mode the params are offsets
      from theta_0 and are merged by the same formula.
    num_examples: examples per task for its Fisher (the first of `split`).
    batch_size: examples per jitted step.
    scaling: l_t per task; default 1 each.
    floor: added to every normalized Fisher entry.
    normalize: see `merge_with_fishers` (default: divide by the mean).
    split: data split used (inputs only; labels are not read).
    chunk_size: examples whose per-example gradients are held at once.

  Returns:
    Merged params theta (not a task vector), structure of `problem.base`.
  """
  if num_examples < 1 or batch_size < 1 or chunk_size < 1:
    raise ValueError("num_examples, batch_size and chunk_size must be >= 1; "
                     f"got {num_examples}, {batch_size}, {chunk_size}")
  step = _make_step(problem.features, chunk_size)
  fishers = [_diagonal(problem, t, step, chunk_size, num_examples,
                       batch_size, split) for t in range(problem.num_tasks)]
  scaling, affine = _check(problem.num_tasks, fishers, scaling, floor,
                           normalize)
  # theta_0 + weighted mean of tau_t equals the weighted mean of theta_t
  # (the weights sum to one) without materializing every theta_t.
  return jax.tree.map(
      lambda b, v, *fs: (b.astype(jnp.float32) + _weighted_mean(
          lambda t: v[t], fs, scaling, affine)).astype(b.dtype),
      problem.base, problem.tvs, *fishers)
