"""BERT encoder in Flax NNX, with an importer for Hugging Face checkpoints.

The architecture is BERT's (Devlin et al., 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding"): learned word,
position and token-type embeddings summed and layer-normalized, then N
post-LayerNorm transformer layers (Vaswani et al., 2017) with exact (erf)
GELU. It runs the real sentence-transformers all-MiniLM-L6-v2 weights
(Wang et al., 2020, "MiniLM"; Reimers & Gurevych, 2019, "Sentence-BERT")
to 1e-4 of PyTorch. The model returns the last hidden states only: task
heads and pooling are separate so merging sees just the shared encoder.

Parameter paths (`nnx.state(model, nnx.Param)` as a pure dict, keys joined
with `/`, as `mtmerge.tree.to_flat_dict` writes them), which merge configs
select by regex:

  embeddings/word/embedding           [vocab, H]
  embeddings/position/embedding       [max_positions, H]
  embeddings/token_type/embedding     [type_vocab, H]
  embeddings/norm/{scale,bias}        [H]
  layers/<i>/attention/{query,key,value,out}/kernel   [H, H]
  layers/<i>/attention/{query,key,value,out}/bias     [H]
  layers/<i>/attention_norm/{scale,bias}              [H]
  layers/<i>/mlp/intermediate/{kernel [H, F], bias [F]}
  layers/<i>/mlp/output/{kernel [F, H], bias [H]}
  layers/<i>/mlp_norm/{scale,bias}                    [H]

e.g. `layers/.*/attention/.*` is every attention projection and
`embeddings/.*` the embedding block. Kernels are `[in, out]` (Flax layout;
a PyTorch `Linear.weight` is its transpose). BERT's pooler (a tanh dense on
the [CLS] token) is not part of the encoder and is dropped on import.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import checkpoint_io
from mtmerge import tree as tree_lib
from mtmerge.models import convert
from mtmerge.models import ops


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape and regularization hyperparameters (Hugging Face names)."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")

  @classmethod
  def from_hf_json(cls, cfg: Mapping[str, Any]) -> "BertConfig":
    """Builds a config from a Hugging Face `config.json` dict.

    Args:
      cfg: the parsed `config.json`; unknown keys are ignored.

    Returns:
      The BertConfig.

    Raises:
      ValueError: for a BERT variant this model does not implement
        (non-GELU activation, relative position embeddings).
    """
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(f"hidden_act {act!r} is not supported (only exact "
                       "'gelu', as in BERT)")
    pos = cfg.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(f"position_embedding_type {pos!r} is not supported")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names})


def _norm(cfg: BertConfig, dtype, rngs) -> nnx.LayerNorm:
  # Two-pass variance: post-LN BERT activations have outlier dimensions
  # where E[x^2] - E[x]^2 loses digits in float32.
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps,
                       dtype=dtype, param_dtype=dtype, use_fast_variance=False,
                       rngs=rngs)


# Dropout masks are drawn with the "rbg" PRNG (XLA's RngBitGenerator)
# rather than JAX's default threefry, whose per-element hash XLA compiles
# slowly: measured on the 2-core CPU, a 2-layer test model's train-mode
# forward compiled in 4.2 s instead of 15.6 s, a MiniLM AdamW step in 10 s
# instead of 13 s, at the same step time. rbg is the usual dropout choice on
# TPU too. Keys are still seeded from the caller's `rngs` (reproducible).
DROPOUT_RNG_IMPL = "rbg"


def dropout_rngs(rngs: nnx.Rngs, impl: str | None = DROPOUT_RNG_IMPL
                 ) -> nnx.Rngs:
  """An `nnx.Rngs` with one `dropout` stream seeded from `rngs`.

  Args:
    rngs: the caller's randomness (its `dropout` stream, else default).
    impl: PRNG implementation of the new stream's keys, e.g. "rbg" or
      "threefry2x32"; None keeps the caller's key as is.

  Returns:
    The Rngs the Dropout layers fork from.
  """
  key = rngs["dropout"]()
  if impl is not None:
    seed = jax.random.bits(key, dtype=jnp.uint32)
    key = jax.random.key(seed, impl=impl)
  return nnx.Rngs(dropout=key)


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""

  def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs,
               dropout_rngs: nnx.Rngs):
    init = nnx.initializers.normal(cfg.initializer_range)
    embed = lambda n: nnx.Embed(n, cfg.hidden_size, dtype=dtype,
                                param_dtype=dtype, embedding_init=init,
                                rngs=rngs)
    self.word = embed(cfg.vocab_size)
    self.position = embed(cfg.max_position_embeddings)
    self.token_type = embed(cfg.type_vocab_size)
    self.norm = _norm(cfg, dtype, rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob, rngs=dropout_rngs)

  def __call__(self, input_ids, token_type_ids, deterministic):
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (self.word(input_ids) + self.position(positions) +
         self.token_type(token_type_ids))
    return self.dropout(self.norm(x), deterministic=deterministic)


def _dense(n_in: int, n_out: int, cfg: BertConfig, dtype, rngs) -> nnx.Linear:
  return nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=dtype,
                    kernel_init=nnx.initializers.normal(cfg.initializer_range),
                    rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention with an additive padding mask."""

  def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs,
               dropout_rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.num_heads = cfg.num_attention_heads
    self.query = _dense(h, h, cfg, dtype, rngs)
    self.key = _dense(h, h, cfg, dtype, rngs)
    self.value = _dense(h, h, cfg, dtype, rngs)
    self.out = _dense(h, h, cfg, dtype, rngs)
    self.dropout = nnx.Dropout(cfg.attention_probs_dropout_prob,
                               rngs=dropout_rngs)

  def __call__(self, x, bias, deterministic):
    b, l, h = x.shape
    split = lambda t: t.reshape(b, l, self.num_heads, h // self.num_heads)
    d = ops.dense
    q, k, v = (split(d(self.query, x)), split(d(self.key, x)),
               split(d(self.value, x)))
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(h // self.num_heads)
    # Softmax in float32 so bf16 weights do not lose the masked-out mass.
    probs = jax.nn.softmax(logits.astype(jnp.float32) + bias, axis=-1)
    probs = self.dropout(probs.astype(x.dtype), deterministic=deterministic)
    ctx = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, l, h)
    return d(self.out, ctx)


class Mlp(nnx.Module):
  """The position-wise feed-forward block: dense, GELU (erf), dense."""

  def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
    self.intermediate = _dense(cfg.hidden_size, cfg.intermediate_size, cfg,
                               dtype, rngs)
    self.output = _dense(cfg.intermediate_size, cfg.hidden_size, cfg, dtype,
                         rngs)

  def __call__(self, x):
    h = ops.gelu(ops.dense(self.intermediate, x))
    return ops.dense(self.output, h)


class Layer(nnx.Module):
  """One post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

  def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs,
               dropout_rngs: nnx.Rngs):
    self.attention = Attention(cfg, dtype=dtype, rngs=rngs,
                               dropout_rngs=dropout_rngs)
    self.attention_norm = _norm(cfg, dtype, rngs)
    self.mlp = Mlp(cfg, dtype=dtype, rngs=rngs)
    self.mlp_norm = _norm(cfg, dtype, rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob, rngs=dropout_rngs)

  def __call__(self, x, bias, deterministic, adapter=None):
    drop = lambda t: self.dropout(t, deterministic=deterministic)
    x = self.attention_norm(x + drop(self.attention(x, bias, deterministic)))
    h = x + drop(self.mlp(x))
    if adapter is None:
      return self.mlp_norm(h)
    # Pfeiffer et al. (2020) placement, as adapter-transformers wires it for
    # BERT: the adapter reads LN(h) and its output joins the residual h
    # before the same (pretrained) LayerNorm is applied again.
    return self.mlp_norm(h + adapter(self.mlp_norm(h)))


class Bert(nnx.Module):
  """BERT encoder: `model(input_ids, attention_mask) -> [B, L, H]`.

  Dropout is active after construction (`model.train()`); call
  `model.eval()` for inference, or pass `deterministic=True` per call.
  `load_dir` returns models in eval mode.
  """

  def __init__(self, cfg: BertConfig, *, dtype=jnp.float32,
               rngs: nnx.Rngs | None = None,
               dropout_rng_impl: str | None = DROPOUT_RNG_IMPL):
    """Builds a randomly initialized encoder.

    Args:
      cfg: the architecture.
      dtype: parameter and compute dtype.
      rngs: parameter init (`params` stream) and dropout (`dropout` stream,
        default stream if absent) randomness; default `nnx.Rngs(0)`.
      dropout_rng_impl: JAX PRNG implementation of the dropout keys (see
        `DROPOUT_RNG_IMPL`), None to keep the key type of `rngs`.
    """
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    drop = dropout_rngs(rngs, dropout_rng_impl)
    self.config = cfg
    self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs,
                                 dropout_rngs=drop)
    self.layers = nnx.List([Layer(cfg, dtype=dtype, rngs=rngs,
                                  dropout_rngs=drop)
                            for _ in range(cfg.num_hidden_layers)])

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               deterministic: bool | None = None,
               adapters=None) -> jax.Array:
    """Encodes a batch of token ids.

    Args:
      input_ids: int `[B, L]` token ids.
      attention_mask: `[B, L]`, 1 for real tokens and 0 for padding.
      token_type_ids: int `[B, L]` segment ids; default all zeros.
      deterministic: overrides the dropout mode set by `train()`/`eval()`.
      adapters: optional bottleneck adapters after each layer's MLP block
        (`mtmerge.transfer.adapters`): `adapters(i, x) -> [B, L, H]`, the
        adapter output of layer `i` for its input `x`; None (default): the
        plain encoder.

    Returns:
      The last hidden states, `[B, L, H]`.
    """
    input_ids = jnp.asarray(input_ids)
    attention_mask = jnp.asarray(attention_mask)
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
      raise ValueError(f"input_ids {input_ids.shape} and attention_mask "
                       f"{attention_mask.shape} must both be [batch, length]")
    if input_ids.shape[1] > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {input_ids.shape[1]} exceeds "
                       f"max_position_embeddings "
                       f"{self.config.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    elif jnp.shape(token_type_ids) != input_ids.shape:
      raise ValueError(f"token_type_ids {jnp.shape(token_type_ids)} must "
                       f"match input_ids {input_ids.shape}")
    # Padded keys get the most negative float instead of -inf, so a row of
    # pure padding stays finite (uniform), as in Hugging Face's BERT.
    big_neg = jnp.finfo(jnp.float32).min
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, big_neg)
    x = self.embeddings(input_ids, token_type_ids, deterministic)
    for i, layer in enumerate(self.layers):
      hook = None if adapters is None else (
          lambda a, i=i: adapters(i, a))
      x = layer(x, bias, deterministic, hook)
    return x


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean of the hidden states over real tokens (sentence-transformers' pool).

  Args:
    hidden: `[B, L, H]` hidden states.
    attention_mask: `[B, L]`, 1 for tokens to average.

  Returns:
    `[B, H]` float32; an all-padding row gives zeros.
  """
  m = jnp.asarray(attention_mask, jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
  return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows scaled to unit L2 norm (as `torch.nn.functional.normalize`)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


# ----------------------------------------------------------------------------
# Hugging Face import. Keys may carry the `bert.` prefix of task models
# (BertForSequenceClassification, ...); LayerNorm weights are `weight/bias`
# in current checkpoints and `gamma/beta` in old TF-converted ones.

_P = r"(?:bert\.)?"
_L = _P + r"encoder\.layer\.(\d+)\."
_SCALE, _BIAS = r"(?:weight|gamma)", r"(?:bias|beta)"
_LINEARS = {r"attention\.self\.query": "attention/query",
            r"attention\.self\.key": "attention/key",
            r"attention\.self\.value": "attention/value",
            r"attention\.output\.dense": "attention/out",
            r"intermediate\.dense": "mlp/intermediate",
            r"output\.dense": "mlp/output"}
_NORMS = {r"attention\.output\.LayerNorm": "attention_norm",
          r"output\.LayerNorm": "mlp_norm"}

RULES = [
    convert.Rule(_P + r"embeddings\.word_embeddings\.weight",
                 "embeddings/word/embedding"),
    convert.Rule(_P + r"embeddings\.position_embeddings\.weight",
                 "embeddings/position/embedding"),
    convert.Rule(_P + r"embeddings\.token_type_embeddings\.weight",
                 "embeddings/token_type/embedding"),
    convert.Rule(_P + r"embeddings\.LayerNorm\." + _SCALE,
                 "embeddings/norm/scale"),
    convert.Rule(_P + r"embeddings\.LayerNorm\." + _BIAS,
                 "embeddings/norm/bias"),
]
for _hf, _ours in _LINEARS.items():
  RULES += [convert.Rule(_L + _hf + r"\.weight", rf"layers/\1/{_ours}/kernel",
                         convert.linear_kernel),
            convert.Rule(_L + _hf + r"\.bias", rf"layers/\1/{_ours}/bias")]
for _hf, _ours in _NORMS.items():
  RULES += [
      convert.Rule(_L + _hf + r"\." + _SCALE, rf"layers/\1/{_ours}/scale"),
      convert.Rule(_L + _hf + r"\." + _BIAS, rf"layers/\1/{_ours}/bias")]

# Buffers and heads that are not part of the encoder.
IGNORE = [r".*position_ids", _P + r"pooler\..*", r"cls\..*", r"classifier\..*"]


@functools.lru_cache(maxsize=8)
def _abstract_cached(cfg: BertConfig, dtype: np.dtype):
  abstract = nnx.eval_shape(lambda: Bert(cfg, dtype=dtype, rngs=nnx.Rngs(0),
                                        dropout_rng_impl=None))
  return nnx.split(abstract, nnx.Param, nnx.RngKey, nnx.RngCount)


def _abstract(cfg: BertConfig, dtype):
  """`(graphdef, params, rng_keys, rng_counts)` states, nothing allocated.

  Tracing the constructor takes ~1 s for MiniLM, hence the cache; the
  states are copied (fresh Variables) because callers fill them in place.
  """
  graphdef, *states = _abstract_cached(cfg, np.dtype(dtype))
  return (graphdef, *(jax.tree.map(lambda x: x, s) for s in states))


def param_shapes(cfg: BertConfig, dtype=jnp.float32) -> dict[str, tuple]:
  """`{path: shape}` of a model's parameters, computed without allocating."""
  params = _abstract(cfg, dtype)[1]
  flat = tree_lib.to_flat_dict(nnx.to_pure_dict(params))
  return {k: tuple(v.shape) for k, v in flat.items()}


def from_flat_params(cfg: BertConfig, flat: Mapping[str, Any], *,
                     dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                     dropout_rng_impl: str | None = DROPOUT_RNG_IMPL) -> Bert:
  """A model whose parameters are `flat` (`{path: array}`, our names).

  The model is assembled from an abstract one, so no random initialization
  runs (eagerly it costs ~10 s of op compilation for MiniLM on CPU).

  Args:
    cfg: the model config.
    flat: every parameter, keyed by `/`-joined path, e.g. from `convert`.
    dtype: parameter and compute dtype.
    rngs: randomness for dropout (default `nnx.Rngs(0)`).
    dropout_rng_impl: as in `Bert`.

  Returns:
    The model, in eval mode.

  Raises:
    ValueError: a parameter missing from `flat` or not in the model, or a
      shape mismatch.
  """
  graphdef, params, keys, counts = _abstract(cfg, dtype)
  want = tree_lib.to_flat_dict(nnx.to_pure_dict(params))
  missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
  bad = [f"{k}: {np.shape(flat[k])} vs {want[k].shape}" for k in want
         if k in flat and tuple(np.shape(flat[k])) != tuple(want[k].shape)]
  if missing or extra or bad:
    raise ValueError(f"parameters do not fit the model: missing {missing}, "
                     f"not in the model {extra}, shape mismatches {bad}")
  nnx.replace_by_pure_dict(params, tree_lib.from_flat_dict(
      {k: jnp.asarray(flat[k], dtype) for k in want}))
  # One dropout key per Dropout layer, folded from the caller's stream.
  base = dropout_rngs(rngs if rngs is not None else nnx.Rngs(0),
                      dropout_rng_impl)["dropout"]()
  leaves, treedef = jax.tree.flatten(keys)
  keys = jax.tree.unflatten(treedef, [jax.random.fold_in(base, i)
                                      for i in range(len(leaves))])
  counts = jax.tree.map(lambda c: jnp.zeros(c.shape, c.dtype), counts)
  model = nnx.merge(graphdef, params, keys, counts)
  model.eval()
  return model


def load_dir(path: str, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
  """Loads a Hugging Face BERT directory (`config.json`, `model.safetensors`).

  Args:
    path: the directory; a `tokenizer.json` there is loaded too.
    dtype: parameter and compute dtype.
    rngs: randomness for dropout (default `nnx.Rngs(0)`).

  Returns:
    `(model, tokenizer)`: the Bert in eval mode, and a
    `mtmerge.models.tokenizer.Tokenizer` (None if no tokenizer.json).

  Raises:
    FileNotFoundError: no config.json.
    convert.ConversionError: checkpoint keys/shapes that do not fit,
      listed by name.
  """
  from mtmerge.models import tokenizer as tokenizer_lib  # tokenizers is heavy
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{path} has no config.json (not a Hugging Face "
                            "model directory)")
  with open(cfg_path) as f:
    cfg = BertConfig.from_hf_json(json.load(f))
  source, layout = checkpoint_io.load(path)
  flat = convert.convert(source, RULES, param_shapes(cfg, dtype),
                         ignore=IGNORE, what=layout.source)
  model = from_flat_params(cfg, flat, dtype=dtype, rngs=rngs)
  tok_path = os.path.join(path, "tokenizer.json")
  tok = tokenizer_lib.Tokenizer(tok_path) if os.path.isfile(tok_path) else None
  return model, tok
