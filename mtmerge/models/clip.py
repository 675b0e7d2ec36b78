"""CLIP (Radford et al. 2021) in Flax NNX, output-compatible with HF.

`CLIP` holds a vision tower (HF `CLIPVisionModel`: patch embedding without
bias, CLS token, position embeddings, `pre_ln`, pre-LN blocks, `post_ln` on
the CLS token), an optional text tower (HF `CLIPTextModel`: causal
attention, final LayerNorm, pooling at the end-of-text token), the two
bias-free projections and the learned log temperature `logit_scale`.

Images are NHWC float32 `[B, H, W, 3]`, normalized with the CLIP mean/std
(`mtmerge.models.image_preprocess`). Text is `input_ids [B, L]` (int32) with
an optional `attention_mask [B, L]` (1 = token, 0 = padding).

Text pooling follows HF transformers 5.x exactly: if `eos_token_id == 2`
(configs saved before HF PR #24773) the pooled token is the position of the
largest token id (OpenAI's end-of-text id is the largest in its vocab;
`TextConfig.pooling = "argmax"`, also used for open_clip weights);
otherwise it is the first position holding `eos_token_id` ("eos").

Parameter paths (`/`-joined; regexes in merge configs match these):

  vision/patch_embed/kernel [P, P, 3, D]   vision/cls_token [D]
  vision/pos_embed [N + 1, D]              vision/pre_ln/{scale,bias}
  vision/layers/{i}/ln1/{scale,bias}       vision/layers/{i}/ln2/...
  vision/layers/{i}/attn/{query,key,value,out}/{kernel,bias}
  vision/layers/{i}/mlp/{fc1,fc2}/{kernel,bias}
  vision/post_ln/{scale,bias}              visual_projection/kernel [D, E]
  text/token_embed/embedding [V, Dt]       text/pos_embed [L, Dt]
  text/layers/{i}/...  (as in vision)      text/final_ln/{scale,bias}
  text_projection/kernel [Dt, E]           logit_scale []  (log of the scale)

A vision-only model (HF `CLIPVisionModel` checkpoint, as the fine-tuned
task-arithmetic checkpoints are) has the same `vision/...` paths and no
`text/...`, `text_projection` or `logit_scale`; `visual_projection` exists
only if the checkpoint has it. So `nnx.update(full.vision,
nnx.state(finetuned.vision))` puts fine-tuned weights into a full model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtmerge.models import convert
from mtmerge.models import image_preprocess
from mtmerge.models import vit


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 49408
  max_len: int = 77
  hidden_size: int = 512
  num_layers: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  # "eos": first position of eos_token_id; "argmax": position of the largest
  # id (OpenAI/open_clip, and HF configs with eos_token_id == 2).
  pooling: str = "eos"


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Tower configs; `text=None` is vision-only; `projection_dim=None` has
  no projections (then `encode_image` returns the pooled CLS feature)."""
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  text: TextConfig | None = dataclasses.field(default_factory=TextConfig)
  projection_dim: int | None = 512
  logit_scale_init: float = 2.6592  # log(1 / 0.07)

  @classmethod
  def from_hf_json(cls, source: str | os.PathLike | dict[str, Any],
                   projection: bool = True) -> "CLIPConfig":
    """Reads a HF `config.json` of model_type "clip" or "clip_vision_model".

    Args:
      source: path, directory or parsed dict.
      projection: for "clip_vision_model", whether the checkpoint has a
        `visual_projection` (a `CLIPVisionModelWithProjection`).
    """
    raw = vit.read_json_config(source)
    kind = raw.get("model_type")
    if kind == "clip":
      return cls(vision=_vision_config(raw.get("vision_config") or {}),
                 text=_text_config(raw.get("text_config") or {}),
                 projection_dim=raw.get("projection_dim", 512),
                 logit_scale_init=raw.get("logit_scale_init_value", 2.6592))
    if kind == "clip_vision_model":
      return cls(vision=_vision_config(raw), text=None,
                 projection_dim=(raw.get("projection_dim", 512)
                                 if projection else None))
    raise ValueError(f"model_type {kind!r} is not 'clip' or "
                     "'clip_vision_model'")


def _vision_config(d: dict) -> VisionConfig:
  square = lambda v: v if isinstance(v, int) else int(v[0])
  return VisionConfig(
      image_size=square(d.get("image_size", 224)),
      patch_size=square(d.get("patch_size", 32)),
      num_channels=d.get("num_channels", 3),
      hidden_size=d.get("hidden_size", 768),
      num_layers=d.get("num_hidden_layers", 12),
      num_heads=d.get("num_attention_heads", 12),
      mlp_dim=d.get("intermediate_size", 3072),
      act=d.get("hidden_act", "quick_gelu"),
      layer_norm_eps=d.get("layer_norm_eps", 1e-5))


def _text_config(d: dict) -> TextConfig:
  eos = d.get("eos_token_id", 49407)
  return TextConfig(
      vocab_size=d.get("vocab_size", 49408),
      max_len=d.get("max_position_embeddings", 77),
      hidden_size=d.get("hidden_size", 512),
      num_layers=d.get("num_hidden_layers", 12),
      num_heads=d.get("num_attention_heads", 8),
      mlp_dim=d.get("intermediate_size", 2048),
      act=d.get("hidden_act", "quick_gelu"),
      layer_norm_eps=d.get("layer_norm_eps", 1e-5),
      eos_token_id=eos[0] if isinstance(eos, list) else eos,
      # HF keeps argmax pooling for configs saved before PR #24773, which
      # all have the wrong eos_token_id 2.
      pooling="argmax" if eos == 2 else "eos")


def _blocks(c, rngs: nnx.Rngs) -> nnx.List:
  return nnx.List([vit.EncoderBlock(c.hidden_size, c.num_heads, c.mlp_dim,
                                    c.act, c.layer_norm_eps, rngs=rngs)
                   for _ in range(c.num_layers)])


class VisionTower(nnx.Module):
  """HF `CLIPVisionModel`: returns (last_hidden_state, pooled)."""

  def __init__(self, c: VisionConfig, *, rngs: nnx.Rngs):
    self.config = c
    grid = c.image_size // c.patch_size
    self.patch_embed = vit.PatchEmbed(c.patch_size, c.num_channels,
                                      c.hidden_size, use_bias=False, rngs=rngs)
    self.cls_token = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (c.hidden_size,)))
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(
        rngs.params(), (grid * grid + 1, c.hidden_size)))
    self.pre_ln = vit.layer_norm(c.hidden_size, c.layer_norm_eps, rngs)
    self.layers = _blocks(c, rngs)
    self.post_ln = vit.layer_norm(c.hidden_size, c.layer_norm_eps, rngs)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.config
    vit.check_images(images, c.image_size, c.num_channels)
    x = self.patch_embed(images)
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
    x = self.pre_ln(x)
    for layer in self.layers:
      x = layer(x)
    return x, self.post_ln(x[:, 0])


class TextTower(nnx.Module):
  """HF `CLIPTextModel`: returns (last_hidden_state, pooled)."""

  def __init__(self, c: TextConfig, *, rngs: nnx.Rngs):
    self.config = c
    self.token_embed = nnx.Embed(c.vocab_size, c.hidden_size, rngs=rngs)
    self.pos_embed = nnx.Param(0.01 * jax.random.normal(
        rngs.params(), (c.max_len, c.hidden_size)))
    self.layers = _blocks(c, rngs)
    self.final_ln = vit.layer_norm(c.hidden_size, c.layer_norm_eps, rngs)

  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    c = self.config
    if input_ids.ndim != 2 or input_ids.shape[1] > c.max_len:
      raise ValueError(f"input_ids must be [B, L] with L <= {c.max_len}, got "
                       f"shape {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    x = self.token_embed(input_ids) + self.pos_embed[:length]
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask[:, None, None, :] > 0)
    for layer in self.layers:
      x = layer(x, mask)
    x = self.final_ln(x)
    if c.pooling == "argmax":
      pos = jnp.argmax(input_ids, axis=-1)
    elif c.pooling == "eos":
      pos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
    else:
      raise ValueError(f"unknown text pooling {c.pooling!r}")
    return x, x[jnp.arange(x.shape[0]), pos]


class CLIPOutput(NamedTuple):
  logits_per_image: jax.Array  # [B_img, B_txt]
  image_embeds: jax.Array  # L2-normalized
  text_embeds: jax.Array  # L2-normalized


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / ||x||_2 along `axis`."""
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


class CLIP(nnx.Module):
  """CLIP with `encode_image`, `encode_text` and HF-style `__call__`."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    v, t, e = config.vision, config.text, config.projection_dim
    self.vision = VisionTower(v, rngs=rngs)
    self.visual_projection = (nnx.Linear(v.hidden_size, e, use_bias=False,
                                         rngs=rngs) if e else None)
    # Each attribute is assigned once: NNX fixes an attribute's kind (data
    # or static) at its first assignment, and None is static.
    has_text = t is not None
    self.text = TextTower(t, rngs=rngs) if has_text else None
    self.text_projection = (nnx.Linear(t.hidden_size, e, use_bias=False,
                                       rngs=rngs) if has_text and e else None)
    self.logit_scale = (nnx.Param(jnp.asarray(config.logit_scale_init,
                                              jnp.float32))
                        if has_text else None)

  def encode_image(self, images: jax.Array) -> jax.Array:
    """`[B, H, W, 3]` -> `[B, E]` image features (not normalized)."""
    pooled = self.vision(images)[1]
    if self.visual_projection is None:
      return pooled
    return self.visual_projection(pooled)

  def encode_text(self, input_ids: jax.Array,
                  attention_mask: jax.Array | None = None) -> jax.Array:
    """`[B, L]` token ids -> `[B, E]` text features (not normalized)."""
    if self.text is None:
      raise ValueError("this CLIP model is vision-only (no text tower)")
    pooled = self.text(input_ids, attention_mask)[1]
    if self.text_projection is None:
      return pooled
    return self.text_projection(pooled)

  def __call__(self, images: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> CLIPOutput:
    """Image-text similarity logits, as HF `CLIPModel.forward`."""
    img = normalize(self.encode_image(images))
    txt = normalize(self.encode_text(input_ids, attention_mask))
    scale = jnp.exp(self.logit_scale[...])
    return CLIPOutput(scale * img @ txt.T, img, txt)


# ----------------------------------------------------------------------------
# HF converter.

_BLOCK = {r"layer_norm1": "ln1", r"layer_norm2": "ln2",
          r"self_attn\.q_proj": "attn/query", r"self_attn\.k_proj": "attn/key",
          r"self_attn\.v_proj": "attn/value",
          r"self_attn\.out_proj": "attn/out",
          r"mlp\.fc1": "mlp/fc1", r"mlp\.fc2": "mlp/fc2"}


def hf_rules() -> list[convert.Rule]:
  """HF `CLIPModel` / `CLIPVisionModel[WithProjection]` keys -> Flax paths.

  The `vision_model.` prefix is optional (transformers 5.x saves
  `CLIPVisionModel` without it); the text tower needs `text_model.`.
  """
  v, t = r"(?:vision_model\.)?", r"text_model\."
  ln = lambda src, dst: [convert.Rule(src + r"\.weight", dst + "/scale"),
                         convert.Rule(src + r"\.bias", dst + "/bias")]
  return (
      vit.block_rules(v + r"encoder\.layers\.(\d+)\.", r"vision/layers/\1/",
                      _BLOCK) +
      vit.block_rules(t + r"encoder\.layers\.(\d+)\.", r"text/layers/\1/",
                      _BLOCK) +
      ln(v + r"pre_layrnorm", "vision/pre_ln") +
      ln(v + r"post_layernorm", "vision/post_ln") +
      ln(t + r"final_layer_norm", "text/final_ln") + [
          convert.Rule(v + r"embeddings\.class_embedding", "vision/cls_token"),
          convert.Rule(v + r"embeddings\.patch_embedding\.weight",
                       "vision/patch_embed/kernel", convert.conv_kernel),
          convert.Rule(v + r"embeddings\.position_embedding\.weight",
                       "vision/pos_embed"),
          convert.Rule(t + r"embeddings\.token_embedding\.weight",
                       "text/token_embed/embedding"),
          convert.Rule(t + r"embeddings\.position_embedding\.weight",
                       "text/pos_embed"),
          convert.Rule(r"visual_projection\.weight",
                       "visual_projection/kernel", convert.linear_kernel),
          convert.Rule(r"text_projection\.weight", "text_projection/kernel",
                       convert.linear_kernel),
          convert.Rule(r"logit_scale", "logit_scale",
                       lambda a: np.asarray(a).reshape(())),
      ])


HF_IGNORE = (r".*position_ids",)


def from_flat_params(flat: dict[str, np.ndarray], config: CLIPConfig,
                     what: str = "CLIP parameters") -> CLIP:
  """Builds a `CLIP` from `{flax_path: array}` after checking every path."""
  make = lambda: CLIP(config, rngs=nnx.Rngs(0))
  flat = convert.convert(flat, [convert.Rule(r"(.*)", r"\1")],
                         vit.param_shapes(make), what=what)
  return vit.from_flat(make, flat)


def from_hf_state_dict(tensors: dict[str, np.ndarray], config: CLIPConfig,
                       what: str = "CLIP checkpoint") -> CLIP:
  """Builds a `CLIP` from HF tensors (numpy), checking every key and shape."""
  make = lambda: CLIP(config, rngs=nnx.Rngs(0))
  flat = convert.convert(tensors, hf_rules(), vit.param_shapes(make),
                         ignore=HF_IGNORE, what=what)
  return vit.from_flat(make, flat)


def load_dir(path: str | os.PathLike):
  """Loads a HF CLIP directory (`CLIPModel` or `CLIPVisionModel*`).

  Args:
    path: directory with `config.json` (model_type "clip" or
      "clip_vision_model"), safetensors weights and optionally
      `preprocessor_config.json`.

  Returns:
    `(model, preprocessor)`: a `CLIP` (vision-only for "clip_vision_model";
    with `visual_projection` only if the checkpoint has one) and an
    `image_preprocess.ImagePreprocessor` (CLIP defaults if the directory
    has no preprocessor config).
  """
  raw = vit.read_json_config(path)
  tensors = vit.read_safetensors_dir(path)
  has_proj = "visual_projection.weight" in tensors
  try:
    config = CLIPConfig.from_hf_json(raw, projection=has_proj)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  model = from_hf_state_dict(tensors, config, what=os.fspath(path))
  pre = image_preprocess.ImagePreprocessor.from_hf_dir(path, default="clip")
  return model, pre
