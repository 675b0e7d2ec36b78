"""The benchmark's learned-merge rows (`config.learned`).

Each entry is `dict(method="adamerging(granularity='layer')", label=...,
grid={...}, train={...})`: a learned method (`mtmerge.learned.registry`),
an optional hyperparameter grid picked on validation accuracy like the
training-free rows, and `mtmerge.train.TrainConfig` overrides. Runs are
checkpointed under `workdir/learned/<key>/`, where the key hashes the
model, tasks and fine-tuning config, so a rerun reuses finished runs and
a changed fine-tuning never resumes stale coefficients.

What a result is evaluated as depends on what the method returns: merged
params (one model), one model per task (a `Compressed`, or a
`reconstruct(t)` as `skill_localization` returns) or a per-input model
(`twin_merging`, whose `features(inputs)` routes every example).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from typing import Any

import numpy as np
from tqdm import auto as tqdm

from mtmerge import train


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
  """Every combination of a `{name: [values]}` grid (`[{}]` if empty)."""
  keys = sorted(grid)
  return [dict(zip(keys, vals)) for vals in
          itertools.product(*(list(grid[k]) for k in keys))] or [{}]


def entries(config, error_cls) -> list[tuple[str, str, dict, dict, dict]]:
  """`(label, name, fixed, grid, train)` per entry, validated up front."""
  from mtmerge import methods
  from mtmerge.learned import registry
  out = []
  for entry in config.get("learned") or []:
    entry = dict(entry)
    unknown = set(entry) - {"method", "grid", "label", "train"}
    if unknown or "method" not in entry:
      raise error_cls(f"learned entry {entry} must have 'method' (e.g. "
                      "\"adamerging(granularity='layer')\") and optionally "
                      f"'grid', 'label', 'train'; unknown keys "
                      f"{sorted(unknown)}")
    try:
      name, fixed = methods.parse_call(entry["method"])
      grid = dict(entry.get("grid") or {})
      for hp in grid_points(grid):
        registry.check(name, {**fixed, **hp})
      train_over = dict(entry.get("train") or {})
      # An entry's own `train.mesh` overrides the run's `config.mesh`.
      _check_train(name, fixed, grid, train.TrainConfig.from_dict(train_over),
                   train_over.get("mesh") or config.get("mesh"))
    except (ValueError, KeyError) as e:
      msg = e.args[0] if e.args else e
      raise error_cls(f"config.learned entry {entry['method']!r}: {msg}"
                      ) from None
    out.append((entry.get("label") or name, name, fixed, grid, train_over))
  return out


def _check_train(name, fixed, grid, cfg: train.TrainConfig,
                 mesh_spec=None) -> None:
  """The mesh fits the devices and every batch size divides its data axes."""
  import jax
  from mtmerge import sharding
  from mtmerge.learned import registry
  shape = sharding.mesh_shape(mesh_spec or cfg.mesh, jax.device_count())
  missing = [a for a in cfg.data_axes if a not in shape]
  if missing:
    raise ValueError(f"train.data_axes {missing} are not mesh axes "
                     f"{tuple(shape)}")
  shards = 1
  for a in cfg.data_axes:
    shards *= shape[a]
  default = registry.hyperparameters(name).get("batch_size")
  for hp in grid_points(grid):
    bs = {**fixed, **hp}.get("batch_size", default)
    if isinstance(bs, int) and bs % shards:
      raise ValueError(f"batch_size={bs} does not divide over the "
                       f"{shards} data shards of mesh {shape}; use a "
                       f"multiple of {shards}")


def runtime(config, error_cls) -> tuple[Any, Any]:
  """`(mesh, rules)` from `config.mesh` and `config.param_rules`.

  Built once per run and passed to fine-tuning and every learned method.
  Defaults: a 1-D `data` mesh over all devices, replicated params.
  """
  from mtmerge import sharding
  try:
    mesh = sharding.make_mesh(config.get("mesh") or [("data", -1)])
  except ValueError as e:
    raise error_cls(f"config.mesh: {e.args[0]}") from None
  rules = config.get("param_rules")
  return mesh, (None if rules is None else [tuple(r) for r in rules])


def _key(config) -> str:
  what = dict(model=config.model, num_layers=config.get("num_layers"),
              tasks=list(config.tasks), heads=config.heads.to_dict(),
              finetune=config.finetune.to_dict())
  if config.get("task_models"):  # published checkpoints instead of tuning
    tm = config.task_models
    what["task_models"] = tm if isinstance(tm, str) else dict(tm)
  return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()
                        ).hexdigest()[:12]


def _evaluator(pool, base_sel, res, num_tasks: int):
  """`split -> {task: accuracy}` of a learned result, and its storage."""
  from mtmerge import methods, tree as tree_lib
  extra = res.extra or {}
  full = tree_lib.tree_bytes(base_sel)
  if "model" in extra:  # a per-input model (Twin-Merging)
    model = extra["model"]
    store = float(extra.get("storage_bytes", full)) / full
    return (lambda split: {t.name: pool.accuracy_of(model.features, t, split)
                           for t in pool.tasks}), store
  if "compressed" in extra:  # one model per task
    c = extra["compressed"]
    store = methods.storage_bytes(c) / full
    return (lambda split: {
        t.name: pool.accuracy(methods.reconstruct(base_sel, c, i), t, split)
        for i, t in enumerate(pool.tasks)}), store
  if "reconstruct" in extra:  # one model per task (skill localization)
    rec = extra["reconstruct"]
    store = float(extra.get("storage_bytes", full)) / full
    return (lambda split: {t.name: pool.accuracy(rec(i), t, split)
                           for i, t in enumerate(pool.tasks)}), store
  return (lambda split: pool.evaluate(res.params, split)), 1.0


def rows(config, workdir, problem, pool, base_sel, learned_entries,
         row_fn, mesh=None, rules=None) -> list[dict]:
  """Runs every learned entry; one result row each (see `benchmark._row`).

  `mesh` and `rules` (from `runtime`) go to every method's trainer.
  """
  from mtmerge.learned import registry
  root = os.path.join(workdir, "learned", _key(config))
  out = []
  for label, name, fixed, grid, train_over in learned_entries:
    t0 = time.time()
    best, best_val, best_eval, scores, best_store = {}, -1.0, None, [], 1.0
    for hp in grid_points(grid):
      tag = "-".join(f"{k}={v}" for k, v in sorted({**fixed, **hp}.items()))
      res = registry.run(
          name, problem, {**fixed, **hp}, train_config=train_over,
          mesh=None if train_over.get("mesh") else mesh, rules=rules,
          workdir=os.path.join(root, f"{label}-{tag}".replace("/", "_")
                               .replace(" ", "")[:150]),
          progress=True)
      evaluate, store = _evaluator(pool, base_sel, res, problem.num_tasks)
      val = float(np.mean(list(evaluate("validation").values())))
      scores.append({**hp, "val": round(100 * val, 2)})
      if val > best_val:
        best, best_val, best_eval, best_store = hp, val, evaluate, store
    accs = best_eval("test")
    out.append(row_fn(label, accs, {
        "hparams": ", ".join(f"{k}={v}" for k, v in {**fixed, **best}.items()),
        "val": round(100 * best_val, 2), "storage": round(best_store, 3),
        "s": round(time.time() - t0, 1), "grid": scores}))
    tqdm.tqdm.write(f"{label}: test avg {out[-1]['avg']:.2f} (validation "
                    f"{out[-1]['val']:.2f}) in {out[-1]['s']} s")
  return out
