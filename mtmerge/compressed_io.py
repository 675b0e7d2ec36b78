"""The compressed one-model-per-task form on disk (TALL masks, EMR-Merging).

A directory: `tau.safetensors` (the merged vector in the base's dtypes),
`masks.safetensors` (one bit per entry and task, packed flat, uint8) and
`compressed.json` (method, hyperparameters, rescalers, base dtypes).
`mtmerge reconstruct` rebuilds any task's model from it and the base.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from mtmerge import atomic_files
from mtmerge import checkpoint_io
from mtmerge.safetensors_layout import CheckpointError
from mtmerge.safetensors_layout import Layout
from mtmerge.safetensors_layout import np_dtype

CJSON, TAU, MASKS = "compressed.json", "tau.safetensors", "masks.safetensors"


def meta_json(method: str, hparams: Mapping[str, Any], rescalers: Any,
                    base_layout: Layout) -> dict[str, Any]:
  """The `compressed.json` of a compressed merge (also the streamed one's)."""
  from mtmerge import __version__
  r = np.asarray(rescalers, np.float32).reshape(-1)
  return {"format": "mtmerge.compressed", "mtmerge_version": __version__,
          "method": method, "hparams": dict(hparams),
          "num_tasks": int(r.shape[0]), "rescalers": [float(x) for x in r],
          "base_dtypes": base_layout.dtypes}


def save(compressed: Any, base_layout: Layout, path: str,
                    method: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
  """Writes a `Compressed` as a directory: tau, packed masks, json.

  Args:
    compressed: `Compressed(tau, masks, rescalers)` with flat dict trees.
    base_layout: the base's layout (tau is cast to its dtypes).
    path: destination directory (replaced atomically if present).
    method, hparams: recorded in `compressed.json`.

  Returns:
    `{"bytes": size on disk, "full_bytes": T times the base's weight files,
    "ratio": bytes / full_bytes}`.
  """
  tau, masks = dict(compressed.tau), dict(compressed.masks)
  checkpoint_io.check_names(tau, base_layout, "the compressed vector",
                            floats_only=True)
  checkpoint_io.check_names(masks, base_layout, "the compressed masks",
                            floats_only=True)
  meta = meta_json(method, hparams, compressed.rescalers, base_layout)
  T = meta["num_tasks"]
  tau = {k: checkpoint_io.cast(x, np_dtype(base_layout.dtypes[k]))
         for k, x in tau.items()}
  from mtmerge import task_vectors
  # Files hold the flat layout (`task_vectors.pack_mask`).
  masks = {k: checkpoint_io.cast(task_vectors.relayout_packed(
      x, np.shape(tau[k]), 1, to_rows=False), np.dtype(np.uint8))
           for k, x in masks.items()}

  def write(tmp):
    checkpoint_io.write_st(os.path.join(tmp, TAU), tau, None)
    checkpoint_io.write_st(os.path.join(tmp, MASKS), masks, None)
    with open(os.path.join(tmp, CJSON), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2, default=repr)
      f.write("\n")

  full = T * sum(os.path.getsize(base_layout.path_of(f))
                 for f in base_layout.files)
  nbytes = atomic_files.disk_bytes(
      atomic_files.atomic_write(path, write, is_dir=True))
  return {"bytes": nbytes, "full_bytes": full, "ratio": nbytes / max(full, 1)}


def load(path: str) -> tuple[Any, dict[str, Any]]:
  """Reads what `save` wrote.

  Returns:
    `(Compressed(tau, masks, rescalers), meta)`, meta the json contents.
  """
  path = os.path.abspath(os.fspath(path))
  jpath = os.path.join(path, CJSON)
  if not os.path.isdir(path):
    raise CheckpointError(f"compressed model {path} is not a directory"
                          if os.path.exists(path) else
                          f"compressed model {path} does not exist")
  try:
    with open(jpath, encoding="utf-8") as f:
      meta = json.load(f)
    T = int(meta["num_tasks"])
    rescalers = np.asarray(meta["rescalers"], np.float32).reshape(-1)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{jpath} is not a valid mtmerge compressed json "
                          f"({type(e).__name__}: {e})") from None
  tau, _ = checkpoint_io.load(os.path.join(path, TAU))
  masks, _ = checkpoint_io.load(os.path.join(path, MASKS))
  if rescalers.shape != (T,):
    raise CheckpointError(f"{jpath}: {rescalers.size} rescalers for {T} tasks")
  for k, x in tau.items():
    want = (T, -(-int(np.prod(x.shape, dtype=np.int64)) // 8))
    if k not in masks or masks[k].shape != want or masks[k].dtype != np.uint8:
      got = masks[k].shape if k in masks else "nothing"
      raise CheckpointError(f"{os.path.join(path, MASKS)}: tensor {k!r} "
                            f"should be uint8 {want}, got {got}")
  if set(masks) - set(tau):
    raise CheckpointError(f"{os.path.join(path, MASKS)} has tensor "
                          f"{sorted(set(masks) - set(tau))[0]!r} absent from "
                          f"{TAU}")
  from mtmerge import task_vectors
  from mtmerge.methods.compressed import Compressed
  # Files hold the flat layout; in memory each row is packed on its own.
  masks = task_vectors.mask_flat_to_rows(masks, tau)
  return Compressed(tau, masks, rescalers), meta
