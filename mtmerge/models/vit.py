"""Vision Transformer (Dosovitskiy et al. 2021) in Flax NNX, HF-compatible.

`ViT` reproduces Hugging Face `ViTModel`: a patch embedding (a stride-P
convolution, computed here as a reshape plus one matmul), a learned CLS
token and position embeddings, pre-LayerNorm encoder blocks, a final
LayerNorm and an optional tanh pooler on the CLS token. The encoder pieces
(`Attention`, `MLP`, `EncoderBlock`, `PatchEmbed`) are shared with
`mtmerge.models.clip`.

Images are NHWC float32 `[B, H, W, C]`, already normalized (see
`mtmerge.models.image_preprocess`). PyTorch's NCHW conv weight
`[D, C, P, P]` is transposed to `[P, P, C, D]` by the converter.

Parameter paths (`/`-joined, what merge configs match with regexes):

  patch_embed/kernel [P, P, C, D]   patch_embed/bias [D]
  cls_token [D]                     pos_embed [N + 1, D]
  layers/{i}/ln1/{scale,bias}       layers/{i}/ln2/{scale,bias}
  layers/{i}/attn/{query,key,value,out}/{kernel,bias}   (kernels [in, out])
  layers/{i}/mlp/fc1/{kernel,bias}  layers/{i}/mlp/fc2/{kernel,bias}
  final_ln/{scale,bias}             pooler/{kernel,bias}  (if present)

`load_dir` reads a HF directory (`config.json` + `model.safetensors`, or a
sharded `model.safetensors.index.json`) in either key layout: the classic
one (`encoder.layer.{i}.attention.attention.query.weight`) that the hub and
`save_pretrained` write, or transformers 5.x module names
(`layers.{i}.attention.q_proj.weight`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import numpy as st_numpy

from mtmerge.models import convert
from mtmerge.models import image_preprocess
from mtmerge.models import ops

# HF's ACT2FN names -> JAX. "gelu" is the exact erf form in both libraries.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": ops.gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Looks up an activation by its HF config name, with a clear error."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; known: "
                     f"{sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance as in PyTorch; the fast E[x^2]-E[x]^2 form loses
  # precision on residual streams with large means.
  return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention with separate q/k/v/out projections."""

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"hidden size {dim} not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.query = nnx.Linear(dim, dim, use_bias=qkv_bias, rngs=rngs)
    self.key = nnx.Linear(dim, dim, use_bias=qkv_bias, rngs=rngs)
    self.value = nnx.Linear(dim, dim, use_bias=qkv_bias, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x: `[B, L, D]`; mask: bool, broadcasts to `[B, H, L, L]`, True=keep."""
    b, length, dim = x.shape
    split = lambda t: t.reshape(b, length, self.num_heads, -1)
    d = ops.dense
    q, k, v = (split(d(self.query, x)), split(d(self.key, x)),
               split(d(self.value, x)))
    scale = (dim // self.num_heads) ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
      # A finite minimum (not -inf) keeps fully masked rows finite, as HF does.
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    return d(self.out, out.reshape(b, length, dim))


class MLP(nnx.Module):
  """fc1 -> activation -> fc2."""

  def __init__(self, dim: int, hidden: int, act: str, *, rngs: nnx.Rngs):
    self.act = act
    activation(act)  # validate early
    self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return ops.dense(self.fc2, activation(self.act)(ops.dense(self.fc1, x)))


class EncoderBlock(nnx.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str,
               eps: float, *, qkv_bias: bool = True, rngs: nnx.Rngs):
    self.ln1 = layer_norm(dim, eps, rngs)
    self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, rngs=rngs)
    self.ln2 = layer_norm(dim, eps, rngs)
    self.mlp = MLP(dim, mlp_dim, act, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = x + self.attn(self.ln1(x), mask)
    return x + self.mlp(self.ln2(x))


class PatchEmbed(nnx.Module):
  """Non-overlapping P x P patches -> `[B, N, D]` (row-major patch order)."""

  def __init__(self, patch: int, channels: int, dim: int, *,
               use_bias: bool = True, rngs: nnx.Rngs):
    self.patch = patch
    fan_in = patch * patch * channels
    self.kernel = nnx.Param(jax.random.normal(
        rngs.params(), (patch, patch, channels, dim)) * fan_in ** -0.5)
    self.bias = nnx.Param(jnp.zeros((dim,))) if use_bias else None

  def __call__(self, images: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    p = self.patch
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch "
                       f"size {p}")
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // p) * (w // p), p * p * c)
    x = x @ self.kernel[...].reshape(p * p * c, -1)
    return x if self.bias is None else x + self.bias[...]


def check_images(images: jax.Array, size: int, channels: int) -> None:
  """Raises a clear error unless `images` is `[B, size, size, channels]`."""
  if images.ndim != 4 or images.shape[1:] != (size, size, channels):
    raise ValueError(f"expected NHWC images [B, {size}, {size}, {channels}], "
                     f"got shape {tuple(images.shape)}")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """ViT hyperparameters (HF `ViTConfig` names in `from_hf_json`)."""
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  act: str = "gelu"
  layer_norm_eps: float = 1e-12
  qkv_bias: bool = True
  pooler: bool = True
  pooler_act: str = "tanh"
  pooler_size: int | None = None  # None: hidden_size

  @classmethod
  def from_hf_json(cls, source: str | os.PathLike | dict[str, Any],
                   pooler: bool = True) -> "ViTConfig":
    """Reads a HF ViT `config.json` (path, directory or parsed dict).

    `pooler` is not in HF configs (it is a `ViTModel` constructor argument);
    `load_dir` sets it from whether the checkpoint has pooler weights.
    """
    cfg = read_json_config(source)
    square = lambda v: v if isinstance(v, int) else int(v[0])
    return cls(image_size=square(cfg.get("image_size", 224)),
               patch_size=square(cfg.get("patch_size", 16)),
               num_channels=cfg.get("num_channels", 3),
               hidden_size=cfg.get("hidden_size", 768),
               num_layers=cfg.get("num_hidden_layers", 12),
               num_heads=cfg.get("num_attention_heads", 12),
               mlp_dim=cfg.get("intermediate_size", 3072),
               act=cfg.get("hidden_act", "gelu"),
               layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
               qkv_bias=cfg.get("qkv_bias", True), pooler=pooler,
               pooler_act=cfg.get("pooler_act", "tanh"),
               pooler_size=cfg.get("pooler_output_size"))


class ViTOutput(NamedTuple):
  last_hidden_state: jax.Array  # [B, N + 1, D], after the final LayerNorm
  pooler_output: jax.Array | None  # [B, pooler_size] or None without pooler


class ViT(nnx.Module):
  """HF `ViTModel` equivalent. Call with NHWC float32 images."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    grid = c.image_size // c.patch_size
    self.patch_embed = PatchEmbed(c.patch_size, c.num_channels, c.hidden_size,
                                  rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((c.hidden_size,)))
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(
        rngs.params(), (grid * grid + 1, c.hidden_size)))
    self.layers = nnx.List([
        EncoderBlock(c.hidden_size, c.num_heads, c.mlp_dim, c.act,
                     c.layer_norm_eps, qkv_bias=c.qkv_bias, rngs=rngs)
        for _ in range(c.num_layers)])
    self.final_ln = layer_norm(c.hidden_size, c.layer_norm_eps, rngs)
    self.pooler = (nnx.Linear(c.hidden_size, c.pooler_size or c.hidden_size,
                              rngs=rngs) if c.pooler else None)

  def __call__(self, images: jax.Array) -> ViTOutput:
    """images: `[B, H, W, C]` float32 (normalized) -> `ViTOutput`."""
    c = self.config
    check_images(images, c.image_size, c.num_channels)
    x = self.patch_embed(images)
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
    for layer in self.layers:
      x = layer(x)
    x = self.final_ln(x)
    pooled = None
    if self.pooler is not None:
      pooled = activation(c.pooler_act)(self.pooler(x[:, 0]))
    return ViTOutput(x, pooled)


# ----------------------------------------------------------------------------
# Loading: shared helpers (also used by clip.py and convert_open_clip.py).


def read_json_config(source: str | os.PathLike | dict[str, Any]) -> dict:
  """A parsed dict, a `config.json` path, or a directory holding one."""
  if isinstance(source, dict):
    return source
  path = os.fspath(source)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"no model config at {path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_safetensors_dir(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a HF directory (single or sharded safetensors) or file."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return dict(st_numpy.load_file(path))
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index, encoding="utf-8") as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(
        f"{path} has neither model.safetensors nor model.safetensors.index"
        ".json (PyTorch .bin checkpoints are not read; re-save them with "
        "save_pretrained(..., safe_serialization=True))")
  out: dict[str, np.ndarray] = {}
  for name in files:
    out.update(st_numpy.load_file(os.path.join(path, name)))
  return out


def param_shapes(make: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
  """`/`-joined parameter path -> shape of the module `make()` would build.

  Nothing is allocated: the module is traced with `nnx.eval_shape`.
  """
  _, state = nnx.split(nnx.eval_shape(make))
  return {"/".join(map(str, p)): tuple(v.get_value().shape)
          for p, v in nnx.to_flat_state(state)}


def from_flat(make: Callable[[], nnx.Module],
              flat: dict[str, np.ndarray]) -> nnx.Module:
  """Builds `make()`'s module with its parameters set from a flat dict.

  `flat` must hold exactly the module's paths (as `convert.convert` with
  `target_shapes=param_shapes(make)` guarantees); no random init runs.
  """
  graphdef, state = nnx.split(nnx.eval_shape(make))
  leaves = {}
  for path, var in nnx.to_flat_state(state):
    name = "/".join(map(str, path))
    value = jnp.asarray(flat[name], dtype=var.get_value().dtype)
    leaves[path] = var.replace(value)
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _param(name: str) -> str:
  return {"weight": "kernel"}.get(name, name)


def block_rules(src: str, dst: str, names: dict[str, str]) -> list[
    convert.Rule]:
  """Rules for one family of encoder blocks.

  Args:
    src: regex for the block prefix with one group for the layer index,
      e.g. `r"encoder\\.layers\\.(\\d+)\\."`.
    dst: Flax prefix with `\\1` for the index, e.g. `r"layers/\\1/"`.
    names: regex of the external sub-module name -> Flax sub-path, e.g.
      `{"self_attn\\.q_proj": "attn/query", "layer_norm1": "ln1"}`. Entries
      whose Flax path contains `ln` are LayerNorms (weight -> scale), the
      rest Linears (weight -> transposed kernel).
  """
  rules = []
  for ext, flax_name in names.items():
    is_ln = flax_name.rsplit("/", 1)[-1].startswith("ln")
    rules.append(convert.Rule(
        src + ext + r"\.weight", dst + flax_name + ("/scale" if is_ln
                                                     else "/kernel"),
        None if is_ln else convert.linear_kernel))
    rules.append(convert.Rule(src + ext + r"\.bias", dst + flax_name + "/bias"))
  return rules


def hf_rules() -> list[convert.Rule]:
  """HF `ViTModel` keys (classic and transformers-5 names) -> Flax paths.

  An optional `vit.` prefix (from `ViTFor*` models) is accepted.
  """
  p = r"(?:vit\.)?"
  classic = block_rules(p + r"encoder\.layer\.(\d+)\.", r"layers/\1/", {
      r"layernorm_before": "ln1", r"layernorm_after": "ln2",
      r"attention\.attention\.query": "attn/query",
      r"attention\.attention\.key": "attn/key",
      r"attention\.attention\.value": "attn/value",
      r"attention\.output\.dense": "attn/out",
      r"intermediate\.dense": "mlp/fc1", r"output\.dense": "mlp/fc2"})
  modern = block_rules(p + r"layers\.(\d+)\.", r"layers/\1/", {
      r"layernorm_before": "ln1", r"layernorm_after": "ln2",
      r"attention\.q_proj": "attn/query", r"attention\.k_proj": "attn/key",
      r"attention\.v_proj": "attn/value", r"attention\.o_proj": "attn/out",
      r"mlp\.fc1": "mlp/fc1", r"mlp\.fc2": "mlp/fc2"})
  flat_vec = lambda a: a.reshape(-1)
  flat_pos = lambda a: a.reshape(a.shape[-2], a.shape[-1])
  return classic + modern + [
      convert.Rule(p + r"embeddings\.cls_token", "cls_token", flat_vec),
      convert.Rule(p + r"embeddings\.position_embeddings", "pos_embed",
                   flat_pos),
      convert.Rule(p + r"embeddings\.patch_embeddings\.projection\.weight",
                   "patch_embed/kernel", convert.conv_kernel),
      convert.Rule(p + r"embeddings\.patch_embeddings\.projection\.bias",
                   "patch_embed/bias"),
      convert.Rule(p + r"layernorm\.weight", "final_ln/scale"),
      convert.Rule(p + r"layernorm\.bias", "final_ln/bias"),
      convert.Rule(p + r"pooler\.dense\.weight", "pooler/kernel",
                   convert.linear_kernel),
      convert.Rule(p + r"pooler\.dense\.bias", "pooler/bias"),
  ]


# Buffers and task heads a `ViT` has no place for.
HF_IGNORE = (r".*position_ids", r"(?:vit\.)?embeddings\.mask_token",
             r"classifier\..*")


def from_hf_state_dict(tensors: dict[str, np.ndarray], config: ViTConfig,
                       what: str = "ViT checkpoint") -> ViT:
  """Builds a `ViT` from HF `ViTModel` tensors (numpy), checking every key."""
  make = lambda: ViT(config, rngs=nnx.Rngs(0))
  flat = convert.convert(tensors, hf_rules(), param_shapes(make),
                         ignore=HF_IGNORE, what=what)
  return from_flat(make, flat)


def load_dir(path: str | os.PathLike):
  """Loads a HF ViT directory.

  Args:
    path: directory with `config.json` (model_type "vit"), safetensors
      weights and optionally `preprocessor_config.json`.

  Returns:
    `(model, preprocessor)`: a `ViT` and an
    `image_preprocess.ImagePreprocessor` (HF ViT defaults: 224x224 resize,
    mean = std = 0.5, when the directory has no preprocessor config).
  """
  raw = read_json_config(path)
  if raw.get("model_type", "vit") != "vit":
    raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not "
                     "'vit'")
  tensors = read_safetensors_dir(path)
  has_pooler = any("pooler." in k for k in tensors)
  config = ViTConfig.from_hf_json(raw, pooler=has_pooler)
  model = from_hf_state_dict(tensors, config, what=os.fspath(path))
  pre = image_preprocess.ImagePreprocessor.from_hf_dir(path, default="vit")
  return model, pre
