"""Pieces every learned merge shares: coefficient merges, objectives, data.

* `weighted_merge(base, tvs, coeffs)`: theta_0 + sum_t c_t tau_t with `c`
  a `[T]` vector (task-wise), a tree of `[T]` (one per leaf: layer-wise
  AdaMerging, aTLAS) or a tree of `[T, K]` with a group index per entry
  (aTLAS x K); differentiable in the coefficients.
* `entropy` / `cross_entropy`: the unsupervised test-time objective of
  AdaMerging and Concrete masks (Shannon entropy of the predictions) and
  the supervised one (aTLAS, skill localization, routers).
* `task_batches`: one seeded, resumable batch stream per task, as a
  `step -> {task: batch}` function for `mtmerge.train.fit`.
* `const_shardings`: NamedShardings of theta_0 (parameter rules) and of
  stacked task vectors (rules plus the mesh's `task` axis, if any).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mtmerge import sharding
from mtmerge import task_vectors
from mtmerge import train
from mtmerge.learned import problem as problem_lib

Tree = Any


class LearnedResult(NamedTuple):
  """What a learned merge returns.

  Attributes:
    params: the merged params (structure of `problem.base`), or None for
      methods that serve each task or input with its own model.
    learned: the learned variables (coefficients, masks, router params).
    log: training metrics, one dict per step.
    extra: method-specific outputs (e.g. a `methods.Compressed`, or a
      per-input model for Twin-Merging).
  """
  params: Tree | None
  learned: Tree
  log: list[dict]
  extra: dict


@jax.custom_vjp
def task_mix(c: jax.Array, v: jax.Array) -> jax.Array:
  """`sum_t c[t] * v[t]` in float32: a `[T]` vector times `[T, ...]` tensors.

  Same value as `tensordot(c, v, 1)`, with a hand-written VJP: the
  coefficient gradient `<g, v[t]>` is an elementwise multiply and a
  reduction over each task's entries. Left to autodiff, the transposed
  tensordot is a matrix-vector product XLA:CPU feeds with a transposed
  `[P, T]` copy of every task vector, on every step (measured on the
  layer-wise AdaMerging step of `benchmarks/learned_bench.py`: 8% of the
  step). The task-vector cotangent `c[t] * g` is dead code in jitted
  steps that only differentiate the coefficients, and is dropped there.
  """
  c = c.astype(jnp.float32)
  if v.dtype == jnp.float32:
    return jnp.tensordot(c, v, axes=1)
  # Narrower task vectors (bf16) are widened inside one fused multiply-sum:
  # a float32 copy of every [T, ...] tensor would otherwise be shared with
  # the backward pass and kept alive across the whole step (measured by
  # launch/aot_check.py at 7B x 8 tasks: ~2 GiB per device).
  return jnp.sum(c.reshape((-1,) + (1,) * (v.ndim - 1)) * v.astype(
      jnp.float32), axis=0)


def _task_mix_fwd(c, v):
  return task_mix(c, v), (c, v)


def _task_mix_bwd(res, g):
  c, v = res
  rest = tuple(range(1, v.ndim))
  dc = jnp.sum(v.astype(jnp.float32) * g[None], axis=rest)
  dv = c.astype(jnp.float32).reshape((-1,) + (1,) * len(rest)) * g[None]
  return dc.astype(c.dtype), dv.astype(v.dtype)


task_mix.defvjp(_task_mix_fwd, _task_mix_bwd)


def _combine(v: jax.Array, c: jax.Array, groups: jax.Array | None):
  if groups is None:  # c: [T]
    return task_mix(c, v)
  c = c.astype(jnp.float32)
  # c: [T, K]; entry e of task t is scaled by c[t, groups[e]].
  return jnp.sum(c[:, groups] * v.astype(jnp.float32), axis=0)


def weighted_merge(base: Tree, tvs: Tree, coeffs: Any,
                   groups: Tree | None = None) -> Tree:
  """theta_0 + sum_t c_t * tau_t, per leaf.

  Args:
    base: theta_0 (no task axis).
    tvs: stacked task vectors `[T, ...]`.
    coeffs: a `[T]` array (task-wise), or a tree like `base` of `[T]`
      arrays (one coefficient per task per leaf) or `[T, K]` arrays (one
      per task per leaf per group).
    groups: with `[T, K]` coefficients, a tree like `base` of int arrays
      of each leaf's shape, the group (0..K-1) of every entry.

  Returns:
    The merged params, in `base`'s dtypes.
  """
  if not isinstance(coeffs, (dict, list, tuple)):
    coeffs = jax.tree.map(lambda _: coeffs, base)
  if groups is None:
    delta = jax.tree.map(lambda v, c: _combine(v, c, None), tvs, coeffs)
  else:
    delta = jax.tree.map(_combine, tvs, coeffs, groups)
  return task_vectors.apply(base, delta)


def task_logits(problem: problem_lib.MergeProblem, head: dict, params: Tree,
                inputs: dict) -> jax.Array:
  """Logits of the model `params` through `head` on `inputs`.

  Inside a loss, pass the head from the (sharded) constants rather than
  `problem.heads`, so it is an argument of the jitted step, not a
  baked-in constant.
  """
  return problem_lib.encoders.logits(head, problem.features(
      params, problem_lib.inputs_of(inputs)))


def multi_task_features(problem: problem_lib.MergeProblem, params: Tree,
                        batch: dict[str, dict]) -> dict[str, jax.Array]:
  """`{task: features}` of one model on every task's inputs.

  When the tasks' inputs have the same keys, dtypes and per-row shapes
  (text padded to one length, images of one size) they go through the
  model as ONE concatenated batch: one forward and one backward instead of
  T, which compiles faster and runs faster on every backend. Otherwise
  each task is run on its own.
  """
  tasks = list(batch)
  ins = [problem_lib.inputs_of(batch[t]) for t in tasks]
  sig = lambda d: tuple(sorted((k, np.shape(v)[1:], jnp.result_type(v))
                               for k, v in d.items()))
  if len(tasks) == 1 or any(sig(d) != sig(ins[0]) for d in ins):
    return {t: problem.features(params, d) for t, d in zip(tasks, ins)}
  sizes = [len(next(iter(d.values()))) for d in ins]
  joined = {k: jnp.concatenate([d[k] for d in ins]) for k in ins[0]}
  feats = problem.features(params, joined)
  out, start = {}, 0
  for t, n in zip(tasks, sizes):
    out[t] = feats[start:start + n]
    start += n
  return out


def pad_heads(heads: dict[str, dict]) -> dict[str, dict]:
  """Linear heads padded to one class count (zero weights, -1e4 bias).

  A padded class has softmax probability exactly 0 in float32, so
  entropies, cross-entropies, argmaxes and their gradients are those of
  the unpadded head, while every task's head has one shape
  (`task_by_task` can then scan over the tasks).
  """
  c = max(int(np.shape(h["bias"])[-1]) for h in heads.values())

  def pad(h):
    extra = c - int(np.shape(h["bias"])[-1])
    if not extra:
      return h
    return {"kernel": jnp.pad(h["kernel"], ((0, 0), (0, extra))),
            "bias": jnp.pad(h["bias"], (0, extra), constant_values=-1e4)}
  return {t: pad(h) for t, h in heads.items()}


def stack_trees(trees: Sequence[Tree]) -> Tree:
  """Trees of one signature (`one_signature`) stacked leaf by leaf."""
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def one_signature(trees: Sequence[Tree]) -> bool:
  """True if every tree has the same structure, leaf shapes and dtypes
  (so the trees stack into one batched tree, e.g. per-task batches)."""
  sig = lambda t: (jax.tree.structure(t), [(np.shape(x), jnp.result_type(x))
                                           for x in jax.tree.leaves(t)])
  first = sig(trees[0])
  return all(sig(t) == first for t in trees[1:])


def task_by_task(task_loss: Callable[[Tree, dict, dict], jax.Array],
                 params: Tree, heads: dict[str, dict],
                 batch: dict[str, dict]) -> tuple[jax.Array, dict]:
  """`sum_t task_loss(params, heads[t], batch[t])`, one task at a time.

  The gradient with respect to `params` is that of the sum, but the
  forward pass is a `lax.scan` over the tasks that computes each task's
  value and gradient and accumulates the gradients (float32), so only one
  task's activations are alive at a time instead of all T tasks' (the
  memory of FusionBench's per-task `backward`); the backward pass only
  scales the accumulated gradient. Needs heads of one shape and inputs of
  one signature (text padded to one length); otherwise the tasks run as
  one concatenated batch (`multi_task_features`).

  Returns:
    The sum and `{task: value}` (the per-task values carry no gradient).
  """
  tasks = list(batch)
  ins = [problem_lib.inputs_of(batch[t]) for t in tasks]
  hs = [heads[t] for t in tasks]
  if not (one_signature(ins) and one_signature(hs)):
    vals = {t: task_loss(params, h, d) for t, h, d in zip(tasks, hs, ins)}
    return sum(vals.values()), vals
  xs = stack_trees(hs), stack_trees(ins)

  def scan(p):
    def body(acc, x):
      v, g = jax.value_and_grad(task_loss)(p, *x)
      return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g), v
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), p)
    return jax.lax.scan(body, zero, xs)

  @jax.custom_vjp
  def total(p):  # (sum, per-task values); differentiable through the sum
    vals = jax.lax.map(lambda x: task_loss(p, *x), xs)
    return jnp.sum(vals), vals

  def fwd(p):
    g, vals = scan(p)
    dtypes = jax.tree.map(lambda a: jnp.zeros((), a.dtype), p)
    return (jnp.sum(vals), vals), (g, dtypes)

  def bwd(res, ct):
    (g, dtypes), (ct_sum, _) = res, ct  # per-task values: no gradient
    return (jax.tree.map(lambda a, z: (ct_sum * a).astype(z.dtype), g,
                         dtypes),)

  total.defvjp(fwd, bwd)
  out, vals = total(params)
  return out, {t: jax.lax.stop_gradient(vals[i]) for i, t in enumerate(tasks)}


def entropy(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean Shannon entropy of softmax(logits) over the (unmasked) rows."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  h = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return _mean(h, mask)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  mask: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy with integer labels (unmasked rows)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32),
                            axis=-1)[:, 0]
  return _mean(ce, mask)


def accuracy(logits: jax.Array, labels: jax.Array,
             mask: jax.Array | None = None) -> jax.Array:
  return _mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)


def _mean(x, mask):
  if mask is None:
    return jnp.mean(x)
  m = mask.astype(jnp.float32)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def task_batches(problem: problem_lib.MergeProblem, split: str,
                 batch_size: int, *, seed: int = 0, limit: int | None = None,
                 labels: bool = False, tasks: Sequence[str] | None = None
                 ) -> Callable[[int], dict[str, dict[str, np.ndarray]]]:
  """`step -> {task: batch}`: every task's batch of training step `step`.

  Each task's split is shuffled per epoch from `(seed, epoch)` and read by
  step index, so a resumed run sees the batches of an uninterrupted one.

  Args:
    problem: the merge problem (its `data`).
    split: `train`, `validation` or `test` (AdaMerging adapts on the
      unlabeled test inputs; labels are then dropped).
    batch_size: rows per task per step (per host).
    seed: shuffle seed.
    limit: use only the first `limit` examples of each split.
    labels: keep the `label` key (supervised objectives).
    tasks: a subset of `problem.tasks` (default all).
  """
  from mtmerge import taskdata  # pylint: disable=g-import-not-at-top
  tasks = list(problem.tasks if tasks is None else tasks)
  src = {t: problem.data(t, split, batch_size, shuffle=True, seed=seed,
                         limit=limit) for t in tasks}

  def at(step: int):
    out = {}
    for t, b in src.items():
      batch = taskdata.batch_at(b, step)
      out[t] = (batch if labels else problem_lib.inputs_of(batch))
    return out
  return at


def const_shardings(mesh: jax.sharding.Mesh, consts: dict[str, Tree],
                    rules: Sequence[tuple[str, Any]] | None = None
                    ) -> dict[str, Tree]:
  """Shardings of a learned merge's constants.

  Args:
    mesh: the mesh.
    consts: a dict that may hold `base` (theta_0), `tvs` (stacked task
      vectors) and anything else (heads, masks: replicated).
    rules: `(regex, spec)` parameter sharding rules (default replicated).
      Stacked task vectors put their task dim on the mesh's `task` axis
      when it has one.

  Returns:
    A dict of shardings with the structure of `consts`.
  """
  rules = [(".*", None)] if rules is None else list(rules)
  repl = NamedSharding(mesh, P())
  out = {}
  for k, v in consts.items():
    if k == "base":
      out[k] = sharding.shardings_from_rules(v, rules, mesh)
    elif k == "tvs":
      out[k] = sharding.task_vector_sharding(
          v, mesh, rules, task_axis="task" if "task" in mesh.shape else None)
    else:
      out[k] = jax.tree.map(lambda _: repl, v)
  return out


def train_config(defaults: dict, overrides: dict | None) -> train.TrainConfig:
  """A `TrainConfig` from a method's defaults and the user's overrides."""
  return train.TrainConfig.from_dict({**defaults, **dict(overrides or {})})
