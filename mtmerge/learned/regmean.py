"""RegMean: merge linear layers by a closed-form multi-task regression.

"Dataless Knowledge Fusion by Merging Weights of Language Models" (Jin et
al., ICLR 2023): for a linear layer with inputs X_t on task t, the merged
kernel minimizing sum_t ||X_t W - X_t W_t||^2 is

  W* = (sum_t G_t)^-1 sum_t G_t W_t,     G_t = X_t^T X_t,

with Flax's `[in, out]` kernels. The paper regularizes toward the plain
average by shrinking the Grams' off-diagonal entries:
G~ = alpha G + (1 - alpha) diag(G) (alpha = 1 is the exact regression,
alpha = 0 a per-input-feature weighted average). Every other leaf (biases,
norms, embeddings, kernels of layers not seen by a linear call) is averaged
over tasks.

Grams come from `mtmerge.learned.capture` (padded tokens and padded batch
rows excluded). By default each task's Grams are divided by its number of
rows, as FusionBench does, so a task with longer texts or more examples does
not dominate; `normalize_grams=False` uses the paper's plain sums.

Singular systems: an input feature that is zero on every task's data (a
dead unit) leaves a zero row and column in sum_t G~_t; its kernel row does
not affect any output on the data and is set to the task average. Any other
singularity (e.g. alpha = 1 with fewer rows than inputs) is an error that
names the layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import tree as tree_lib
from mtmerge.learned import capture
from mtmerge.learned import problem as problem_lib

Tree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def task_grams(problem: problem_lib.MergeProblem, t: int, *,
               num_examples: int = 256, batch_size: int = 32,
               split: str = "validation", step=None
               ) -> tuple[dict[str, jax.Array], dict[str, float]]:
  """Summed input Grams of task `t`'s fine-tuned model on its data.

  Args:
    problem: the merge problem (needs `capture_model`).
    t: task index.
    num_examples: the first this many examples of `split` are used.
    batch_size: examples per jitted forward.
    split: the data split (inputs only).
    step: a jitted `capture.linear_grams` to reuse across tasks.

  Returns:
    `({kernel path: G}, {kernel path: number of rows})`.
  """
  _check(problem)
  task = problem.tasks[t]
  params = problem.task_params(t)
  step = step or _gram_step(problem.capture_model)
  grams, counts, seen = {}, {}, 0
  for inputs, keep in problem_lib.weighted_batches(problem, task, split,
                                                   batch_size, num_examples):
    seen += int(keep.sum())
    g, c = step(params, inputs, capture.row_weights(dict(inputs, mask=keep)))
    for k in g:
      grams[k] = grams[k] + g[k] if k in grams else g[k]
      counts[k] = counts.get(k, 0.0) + float(c[k])
  if not seen:
    raise ValueError(f"task {task!r} has no {split!r} examples for its "
                     "Gram matrices")
  return grams, counts


def _check(problem):
  if problem.mode == "tangent" or problem.capture_model is None:
    raise ValueError(
        "regmean needs finetune.mode=standard (the real network's linear "
        "layers); this problem is mode="
        f"{problem.mode!r} with capture_model="
        f"{'None' if problem.capture_model is None else 'set'}; RegMean is "
        "undefined for the tangent-space linearized model")


def _gram_step(forward):
  return jax.jit(lambda p, x, w: capture.linear_grams(forward, p, x, w,
                                                      with_counts=True))


def _shrink(g: jax.Array, alpha: float) -> jax.Array:
  """G~ = alpha G + (1 - alpha) diag(G)."""
  return alpha * g + (1.0 - alpha) * jnp.diag(jnp.diag(g))


@jax.jit
def _solve(a, b, fallback):
  """Cholesky solve of `a w = b`; rows of zero-diagonal inputs = fallback.

  Returns `(w, smallest relative pivot)`: pivot_i^2 / a_ii is the share of
  input i's energy not explained by inputs 0..i-1 (1 - R^2). It is at least
  1 - alpha for shrunk Grams and about float32 rounding (or NaN) for a
  rank-deficient one.
  """
  dead = jnp.diag(a) <= 0
  a = jnp.where(jnp.diag(dead), 1.0, a)
  b = jnp.where(dead[:, None], fallback, b)
  chol = jnp.linalg.cholesky(a)
  w = jax.scipy.linalg.cho_solve((chol, True), b)
  return w, jnp.min(jnp.square(jnp.diag(chol)) / jnp.diag(a))


def _check_hparams(alpha, reduce_non_linear):
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  if reduce_non_linear not in ("mean", "base"):
    raise ValueError("reduce_non_linear must be 'mean' or 'base', got "
                     f"{reduce_non_linear!r}")


def _accumulate(acc: dict, base: dict, tvs: dict, t: int, grams: dict,
                alpha: float) -> dict:
  """Adds task t's `(G~_t, G~_t W_t)` to `acc[path]` (flat dicts)."""
  if acc and set(grams) != set(acc):
    raise ValueError(f"task {t} has Grams for other layers than the tasks "
                     f"before it: {sorted(set(grams) ^ set(acc))[:6]}")
  for path, g in grams.items():
    if path not in base:
      raise ValueError(f"a Gram for {path}, which is not in the params")
    b = base[path]
    if b.ndim != 2 or tuple(g.shape) != (b.shape[0],) * 2:
      raise ValueError(f"{path}: kernel {b.shape} does not fit Gram "
                       f"{tuple(g.shape)} (expected [in, out] and [in, in])")
    g = _shrink(jnp.asarray(g, jnp.float32), alpha)
    w_t = b.astype(jnp.float32) + tvs[path][t].astype(jnp.float32)
    rhs = jnp.matmul(g, w_t, precision=_HIGHEST)
    lhs0, rhs0 = acc.get(path, (0.0, 0.0))
    acc[path] = (lhs0 + g, rhs0 + rhs)
  return acc


def _finish(base: Tree, tvs: Tree, acc: dict, reduce_non_linear: str):
  """Solves every accumulated layer; averages (or keeps) the other leaves."""
  flat_tvs = tree_lib.to_flat_dict(tvs)
  out = []
  for path, b in tree_lib.named_leaves(base):
    mean = b.astype(jnp.float32) + jnp.mean(
        flat_tvs[path].astype(jnp.float32), axis=0)
    if path not in acc:
      out.append((mean if reduce_non_linear == "mean" else b).astype(b.dtype))
      continue
    w, pivot = _solve(*acc[path], mean)
    # 10 n eps: float32 rounding of an exactly singular Gram stays below.
    tol = 10 * b.shape[0] * float(np.finfo(np.float32).eps)
    if not float(pivot) > tol:
      raise ValueError(
          f"RegMean's system for {path} is singular (smallest relative "
          f"Cholesky pivot {float(pivot):.2g} <= {tol:.2g}); use alpha < 1 "
          "or more examples (an alpha = 1 Gram needs at least as many "
          "linearly independent rows as inputs)")
    out.append(w.astype(b.dtype))
  return jax.tree.unflatten(jax.tree.structure(base), out)


def merge_with_grams(base: Tree, tvs: Tree, grams: list[dict[str, Any]], *,
                     alpha: float = 0.9, reduce_non_linear: str = "mean"
                     ) -> Tree:
  """RegMean's merge given each task's Grams.

  Args:
    base: theta_0.
    tvs: stacked task vectors `[T, ...]`.
    grams: per task, `{kernel path: G}` (`[in, in]`, scaled as wanted);
      every task must have the same paths.
    alpha: off-diagonal scale of the Grams, in [0, 1].
    reduce_non_linear: `mean` (average over tasks) or `base` (keep theta_0)
      for every leaf without a Gram.

  Returns:
    The merged params, structure and dtypes of `base`.
  """
  _check_hparams(alpha, reduce_non_linear)
  flat_base, flat_tvs = tree_lib.to_flat_dict(base), tree_lib.to_flat_dict(tvs)
  acc = {}
  for t, g in enumerate(grams):
    acc = _accumulate(acc, flat_base, flat_tvs, t, g, alpha)
  return _finish(base, tvs, acc, reduce_non_linear)


def regmean(problem: problem_lib.MergeProblem, *, alpha: float = 0.9,
            num_examples: int = 256, batch_size: int = 32,
            split: str = "validation", reduce_non_linear: str = "mean",
            normalize_grams: bool = True) -> Tree:
  """RegMean merge of the tasks' fine-tuned models.

  Args:
    problem: the merge problem, standard mode with a `capture_model`.
    alpha: off-diagonal scale of the Grams (0.9 in the paper's language
      setting, 0.95 in FusionBench's CLIP configs).
    num_examples: examples per task (the first of `split`).
    batch_size: examples per jitted forward.
    split: data split (inputs only; labels are not read).
    reduce_non_linear: `mean` or `base` for leaves without a Gram.
    normalize_grams: divide each task's Grams by its row count
      (FusionBench); False uses the summed Grams of the paper's equation.

  Returns:
    Merged params theta, structure of `problem.base`.

  Raises:
    ValueError: tangent mode or no `capture_model`; a singular layer.
  """
  _check(problem)
  _check_hparams(alpha, reduce_non_linear)
  step = _gram_step(problem.capture_model)
  flat_base = tree_lib.to_flat_dict(problem.base)
  flat_tvs = tree_lib.to_flat_dict(problem.tvs)
  # One task's Grams at a time: memory holds the two sums, not T Grams.
  acc = {}
  for t in range(problem.num_tasks):
    g, c = task_grams(problem, t, num_examples=num_examples,
                      batch_size=batch_size, split=split, step=step)
    if normalize_grams:
      g = {k: v / max(c[k], 1.0) for k, v in g.items()}
    acc = _accumulate(acc, flat_base, flat_tvs, t, g, alpha)
  return _finish(problem.base, problem.tvs, acc, reduce_non_linear)
