r"""Task-based flat regions: per-task sharpness-aware gradients for MTL.

Phan, Tran, Tran, Tran, Truong, Lei, Ho, Phung, Le, "Improving Multi-task
Learning via Seeking Task-based Flat Regions", arXiv:2211.13723 (2022; v5
retitled "Beyond Losses Reweighting: Empowering Multi-Task Learning via the
Generalization Perspective", ICCV 2025). Official code:
github.com/VietHoang1512/FS-MTL (PyTorch; `multi-mnist/train.py`,
`multi-mnist/mtl.py`).

A model is a shared part `theta_sh` and one head `theta_t` per task. For
every task t (equal-weight case of the paper's Algorithm 1):

  g_t      = grad_sh L_t(theta_sh, theta_t)                 (low-loss part)
  eps_t    = rho * grad L_t / ||grad L_t||                  (ascent step)
  g_t^SAM  = grad L_t(theta + eps_t)                        (flat gradient)
  h_t      = g_t^SAM|_sh - g_t                              (flat part)
  shared update = C(g_1..g_T) + C(h_1..h_T)
  head t update = g_t^SAM|_t

where C is an MTL gradient combiner (`COMBINERS`: `mean`, `sum`,
`pcgrad`). With `mean` the shared update is the mean of the per-task flat
gradients; with rho = 0, eps_t = 0 exactly and the update is C(g_t), the
plain multi-task gradient.

Where the sources differ, and what we follow:

* Perturbation scope. The code (`multi-mnist/train.py`) normalizes ONE
  vector per task over the shared params and that task's own head and
  perturbs both (`scope="joint"`, our default). Our reading of the paper
  writes the ascent on the shared part (eps_sh^t = rho g_t / ||g_t||), with
  the head perturbed by its own normalized gradient; `scope="separate"`
  normalizes the two parts separately, each to norm rho. Only the paper's
  abstract was readable through this project's tools, so the `separate`
  reading is unverified.
* Equal weighting. The code's `ew` method averages the per-task flat
  gradients (= `mean` here); its PCGrad sums the projected gradients
  (reduction "sum") and visits every task's gradient (its own included)
  in a random order; ours projects off the other tasks' gradients in the
  fixed task order (deterministic, testable).
  MGDA, CAGrad and IMTL (also in the code) are not implemented.
* Adaptive SAM (`|w|`-scaled, ASAM) is an option in the code, off by
  default there; not implemented here.

Everything is a pytree: per-task gradients are stacked on a leading task
axis and combined with `axis=0` reductions; the norm is a reduction over
leaves, never a flattened model.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

Tree = Any
_EPS = 1e-12  # as the reference code: a zero gradient gives eps = 0


class FlatError(ValueError):
  """Bad input to the flat-region transforms (one line naming it)."""


def check_rho(rho: float) -> float:
  """`rho` as a float, or a FlatError naming it.

  Args:
    rho: the SAM radius.

  Returns:
    `float(rho)`.
  """
  try:
    r = float(rho)
  except (TypeError, ValueError):
    raise FlatError(f"sam rho must be a number >= 0, got {rho!r}") from None
  if not r >= 0 or r == float("inf"):
    raise FlatError(f"sam rho must be a finite number >= 0, got {rho!r}")
  return r


def check_tasks(order: Sequence[str], known: Sequence[str]) -> tuple:
  """The task order as a tuple, or a FlatError naming unknown tasks.

  Args:
    order: task names in the order they are combined.
    known: the tasks the model has heads (or data) for.

  Returns:
    `tuple(order)`.
  """
  order = tuple(order)
  bad = [t for t in order if t not in set(known)]
  if bad:
    raise FlatError(f"task order names unknown task(s) {bad}; known: "
                    f"{sorted(known)}")
  if len(set(order)) != len(order) or not order:
    raise FlatError(f"task order must list each task once, got {list(order)}")
  return order


def tree_norm(tree: Tree) -> jax.Array:
  """Global L2 norm (sum of per-leaf squared norms, then one sqrt)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def tree_vdot(a: Tree, b: Tree) -> jax.Array:
  """Sum over leaves of `<a_leaf, b_leaf>`."""
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a),
                                             jax.tree.leaves(b)))


def ascent(grads: Tree, rho: float, norm: jax.Array | None = None) -> Tree:
  """The SAM ascent step `rho * g / (||g|| + 1e-12)` (Foret et al. 2021).

  Args:
    grads: a gradient pytree.
    rho: radius.
    norm: the norm to divide by (default the global norm of `grads`).

  Returns:
    The perturbation, same structure as `grads`.
  """
  norm = tree_norm(grads) if norm is None else norm
  scale = rho / (norm + _EPS)
  return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)


def task_perturbation(g_shared: Tree, g_head: Tree, rho: float,
                      scope: str = "joint") -> tuple[Tree, Tree]:
  """Task t's ascent step `(eps_shared, eps_head)`.

  Args:
    g_shared: grad of L_t wrt the shared params.
    g_head: grad of L_t wrt task t's head (may be an empty tree).
    rho: radius.
    scope: `joint` (one norm over shared and head; the official code) or
      `separate` (each part normalized to rho; our reading of the paper).

  Returns:
    The perturbations of the shared params and of the head.
  """
  if scope == "joint":
    norm = jnp.sqrt(tree_norm(g_shared) ** 2 + tree_norm(g_head) ** 2)
    return ascent(g_shared, rho, norm), ascent(g_head, rho, norm)
  if scope == "separate":
    return ascent(g_shared, rho), ascent(g_head, rho)
  raise FlatError(f"sam scope must be 'joint' or 'separate', got {scope!r}")


def _stack(trees: Sequence[Tree]) -> Tree:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def combine_mean(stacked: Tree) -> Tree:
  """Equal weights: the mean over the task axis (the code's `ew`)."""
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked)


def combine_sum(stacked: Tree) -> Tree:
  """The sum over the task axis."""
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), stacked)


def combine_pcgrad(stacked: Tree) -> Tree:
  """PCGrad (Yu et al. 2020), deterministic order, summed.

  Each task's gradient is projected, in task order, off every other
  task's ORIGINAL gradient it conflicts with (negative inner product);
  the projected gradients are summed.

  Args:
    stacked: per-task gradients with a leading task axis `[T, ...]`.

  Returns:
    The combined gradient (no task axis).
  """
  n = jax.tree.leaves(stacked)[0].shape[0]
  per = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]
  sq = [tree_vdot(g, g) for g in per]
  out = []
  for i in range(n):
    gi = per[i]
    for j in range(n):
      if j == i:
        continue
      dot = tree_vdot(gi, per[j])
      coef = jnp.where(dot < 0, dot / (sq[j] + _EPS), 0.0)
      gi = jax.tree.map(lambda a, b, c=coef: a - c * b, gi, per[j])
    out.append(gi)
  return combine_sum(_stack(out))


COMBINERS: dict[str, Callable[[Tree], Tree]] = {
    "mean": combine_mean, "sum": combine_sum, "pcgrad": combine_pcgrad}


def get_combiner(name: str) -> Callable[[Tree], Tree]:
  """The combiner called `name`, or a FlatError listing the known ones."""
  if name not in COMBINERS:
    raise FlatError(f"unknown sam combiner {name!r}; known: "
                    f"{sorted(COMBINERS)}")
  return COMBINERS[name]


def flat_gradients(task_loss: Callable[..., tuple[jax.Array, Any]],
                   params: dict, batch: dict, order: Sequence[str],
                   rho: float, combiner: str = "mean",
                   scope: str = "joint") -> tuple[dict, dict]:
  """The paper's update direction for a shared + per-task-head model.

  Args:
    task_loss: `(shared, head, task_batch, task) -> (loss, aux)`; `task` is
      the task's name (a static Python string).
    params: `{"shared": tree, "heads": {task: tree}}`.
    batch: `{task: task_batch}`.
    order: tasks in the order the combiner sees them (a key of `heads`).
    rho: SAM radius (0: the plain multi-task gradient, exactly).
    combiner: a key of `COMBINERS`.
    scope: `joint` or `separate` (`task_perturbation`).

  Returns:
    `(grads, info)`: grads with the structure of `params` (shared: combined
    low-loss + flat parts; head t: its flat gradient); info holds per-task
    `loss` (at theta), `sam_loss` (at theta + eps_t) and `aux` dicts.
  """
  rho = check_rho(rho)
  order = check_tasks(order, list(params["heads"]))
  comb = get_combiner(combiner)
  vg = jax.value_and_grad(task_loss, argnums=(0, 1), has_aux=True)
  g_low, g_flat, heads, info = [], [], {}, {"loss": {}, "sam_loss": {},
                                            "aux": {}}
  shared = params["shared"]
  for t in order:
    head = params["heads"][t]
    (loss, aux), (gs, gh) = vg(shared, head, batch[t], t)
    if rho == 0:  # eps_t = 0 exactly: the second pass would repeat the first
      sloss, gs2, gh2 = loss, gs, gh
    else:
      es, eh = task_perturbation(gs, gh, rho, scope)
      add = lambda p, e: jax.tree.map(lambda a, b: a + b, p, e)
      (sloss, _), (gs2, gh2) = vg(add(shared, es), add(head, eh), batch[t], t)
    g_low.append(gs)
    g_flat.append(jax.tree.map(lambda a, b: a - b, gs2, gs))
    heads[t] = gh2
    info["loss"][t], info["sam_loss"][t], info["aux"][t] = loss, sloss, aux
  low, flat = comb(_stack(g_low)), comb(_stack(g_flat))
  grads = {"shared": jax.tree.map(lambda a, b: a + b, low, flat),
           "heads": {t: heads.get(t, jax.tree.map(jnp.zeros_like, h))
                     for t, h in params["heads"].items()}}
  return grads, info


def sam_gradient(loss: Callable[..., tuple[jax.Array, Any]], params: Tree,
                 *args, rho: float
                 ) -> tuple[tuple[jax.Array, Any], Tree, jax.Array]:
  """Single-task SAM: the gradient at `params + rho g / ||g||`.

  Args:
    loss: `(params, *args) -> (loss, aux)`.
    params: the learned params.
    *args: the loss's other arguments.
    rho: radius.

  Returns:
    `((loss at params, aux at params), SAM gradient, loss at params + eps)`.
  """
  rho = check_rho(rho)
  vg = jax.value_and_grad(loss, has_aux=True)
  out, g = vg(params, *args)
  eps = ascent(g, rho)
  (value2, _), g2 = vg(jax.tree.map(lambda a, b: a + b, params, eps), *args)
  return out, g2, value2
