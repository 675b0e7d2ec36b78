"""Task-based flat regions as losses for the one trainer (`train.fit`).

`train.fit` differentiates `objective.loss` with `jax.value_and_grad`. The
flat-region update is not the gradient of any one loss, so these wrappers
return a surrogate whose VALUE is the plain loss at theta and whose
GRADIENT is exactly the wanted direction:

  surrogate(p) = L(theta) + sum_leaves <stop_gradient(G), p - stop_gradient(p)>

(d/dp of the second term is G times an exact 1.0; the inner gradient
passes are cut off by `stop_gradient`, so the outer backward pass adds
nothing to them). This keeps one trainer, one jitted step with donated
state, checkpoints and exact resume for SAM runs too.

Why not `optax.contrib.sam`: it is a GradientTransformation that realizes
the ascent as extra optimizer steps on ONE loss (alternating adversarial
and outer steps, or an opaque mode that calls a single `grad_fn`). The
multi-task method needs one ascent per task, each from that task's own
gradient, and a combiner over the tasks' low-loss and flat parts, so the
loss itself has to see the tasks; the wrapper below does, and leaves the
optimizer (AdamW, schedules, clipping) as configured.

Sources: see `mtmerge.flat.sam` (Phan et al., arXiv:2211.13723; code
github.com/VietHoang1512/FS-MTL).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mtmerge import train
from mtmerge.flat import sam

Tree = Any


def with_gradient(value: jax.Array, grads: Tree, params: Tree) -> jax.Array:
  """A scalar equal to `value` whose gradient wrt `params` is `grads`.

  Args:
    value: the loss value to report.
    grads: the gradient to return (same structure as `params`).
    params: the differentiated params.

  Returns:
    `value + sum <stop_gradient(grads), params - stop_gradient(params)>`.
  """
  sg = jax.lax.stop_gradient
  lin = sum(jnp.sum(sg(g).astype(p.dtype) * (p - sg(p)))
            for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)))
  return sg(value) + lin


def sam_loss(loss: Callable, rho: float) -> Callable:
  """Single-task SAM (Foret et al. 2021) as a `train.Objective.loss`.

  Args:
    loss: `(params, consts, batch, rng) -> (loss, metrics)`.
    rho: radius (checked; 0 gives the plain gradient).

  Returns:
    A loss of the same signature: value and metrics at theta, gradient at
    theta + rho g / ||g||; metrics gain `sam_loss` (the loss there).
  """
  rho = sam.check_rho(rho)

  def wrapped(params, consts, batch, rng):
    (value, metrics), g, perturbed = sam.sam_gradient(
        loss, params, consts, batch, rng, rho=rho)
    return with_gradient(value, g, params), {
        **metrics, "sam_loss": jax.lax.stop_gradient(perturbed)}
  return wrapped


def multitask_objective(task_loss: Callable, init: dict,
                        order: Sequence[str], *, rho: float,
                        combiner: str = "mean", scope: str = "joint",
                        consts: Tree = None) -> train.Objective:
  """The task-based flat-region method as a `train.Objective`.

  Args:
    task_loss: `(shared, head, consts, task_batch, task) -> (loss, aux)`.
    init: `{"shared": tree, "heads": {task: tree}}` initial params (a head
      may be an empty dict: frozen or absent heads).
    order: the tasks, in combiner order (checked against `init["heads"]`).
    rho: SAM radius (0: the plain multi-task gradient).
    combiner: `mean`, `sum` or `pcgrad` (`sam.COMBINERS`).
    scope: `joint` (code) or `separate` (paper, as we read it).
    consts: frozen inputs passed to `task_loss`.

  Returns:
    An Objective whose batches are `{task: task_batch}`; its loss value is
    the mean task loss at theta; metrics `loss/<task>` and `sharpness/<task>`
    (loss at theta + eps_t minus loss at theta).
  """
  rho = sam.check_rho(rho)
  order = sam.check_tasks(order, list(init["heads"]))
  sam.get_combiner(combiner)
  if scope not in ("joint", "separate"):
    raise sam.FlatError(f"sam scope must be 'joint' or 'separate', got "
                        f"{scope!r}")

  def loss(params, cst, batch, rng):
    del rng
    fn = lambda s, h, b, t: task_loss(s, h, cst, b, t)
    grads, info = sam.flat_gradients(fn, params, batch, order, rho,
                                     combiner, scope)
    value = sum(info["loss"].values()) / len(order)
    metrics = {}
    for t in order:
      metrics[f"loss/{t}"] = info["loss"][t]
      metrics[f"sharpness/{t}"] = info["sam_loss"][t] - info["loss"][t]
    return with_gradient(value, grads, params), metrics
  return train.Objective(init, loss, consts)
