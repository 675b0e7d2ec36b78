"""What every learned (data-using) merge method is given: `MergeProblem`.

A learned merge sees the merged part of the model as a pure function of its
params plus, per task, a frozen head and a source of batches:

* `base`: theta_0 of the merged params (a nested canonical dict; all zeros
  for tangent-space runs, whose params are offsets from theta_0);
* `tvs`: the stacked task vectors, the structure of `base` with a leading
  task axis `[T, ...]`;
* `features(params, inputs) -> [B, D]`: the encoder's forward over params
  shaped like `base` (the linearized forward in tangent mode), jittable and
  differentiable;
* `heads[task]`: `{"kernel": [D, C], "bias": [C]}`, never merged;
* `data(task, split, batch_size, *, shuffle=False, seed=0, limit=None)`:
  a `mtmerge.data.pipeline.Batcher` whose batches are dicts of numpy arrays
  (model inputs plus `label`, and a boolean `mask` on a padded last batch).

The benchmark builds one from an encoder and a task suite
(`from_encoder`); tests build tiny ones from arrays (`from_arrays`), so every
method runs on a real BERT and on a 2-layer MLP through the same code.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import encoders
from mtmerge import tree as tree_lib
from mtmerge.data import pipeline

Tree = Any
LABEL_KEYS = ("label", "mask")


class MergeProblem(NamedTuple):
  """Models and data of a learned merge (see the module docstring).

  Attributes:
    tasks: task names, in the order of the task axis of `tvs`.
    base: theta_0 of the merged params (zeros in tangent mode).
    tvs: stacked task vectors `[T, ...]`, structure of `base`.
    features: `(params, inputs) -> [B, D]` features.
    heads: task name -> frozen linear head.
    data: `(task, split, batch_size, **kw) -> Batcher`; keywords `shuffle`,
      `seed`, `limit`, and `tight` (text padded per batch, to a multiple of
      8 tokens, rather than every batch to one length: for passes that do
      not need one compiled shape, such as evaluations and statistics).
    mode: `standard` or `tangent`.
    capture_model: for statistics of the real network (RegMean's Gram
      matrices): `(params, inputs) -> features` run through the unmodified
      module graph, or None when the problem has no module graph.
  """
  tasks: tuple[str, ...]
  base: Tree
  tvs: Tree
  features: Callable[[Tree, dict], jax.Array]
  heads: dict[str, dict]
  data: Callable[..., pipeline.Batcher]
  mode: str = "standard"
  capture_model: Callable[[Tree, dict], jax.Array] | None = None

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  def task_params(self, t: int) -> Tree:
    """theta_t = base + tvs[t] (the task's fine-tuned merged params)."""
    return jax.tree.map(lambda b, v: b + v[t], self.base, self.tvs)

  def logits(self, params: Tree, task: str, inputs: dict) -> jax.Array:
    """Task logits of the model `params` through the task's head."""
    return encoders.logits(self.heads[task], self.features(params, inputs))


def inputs_of(batch: dict) -> dict:
  """The model inputs of a batch (drops `label` and `mask`)."""
  return {k: v for k, v in batch.items() if k not in LABEL_KEYS}


def weighted_batches(problem: MergeProblem, task: str, split: str,
                     batch_size: int, num_examples: int):
  """Yields `(inputs, row weights)` over the first `num_examples` real rows.

  Weights are 1 for real rows, 0 for padding (`mask`) and for rows past
  `num_examples` (even if the source ignores `limit`); iteration stops once
  `num_examples` rows have been yielded. Statistics (Fisher, RegMean Grams)
  weight every row by it.
  """
  seen = 0
  for batch in problem.data(task, split, batch_size,
                            limit=num_examples).epoch(0):
    inputs = inputs_of(batch)
    rows = len(next(iter(jax.tree.leaves(inputs))))
    w = np.asarray(batch.get("mask", np.ones(rows, bool)), np.float32)
    w = w * (np.cumsum(w) <= num_examples - seen)
    if not w.any():
      return
    seen += int(w.sum())
    yield inputs, w


def from_encoder(encoder: encoders.Encoder, tasks: Sequence[Any],
                 heads: dict[str, Any], base: Tree, tvs: Tree, *,
                 trainable: str, mode: str, max_len: int = 48
                 ) -> MergeProblem:
  """The problem of merging `encoder`'s `trainable` params over `tasks`.

  Args:
    encoder: the pretrained encoder (forward and theta_0 of the rest).
    tasks: task names or TaskSpecs (the order of `tvs`' task axis).
    heads: task name -> head.
    base: the merged params' theta_0 (nested; zeros in tangent mode).
    tvs: stacked task vectors.
    trainable: regex of the merged paths (the rest stays pretrained).
    mode: `standard` or `tangent`.
    max_len: text truncation length.
  """
  from mtmerge import taskdata  # local: tokenizers, tfds
  from mtmerge.data import suites
  tasks = tuple(suites.get_task(t).name for t in tasks)
  _, rest = encoders.split(encoder.params, trainable)
  flat = tree_lib.to_flat_dict
  if mode == "tangent":
    lin = encoders.linearized(encoder.features, encoder.params, trainable)
    features = lambda p, inputs: lin(flat(p), inputs)
    capture = None
  elif mode == "standard":
    features = lambda p, inputs: encoder.features(
        encoders.join(flat(p), rest), inputs)
    capture = features
  else:
    raise ValueError(f"mode must be standard or tangent, got {mode!r}")

  def data(task, split, batch_size, *, shuffle=False, seed=0, limit=None,
           tight=False):
    # Every batch padded to max_len: one shape, so one compiled step
    # (`tight`: to a multiple of 8; word tasks then take 8 tokens, not 32).
    return taskdata.batcher(encoder, task, split, batch_size, shuffle=shuffle,
                            seed=seed, limit=limit, max_len=max_len,
                            multiple=8 if tight else max_len)
  heads = {t: jax.tree.map(jnp.asarray, heads[t]) for t in tasks}
  return MergeProblem(tasks, base, tvs, features, heads, data, mode, capture)


def from_arrays(tasks: Sequence[str], base: Tree, tvs: Tree,
                features: Callable[[Tree, dict], jax.Array],
                heads: dict[str, Any],
                splits: dict[str, dict[str, dict[str, np.ndarray]]],
                capture_model: Callable | None = None) -> MergeProblem:
  """A problem over in-memory data (tests, notebooks).

  Args:
    tasks, base, tvs, features, heads: as in `MergeProblem`.
    splits: `splits[task][split]` is a dict of equal-length arrays (model
      inputs and `label`).
    capture_model: see `MergeProblem`.
  """
  def data(task, split, batch_size, *, shuffle=False, seed=0, limit=None,
           tight=False):
    del tight  # arrays come padded
    try:
      arrays = splits[task][split]
    except KeyError:
      raise KeyError(f"no {split!r} data for task {task!r}; have "
                     f"{ {t: sorted(s) for t, s in splits.items()} }") from None
    n = len(next(iter(arrays.values())))
    n = n if limit is None else min(n, int(limit))
    source = [{k: v[i] for k, v in arrays.items()} for i in range(n)]
    return pipeline.Batcher(source, min(batch_size, n) if not shuffle
                            else batch_size, shuffle=shuffle, seed=seed,
                            drop_remainder=shuffle)
  heads = {t: jax.tree.map(jnp.asarray, heads[t]) for t in tasks}
  return MergeProblem(tuple(tasks), base, tvs, features, heads, data,
                      "standard", capture_model)
