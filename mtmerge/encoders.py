"""Pure forward functions over parameter dicts: what fine-tuning, evaluation
and learned merging share.

A pretrained NNX model becomes an `Encoder`: its static part plus a pure
`features(params, batch) -> [B, D]` over a params dict with `/`-joined
string paths (the form merge methods, checkpoints and task vectors use).
Task heads are separate linear maps `{"kernel": [D, C], "bias": [C]}`, one
per task, never merged.

Tangent-space models ("Task Arithmetic in the Tangent Space", Ortiz-Jimenez
et al., NeurIPS 2023) are the first-order Taylor expansion of the features
around the pretrained params theta_0:
`f_lin(x; theta_0 + d) = f(x; theta_0) + J_theta f(x; theta_0) d`, computed
with one `jax.jvp`; fine-tuning trains `d`, merging adds task vectors in
`d`, and evaluation runs the same linearized forward.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import tree as tree_lib

Params = dict[str, Any]


def canonical(params: Any) -> Params:
  """A nested dict with string keys only (list indices become '0', '1', ...).

  The one spelling shared by models, orbax checkpoints (which write keys as
  strings) and stacked task vectors, so their tree structures always match.
  """
  return tree_lib.from_flat_dict(tree_lib.to_flat_dict(params))


class Encoder(NamedTuple):
  """A feature extractor as a pure function of its params.

  Attributes:
    name: the model name it was loaded from.
    modality: `text` or `image`.
    static: the model minus its params (`mtmerge.models.split_params`).
    params: the pretrained params (canonical dict).
    features: `(params, batch) -> [B, D]` L2-normalized features, jittable.
    dim: feature width D.
    tokenizer: tokenizer (text) or image preprocessor (image).
    embed_text: for an image encoder with a text tower (CLIP), the pair
      `(encode(input_ids, attention_mask) -> [B, E], tokenize(texts) ->
      dict)` with the pretrained text weights, which `mtmerge.heads` uses
      for zero-shot heads; None otherwise.
    logit_scale: the model's own logit multiplier (CLIP's
      `exp(logit_scale)`), or None.
  """
  name: str
  modality: str
  static: Any
  params: Params
  features: Callable[[Params, dict], jax.Array]
  dim: int
  tokenizer: Any
  embed_text: tuple[Callable, Callable] | None = None
  logit_scale: float | None = None


def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def load(name: str, num_layers: int | None = None) -> Encoder:
  """Loads a pretrained model as an `Encoder`.

  Args:
    name: anything `mtmerge.models.load` accepts (e.g. `minilm`, a local
      Hugging Face BERT or CLIP directory).
    num_layers: keep only the first N transformer layers (BERT; used by the
      seconds-long `runlocal` configs).

  Returns:
    The encoder: BERT gives mean-pooled normalized sentence embeddings
    (sentence-transformers' recipe); CLIP gives normalized image embeddings.
  """
  from mtmerge import models  # local: flax, tokenizers
  from mtmerge.models import bert
  from mtmerge.models import hub
  path = hub.local_dir(name)
  model, tok = models.load(path)
  if isinstance(model, bert.Bert):
    if num_layers is not None:
      if not 1 <= num_layers <= len(model.layers):
        raise ValueError(f"num_layers={num_layers} outside 1.."
                         f"{len(model.layers)} for {name}")
      model.layers = model.layers[:num_layers]
    static, params = models.split_params(model)

    def features(p, batch):
      m = models.merge_params(static, p)
      mask = batch["attention_mask"]
      hidden = m(batch["input_ids"], mask, deterministic=True)
      return _normalize(bert.mean_pool(hidden, mask))
    return Encoder(name, "text", static, canonical(params), features,
                   model.config.hidden_size, tok)
  if hasattr(model, "encode_image"):
    static, params = models.split_params(model)

    def features(p, batch):
      return _normalize(models.merge_params(static, p).encode_image(
          batch["image"]))
    c = model.config.vision
    dim = int(jax.eval_shape(lambda: model.encode_image(jnp.zeros(
        (1, c.image_size, c.image_size, c.num_channels)))).shape[-1])
    if getattr(tok, "backend", None) == "jax":
      # PIL resizes each image without a compile per image size (SUN397,
      # Cars and DTD have thousands of sizes) and, like HF's
      # CLIPImageProcessor, rounds the resized image to uint8.
      tok = dataclasses.replace(tok, backend="pil")
    embed_text = scale = None
    if getattr(model, "text", None) is not None:
      embed_text = _clip_text(static, params, model.config.text.max_len, path)
      scale = float(np.exp(np.asarray(params["logit_scale"], np.float64)))
    return Encoder(name, "image", static, canonical(params), features, dim,
                   tok, embed_text, scale)
  raise ValueError(f"model {name!r} ({type(model).__name__}) has no feature "
                   "extractor here; supported: BERT text encoders, CLIP")


def _clip_text(static, params, max_len: int, path: str):
  """CLIP's `(encode, tokenize)` over the pretrained text tower.

  The tokenizer is the checkpoint's `tokenizer.json` (read on first use,
  so a vision-only use of the model does not need it); batches are padded
  to a multiple of 16 tokens (the attention mask hides padding, and
  pooling takes the end-of-text token) and 64 rows (padding rows are
  dropped from the output).
  """
  from mtmerge import models  # pylint: disable=g-import-not-at-top
  from mtmerge.models import tokenizer as tokenizer_lib
  fn = jax.jit(lambda p, ids, mask: models.merge_params(static, p)
               .encode_text(ids, mask))
  tok = []

  def tokenize(texts):
    if not tok:
      tok.append(tokenizer_lib.Tokenizer(os.path.join(path, "tokenizer.json")))
    return tok[0](texts, max_length=max_len, pad_to_multiple_of=16)

  def encode(ids, mask):  # rows padded to a multiple of 64: few compiles
    n = ids.shape[0]
    pad = ((0, -n % 64), (0, 0))
    if mask is None:
      mask = jnp.ones_like(ids)
    # Padding rows attend to every position (no all-masked softmax rows).
    return fn(params, jnp.pad(ids, pad),
              jnp.pad(mask, pad, constant_values=1))[:n]
  return encode, tokenize


def split(params: Params, pattern: str) -> tuple[Params, Params]:
  """`(selected, rest)` flat dicts: paths fully matching `pattern` or not."""
  rx = re.compile(pattern)
  flat = tree_lib.to_flat_dict(params)
  sel = {k: v for k, v in flat.items() if rx.fullmatch(k)}
  if not sel:
    raise ValueError(f"no parameter path matches {pattern!r}; paths look "
                     f"like {sorted(flat)[:4]}")
  return sel, {k: v for k, v in flat.items() if k not in sel}


def join(*flats: dict[str, Any]) -> Params:
  """Canonical nested params from disjoint flat dicts."""
  out: dict[str, Any] = {}
  for f in flats:
    out.update(f)
  return tree_lib.from_flat_dict(out)


def linearized(features: Callable[[Params, dict], jax.Array], base: Params,
               trainable: str) -> Callable[[dict, dict], jax.Array]:
  """Tangent-space features `(delta, batch) -> f(theta_0) + J delta`.

  Args:
    features: the encoder's `features`.
    base: theta_0 (canonical params).
    trainable: regex of the paths `delta` holds (a flat dict); the rest
      stay at theta_0 and are not differentiated.

  Returns:
    The linearized forward over `delta` (zero delta = pretrained model).
  """
  sel, rest = split(base, trainable)

  def f(delta, batch):
    g = lambda s: features(join(s, rest), batch)
    y0, dy = jax.jvp(g, (sel,), (delta,))
    return y0 + dy
  return f


def logits(head: dict, feats: jax.Array) -> jax.Array:
  """A linear head: `feats @ kernel + bias`."""
  return feats @ head["kernel"] + head["bias"]
