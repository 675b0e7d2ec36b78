"""open_clip / OpenAI CLIP state dicts -> `clip.CLIP`.

open_clip (and OpenAI's original CLIP code) name a ViT CLIP's tensors
`visual.conv1.weight`, `visual.class_embedding`,
`visual.positional_embedding`, `visual.ln_pre.*`,
`visual.transformer.resblocks.{i}.{ln_1,attn,ln_2,mlp.c_fc,mlp.c_proj}.*`,
`visual.ln_post.*`, `visual.proj`, and for text `token_embedding.weight`,
`positional_embedding`, `transformer.resblocks.{i}.*`, `ln_final.*`,
`text_projection`, `logit_scale`. Attention is PyTorch's
`nn.MultiheadAttention`, whose `in_proj_weight [3D, D]` packs the query,
key and value projections in that order; `split_in_proj` unpacks it before
the name rules run. `visual.proj` and `text_projection` are used as
`x @ proj`, so they are already Flax kernels (no transpose).

Text features are pooled at the largest token id (OpenAI's end-of-text),
i.e. `TextConfig.pooling = "argmax"`. The activation is not stored in the
weights: OpenAI-trained weights use QuickGELU, open_clip's own training
configs use exact GELU unless their name ends in `-quickgelu`.

The task-arithmetic checkpoints of Ilharco et al. 2023 ("Editing Models
with Task Arithmetic") were open_clip ViT-B-32 models with OpenAI weights:
export their `state_dict()` to safetensors and `load_file` them here.
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping

import numpy as np
from flax import nnx

from mtmerge.models import clip
from mtmerge.models import convert
from mtmerge.models import image_preprocess
from mtmerge.models import vit

_IN_PROJ = re.compile(r"(.*\.attn)\.in_proj_(weight|bias)")


def split_in_proj(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Replaces each packed `attn.in_proj_{weight,bias}` with q/k/v parts.

  Returns a new dict where `X.attn.in_proj_weight [3D, D]` became
  `X.attn.q_proj.weight`, `X.attn.k_proj.weight`, `X.attn.v_proj.weight`
  (`[D, D]` each, PyTorch layout), likewise for the bias.
  """
  out = {}
  for key, value in sd.items():
    m = _IN_PROJ.fullmatch(key)
    if not m:
      out[key] = value
      continue
    value = np.asarray(value)
    if value.shape[0] % 3:
      raise convert.ConversionError(
          f"{key}: packed q/k/v size {value.shape[0]} is not a multiple of 3")
    for name, part in zip("qkv", np.split(value, 3, axis=0)):
      out[f"{m.group(1)}.{name}_proj.{m.group(2)}"] = part
  return out


_BLOCK = {r"ln_1": "ln1", r"ln_2": "ln2", r"attn\.q_proj": "attn/query",
          r"attn\.k_proj": "attn/key", r"attn\.v_proj": "attn/value",
          r"attn\.out_proj": "attn/out", r"mlp\.c_fc": "mlp/fc1",
          r"mlp\.c_proj": "mlp/fc2"}


def rules() -> list[convert.Rule]:
  """Rules for open_clip keys after `split_in_proj`."""
  ln = lambda src, dst: [convert.Rule(src + r"\.weight", dst + "/scale"),
                         convert.Rule(src + r"\.bias", dst + "/bias")]
  return (
      vit.block_rules(r"visual\.transformer\.resblocks\.(\d+)\.",
                      r"vision/layers/\1/", _BLOCK) +
      vit.block_rules(r"transformer\.resblocks\.(\d+)\.", r"text/layers/\1/",
                      _BLOCK) +
      ln(r"visual\.ln_pre", "vision/pre_ln") +
      ln(r"visual\.ln_post", "vision/post_ln") +
      ln(r"ln_final", "text/final_ln") + [
          convert.Rule(r"visual\.class_embedding", "vision/cls_token"),
          convert.Rule(r"visual\.positional_embedding", "vision/pos_embed"),
          convert.Rule(r"visual\.conv1\.weight", "vision/patch_embed/kernel",
                       convert.conv_kernel),
          convert.Rule(r"visual\.proj", "visual_projection/kernel"),
          convert.Rule(r"token_embedding\.weight",
                       "text/token_embed/embedding"),
          convert.Rule(r"positional_embedding", "text/pos_embed"),
          convert.Rule(r"text_projection", "text_projection/kernel"),
          convert.Rule(r"logit_scale", "logit_scale",
                       lambda a: np.asarray(a).reshape(())),
      ])


# Buffers: the causal mask, and OpenAI jit-archive metadata.
IGNORE = (r"(?:visual\.)?attn_mask", r"input_resolution", r"context_length",
          r"vocab_size")


def _count_blocks(sd: Mapping[str, np.ndarray], prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  ids = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
  return max(ids) + 1 if ids else 0


def _need(sd, key: str, what: str) -> np.ndarray:
  if key not in sd:
    raise convert.ConversionError(
        f"{what}: missing {key!r}; not an open_clip ViT CLIP state dict")
  return np.asarray(sd[key])


def config_from_state_dict(sd: Mapping[str, np.ndarray], *,
                           act: str = "quick_gelu", head_width: int = 64,
                           text_heads: int | None = None,
                           what: str = "open_clip state dict"
                           ) -> clip.CLIPConfig:
  """Infers a `CLIPConfig` from tensor shapes (as OpenAI's `build_model`).

  Args:
    sd: the open_clip state dict (packed or split q/k/v).
    act: "quick_gelu" for OpenAI-trained weights, "gelu" for open_clip's
      own (non `-quickgelu`) models.
    head_width: attention head size; heads = width // head_width (64 in
      every OpenAI and open_clip ViT CLIP).
    text_heads: text tower heads (open_clip's `text_cfg.heads`); default
      text width // head_width.
    what: names the checkpoint in errors.
  """
  conv = _need(sd, "visual.conv1.weight", what)
  vpos = _need(sd, "visual.positional_embedding", what)
  width, patch = conv.shape[0], conv.shape[-1]
  grid = int(round((vpos.shape[0] - 1) ** 0.5))
  vprefix, tprefix = "visual.transformer.resblocks.", "transformer.resblocks."
  vfc = _need(sd, vprefix + "0.mlp.c_fc.weight", what)
  vision = clip.VisionConfig(
      image_size=grid * patch, patch_size=patch, num_channels=conv.shape[1],
      hidden_size=width, num_layers=_count_blocks(sd, vprefix),
      num_heads=max(1, width // head_width), mlp_dim=vfc.shape[0], act=act)
  tok = _need(sd, "token_embedding.weight", what)
  tfc = _need(sd, tprefix + "0.mlp.c_fc.weight", what)
  twidth = tok.shape[1]
  text = clip.TextConfig(
      vocab_size=tok.shape[0],
      max_len=_need(sd, "positional_embedding", what).shape[0],
      hidden_size=twidth, num_layers=_count_blocks(sd, tprefix),
      num_heads=text_heads or max(1, twidth // head_width),
      mlp_dim=tfc.shape[0], act=act,
      eos_token_id=tok.shape[0] - 1, pooling="argmax")
  proj = _need(sd, "text_projection", what)
  return clip.CLIPConfig(vision=vision, text=text,
                         projection_dim=int(proj.shape[1]))


def from_state_dict(sd: Mapping[str, np.ndarray],
                    config: clip.CLIPConfig | None = None, *,
                    act: str = "quick_gelu", head_width: int = 64,
                    text_heads: int | None = None,
                    what: str = "open_clip state dict") -> clip.CLIP:
  """Builds a `clip.CLIP` from an open_clip state dict (numpy arrays).

  Args:
    sd: tensors by open_clip name; a `module.` prefix (DataParallel) is
      stripped.
    config: the model config; inferred from shapes when None.
    act, head_width, text_heads: used when inferring the config (see
      `config_from_state_dict`).
    what: names the checkpoint in errors.

  Raises:
    convert.ConversionError: naming unmapped keys, missing parameters and
      shape mismatches.
  """
  sd = {k[len("module."):] if k.startswith("module.") else k: v
        for k, v in sd.items()}
  if config is None:
    config = config_from_state_dict(sd, act=act, head_width=head_width,
                                    text_heads=text_heads, what=what)
  make = lambda: clip.CLIP(config, rngs=nnx.Rngs(0))
  flat = convert.convert(split_in_proj(sd), rules(), vit.param_shapes(make),
                         ignore=IGNORE, what=what)
  return vit.from_flat(make, flat)


def read_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a safetensors file, or a PyTorch state dict if torch is present."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    return vit.read_safetensors_dir(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"{path}: reading PyTorch files needs torch; convert "
                      "it to .safetensors instead") from None
  obj = torch.load(path, map_location="cpu", weights_only=True)
  obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state "
                     "dict; save model.state_dict() instead")
  return {k: v.float().numpy() for k, v in obj.items()}


_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def load(path: str | os.PathLike, act: str | None = None):
  """Loads open_clip weights: a file, or a hub-style directory.

  A directory holds `open_clip_model.safetensors` (or
  `open_clip_pytorch_model.bin`) and optionally `open_clip_config.json`,
  whose `model_cfg` gives the activation (`quick_gelu`) and head sizes
  (`vision_cfg.head_width`, `text_cfg.heads`) and `preprocess_cfg` the
  normalization.

  Args:
    path: directory or weights file.
    act: overrides the activation; default "quick_gelu" unless the
      directory's config says otherwise.

  Returns:
    `(model, preprocessor)`: a `clip.CLIP` and an
    `image_preprocess.ImagePreprocessor` (shorter side to the image size,
    center crop, bicubic, CLIP mean/std unless configured).
  """
  path = os.fspath(path)
  cfg = {}
  weights = path
  if os.path.isdir(path):
    found = [f for f in _WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
    if not found:
      raise FileNotFoundError(f"{path} has none of {_WEIGHT_FILES}")
    weights = os.path.join(path, found[0])
    cfg_path = os.path.join(path, "open_clip_config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
  model_cfg = cfg.get("model_cfg", {})
  if act is None:
    # No config: assume OpenAI-trained weights, the common case.
    act = "quick_gelu" if model_cfg.get("quick_gelu", not cfg) else "gelu"
  model = from_state_dict(
      read_file(weights), act=act,
      head_width=model_cfg.get("vision_cfg", {}).get("head_width", 64),
      text_heads=model_cfg.get("text_cfg", {}).get("heads"), what=weights)
  pre_cfg = cfg.get("preprocess_cfg", {})
  size = model.config.vision.image_size
  pre = image_preprocess.ImagePreprocessor(
      size=size, crop_size=(size, size),
      mean=tuple(pre_cfg.get("mean", image_preprocess.CLIP_MEAN)),
      std=tuple(pre_cfg.get("std", image_preprocess.CLIP_STD)))
  return model, pre
