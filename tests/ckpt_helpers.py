"""Small safetensors checkpoints for the IO and CLI tests."""

import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = {"encoder.w": (16, 8), "encoder.b": (8,), "head.w": (8, 4),
          "head.b": (4,), "logit_scale": ()}  # 0-d, as CLIP's
SHARD = {k: f"model-0000{1 if k.startswith('encoder') else 2}-of-00002."
            "safetensors" for k in SHAPES}


def make_model(seed, dtype=np.float32, base=None, scale=0.1):
  rng = np.random.default_rng(seed)
  out = {}
  for k, s in SHAPES.items():
    x = np.asarray(rng.normal(size=s), np.float32) * scale
    if base is not None:
      x = x + base[k].astype(np.float32)
    out[k] = np.asarray(x, dtype)  # an array, also when 0-d
  return out


def write_ckpt(path, tensors, sharded=False):
  """A single .safetensors file, or an HF dir of 2 shards + index + config."""
  path = str(path)
  if not sharded:
    save_file(tensors, path, metadata={"format": "pt"})
    return path
  os.makedirs(path)
  for file in sorted(set(SHARD.values())):
    save_file({k: v for k, v in tensors.items() if SHARD[k] == file},
              os.path.join(path, file), metadata={"format": "pt"})
  index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
           "weight_map": {k: SHARD[k] for k in tensors}}
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "toy"}, f)
  with open(os.path.join(path, "pytorch_model.bin"), "w") as f:
    f.write("stale base weights: must not be copied")
  return path
