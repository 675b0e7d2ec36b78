"""The `exssnet` job: continual learning over the offline text suite.

ExSSNeT (Yadav and Bansal 2023; see `mtmerge.continual.exssnet` for the
method, its sources and where paper and code differ) against its
baselines, on the tasks of `config.tasks` in that order:

1. the frozen encoder (`config.model`, `config.num_layers`) embeds every
   task's training and test examples once (pooled, L2-normalized sentence
   features, `config.features`); each task's head is its frozen zero-shot
   head (`mtmerge.heads`), padded to a common class count;
2. every entry of `config.methods` learns the sequence over one masked
   MLP (`config.hidden`, signed-constant init): sequential fine-tuning,
   SupSup (masks over fixed weights), SSNeT (weights trained over the whole
   mask), ExSSNeT without and with KKT;
3. after each task every task learned so far is evaluated on test; the
   table reports the final accuracy per task, its mean (`avg`), the mean
   accuracy right after learning each task (`learned`), forgetting
   (`learned` minus final, over all tasks but the last), whether every
   earlier task's test logits stayed bit-for-bit identical (`bitexact`),
   and for the weight-training methods the mean fraction of a task's mask
   it could train (`trainable`); every number is a mean over
   `config.seeds` (network init, scores, batch order), `avg_sd` the
   standard deviation of `avg` over them.

`run(config, workdir)` prints the table and writes `results.json` and
`table.txt` (atomically) into the workdir.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from mtmerge import encoders
from mtmerge import finetune
from mtmerge import heads as heads_lib
from mtmerge import results
from mtmerge import taskdata
from mtmerge.continual import exssnet
from mtmerge.continual import supermask as sm
from mtmerge.data import suites


class ConfigError(ValueError):
  """A config this job cannot run (raised before any long work)."""


def settings(config: Any, method: str, kkt: str,
             seed: int | None = None) -> exssnet.Settings:
  """The `exssnet.Settings` of one method entry of `config` (seed: the
  first of `config.seeds` unless given)."""
  return exssnet.Settings(
      method=method, density=float(config.density), kkt=kkt,
      knn_k=int(config.knn.k), knn_examples=int(config.knn.examples),
      mask_steps=int(config.mask.steps), mask_lr=float(config.mask.lr),
      weight_steps=int(config.weights.steps),
      weight_lr=float(config.weights.lr), batch_size=int(config.batch_size),
      hidden=tuple(int(h) for h in config.hidden),
      seed=int(config.seeds[0] if seed is None else seed))


def check(config: Any) -> list:
  """Every check that needs no model or data; returns the TaskSpecs."""
  try:
    sm.check_density(config.density)
  except sm.MaskError as e:
    raise ConfigError(f"config.density: {e}") from None
  names = list(config.tasks)
  unknown = [t for t in names if t not in suites.task_names()]
  if unknown:
    raise ConfigError(f"config.tasks: unknown task(s) {unknown} in the task "
                      f"order; known: {suites.task_names()}")
  dup = sorted({t for t in names if names.count(t) > 1})
  if dup:
    raise ConfigError(f"config.tasks: the task order names {dup} more than "
                      "once")
  tasks = [suites.get_task(t) for t in names]
  if not tasks:
    raise ConfigError("config.tasks: empty task order")
  seeds = list(config.seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ConfigError(f"config.seeds: need distinct seeds, got {seeds}")
  labels = [m.get("label", m["method"]) for m in config.methods]
  if len(set(labels)) != len(labels):
    raise ConfigError(f"config.methods: duplicate labels {labels}")
  for m in config.methods:
    try:
      settings(config, m["method"], m.get("kkt", "")).check()
    except exssnet.ContinualError as e:
      raise ConfigError(f"config.methods[{m.get('label', m['method'])!r}]: "
                        f"{e}") from None
  lim = config.features.limits
  need = max(int(config.batch_size), int(config.knn.examples))
  if lim.train is not None and int(lim.train) < need:
    raise ConfigError(f"config.features.limits.train={lim.train} is below "
                      f"max(batch_size, knn.examples)={need}")
  return tasks


def _features(encoder, task, split: str, fc, limit) -> tuple:
  """Pooled features `[N, D]` and labels of a split (one compiled shape:
  fixed batch rows and token length, padding rows dropped)."""
  b = taskdata.batcher(encoder, task, split, int(fc.batch_size), limit=limit,
                       max_len=int(fc.max_len), multiple=int(fc.max_len))
  xs, ys = [], []
  for batch in b.epoch(0):
    keep = batch.get("mask", np.ones(len(batch["label"]), bool))
    inputs = {k: v for k, v in batch.items() if k not in ("label", "mask")}
    n = len(batch["label"])
    if n < int(fc.batch_size):  # a split smaller than one batch
      pad = int(fc.batch_size) - n
      inputs = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in inputs.items()}
    f = np.asarray(_feats(encoder)(encoder.params, inputs))[:n]
    xs.append(f[keep])
    ys.append(np.asarray(batch["label"])[keep])
  return (np.concatenate(xs).astype(np.float32),
          np.concatenate(ys).astype(np.int32))


_FEATS: dict = {}


def _feats(encoder):
  key = id(encoder.static)
  if key not in _FEATS:
    _FEATS.clear()
    _FEATS[key] = jax.jit(encoder.features)
  return _FEATS[key]


def run(config: Any, workdir: str) -> dict:
  """Runs the job; returns the results dict also written to `workdir`."""
  t_start = time.time()
  specs = check(config)
  os.makedirs(workdir, exist_ok=True)
  try:
    encoder = encoders.load(config.model, num_layers=config.num_layers)
  except ValueError as e:
    raise ConfigError(f"config.num_layers: {e}") from None
  fc = config.features
  heads = {t.name: heads_lib.build(encoder, t, config.heads, workdir)
           for t in specs}
  width = max(t.num_classes for t in specs)
  tasks, zero = [], {}
  t0 = time.time()
  for spec in specs:
    xtr, ytr = _features(encoder, spec, "train", fc, fc.limits.train)
    xte, yte = _features(encoder, spec, "test", fc, fc.limits.test)
    head = jax.tree.map(np.asarray, finetune.pad_classes(
        heads[spec.name], multiple=-width % 8 + width))
    tasks.append(exssnet.Task(spec.name, xtr, ytr, xte, yte, head,
                              spec.num_classes))
    z = xte @ head["kernel"] + head["bias"]
    zero[spec.name] = float(np.mean(np.argmax(z, -1) == yte))
  timing = {"features s": round(time.time() - t0, 1)}
  print(f"features: {len(tasks)} tasks embedded in {timing['features s']} s "
        f"({sum(len(t.x_train) for t in tasks)} train, "
        f"{sum(len(t.x_test) for t in tasks)} test examples)", flush=True)
  rows = [results.accuracy_row("zero-shot (frozen encoder)", zero)]
  detail = {}
  seeds = [int(x) for x in config.seeds]
  for m in config.methods:
    label = m.get("label", m["method"])
    runs = []
    for seed in seeds:
      s = settings(config, m["method"], m.get("kkt", ""), seed)
      try:
        runs.append(exssnet.run_sequence(tasks, s))
      except exssnet.ContinualError as e:
        raise ConfigError(f"config.methods[{label!r}]: {e}") from None
    final = {t.name: float(np.mean([r.acc[-1, j] for r in runs]))
             for j, t in enumerate(tasks)}
    avgs = [exssnet.average_accuracy(r.acc) for r in runs]
    extra = {
        "learned": round(100 * float(np.mean([np.mean(np.diag(r.acc))
                                              for r in runs])), 2),
        "forgetting": round(100 * float(np.mean([exssnet.forgetting(r.acc)
                                                 for r in runs])), 2),
        "bitexact": "yes" if all(all(r.unchanged) for r in runs) else "no"}
    if len(runs) > 1:
      extra["avg_sd"] = round(100 * float(np.std(avgs, ddof=1)), 2)
    tr = [x["trainable"] for r in runs for x in r.info[1:]
          if "trainable" in x]
    if tr:
      extra["trainable"] = round(float(np.mean(tr)), 3)
    seconds = round(sum(r.seconds for r in runs), 1)
    extra["s"] = seconds
    rows.append(results.accuracy_row(label, final, **extra))
    detail[label] = {"method": s.method, "kkt": s.kkt, "seeds": seeds,
                     "avg_per_seed": [round(100 * a, 2) for a in avgs],
                     "acc_matrix": [np.round(100 * r.acc, 2).tolist()
                                    for r in runs],
                     "per_task": [r.info for r in runs]}
    timing[f"{label} s"] = seconds
    print(f"{label}: avg {rows[-1]['avg']}, forgetting "
          f"{extra['forgetting']}, learned {extra['learned']} "
          f"({seconds} s, {len(seeds)} seed(s))", flush=True)
  timing["total_s"] = round(time.time() - t_start, 1)
  text = results.format_table(rows)
  print(f"\nexssnet: {encoder.name} ({config.num_layers} layers, frozen), "
        f"masked MLP {list(config.hidden)} at density {config.density}, "
        f"task order {[t.name for t in tasks]}, seeds {seeds}, test "
        f"accuracy (%, mean over seeds)\n{text}\n"
        f"timing {timing}", flush=True)
  out = {"model": encoder.name, "tasks": [t.name for t in tasks],
         "rows": rows, "detail": detail, "timing": timing,
         "config": config.to_dict()}
  results.write_json(os.path.join(workdir, "results.json"), out)
  results.atomic_write_text(os.path.join(workdir, "table.txt"), text + "\n")
  return out
