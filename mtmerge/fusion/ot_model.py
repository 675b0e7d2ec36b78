"""A small BERT classifier as pure functions, for the OT fusion benchmark.

The forward is `mtmerge.models.bert.Bert` (post-LN layers, exact GELU,
two-pass LayerNorm, additive padding mask) written over the flat
`/`-joined params `mtmerge.fusion.ot_fusion` takes, plus a linear head on
the mean-pooled last hidden states, so one function serves training,
evaluation and the activations that activation-based alignment needs
(Imfeld et al., ICLR 2024, compute transport maps from activations; the
sites are those `ot_fusion.align` names). `tests/test_ot_fusion.py`
checks it against the NNX model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge.models import bert
from mtmerge.models import ops

Params = dict[str, Any]


def init(cfg: bert.BertConfig, num_classes: int, seed: int) -> Params:
  """BERT's initialization (normal(0.02) weights, zero biases, unit norms).

  Args:
    cfg: the architecture.
    num_classes: classifier outputs.
    seed: NumPy seed (different seeds: independently initialized parents).

  Returns:
    Flat float32 params, BERT paths plus `head/{kernel,bias}`.
  """
  rng = np.random.default_rng(seed)
  out = {}
  shapes = dict(bert.param_shapes(cfg), **{
      "head/kernel": (cfg.hidden_size, num_classes),
      "head/bias": (num_classes,)})
  for k, shape in shapes.items():
    if k.endswith("norm/scale"):
      out[k] = np.ones(shape)
    elif k.endswith("bias"):
      out[k] = np.zeros(shape)
    else:
      out[k] = rng.normal(scale=cfg.initializer_range, size=shape)
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _norm(p, prefix, x, eps):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return ((x - mean) * jax.lax.rsqrt(var + eps) * p[prefix + "/scale"]
          + p[prefix + "/bias"])


def forward(p: Params, ids: jax.Array, mask: jax.Array, num_heads: int, *,
            eps: float = 1e-12, capture: bool = False):
  """Logits of the classifier (deterministic: no dropout).

  Args:
    p: flat params (BERT paths and `head/*`).
    ids: int `[B, L]` token ids.
    mask: `[B, L]`, 1 for real tokens.
    num_heads: attention heads.
    eps: LayerNorm epsilon.
    capture: also return activations per alignment site, each
      `[tokens, width]`, padding included (`embeddings`, `layers/<i>/qk` (queries then
      keys stacked as samples), `layers/<i>/value`,
      `layers/<i>/attention_out`, `layers/<i>/mlp` (pre-GELU, as the
      official code's `pre_relu`), `layers/<i>/mlp_out`).

  Returns:
    `[B, C]` logits, and with `capture` the activation dict.
  """
  b, l = ids.shape
  acts = {}
  rec = lambda k, x: acts.__setitem__(k, x.reshape(-1, x.shape[-1]))
  x = (p["embeddings/word/embedding"][ids]
       + p["embeddings/position/embedding"][jnp.arange(l)][None]
       + p["embeddings/token_type/embedding"][0])
  x = _norm(p, "embeddings/norm", x, eps)
  rec("embeddings", x)
  bias = jnp.where(mask[:, None, None, :] > 0, 0.0,
                   jnp.finfo(jnp.float32).min)
  depth = len({k.split("/")[1] for k in p if k.startswith("layers/")})
  dense = lambda pre, y: y @ p[pre + "/kernel"] + p[pre + "/bias"]
  for i in range(depth):
    a = f"layers/{i}/attention"
    q, k, v = (dense(f"{a}/{n}", x) for n in ("query", "key", "value"))
    rec(f"layers/{i}/value", v)
    if capture:
      acts[f"layers/{i}/qk"] = jnp.concatenate(
          [q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1])])
    h = q.shape[-1]
    split = lambda t: t.reshape(b, l, num_heads, h // num_heads)
    logits = jnp.einsum("bqnd,bknd->bnqk", split(q), split(k)) / np.sqrt(
        h // num_heads)
    probs = jax.nn.softmax(logits + bias, axis=-1)
    ctx = jnp.einsum("bnqk,bknd->bqnd", probs, split(v)).reshape(b, l, h)
    o = dense(f"{a}/out", ctx)
    rec(f"layers/{i}/attention_out", o)
    x = _norm(p, f"layers/{i}/attention_norm", x + o, eps)
    pre = dense(f"layers/{i}/mlp/intermediate", x)
    rec(f"layers/{i}/mlp", pre)
    o = dense(f"layers/{i}/mlp/output", ops.gelu(pre))
    rec(f"layers/{i}/mlp_out", o)
    x = _norm(p, f"layers/{i}/mlp_norm", x + o, eps)
  pooled = bert.mean_pool(x, mask)
  out = pooled @ p["head/kernel"] + p["head/bias"]
  return (out, acts) if capture else out


def accuracy(p: Params, data: dict, num_heads: int,
             batch: int = 256) -> float:
  """Top-1 accuracy over `data` (`ids`, `mask`, `label` numpy arrays)."""
  fn = _eval_fn(num_heads)
  hits, n = 0, len(data["label"])
  for s in range(0, n, batch):
    # The last batch is padded (all-padding rows), so one shape compiles.
    rows = min(batch, n - s)
    pad = lambda x: np.pad(x[s:s + rows], ((0, batch - rows), (0, 0)))
    pred = np.asarray(fn(p, pad(data["ids"]), pad(data["mask"])))[:rows]
    hits += int((pred == data["label"][s:s + rows]).sum())
  return hits / n


_EVAL = {}


def _eval_fn(num_heads):
  if num_heads not in _EVAL:
    _EVAL[num_heads] = jax.jit(lambda p, i, m: jnp.argmax(
        forward(p, i, m, num_heads), -1))
  return _EVAL[num_heads]


def activations(p: Params, data: dict, num_heads: int,
                samples: int) -> dict[str, np.ndarray]:
  """Activations per site on the first `samples` examples, centered.

  Each neuron's activations are centered over the samples (the official
  code's `acts: center`); `ot_align.cost_matrix` then unit-normalizes
  them (its `norm`), so costs compare activation patterns.
  """
  ids, mask = data["ids"][:samples], data["mask"][:samples]
  _, acts = _capture(num_heads)(p, ids, mask)
  keep = np.asarray(mask).reshape(-1) > 0
  out = {}
  for k, v in acts.items():
    v = np.asarray(v)
    # Only real tokens are samples (queries and keys: both halves).
    v = v[np.concatenate([keep, keep]) if k.endswith("/qk") else keep]
    out[k] = v - v.mean(0)
  return out


_CAPTURE = {}


def _capture(num_heads):
  if num_heads not in _CAPTURE:
    _CAPTURE[num_heads] = jax.jit(lambda p, i, m: forward(
        p, i, m, num_heads, capture=True))
  return _CAPTURE[num_heads]
