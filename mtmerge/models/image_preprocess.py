"""Image preprocessing for ViT/CLIP: resize, center crop, rescale, normalize.

The steps and their order follow HF's `CLIPImageProcessor` /
`ViTImageProcessor`: convert to 3 channels, resize (either the shorter side
to `size`, keeping the aspect ratio, or to an exact `(height, width)`),
center crop, multiply by `rescale_factor` (1/255, so uint8 becomes
[0, 1]), then `(x - mean) / std` per channel. Output is NHWC float32, the
layout `vit.ViT` and `clip.CLIP` take.

Resizing runs in JAX (`jax.image.resize`, antialiased when downsampling) by
default, so nothing beyond JAX is needed. `backend="pil"` uses Pillow, as
HF does; PIL rounds the resized image to uint8, so the two backends differ
by up to about 1/255 before normalization.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# OpenAI CLIP's training statistics (Radford et al. 2021); HF's defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# HF ViT (Dosovitskiy et al. 2021) maps [0, 1] to [-1, 1].
VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.5, 0.5, 0.5)

# HF stores PIL resample codes; 2 = bilinear, 3 = bicubic.
_RESAMPLE = {0: "nearest", 1: "lanczos3", 2: "bilinear", 3: "bicubic",
             4: "bilinear", 5: "bicubic"}


def to_rgb(images: np.ndarray) -> np.ndarray:
  """`[N, H, W]`, `[N, H, W, 1]`, `[N, H, W, 3]` or RGBA -> `[N, H, W, 3]`."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
    raise ValueError("expected a batch of images [N, H, W] or [N, H, W, C] "
                     f"with C in (1, 3, 4), got shape {images.shape}")
  if images.shape[-1] == 1:
    return np.repeat(images, 3, axis=-1)
  return images[..., :3]  # drop alpha, as PIL's convert("RGB") does


def resize_shape(height: int, width: int,
                 size: int | Sequence[int]) -> tuple[int, int]:
  """Output `(h, w)`: an int resizes the shorter side (HF `shortest_edge`)."""
  if isinstance(size, int):
    short, long = sorted((height, width))
    new_long = int(size * long / short)
    return (size, new_long) if height <= width else (new_long, size)
  h, w = size
  return int(h), int(w)


def center_crop(images: np.ndarray, crop: Sequence[int]) -> np.ndarray:
  """Crops `[N, H, W, C]` to the centered `crop = (h, w)` window."""
  h, w = images.shape[1:3]
  ch, cw = crop
  if ch > h or cw > w:
    raise ValueError(f"crop {ch}x{cw} is larger than the image {h}x{w}")
  top, left = (h - ch) // 2, (w - cw) // 2
  return images[:, top:top + ch, left:left + cw]


def resize(images: np.ndarray, shape: tuple[int, int], method: str = "bicubic",
           backend: str = "jax") -> np.ndarray:
  """Resizes `[N, H, W, C]` to `[N, *shape, C]` (float32 out)."""
  if tuple(images.shape[1:3]) == tuple(shape):
    return np.asarray(images, np.float32)
  if backend == "pil":
    from PIL import Image  # pylint: disable=g-import-not-at-top
    if images.dtype != np.uint8:
      raise ValueError("backend='pil' needs uint8 images, got "
                       f"{images.dtype}")
    codes = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR,
             "bicubic": Image.BICUBIC, "lanczos3": Image.LANCZOS}
    out = [np.asarray(Image.fromarray(im).resize(shape[::-1], codes[method]))
           for im in images]
    return np.stack(out).astype(np.float32)
  if backend != "jax":
    raise ValueError(f"backend must be 'jax' or 'pil', got {backend!r}")
  out = jax.image.resize(jnp.asarray(images, jnp.float32),
                         (images.shape[0], *shape, images.shape[-1]),
                         method=method, antialias=True)
  return np.asarray(out)


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
  """Callable: uint8 (or 0..255 float) `[N, H, W(, C)]` -> model input.

  Attributes:
    size: int = resize the shorter side to it; `(h, w)` = resize exactly;
      None = no resize.
    crop_size: `(h, w)` center crop after resizing, or None.
    mean, std: per-channel normalization after rescaling.
    rescale_factor: multiplier applied first (1/255 maps uint8 to [0, 1]).
    resample: "bicubic", "bilinear", "nearest" or "lanczos3".
    backend: "jax" (default, no extra dependency) or "pil".
  """
  size: int | tuple[int, int] | None = 224
  crop_size: tuple[int, int] | None = (224, 224)
  mean: tuple[float, ...] = CLIP_MEAN
  std: tuple[float, ...] = CLIP_STD
  rescale_factor: float = 1 / 255
  resample: str = "bicubic"
  backend: str = "jax"

  @classmethod
  def clip(cls, image_size: int = 224) -> "ImagePreprocessor":
    """HF `CLIPImageProcessor` defaults for `image_size`."""
    return cls(size=image_size, crop_size=(image_size, image_size))

  @classmethod
  def vit(cls, image_size: int = 224) -> "ImagePreprocessor":
    """HF `ViTImageProcessor` defaults: exact resize, bilinear, 0.5/0.5."""
    return cls(size=(image_size, image_size), crop_size=None, mean=VIT_MEAN,
               std=VIT_STD, resample="bilinear")

  @classmethod
  def from_hf_dir(cls, path: str | os.PathLike, default: str = "clip"
                  ) -> "ImagePreprocessor":
    """Reads `preprocessor_config.json`; `default` ("clip"/"vit") if absent.

    The defaults' image size comes from `config.json` when present.
    """
    path = os.fspath(path)
    pre_path = os.path.join(path, "preprocessor_config.json")
    if not os.path.exists(pre_path):
      size = _image_size_from_config(path)
      return cls.vit(size) if default == "vit" else cls.clip(size)
    with open(pre_path, encoding="utf-8") as f:
      cfg = json.load(f)
    base = cls.vit() if default == "vit" else cls.clip()
    size = base.size
    if cfg.get("do_resize", True) is False:
      size = None
    elif "size" in cfg:
      size = _parse_size(cfg["size"], pre_path)
    crop = base.crop_size
    if "do_center_crop" in cfg:
      crop = (_parse_size(cfg.get("crop_size", 224), pre_path, square=True)
              if cfg["do_center_crop"] else None)
    normalize = cfg.get("do_normalize", True)
    return cls(
        size=size, crop_size=crop,
        mean=tuple(cfg.get("image_mean", base.mean)) if normalize else (0.0,),
        std=tuple(cfg.get("image_std", base.std)) if normalize else (1.0,),
        rescale_factor=(cfg.get("rescale_factor", 1 / 255)
                        if cfg.get("do_rescale", True) else 1.0),
        resample=_RESAMPLE.get(cfg.get("resample"), base.resample))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Preprocesses a batch; returns float32 `[N, H', W', 3]`."""
    raw = to_rgb(images)
    x = raw
    if self.size is not None:
      shape = resize_shape(raw.shape[1], raw.shape[2], self.size)
      x = resize(raw, shape, self.resample, self.backend)
    if self.crop_size is not None:
      x = center_crop(x, self.crop_size)
    x = np.asarray(x, np.float32) * np.float32(self.rescale_factor)
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return (x - mean) / std


def _parse_size(size, where: str, square: bool = False):
  """HF size dicts: {"shortest_edge": s} | {"height": h, "width": w} | int."""
  if isinstance(size, int):
    return (size, size) if square else size
  if isinstance(size, dict):
    if "shortest_edge" in size:
      s = int(size["shortest_edge"])
      return (s, s) if square else s
    if "height" in size and "width" in size:
      return int(size["height"]), int(size["width"])
  raise ValueError(f"{where}: unsupported size {size!r}")


def _image_size_from_config(path: str) -> int:
  try:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError):
    return 224
  cfg = cfg.get("vision_config", cfg)
  size = cfg.get("image_size", 224)
  return size if isinstance(size, int) else int(size[0])
