"""Tiny Llama-shaped checkpoints and mergekit YAML files for the tests.

Shapes are chosen so that `int(0.3 * n)` and `round(0.3 * n)` differ
(n = 24 * 16 = 384: 115.2 -> 115 both; q_proj n = 16 * 16 = 256: 76.8 ->
76 vs 77), which is where mergekit's count differs from round-half-up.
"""

import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

BF16 = np.dtype(ml_dtypes.bfloat16)

LAYERS = 2
SHAPES = {"model.embed_tokens.weight": (24, 16)}
for _i in range(LAYERS):
  _p = f"model.layers.{_i}."
  SHAPES.update({
      _p + "self_attn.q_proj.weight": (16, 16),
      _p + "self_attn.k_proj.weight": (8, 16),
      _p + "self_attn.v_proj.weight": (8, 16),
      _p + "self_attn.o_proj.weight": (16, 16),
      _p + "mlp.gate_proj.weight": (24, 16),
      _p + "mlp.up_proj.weight": (24, 16),
      _p + "mlp.down_proj.weight": (16, 24),
      _p + "input_layernorm.weight": (16,),
      _p + "post_attention_layernorm.weight": (16,)})
SHAPES.update({"model.norm.weight": (16,), "lm_head.weight": (24, 16)})
CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"],
              hidden_size=16, intermediate_size=24, num_hidden_layers=LAYERS,
              num_attention_heads=2, num_key_value_heads=1, vocab_size=24,
              torch_dtype="float32", tie_word_embeddings=False,
              rms_norm_eps=1e-5, max_position_embeddings=64)


def tensors(seed, base=None, scale=0.02, dtype=np.float32):
  """A model: N(0, scale) (the base) or `base` plus a task vector."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, s in SHAPES.items():
    x = rng.normal(size=s).astype(np.float32) * np.float32(scale)
    if base is not None:
      x = x + base[k].astype(np.float32)
    out[k] = x.astype(dtype)
  return out


def write(path, ts):
  """An HF-style directory: model.safetensors + config.json."""
  os.makedirs(path, exist_ok=True)
  save_file(ts, os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"})
  cfg = dict(CONFIG, torch_dtype=str(next(iter(ts.values())).dtype.name))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  return str(path)


def family(root, T=3, dtype=np.float32):
  """base/ and m0/.. m{T-1}/ under root; returns (base path, model paths,
  base tensors, model tensors)."""
  b = tensors(0, scale=0.02, dtype=dtype)
  ms = [tensors(10 + t, base=b, scale=0.01, dtype=dtype) for t in range(T)]
  bp = write(os.path.join(root, "base"), b)
  mps = [write(os.path.join(root, f"m{t}"), m) for t, m in enumerate(ms)]
  return bp, mps, b, ms


def yaml_file(path, doc):
  """Writes `doc` as YAML (JSON is valid YAML)."""
  with open(path, "w") as f:
    json.dump(doc, f, indent=1)
  return str(path)


def read(path):
  """A merged output directory's tensors as float32."""
  from safetensors.numpy import load_file
  import glob
  out = {}
  for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
    out.update(load_file(f))
  return out
