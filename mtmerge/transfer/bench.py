"""The `scalearn` job: two-stage transfer on the offline text suite.

`run(config, workdir)` (reached through `python -m mtmerge.main --config
configs/scalearn.py --workdir DIR`):

1. loads the encoder, the tasks and their frozen heads (`mtmerge.heads`,
   zero-shot by default, as in the default benchmark);
2. stage 1: one Pfeiffer adapter per task on the frozen backbone
   (`adapters.objective`, trained by `train.fit`, cached in
   `workdir/adapters/<task>`);
3. stage 2: for every target task and every ScaLearn variant, omega over
   the source adapters (`scalearn.objective`, `train.fit`, cached in
   `workdir/scalearn/<setting>/<variant>/<target>`), in the settings of
   `config.scalearn.settings`: `loto` (the other tasks' adapters only) and
   `all` (the paper's: every task's adapter, the target's own included);
4. reference rows: the frozen encoder (zero-shot heads), each target's own
   adapter, and full fine-tuning of the encoder layers (`finetune`) when
   `config.finetune.steps > 0`;
5. writes `results.json` and `results.txt` (the table) into the workdir.
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
from mtmerge import sharding
from mtmerge import taskdata
from mtmerge import taskpool
from mtmerge import train
from mtmerge.data import suites
from mtmerge.transfer import adapters as adapters_lib
from mtmerge.transfer import scalearn


class ConfigError(ValueError):
  """A config this job cannot run (raised before any long work)."""


def _batches(encoder, task, cfg, mesh):
  """`step -> this host's rows` of the task's shuffled train split."""
  data_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
  rows = sharding.check_batch_divides(cfg.batch_size, mesh, data_axes)
  index, count = sharding.data_shard(cfg.batch_size, mesh, data_axes)
  b = []

  def batches(step):
    if not b:  # not built when the run is already finished
      b.append(taskdata.batcher(
          encoder, task, "train", rows, shuffle=True, seed=cfg.seed,
          limit=cfg.limit, max_len=cfg.max_len,
          multiple=cfg.get("multiple", 16) if count == 1 else cfg.max_len,
          process_index=index, process_count=count))
    return taskdata.batch_at(b[0], step)
  return batches, data_axes


def _train_cfg(cfg, data_axes) -> train.TrainConfig:
  return train.TrainConfig(steps=int(cfg.steps), optimizer="adam",
                           lr=float(cfg.lr), schedule="cosine",
                           warmup=int(cfg.get("warmup", 0)),
                           seed=int(cfg.seed), log_every=int(cfg.steps),
                           data_axes=data_axes)


def _check(config) -> list:
  try:
    tasks = [suites.get_task(t) for t in config.tasks]
  except KeyError as e:
    raise ConfigError(f"config.tasks: {e.args[0]}") from None
  if len(tasks) < 2:
    raise ConfigError("config.tasks: leave-one-task-out transfer needs at "
                      f"least 2 tasks, got {config.tasks}")
  for v in config.scalearn.variants:
    try:
      scalearn.get(v)
    except ValueError as e:
      raise ConfigError(f"config.scalearn.variants: {e}") from None
  bad = set(config.scalearn.settings) - {"loto", "all"}
  if bad:
    raise ConfigError(f"config.scalearn.settings: {sorted(bad)} unknown; "
                      "use 'loto' and/or 'all'")
  return tasks


def run(config: Any, workdir: str) -> dict:
  """Runs the job; returns the results dict also written to the workdir."""
  t_start = time.time()
  tasks = _check(config)
  names = [t.name for t in tasks]
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  encoder = encoders.load(config.model, num_layers=config.get("num_layers"))
  num_layers, hidden = len(encoder.params["layers"]), encoder.dim
  heads = {t.name: heads_lib.build(encoder, t, config.heads, workdir)
           for t in tasks}
  padded = {k: finetune.pad_classes(h) for k, h in heads.items()}
  pool = taskpool.TaskPool(encoder, tasks, heads, trainable=r"layers/.*",
                           batch_size=config.eval.batch_size,
                           max_len=config.eval.max_len,
                           multiple=config.eval.multiple,
                           limits={"test": config.eval.limit})
  backbone = encoder.params
  plain = jax.jit(lambda p, b: adapters_lib.features(encoder, p, b, None))
  one = jax.jit(lambda p, a, b: adapters_lib.features(
      encoder, p, b, adapters_lib.single(a)))
  scaled = jax.jit(lambda p, s, w, b: adapters_lib.features(
      encoder, p, b, scalearn.hook(s, w)))
  rows, log = [], {}
  # Resumable cached runs; off only in `runlocal` (orbax saves dominate it).
  ckpt = lambda *p: (os.path.join(workdir, *p)
                     if config.get("checkpoints", True) else None)

  t0 = time.time()
  rows.append(results.accuracy_row("frozen encoder (zero-shot heads)", {
      t: pool.accuracy_of(lambda b: plain(backbone, b), t) for t in names},
      transfer_params=0, s=round(time.time() - t0, 1)))

  acfg = config.adapter
  adapters, t0 = {}, time.time()
  for i, t in enumerate(tasks):
    obj = adapters_lib.objective(encoder, padded[t.name],
                                 jax.random.key(acfg.seed + i),
                                 acfg.reduction_factor)
    batches, axes = _batches(encoder, t, acfg, mesh)
    res = train.fit(obj, batches, _train_cfg(acfg, axes), mesh=mesh,
                    workdir=ckpt("adapters", t.name),
                    fingerprint={"task": t.name, "adapter": acfg.to_dict(),
                                 "model": encoder.name,
                                 "layers": num_layers},
                    desc=f"adapter {t.name}")
    adapters[t.name] = res.params
    log[f"adapter/{t.name}"] = res.log[-1] if res.log else {}
  r = adapters_lib.bottleneck_size(hidden, acfg.reduction_factor)
  rows.append(results.accuracy_row("own adapter (stage 1)", {
      t: pool.accuracy_of(lambda b, t=t: one(backbone, adapters[t], b), t)
      for t in names}, transfer_params=adapters_lib.num_params(
          num_layers, hidden, r), s=round(time.time() - t0, 1)))

  scfg = config.scalearn
  for setting in scfg.settings:
    for variant in scfg.variants:
      accs, t0 = {}, time.time()
      for t in tasks:
        sources = {s: adapters[s] for s in names
                   if setting == "all" or s != t.name}
        obj = scalearn.objective(
            encoder, variant, t.name, sources, padded[t.name],
            jax.random.key(scfg.seed), init_scale=scfg.init_scale,
            init_std=scfg.init_std, dropout_rate=scfg.get("dropout"))
        batches, axes = _batches(encoder, t, scfg, mesh)
        res = train.fit(
            obj, batches, _train_cfg(scfg, axes), mesh=mesh,
            workdir=ckpt("scalearn", setting, variant, t.name),
            fingerprint={"target": t.name, "sources": sorted(sources),
                         "variant": variant, "scalearn": {
                             k: v for k, v in scfg.to_dict().items()
                             if k not in ("variants", "settings")},
                         "adapter": acfg.to_dict(), "model": encoder.name,
                         "layers": num_layers},
            desc=f"{variant} {setting} {t.name}")
        omega = scalearn.expand(res.params["omega"], num_layers, hidden)
        src = adapters_lib.stack(list(sources.values()))
        accs[t.name] = pool.accuracy_of(
            lambda b: scaled(backbone, src, omega, b), t)
        # Mean learned scale per source: which tasks the target draws on.
        log[f"{setting}/{variant}/{t.name}"] = dict(
            res.log[-1] if res.log else {}, omega_mean_by_source={
                s: round(float(np.mean(res.params["omega"][:, j])), 4)
                for j, s in enumerate(sources)})
      n = len(names) - (setting == "loto")
      rows.append(results.accuracy_row(
          f"{variant} ({setting})", accs,
          transfer_params=scalearn.num_transfer_params(
              variant, n, num_layers, hidden),
          s=round(time.time() - t0, 1)))

  fcfg = config.finetune
  if int(fcfg.steps) > 0:
    t0, accs = time.time(), {}
    for t in tasks:
      sel = finetune.finetune_task(encoder, t, heads[t.name], fcfg, workdir,
                                   progress=False, mesh=mesh)
      accs[t.name] = pool.accuracy(sel, t)
    n_tuned = sum(int(np.size(x)) for x in jax.tree.leaves(
        encoders.split(encoder.params, fcfg.trainable)[0]))
    rows.append(results.accuracy_row(
        "full fine-tuning", accs, transfer_params=n_tuned,
        s=round(time.time() - t0, 1)))

  table = results.format_table(rows)
  out = {"tasks": names, "model": encoder.name, "num_layers": num_layers,
         "rows": rows, "final_train_metrics": log,
         "wall_s": round(time.time() - t_start, 1),
         "config": config.to_dict()}
  print(table, flush=True)
  results.write_json(os.path.join(workdir, "results.json"), out)
  results.atomic_write_text(os.path.join(workdir, "results.txt"), table + "\n")
  return out
