"""Bottleneck adapters in the BERT encoder: ScaLearn's stage 1 (task learning).

A Pfeiffer adapter (Pfeiffer et al., 2021, "AdapterFusion: Non-Destructive
Task Composition for Transfer Learning"; the configuration ScaLearn uses,
Frohmann et al., 2024) sits after each layer's feed-forward block. With `h`
the layer's residual stream after the MLP (`x + MLP(x)`) and `LN` the
layer's pretrained output LayerNorm:

  a = LN(h);  u = W_up relu(W_down a + b_down) + b_up;  y = LN(h + u)

which is how adapter-transformers wires `original_ln_before`,
`residual_before_ln` and `original_ln_after` for BERT
(`mtmerge.models.bert.Layer` takes the `adapter` hook). The bottleneck is
`hidden // reduction_factor` (16 in the paper: 24 for MiniLM's 384).

Adapters are plain pytrees, `{"layers": {"<i>": {"down": {"kernel" [H, r],
"bias" [r]}, "up": {"kernel" [r, H], "bias" [H]}}}}`; a set of T task
adapters is ONE such tree with a leading task axis `[T, ...]` on every leaf
(`stack`). Stage 1 trains one adapter per task on the frozen backbone
through `mtmerge.train.fit` (`train_adapter`), against the task's frozen
head.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtmerge import encoders
from mtmerge import train
from mtmerge import tree as tree_lib

Params = dict[str, Any]
# `(i, x) -> u`: the adapter output of layer i for its input x.
AdapterFn = Callable[[int, jax.Array], jax.Array]


def bottleneck_size(hidden: int, reduction_factor: float = 16) -> int:
  """Adapter width `max(1, hidden // reduction_factor)` (adapter-transformers)."""
  return max(1, int(hidden // reduction_factor))


def init(key: jax.Array, num_layers: int, hidden: int,
         reduction_factor: float = 16, std: float = 0.02) -> Params:
  """A fresh adapter: BERT-style init (normal(std) kernels, zero biases).

  Args:
    key: PRNG key.
    num_layers: encoder layers (one adapter block each).
    hidden: the encoder width H.
    reduction_factor: H / bottleneck.
    std: kernel init std (adapter-transformers' "bert" init, 0.02).

  Returns:
    The adapter params (no task axis).
  """
  r = bottleneck_size(hidden, reduction_factor)
  out = {}
  for i, k in enumerate(jax.random.split(key, num_layers)):
    kd, ku = jax.random.split(k)
    out[str(i)] = {
        "down": {"kernel": std * jax.random.normal(kd, (hidden, r)),
                 "bias": jnp.zeros((r,))},
        "up": {"kernel": std * jax.random.normal(ku, (r, hidden)),
               "bias": jnp.zeros((hidden,))}}
  return {"layers": out}


def num_params(num_layers: int, hidden: int, bottleneck: int) -> int:
  """Parameters of one adapter: `L (2 H r + r + H)`."""
  return num_layers * (2 * hidden * bottleneck + bottleneck + hidden)


def apply(block: Params, x: jax.Array) -> jax.Array:
  """One layer's adapter output `W_up relu(W_down x + b) + b'` (no residual).

  Args:
    block: `{"down": {kernel, bias}, "up": {kernel, bias}}` of one layer.
    x: `[..., H]` adapter input.

  Returns:
    `[..., H]`, in x's dtype.
  """
  d = jax.nn.relu(x @ block["down"]["kernel"] + block["down"]["bias"])
  return (d @ block["up"]["kernel"] + block["up"]["bias"]).astype(x.dtype)


def stack(adapters: Sequence[Params]) -> Params:
  """T adapters as one tree with a leading task axis `[T, ...]`."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)


def check(adapter: Params, num_layers: int, hidden: int, *,
          lead: tuple[int, ...] = (), name: str = "adapter") -> int:
  """Refuses an adapter that does not fit the encoder; one line naming it.

  Args:
    adapter: adapter params, with `lead` leading axes on every leaf.
    num_layers, hidden: the encoder's depth and width.
    lead: expected leading axes (e.g. `(T,)` for a stacked set).
    name: what to call it in the error (e.g. "source adapter 'party'").

  Returns:
    The bottleneck width r.

  Raises:
    ValueError: naming the adapter and the first leaf that does not fit.
  """
  layers = adapter.get("layers") if isinstance(adapter, dict) else None
  if not isinstance(layers, dict) or set(layers) != {
      str(i) for i in range(num_layers)}:
    got = sorted(layers) if isinstance(layers, dict) else type(adapter)
    raise ValueError(f"{name}: needs blocks for layers 0..{num_layers - 1}, "
                     f"got {got}")
  r = np.shape(layers["0"]["down"]["kernel"])[-1]
  want = {"down/kernel": (hidden, r), "down/bias": (r,),
          "up/kernel": (r, hidden), "up/bias": (hidden,)}
  for i in range(num_layers):
    flat = tree_lib.to_flat_dict(layers[str(i)])
    if set(flat) != set(want):
      raise ValueError(f"{name}: layer {i} has leaves {sorted(flat)}, need "
                       f"{sorted(want)}")
    for k, shape in want.items():
      got = tuple(np.shape(flat[k]))
      if got != tuple(lead) + shape:
        raise ValueError(f"{name}: layers/{i}/{k} has shape {got}, need "
                         f"{tuple(lead) + shape} (hidden {hidden}, "
                         f"bottleneck {r})")
  return int(r)


def single(adapter: Params) -> AdapterFn:
  """The adapter hook of one (unstacked) adapter."""
  return lambda i, x: apply(adapter["layers"][str(i)], x)


def features(encoder: encoders.Encoder, backbone: Params, batch: dict,
             hook: AdapterFn | None) -> jax.Array:
  """Sentence features of the encoder with adapters (mean pool, L2 norm).

  Args:
    encoder: a BERT text encoder (`mtmerge.encoders.load`).
    backbone: its (frozen) params.
    batch: `input_ids`, `attention_mask`.
    hook: the adapters (`single`, `scalearn.hook`), None for none.

  Returns:
    `[B, H]` unit-norm features, as `encoder.features` computes them.
  """
  from mtmerge import models  # pylint: disable=g-import-not-at-top
  from mtmerge.models import bert  # pylint: disable=g-import-not-at-top
  model = models.merge_params(encoder.static, backbone)
  if not isinstance(model, bert.Bert):
    raise ValueError(f"adapters need a BERT text encoder, got "
                     f"{type(model).__name__} ({encoder.name!r})")
  mask = batch["attention_mask"]
  hidden = model(batch["input_ids"], mask, deterministic=True, adapters=hook)
  return bert.normalize(bert.mean_pool(hidden, mask))


def cross_entropy(logits: jax.Array, labels: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """`(mean cross-entropy, accuracy)` of integer labels."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return ce, jnp.mean(jnp.argmax(logits, -1) == labels)


_LOSSES: dict[int, tuple] = {}


def objective(encoder: encoders.Encoder, head: dict, key: jax.Array,
              reduction_factor: float = 16) -> train.Objective:
  """Stage 1: one task's adapter on the frozen backbone, frozen head.

  The loss function is cached per encoder and the backbone and head are
  arguments (constants of the step, not of the program), so every task
  shares one compiled step (`train.fit`'s step cache).

  Args:
    encoder: the pretrained BERT encoder (frozen).
    head: the task's frozen head, padded to a class multiple
      (`mtmerge.finetune.pad_classes`).
    key: adapter init key.
    reduction_factor: H / bottleneck.

  Returns:
    The `train.Objective`.
  """
  if id(encoder.static) not in _LOSSES or _LOSSES[id(encoder.static)][0] \
      is not encoder:
    def loss(params, consts, batch, rng):
      del rng  # no dropout (deterministic steps, exact resume)
      f = features(encoder, consts["backbone"], batch, single(params))
      ce, acc = cross_entropy(encoders.logits(consts["head"], f),
                              batch["label"])
      return ce, {"acc": acc}
    _LOSSES[id(encoder.static)] = (encoder, loss)
  loss = _LOSSES[id(encoder.static)][1]
  n_layers = len(encoder.params["layers"])
  return train.Objective(
      init(key, n_layers, encoder.dim, reduction_factor), loss,
      {"backbone": encoder.params, "head": head})
