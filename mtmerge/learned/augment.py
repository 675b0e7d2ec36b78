"""Strong views for test-time objectives (aTLAS's UFM, FixMatch-style).

Text: token dropout (real tokens leave the attention mask, or become a mask
id); images: a bilinear random resized crop, a flip and uniform noise,
drawn with one random call (each threefry op compiles slowly on XLA:CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_dropout(inputs: dict, rng: jax.Array, rate: float = 0.2,
                  mask_id: int | None = None) -> dict:
  """Text's strong view: drops real tokens but the first and the last.

  Dropped tokens leave the attention mask, or become `mask_id` (BERT's
  [MASK] is 103). Inputs are right-padded.
  """
  ids, am = inputs["input_ids"], inputs["attention_mask"]
  pos, last = jnp.arange(ids.shape[1])[None], jnp.sum(am, 1, keepdims=True) - 1
  drop = (jax.random.bernoulli(rng, rate, ids.shape) & (am > 0) & (pos > 0)
          & (pos < last))
  if mask_id is None:
    return {**inputs, "attention_mask": jnp.where(drop, 0, am).astype(
        am.dtype)}
  return {**inputs, "input_ids": jnp.where(drop, mask_id, ids).astype(
      ids.dtype)}


def image_augment(images: jax.Array, rng: jax.Array, min_area: float = 0.5,
                  flip: float = 0.5, noise: float = 0.05) -> jax.Array:
  """NHWC images' strong view: resized random crop, flip, uniform noise.

  The square crop covers `min_area`..1 of the image (bilinear; as the
  official RandomResizedCrop(scale=(0.5, 1))), mirrored with probability
  `flip`; the noise has std `noise` in normalized pixel units.
  """
  b, h, w, c = images.shape
  # One draw for everything: each threefry op compiles slowly on XLA:CPU.
  u = jax.random.uniform(rng, (b, 4 + h * w * c))
  side = jnp.sqrt(min_area + (1 - min_area) * u[:, :1])

  def lerp(v, n):  # [b, out, in] bilinear weights: output o reads start + o s
    src = jnp.clip(v * (1 - side) * n + (jnp.arange(n) + 0.5) * side - 0.5, 0,
                   n - 1)
    return jnp.maximum(0.0, 1 - jnp.abs(src[..., None] - jnp.arange(n)))
  out = jnp.einsum("boi,bijc,bpj->bopc", lerp(u[:, 1:2], h),
                   images.astype(jnp.float32), lerp(u[:, 2:3], w))
  out = jnp.where(u[:, 3, None, None, None] < flip, out[:, :, ::-1], out)
  jitter = (u[:, 4:].reshape(out.shape) - 0.5) * (12 ** 0.5 * noise)
  return (out + jitter).astype(images.dtype)


def default_augment(inputs: dict, rng: jax.Array) -> dict:
  """`image` -> `image_augment`; `input_ids`+`attention_mask` -> tokens."""
  if "image" in inputs:
    return {**inputs, "image": image_augment(inputs["image"], rng)}
  if "input_ids" in inputs and "attention_mask" in inputs:
    return token_dropout(inputs, rng)
  raise ValueError(f"no default augmentation for inputs {sorted(inputs)}; "
                   "pass augment=(inputs, rng) -> inputs")
