"""Taskpool: accuracy of a (merged) encoder on every task, each with its head.

`TaskPool` holds the tasks, their frozen heads and the evaluation batches
(tokenized once, reused for every model), and evaluates either full
parameters or, for tangent-space runs, an offset `delta` through the
linearized forward. Normalized accuracy (merged / individually fine-tuned,
as in the TIES and AdaMerging papers) is computed by the benchmark from
these numbers.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import encoders
from mtmerge import taskdata
from mtmerge import tree as tree_lib
from mtmerge.data import suites


class TaskPool:
  """Evaluates encoders on tasks with per-task heads.

  Args:
    encoder: the pretrained encoder (gives the forward and theta_0).
    tasks: task names or TaskSpecs.
    heads: task name -> `{"kernel", "bias"}`.
    trainable: regex of the fine-tuned/merged paths (for tangent mode).
    mode: `standard` (evaluate params) or `tangent` (evaluate deltas with
      the linearized model).
    batch_size, max_len: evaluation batching.
    multiple: text batches are padded to a multiple of this many tokens
      (smaller: less padding, more compiled shapes).
    limits: split -> number of examples used (None = all).
  """

  def __init__(self, encoder: encoders.Encoder, tasks: Sequence[Any],
               heads: dict[str, Any], *, trainable: str, mode: str = "standard",
               batch_size: int = 128, max_len: int = 48, multiple: int = 16,
               limits: dict[str, int | None] | None = None):
    self.encoder = encoder
    self.tasks = [suites.get_task(t) for t in tasks]
    self.heads = {k: jax.tree.map(jnp.asarray, v) for k, v in heads.items()}
    self.mode = mode
    self.batch_size, self.max_len = batch_size, max_len
    self.multiple = multiple
    self.limits = dict(limits or {})
    self._batches: dict[tuple[str, str], list] = {}
    _, self._rest = encoders.split(encoder.params, trainable)
    if mode == "tangent":
      lin = encoders.linearized(encoder.features, encoder.params, trainable)
      self._feats = jax.jit(lambda delta, batch: lin(delta, batch))
    elif mode == "standard":
      # The frozen params are an argument: closed over, XLA embeds them
      # (MiniLM's 47 MB embedding table) in every program, one per batch
      # shape.
      feats = jax.jit(lambda sel, rest, batch: encoder.features(
          encoders.join(sel, rest), batch))
      self._feats = lambda sel, batch: feats(sel, self._rest, batch)
    else:
      raise ValueError(f"mode must be standard or tangent, got {mode!r}")

  def batches(self, task, split: str) -> list[dict[str, np.ndarray]]:
    """The split's evaluation batches (cached)."""
    task = suites.get_task(task)
    key = (task.name, split)
    if key not in self._batches:
      b = taskdata.batcher(self.encoder, task, split, self.batch_size,
                           limit=self.limits.get(split),
                           max_len=self.max_len, multiple=self.multiple,
                           sort_by_length=True)
      self._batches[key] = list(b.epoch(0))
    return self._batches[key]

  def accuracy(self, selected: Any, task, split: str = "test") -> float:
    """Accuracy on one task of the model given by its trainable params.

    Args:
      selected: the trainable params (standard: weights; tangent: delta),
        nested or flat, with the paths of `trainable`.
      task: task name or TaskSpec.
      split: `validation` or `test`.
    """
    flat = tree_lib.to_flat_dict(selected)
    return self.accuracy_of(lambda inputs: self._feats(flat, inputs), task,
                            split)

  def accuracy_of(self, features, task, split: str = "test") -> float:
    """Accuracy on one task of any forward `features(inputs) -> [B, D]`.

    For models that are not one set of params, e.g. Twin-Merging's
    per-input routed model; the task's head is applied to the features.
    """
    task = suites.get_task(task)
    head = self.heads[task.name]
    correct = total = 0
    for batch in self.batches(task, split):
      inputs = {k: v for k, v in batch.items() if k not in ("label", "mask")}
      logits = encoders.logits(head, features(inputs))
      pred = np.asarray(jnp.argmax(logits, -1))
      keep = batch.get("mask", np.ones(len(pred), bool))
      correct += int(np.sum((pred == batch["label"])[keep]))
      total += int(np.sum(keep))
    return correct / max(total, 1)

  def evaluate(self, selected: Any, split: str = "test",
               tasks: Sequence[Any] | None = None) -> dict[str, float]:
    """`{task: accuracy}` for every task (or the given ones)."""
    return {t.name: self.accuracy(selected, t, split)
            for t in (self.tasks if tasks is None else
                      [suites.get_task(x) for x in tasks])}
