"""aTLAS: task-vector compositions with learned anisotropic (per-block) scales.

"Knowledge Composition using Task Vectors with Learned Anisotropic Scaling"
(Zhang et al., NeurIPS 2024; fredzzhang/atlas): theta = theta_0 + sum_t
Lambda_t tau_t, one coefficient per task vector per leaf, initialized to 0;
"aTLAS x K" splits each leaf's entries into K fixed random groups, one
coefficient per (task, leaf, group). Objectives (`objective=`):

* `task_addition`: cross-entropy on the tasks' labeled validation splits,
  each through its own head (AdamW lr 1e-3, weight decay 0.1);
* `few_shot`: cross-entropy on `k_shot` examples per class of a `target`'s
  train split, composing the other tasks' vectors (AdamW lr 1e-1, cosine);
* `test_time`, the paper's unsupervised FixMatch (UFM; AdamW 1e-3, cosine):
  the plain view's softmax (no gradient) is the soft target of a strongly
  augmented view where its top probability exceeds `threshold`. Per class,
  the `min(N / C / 10, 100)` test examples of highest initial (theta_0)
  probability of that class are trusted: their target is the one-hot
  initial prediction and they fill 1/4 of every batch. As in the official
  code, except that all classes' trusted examples are flagged (the code
  flags only the last class's) and its no-op sharpening is left out;
* `negation`: -CE(target) + CE(control) on validation data with the
  target's own vector (AdamW 5e-3: the code's 1e-3 times 5 to 10).

Gradients are clipped to norm 1 as in the official code. Unlike it, "x K"
partitions every leaf (the code only 2-D weights), no per-epoch selection
of the best coefficients is made, and text's strong view is token dropout.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import sharding
from mtmerge import train
from mtmerge.data import pipeline
from mtmerge.learned import augment as augment_lib
from mtmerge.learned import common
from mtmerge.learned import problem as problem_lib

Tree = Any
_ADAMW = dict(optimizer="adamw", weight_decay=0.1, clip_norm=1.0, steps=500)
TRAIN_DEFAULTS = dict(task_addition=dict(_ADAMW, lr=1e-3),
                      few_shot=dict(_ADAMW, lr=1e-1, schedule="cosine"),
                      test_time=dict(_ADAMW, lr=1e-3, schedule="cosine"),
                      negation=dict(_ADAMW, lr=5e-3))
SPLITS = dict(task_addition="validation", few_shot="train", test_time="test",
              negation="validation")
OBJECTIVES = tuple(TRAIN_DEFAULTS)


def partition_groups(base: Tree, partitions: int, seed: int = 0) -> Tree:
  """aTLAS x K's fixed random group (0..K-1) of every entry of every leaf."""
  leaves, treedef = jax.tree.flatten(base)
  dtype = np.int8 if partitions < 128 else np.int32
  return jax.tree.unflatten(treedef, [
      np.random.default_rng([seed, i]).integers(0, partitions, np.shape(x))
      .astype(dtype) for i, x in enumerate(leaves)])


def init_coeffs(base: Tree, num_sources: int, partitions: int = 1) -> Tree:
  """Zero coefficients: `[S]` per leaf, or `[S, K]` with K partitions."""
  shape = (num_sources,) + ((partitions,) if partitions > 1 else ())
  return jax.tree.map(lambda _: np.zeros(shape, np.float32), base)


def few_shot_indices(labels: np.ndarray, k_shot: int, num_classes: int,
                     seed: int = 0) -> np.ndarray:
  """Sorted indices of `k_shot` seeded random examples of every class."""
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(np.asarray(labels) == c)
    if len(idx) < k_shot:
      raise ValueError(f"k_shot={k_shot} but class {c} has {len(idx)} "
                       "examples")
    out.append(np.random.default_rng([seed, c]).permutation(idx)[:k_shot])
  return np.sort(np.concatenate(out))


def trusted_samples(probs: np.ndarray, per_class: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """UFM's trusted examples (sorted) and targets (their argmax): per class
  c, the `per_class` (default min(N / C / 10, 100)) of highest p(c|x)."""
  n, c = probs.shape
  k = max(1, per_class or min(n // c // 10, 100))
  idx = np.unique(np.concatenate(
      [np.argsort(probs[:, j], kind="stable")[-k:] for j in range(c)]))
  return idx, np.argmax(probs[idx], -1).astype(np.int32)


def ufm_loss(plain: jax.Array, strong: jax.Array, target: jax.Array,
             threshold: float) -> jax.Array:
  """UFM: CE of the strong view against softmax(plain) (no gradient), or a
  one-hot `target` where >= 0 (trusted), over rows whose max > threshold."""
  q = jax.nn.softmax(jax.lax.stop_gradient(plain).astype(jnp.float32))
  q = jnp.where(target[:, None] >= 0, jax.nn.one_hot(target, q.shape[-1]), q)
  w = (jnp.max(q, -1) > threshold).astype(jnp.float32)
  ce = -jnp.sum(q * jax.nn.log_softmax(strong.astype(jnp.float32)), -1)
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def make_objective(problem: problem_lib.MergeProblem, objective: str,
                   tvs: Tree, coeffs: Tree, groups: Tree | None = None, *,
                   signs: dict[str, float] | None = None,
                   threshold: float = 0.99,
                   augment: Callable | None = None) -> train.Objective:
  """The loss summed over a batch's tasks `{task: labeled batch}`.

  test_time's batches are `{task: {"inputs", "target"}}` (see `ufm_loss`)
  and `augment` makes their strong view; `signs[task]` weights a task's
  cross-entropy (negation: -1 for the target).
  """
  consts = {"base": problem.base, "tvs": tvs, "heads": problem.heads,
            **({} if groups is None else {"groups": groups})}

  def stacked_ce(merged, heads, batch):
    """Per-task (cross-entropy, accuracy) `[T]` in one compiled body."""
    names = sorted(batch)
    heads = common.pad_heads({t: heads[t] for t in names})
    def one(x):
      head, b = x
      z = common.task_logits(problem, head, merged, problem_lib.inputs_of(b))
      return common.cross_entropy(z, b["label"]), common.accuracy(
          z, b["label"])
    return jax.lax.map(one, (common.stack_trees([heads[t] for t in names]),
                             common.stack_trees([batch[t] for t in names])))

  def loss(c, k, batch, rng):
    merged = common.weighted_merge(k["base"], k["tvs"], c, k.get("groups"))
    out, total = {}, 0.0
    if (objective != "test_time" and augment is None and len(batch) > 1
        and common.one_signature(list(batch.values()))):
      # One compiled forward/backward for every task (an unrolled loop
      # compiled T copies).
      ce, acc = stacked_ce(merged, k["heads"], batch)
      for i, t in enumerate(sorted(batch)):
        out[f"ce/{t}"], out[f"acc/{t}"] = ce[i], acc[i]
        total += (signs or {}).get(t, 1.0) * ce[i]
      return total, out
    for i, (t, b) in enumerate(sorted(batch.items())):
      key, head = jax.random.fold_in(rng, i), k["heads"][t]
      logits = lambda x: common.task_logits(problem, head, merged, x)
      if objective == "test_time":
        out[f"ufm/{t}"] = ufm_loss(logits(b["inputs"]), logits(augment(
            b["inputs"], key)), b["target"], threshold)
        total += out[f"ufm/{t}"]
        continue
      x = problem_lib.inputs_of(b)
      z = logits(augment(x, key) if augment else x)
      out[f"ce/{t}"] = common.cross_entropy(z, b["label"])
      out[f"acc/{t}"] = common.accuracy(z, b["label"])
      total += (signs or {}).get(t, 1.0) * out[f"ce/{t}"]
    return total, out
  return train.Objective(coeffs, loss, consts)


def _all_rows(b: pipeline.Batcher) -> Any:
  """Every example of `b`'s source once, in order, on every host."""
  return pipeline.Batcher(b.source, min(256, b.n), transform=b.transform,
                          shuffle=False, drop_remainder=False,
                          process_index=0, process_count=1).epoch(0)


def _rows(idx, n: int, seed: int, step: int) -> np.ndarray:
  """This host's `n` of `idx` for `step`: a seeded permutation per epoch."""
  per = len(idx) // jax.process_count() // n
  if per < 1:
    raise ValueError(f"{len(idx)} examples cannot fill batches of {n} per "
                     f"host; lower batch_size")
  epoch, i = divmod(int(step), per)
  mine = np.random.default_rng([seed, epoch]).permutation(np.asarray(idx))[
      jax.process_index()::jax.process_count()]
  return mine[i * n:(i + 1) * n]


def _ufm_batches(problem, targets, split, bs, limit, seed, per_class):
  """UFM's `step -> batches` (3/4 untrusted, 1/4 trusted), trusted sets."""
  fwd = jax.jit(lambda p, h, x: jax.nn.softmax(common.task_logits(
      problem, h, p, x).astype(jnp.float32)))
  data, trusted = {}, {}
  for t in targets:
    b = problem.data(t, split, bs, shuffle=False, limit=limit)
    probs = np.concatenate([
        np.asarray(fwd(problem.base, problem.heads[t], x))[
            x.get("mask", slice(None))] for x in _all_rows(b)])
    trusted[t], labels = trusted_samples(probs, per_class)
    target = np.full(len(probs), -1, np.int32)  # -1: not trusted
    target[trusted[t]] = labels
    data[t] = (b, target, min(max(1, bs // 4), len(labels)))

  def at(step):
    out = {}
    for t, (b, target, n) in data.items():
      rows = np.concatenate([_rows(np.flatnonzero(target < 0), bs - n, seed,
                                   step), _rows(trusted[t], n, seed, step)])
      out[t] = {"inputs": problem_lib.inputs_of(b.transform(
          [b.source[int(j)] for j in rows])), "target": target[rows]}
    return out
  return at, trusted


def _few_shot_batches(problem, target, split, bs, limit, k_shot, seed, shuffle):
  if k_shot is None or int(k_shot) < 1:
    raise ValueError(f"few_shot needs k_shot >= 1, got {k_shot!r}")
  b = problem.data(target, split, bs, shuffle=False, limit=limit)
  labels = np.concatenate([x["label"][x.get("mask", slice(None))]
                           for x in _all_rows(b)])
  try:
    shots = few_shot_indices(labels, int(k_shot), np.shape(
        problem.heads[target]["kernel"])[-1], seed)
  except ValueError as e:
    raise ValueError(f"task {target!r} split {split!r}: {e}") from None
  return (lambda s: {target: b.transform([b.source[int(j)] for j in _rows(
      shots, min(bs, len(shots)), shuffle, s)])}), shots


def _tasks(problem, names, what) -> tuple[str, ...]:
  names = (names,) if isinstance(names, str) else tuple(names)
  if not names or len(set(names)) != len(names) or set(names) - set(
      problem.tasks):
    raise ValueError(f"{what} must be distinct tasks of the problem "
                     f"{problem.tasks}; got {names}")
  return names


def atlas(problem: problem_lib.MergeProblem, *,
          objective: str = "task_addition",
          target: str | Sequence[str] | None = None, control: str | None = None,
          sources: Sequence[str] | None = None, k_shot: int | None = None,
          partitions: int = 1, threshold: float = 0.99,
          trusted_per_class: int | None = None,
          augment: Callable | None = None, batch_size: int = 32,
          split: str | None = None, limit: int | None = None, seed: int = 0,
          train_config: dict | None = None, mesh=None,
          rules: Sequence[tuple[str, Any]] | None = None,
          workdir: str | None = None, progress: bool = True
          ) -> common.LearnedResult:
  """Learns aTLAS coefficients; returns the merged params.

  Args:
    problem: the merge problem.
    objective: one of `OBJECTIVES` (see the module docstring).
    target: the task(s) whose data drive the loss: default all (task_addition,
      test_time); one, required (few_shot, negation).
    control: negation's task to keep (required there, refused elsewhere).
    sources: the task vectors composed; default all tasks (the paper's
      test-time protocol leaves the target out), all but the target
      (few_shot; name it to include it), the target's own (negation).
    k_shot: few_shot's examples per class (drawn with `seed`).
    partitions: K of aTLAS x K (1: one coefficient per task per leaf).
    threshold, trusted_per_class: test_time's confidence threshold and
      trusted examples per class (default min(N / C / 10, 100)).
    augment: `(inputs, rng) -> inputs`: test_time's strong view (default
      `augment.default_augment`) or a few_shot training augmentation (default none).
    batch_size: examples per task per step.
    split, limit: the split (default `SPLITS[objective]`), its first N only.
    seed: seed of the x K groups and of the k-shot draw.
    train_config, mesh, rules, workdir, progress: as in
      `adamerging.adamerging` (defaults `TRAIN_DEFAULTS[objective]`).

  Returns:
    `LearnedResult(merged params, coefficients, log, extra)`, `extra` with
    `sources`, `groups` (x K, else None), and `shots` (few_shot) or
    `trusted` (test_time: per task) indices into the split.
  """
  fingerprint = dict(method="atlas", tasks=problem.tasks, **{
      k: getattr(v, "__qualname__", v) for k, v in locals().items() if k
      not in ("problem", "train_config", "mesh", "rules", "workdir",
              "progress")})
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; one of {OBJECTIVES}")
  if int(partitions) < 1 or not 0.0 <= threshold < 1.0:
    raise ValueError(f"need partitions >= 1 and 0 <= threshold < 1, got "
                     f"{partitions} and {threshold}")
  if objective in ("few_shot", "negation") and not isinstance(target, str):
    raise ValueError(f"{objective} needs one target task, got {target!r}")
  targets = _tasks(problem, target or problem.tasks, "target")
  if (control is None) == (objective == "negation") or (
      control is not None and control == target):
    raise ValueError(f"negation (only) needs a control task other than its "
                     f"target; got control={control!r} for {objective}")
  controls = _tasks(problem, control, "control") if control else ()
  sources = _tasks(problem, sources or {
      "few_shot": [t for t in problem.tasks if t != target],
      "negation": [target]}.get(objective, problem.tasks), "sources")
  cfg = common.train_config(TRAIN_DEFAULTS[objective], train_config)
  split = split or SPLITS[objective]
  groups = partition_groups(problem.base, partitions, seed) \
      if partitions > 1 else None
  extra = {"sources": sources, "groups": groups}
  if objective == "test_time":
    batches, extra["trusted"] = _ufm_batches(
        problem, targets, split, batch_size, limit, cfg.seed, trusted_per_class)
    augment = augment or augment_lib.default_augment
    jax.eval_shape(augment, batches(0)[targets[0]]["inputs"],
                   jax.random.key(0))  # an unusable augment fails here
  elif objective == "few_shot":
    batches, extra["shots"] = _few_shot_batches(
        problem, target, split, batch_size, limit, k_shot, seed, cfg.seed)
  else:
    batches = common.task_batches(problem, split, batch_size, seed=cfg.seed,
                                  limit=limit, labels=True,
                                  tasks=targets + controls)
  idx = np.array([problem.tasks.index(s) for s in sources])
  tvs = problem.tvs if sources == problem.tasks else jax.tree.map(
      lambda v: v[idx], problem.tvs)  # a copy only for a subset
  obj = make_objective(problem, objective, tvs,
                       init_coeffs(problem.base, len(sources), partitions),
                       groups, signs={target: -1.0} if control else None,
                       threshold=threshold, augment=augment)
  mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
  shard = common.const_shardings(mesh, obj.consts, rules)
  if groups is not None:  # entries' groups are sharded like the params
    shard["groups"] = common.const_shardings(mesh, {"base": groups},
                                             rules)["base"]
  res = train.fit(obj, batches, cfg, mesh=mesh, const_shardings=shard,
                  workdir=workdir, fingerprint=fingerprint,
                  desc=f"atlas {objective}", progress=progress)
  merged = jax.jit(common.weighted_merge)(problem.base, tvs, res.params, groups)
  return common.LearnedResult(jax.tree.map(np.asarray, merged), res.params,
                              res.log, extra)
