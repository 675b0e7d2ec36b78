"""`mtmerge merge --config merge.yml --out DIR`: a mergekit YAML merge.

When every tensor resolves to the same mtmerge method and hyperparameters
(`mergekit_kernels.equivalent`), the merge is `streaming.merge_files` of
that method: out-of-core, in row blocks under `--max-memory`. Otherwise
(per-tensor filters or gradients, or a method mtmerge computes only through
`mergekit_kernels.compute`) it runs tensor by tensor: each tensor's
parameters resolved, merged by the equivalent mtmerge method or by
`compute`, and written straight into the output shards, so memory is one
tensor of each model. Either way the output has the base's layout and
names, the dtype `out_dtype` (else `dtype`, else as stored) for floating
tensors, and appears atomically.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np

from mtmerge import atomic_files
from mtmerge import checkpoint_io
from mtmerge import cli_output
from mtmerge import mergekit_config
from mtmerge import mergekit_kernels
from mtmerge import safetensors_layout as st_layout


def _inputs(cfg: mergekit_config.Config) -> tuple[str, list[str]]:
  """(base, models) as mtmerge reads them: linear's base is its first model."""
  if cfg.base is None:
    return cfg.models[0], cfg.models[1:]
  return cfg.base, cfg.models


def plan(cfg: mergekit_config.Config, names: list[str]
         ) -> tuple[str, dict[str, Any]] | None:
  """The one mtmerge `(method, hparams)` every tensor maps to, or None."""
  found = None
  for name in names:
    eq = mergekit_kernels.equivalent(cfg.method, *cfg.tensor_params(name))
    if eq is None or (found is not None and eq != found):
      return None
    found = eq
  return found


def _output_layout(cfg, layout: checkpoint_io.Layout, out: str, form: str
                   ) -> checkpoint_io.Layout:
  olayout = cli_output.output_layout(layout, out, form)
  if cfg.out_dtype is None:
    return olayout
  dtypes = {k: cfg.out_dtype if st_layout.is_float(
      checkpoint_io.np_dtype(v)) else v for k, v in olayout.dtypes.items()}
  return dataclasses.replace(olayout, dtypes=dtypes)


def merge(config: str, out: str, force: bool = False, progress: bool = True,
          max_memory: int | None = None, in_memory: bool = False,
          mesh: Any = None) -> dict[str, Any]:
  """Runs the merge a mergekit YAML file describes.

  Args:
    config: the YAML file.
    out: NAME.safetensors (one file) or a directory name (`cli_output`).
    force: replace an existing `out`.
    progress: progress bars on stderr.
    max_memory: the streamed path's block budget in bytes.
    in_memory: run tensor by tensor even when the merge could stream.
    mesh: the streamed path's device mesh (`streaming.merge_files`'s
      `mesh`: a spec such as 'data:-1', 'none', or None for all devices);
      the per-tensor path runs in host NumPy and ignores it.

  Returns:
    `{"method", "mtmerge", "hparams", "models", "bytes", "path"}`: mergekit's
    method, the mtmerge method used (or 'per tensor'), its hyperparameters.

  Raises:
    ValueError: any problem with the file, the checkpoints or `out`.
  """
  from mtmerge import streaming  # local: imports JAX
  cfg = mergekit_config.load(config)
  base, models = _inputs(cfg)
  inputs = {"the base": base, **{f"model {i}": p
                                 for i, p in enumerate(models)}}
  form = cli_output.output_form(out)
  cli_output.check_destination(out, inputs, force)
  layout = checkpoint_io.read_layout(base)
  cli_output.check_dtypes(layout, [checkpoint_io.read_layout(p)
                                   for p in models])
  olayout = _output_layout(cfg, layout, out, form)
  cli_output.check_space(out, olayout.nbytes)
  floats = [k for k, v in layout.dtypes.items()
            if st_layout.is_float(checkpoint_io.np_dtype(v))]
  # Streamed kernels round to the base's dtype; a wider or different output
  # dtype than a non-float32 base's would round twice: merge per tensor.
  once = all(layout.dtypes[k] in ("float32", olayout.dtypes[k])
             for k in floats)
  found = None if in_memory or not once else plan(cfg, floats)
  info = {"method": cfg.method, "models": len(cfg.models)}
  if found is not None and _streams(found[0], found[1], len(models)):
    name, hp = found
    res = streaming.merge_files(
        name, base, models, out, progress=progress, layout=olayout,
        max_memory=max_memory or streaming.DEFAULT_MAX_MEMORY, mesh=mesh,
        **hp)
    return dict(info, mtmerge=name, hparams=hp, bytes=res["bytes"],
                path=res["out"])
  nbytes, path = _per_tensor(cfg, base, models, out, olayout, progress)
  return dict(info, mtmerge="per tensor", hparams={}, bytes=nbytes,
              path=path)


def _streams(name: str, hp: dict[str, Any], T: int) -> bool:
  """True if `streaming.merge_files(name, ...)` runs these hparams."""
  from mtmerge import methods
  from mtmerge.streaming import recipes
  try:
    recipes.for_method(name, methods.get(name).check(hp, T), T)
  except ValueError:
    return False
  return True


def merge_tensor(cfg: mergekit_config.Config, name: str, b: np.ndarray,
                 ms: np.ndarray) -> np.ndarray:
  """One tensor merged as `cfg` says (float32): mtmerge's method or mergekit's.

  Args:
    cfg: the configuration.
    name: the tensor's name.
    b: the base's tensor (linear: its first model's).
    ms: the other models' tensors stacked `[T, ...]`.
  """
  import jax.numpy as jnp  # local: imports JAX
  from mtmerge import methods
  pm, sh = cfg.tensor_params(name)
  eq = mergekit_kernels.equivalent(cfg.method, pm, sh)
  b32 = b.astype(np.float32)
  if eq is not None:
    tv = ms.astype(np.float32) - b32
    out = methods.merge(eq[0], {name: jnp.asarray(b32)},
                        {name: jnp.asarray(tv)}, **eq[1])
    return np.asarray(out[name], np.float32)
  if cfg.base is None:  # linear: all models are averaged
    return mergekit_kernels.compute(cfg.method, None,
                                    np.concatenate([b[None], ms]), pm, sh,
                                    name)
  return mergekit_kernels.compute(cfg.method, b, ms, pm, sh, name)


def _per_tensor(cfg, base: str, models: list[str], out: str,
                olayout: checkpoint_io.Layout, progress: bool
                ) -> tuple[int, str]:
  """Tensor by tensor into the output shards; returns (bytes, path)."""
  from tqdm import tqdm  # local: keeps imports light
  from mtmerge.streaming import reader
  from mtmerge.streaming import writer
  inputs = reader.Inputs(base, models)
  blocks = reader.plan(inputs, 1, 1 << 62, olayout)  # whole tensors
  got: dict[str, int] = {}

  def write(tmp):
    w = writer.Output(olayout, tmp, lambda k: np.asarray(inputs.whole(k)),
                      streamed={blk.name for blk in blocks})
    try:
      for blk in tqdm(blocks, unit="tensor", file=sys.stderr, leave=False,
                      disable=not (progress and sys.stderr.isatty())):
        b, ms = inputs.read(blk, check=True)
        w.write(blk.name, blk.first, merge_tensor(cfg, blk.name, b, ms))
      got["bytes"] = w.close()
    except BaseException:
      w.abort()
      raise

  try:
    path = atomic_files.atomic_write(out, write,
                                     is_dir=olayout.kind != "file")
  finally:
    inputs.close()
  return got["bytes"], path
