r"""Width-slimmable transformer layers as pure functions over param dicts.

The architecture of Aich et al., "Efficient Controllable Multi-Task
Architectures" (ICCV 2023, arXiv:2308.11744; see `mtmerge.controllable.
distill` for the training and what was read), carried to text: a shared
encoder (the first `enc_layers` post-LN BERT layers of MiniLM, embeddings
frozen) and one decoder per task (`dec_layers` BERT layers initialized from
the next pretrained layer(s), then mean pooling and the task's frozen
zero-shot head). Every layer is slimmable in its two inner widths, as
DynaBERT (Hou et al., NeurIPS 2020) slims BERT: the attention heads kept
(the first k of n) and the feed-forward units kept (the first u of F); the
residual width H stays whole, so any encoder width feeds any decoder.

A width is a ratio from a short list (`Space.enc_ratios`, one ratio for
all encoder layers; `Space.dec_ratios`, one per task decoder); a
configuration is `(e, d_1..d_T)`, indices into those lists. Slimming is
done with 0/1 masks on the head outputs and on the FFN activations, which
gives exactly the numbers of the sliced layer (dropped heads never reach
the output projection, dropped units never reach the second FFN matmul;
tests/test_controllable.py checks it against a NumPy layer that slices
the weights), so every configuration runs through ONE compiled program.
Masks cost the full width's compute on the host; the compute a
configuration is charged (`layer_flops`, `config_flops`) is that of the
sliced layers, the cost the configuration has when deployed.

Params: `{"encoder": {"0": layer, ...}, "decoders": {"0": layer with a
leading task axis [T, ...], ...}}`, layers in `mtmerge.models.bert`'s
names (`attention/{query,key,value,out}/{kernel,bias}`, `attention_norm`,
`mlp/{intermediate,output}`, `mlp_norm`); the decoders are one stacked
pytree (the project's task-axis convention) run with `jax.vmap`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge.models import ops

Tree = Any


class Space(NamedTuple):
  """The slimmable architecture and its width choices.

  Attributes:
    hidden: residual width H.
    num_heads: attention heads n of a full layer (head size H / n).
    ffn: feed-forward units F of a full layer.
    enc_layers: shared encoder layers.
    dec_layers: layers of each task decoder.
    enc_ratios: width ratios the encoder can run at (increasing).
    dec_ratios: width ratios each decoder can run at (increasing).
    num_classes: classes per task (the frozen heads' widths), task order.
    seq_len: tokens per example the compute is counted for.
    eps: LayerNorm epsilon.
  """
  hidden: int
  num_heads: int
  ffn: int
  enc_layers: int
  dec_layers: int
  enc_ratios: tuple[float, ...]
  dec_ratios: tuple[float, ...]
  num_classes: tuple[int, ...]
  seq_len: int
  eps: float = 1e-12

  @property
  def num_tasks(self) -> int:
    return len(self.num_classes)


def check_ratios(ratios: Sequence[float], what: str) -> tuple[float, ...]:
  """Width ratios as an increasing tuple in (0, 1]; ValueError naming `what`."""
  r = tuple(float(x) for x in ratios)
  if not r or any(not 0.0 < x <= 1.0 for x in r) or list(r) != sorted(set(r)):
    raise ValueError(f"{what} must be increasing width ratios in (0, 1], "
                     f"got {list(ratios)}")
  return r


def widths(space: Space, ratio: float) -> tuple[int, int]:
  """`(heads kept, FFN units kept)` of a layer at width `ratio` (>= 1 each)."""
  return (max(1, int(round(ratio * space.num_heads))),
          max(1, int(round(ratio * space.ffn))))


def mask_tables(space: Space) -> dict[str, np.ndarray]:
  """0/1 float masks per width index: `enc_heads [E, n]`, `enc_ffn [E, F]`,
  `dec_heads [D, n]`, `dec_ffn [D, F]` (the first k entries are 1)."""
  def table(ratios):
    ws = [widths(space, r) for r in ratios]
    heads = np.array([np.arange(space.num_heads) < k for k, _ in ws],
                     np.float32)
    ffn = np.array([np.arange(space.ffn) < u for _, u in ws], np.float32)
    return heads, ffn
  eh, ef = table(space.enc_ratios)
  dh, df = table(space.dec_ratios)
  return {"enc_heads": eh, "enc_ffn": ef, "dec_heads": dh, "dec_ffn": df}


# ----------------------------------------------------------------------------
# Compute accounting (what a configuration costs when deployed).

def layer_flops(space: Space, heads: int, units: int) -> int:
  """FLOPs of one post-LN layer with `heads` heads and `units` FFN units on
  one example of `space.seq_len` tokens: 2 x the multiply-adds of its
  matmuls (Q, K, V and output projections, attention scores and context,
  the two FFN matmuls). Biases, LayerNorm, softmax and GELU are not counted.
  """
  L, H = space.seq_len, space.hidden  # pylint: disable=invalid-name
  a = heads * (H // space.num_heads)  # attention width kept
  macs = 3 * L * H * a + 2 * L * L * a + L * a * H + 2 * L * H * units
  return 2 * macs


def enc_flops(space: Space, e: int) -> int:
  """FLOPs of the shared encoder at width index `e` (one example)."""
  return space.enc_layers * layer_flops(space, *widths(space,
                                                       space.enc_ratios[e]))


def dec_flops(space: Space, t: int, d: int) -> int:
  """FLOPs of task `t`'s decoder at width index `d` (one example), with
  its head (`2 H C_t`; mean pooling not counted)."""
  return (space.dec_layers * layer_flops(space, *widths(space,
                                                        space.dec_ratios[d]))
          + 2 * space.hidden * space.num_classes[t])


def config_flops(space: Space, e: int, ds: Sequence[int]) -> int:
  """FLOPs of the multi-task model at configuration `(e, ds)`: the encoder
  once and every task's decoder (all tasks predicted for one input)."""
  if len(ds) != space.num_tasks:
    raise ValueError(f"{len(ds)} decoder widths for {space.num_tasks} tasks")
  return enc_flops(space, e) + sum(dec_flops(space, t, d)
                                   for t, d in enumerate(ds))


def cost_tables(space: Space) -> tuple[np.ndarray, np.ndarray]:
  """`(enc [E], dec [T, D])` FLOPs of every encoder and decoder width."""
  enc = np.array([enc_flops(space, e) for e in range(len(space.enc_ratios))],
                 np.int64)
  dec = np.array([[dec_flops(space, t, d) for d in range(len(
      space.dec_ratios))] for t in range(space.num_tasks)], np.int64)
  return enc, dec


# ----------------------------------------------------------------------------
# Forward.

def _dense(p: dict, x: jax.Array) -> jax.Array:
  y = x.reshape(-1, x.shape[-1]) @ p["kernel"] + p["bias"]
  return y.reshape(x.shape[:-1] + (y.shape[-1],))


def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm with the two-pass variance (as `mtmerge.models.bert`)."""
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def attention_bias(mask: jax.Array) -> jax.Array:
  """Additive key mask `[B, 1, 1, L]` from a `[B, L]` padding mask."""
  return jnp.where(mask[:, None, None, :] > 0, 0.0,
                   jnp.finfo(jnp.float32).min)


def layer(p: dict, x: jax.Array, bias: jax.Array, head_mask: jax.Array,
          ffn_mask: jax.Array, num_heads: int, eps: float) -> jax.Array:
  """One post-LN BERT layer at a slimmed width.

  Args:
    p: the layer's params (`mtmerge.models.bert` names).
    x: `[B, L, H]` input.
    bias: `[B, 1, 1, L]` additive attention mask (`attention_bias`).
    head_mask: `[n]` 0/1, the heads kept.
    ffn_mask: `[F]` 0/1, the feed-forward units kept.
    num_heads: n.
    eps: LayerNorm epsilon.

  Returns:
    `[B, L, H]`: the layer restricted to the kept heads and units.
  """
  b, l, h = x.shape
  split = lambda t: t.reshape(b, l, num_heads, h // num_heads)
  att = p["attention"]
  q, k, v = (split(_dense(att[n], x)) for n in ("query", "key", "value"))
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(h // num_heads)
  probs = jax.nn.softmax(logits.astype(jnp.float32) + bias, axis=-1)
  ctx = jnp.einsum("bnqk,bknd->bqnd", probs.astype(x.dtype), v)
  ctx = (ctx * head_mask[:, None]).reshape(b, l, h)
  x = layer_norm(p["attention_norm"], x + _dense(att["out"], ctx), eps)
  inner = ops.gelu(_dense(p["mlp"]["intermediate"], x)) * ffn_mask
  return layer_norm(p["mlp_norm"], x + _dense(p["mlp"]["output"], inner), eps)


def embed(p: dict, ids: jax.Array, eps: float) -> jax.Array:
  """BERT embeddings (word + position + token type 0, LayerNorm)."""
  x = (p["word"]["embedding"][ids] +
       p["position"]["embedding"][jnp.arange(ids.shape[-1])] +
       p["token_type"]["embedding"][0])
  return layer_norm(p["norm"], x, eps)


def encode(enc: dict, emb: dict, ids: jax.Array, mask: jax.Array,
           head_mask: jax.Array, ffn_mask: jax.Array, space: Space
           ) -> jax.Array:
  """Shared encoder hidden states `[B, L, H]` at one width."""
  x, bias = embed(emb, ids, space.eps), attention_bias(mask)
  for i in range(space.enc_layers):
    x = layer(enc[str(i)], x, bias, head_mask, ffn_mask, space.num_heads,
              space.eps)
  return x


def decode(dec: dict, hidden: jax.Array, mask: jax.Array,
           head_mask: jax.Array, ffn_mask: jax.Array, space: Space
           ) -> jax.Array:
  """One task decoder: its layers, mean pooling, L2 normalization `[B, H]`
  (the features its frozen zero-shot head reads)."""
  x, bias = hidden, attention_bias(mask)
  for i in range(space.dec_layers):
    x = layer(dec[str(i)], x, bias, head_mask, ffn_mask, space.num_heads,
              space.eps)
  m = mask.astype(jnp.float32)[..., None]
  pooled = jnp.sum(x * m, 1) / jnp.maximum(jnp.sum(m, 1), 1e-9)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1,
                                              keepdims=True), 1e-12)


def forward(params: dict, emb: dict, ids: jax.Array, mask: jax.Array,
            e: jax.Array, ds: jax.Array, space: Space
            ) -> tuple[jax.Array, jax.Array]:
  """The multi-task model at configuration `(e, ds)` (traced indices).

  Args:
    params: `{"encoder", "decoders"}` (decoders with a task axis).
    emb: the frozen embedding params.
    ids, mask: `[T, B, L]`, task t's batch in row t.
    e: encoder width index.
    ds: `[T]` decoder width indices.
    space: the architecture.

  Returns:
    `(hidden [T, B, L, H], features [T, B, H])`: the shared encoder's
    output (what CI-KD compares) and each task's decoder features.
  """
  tab = jax.tree.map(jnp.asarray, mask_tables(space))
  t, b, l = ids.shape
  h = encode(params["encoder"], emb, ids.reshape(t * b, l),
             mask.reshape(t * b, l), tab["enc_heads"][e], tab["enc_ffn"][e],
             space).reshape(t, b, l, -1)
  feats = jax.vmap(lambda p, x, m, d: decode(
      p, x, m, tab["dec_heads"][d], tab["dec_ffn"][d], space))(
          params["decoders"], h, mask, ds)
  return h, feats


def init_params(pretrained: dict, space: Space) -> tuple[dict, dict]:
  """`(trainable params, frozen embeddings)` from pretrained BERT params.

  The encoder is pretrained layers `0..enc_layers-1`; every task decoder
  starts as a copy of the next `dec_layers` layers, so the full-width model
  is exactly the pretrained (truncated) encoder under each task's head.
  """
  layers = pretrained["layers"]
  need = space.enc_layers + space.dec_layers
  if len(layers) < need:
    raise ValueError(f"the model has {len(layers)} layers; the encoder and "
                     f"decoders need {need}")
  enc = {str(i): layers[str(i)] for i in range(space.enc_layers)}
  dec = {str(i): jax.tree.map(
      lambda x: np.stack([np.asarray(x)] * space.num_tasks),
      layers[str(space.enc_layers + i)]) for i in range(space.dec_layers)}
  return ({"encoder": jax.tree.map(np.asarray, enc), "decoders": dec},
          jax.tree.map(np.asarray, pretrained["embeddings"]))


def num_configs(space: Space) -> int:
  return len(space.enc_ratios) * len(space.dec_ratios) ** space.num_tasks


def full_config(space: Space) -> tuple[int, tuple[int, ...]]:
  return len(space.enc_ratios) - 1, (len(space.dec_ratios) - 1,) * \
      space.num_tasks


def describe(space: Space, e: int, ds: Sequence[int]) -> str:
  """`enc 0.5 | dec 1,0.25` (the width ratios of a configuration)."""
  fmt = lambda r: f"{r:g}"
  return (f"enc {fmt(space.enc_ratios[e])} | dec " +
          ",".join(fmt(space.dec_ratios[d]) for d in ds))


def gflops(flops: float) -> float:
  return round(float(flops) / 1e9, 4)

