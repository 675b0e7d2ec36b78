"""Gram matrices of the inputs of every linear layer during a forward pass.

RegMean ("Dataless Knowledge Fusion by Merging Weights of Language Models",
Jin et al., ICLR 2023) needs, for every linear layer `y = x W + b`, the Gram
`G = X^T X` of the inputs `X` that layer sees on a task's data. Our models
are pure functions of a params dict that rebuild NNX modules internally
(`mtmerge.models.hub.merge_params`), so there are no forward hooks; instead
`recording` patches `nnx.Linear.__call__` at class level for the duration
of a trace. The patched call recognizes its layer by the identity of the
kernel array: `merge_params` hands the very arrays (tracers under `jax.jit`
or `jax.grad`) of the params dict to the module's Variables, so
`id(self.kernel.get_value())` names a path of the params dict. Layers whose
kernel does not come from `params` (frozen parts of the model) are skipped.

Padding: a text transformer runs every position through every linear layer,
padded positions included (they attend to real tokens and get hidden states
that pooling later ignores), so their rows must be weighted out explicitly:
`row_weights` builds the weights from a batch's `attention_mask` and its
padded-batch `mask`, and `linear_grams` applies them to every layer whose
input rows line up with them.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import tree as tree_lib

Tree = Any
_HIGHEST = jax.lax.Precision.HIGHEST
_LOCK = threading.Lock()
_ACTIVE: list["_Recorder"] = []  # innermost recorder last
_ORIGINAL_CALL = None


class _Recorder:
  """Accumulates `X^T diag(w) X` per kernel path for one `recording`."""

  def __init__(self, params: Tree, weights: jax.Array | None):
    self.paths = {id(leaf): path
                  for path, leaf in tree_lib.named_leaves(params)}
    self.weights = None if weights is None else jnp.asarray(weights)
    self.grams: dict[str, jax.Array] = {}
    self.counts: dict[str, jax.Array] = {}

  def _row_weights(self, path: str, lead: tuple[int, ...]) -> jax.Array:
    """Per-row weights broadcast to the layer input's leading dims."""
    if self.weights is None:
      return jnp.ones(lead, jnp.float32)
    w = self.weights.astype(jnp.float32)
    if lead[:w.ndim] == w.shape:
      w = w.reshape(w.shape + (1,) * (len(lead) - w.ndim))
      return jnp.broadcast_to(w, lead)
    if w.shape[:len(lead)] == lead:
      # A row built from several weighted positions (a pooled token): it
      # counts when any of them does.
      return jnp.max(w.reshape(lead + (-1,)), axis=-1)
    if len(lead) == 1 and lead[0] % w.size == 0:
      # Rows flattened batch-major (`x.reshape(-1, in)` of `[B, L, in]`, as
      # `models.ops.dense` feeds them): each weight covers the next
      # `lead[0] // w.size` rows.
      return jnp.repeat(w.reshape(-1), lead[0] // w.size)
    raise ValueError(f"linear layer {path}: input rows {lead} do not line "
                     f"up with row weights of shape {w.shape}")

  def record(self, path: str, x: jax.Array) -> None:
    lead = tuple(x.shape[:-1])
    w = self._row_weights(path, lead).reshape(-1)
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    gram = jnp.einsum("ri,r,rj->ij", x2, w, x2, precision=_HIGHEST)
    count = jnp.sum(w)
    if path in self.grams:  # a layer applied more than once
      gram, count = self.grams[path] + gram, self.counts[path] + count
    self.grams[path], self.counts[path] = gram, count


def _kernel_value(layer: nnx.Linear):
  var = layer.kernel
  return var.get_value() if hasattr(var, "get_value") else var.value


def _patched_call(self, inputs, *args, **kwargs):
  if _ACTIVE:
    rec = _ACTIVE[-1]
    path = rec.paths.get(id(_kernel_value(self)))
    if path is not None:
      rec.record(path, jnp.asarray(inputs))
  return _ORIGINAL_CALL(self, inputs, *args, **kwargs)


@contextlib.contextmanager
def recording(params: Tree, weights: jax.Array | None = None):
  """Records the input Grams of the `nnx.Linear` layers using `params`.

  While active (also while `jax.jit` traces), every `nnx.Linear` call whose
  kernel array is a leaf of `params` adds `X^T diag(w) X` to the recorder.
  Not for concurrent use from several threads (the patch is class-wide).

  Args:
    params: the params dict the forward will consume (the same arrays).
    weights: optional row weights (see `linear_grams`).

  Yields:
    The recorder; its `grams` and `counts` dicts fill during the forward.
  """
  global _ORIGINAL_CALL
  rec = _Recorder(params, weights)
  with _LOCK:
    if not _ACTIVE:
      _ORIGINAL_CALL = nnx.Linear.__call__
      nnx.Linear.__call__ = _patched_call
    _ACTIVE.append(rec)
  try:
    yield rec
  finally:
    with _LOCK:
      _ACTIVE.remove(rec)
      if not _ACTIVE:
        nnx.Linear.__call__ = _ORIGINAL_CALL


def linear_grams(forward: Callable[[Tree, Any], Any], params: Tree,
                 inputs: Any, weights: jax.Array | None = None, *,
                 with_counts: bool = False):
  """Gram matrices of the inputs of every linear layer of `forward`.

  Jittable: wrap it in `jax.jit` (with `forward` closed over) to trace once.

  Args:
    forward: `(params, inputs) -> outputs` that builds NNX modules from
      `params` (e.g. `MergeProblem.capture_model`).
    params: nested params dict; layers are named by their kernel's
      `/`-joined path in it, e.g. `layers/0/attention/query/kernel`.
    inputs: the forward's inputs.
    weights: optional per-row weights (0/1 masks) whose shape is a prefix
      of each layer input's leading dims, e.g. `[B]` (padded-batch mask) or
      `[B, L]` (tokens; see `row_weights`). A layer whose rows are fewer
      dims than the weights (a pooled `[B, D]` input) counts a row when any
      of its positions has nonzero weight; one whose input was flattened
      batch-major to `[B * L, in]` (`models.ops.dense`) gets the weights
      in the same order. Default: every row counts 1.
    with_counts: also return the weighted row count of every layer.

  Returns:
    `{path: G}` with `G = sum_r w_r x_r x_r^T`, float32 `[in, in]`; with
    `with_counts`, `(grams, counts)`.

  Raises:
    ValueError: no linear layer of the forward uses a kernel from `params`,
      or the weights do not line up with a layer's input rows.
  """
  with recording(params, weights) as rec:
    forward(params, inputs)
  if not rec.grams:
    kernels = [p for p, _ in tree_lib.named_leaves(params)
               if p.endswith("kernel")]
    raise ValueError(
        "no nnx.Linear layer of the forward uses a kernel from params "
        f"(kernel paths in params: {kernels[:6]}); Grams need the real "
        "module graph (not a linearized model) and params passed to the "
        "modules as they are (a dtype cast makes new arrays)")
  return (rec.grams, rec.counts) if with_counts else rec.grams


def row_weights(batch: dict) -> np.ndarray | None:
  """Row weights of a batch: padded-batch `mask` times `attention_mask`.

  Args:
    batch: a batch dict (inputs plus optional `mask`).

  Returns:
    float32 `[B, L]` for token inputs, `[B]` otherwise, or None when every
    row counts.
  """
  mask = batch.get("mask")
  tokens = batch.get("attention_mask")
  if tokens is None:
    return None if mask is None else np.asarray(mask, np.float32)
  w = np.asarray(tokens, np.float32)
  if mask is not None:
    w = w * np.asarray(mask, np.float32)[:, None]
  return w
