"""The `flat_sam` job: do task vectors from flat regions merge better?

Phan et al., arXiv:2211.13723 (code github.com/VietHoang1512/FS-MTL; see
`mtmerge.flat.sam` for the method and where paper and code differ), on the
offline text suite with frozen zero-shot heads (`mtmerge.heads`):

1. per task, the encoder's trainable layers are fine-tuned twice through
   `mtmerge.finetune`: plainly and with single-task SAM
   (`config.finetune.sam = dict(rho=...)` for every `config.sam_rhos`);
2. each family of task vectors is merged with task arithmetic and TIES
   (hyperparameters picked on validation, as in `mtmerge.benchmark`) and
   evaluated on test (`mtmerge.taskpool`);
3. flatness is measured, not assumed: per task model the loss increase
   under an ascent step of radius `config.sharpness_rho` on validation
   inputs (`sharp` column), and the task vectors' mean norm and mean
   pairwise cosine;
4. the multi-task method itself: one model trained on all tasks with
   `train.fit` and `mtmerge.flat.objective.multitask_objective`, rho = 0
   (plain equal-weight MTL) against `config.multitask.rho` (task-based
   flat regions), if `config.multitask.steps > 0`.

`run(config, workdir)` prints the table and writes `results.json` and
`table.txt` into the workdir.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtmerge import encoders
from mtmerge import finetune
from mtmerge import heads as heads_lib
from mtmerge import methods
from mtmerge import results
from mtmerge import taskdata
from mtmerge import taskpool
from mtmerge import train
from mtmerge import tree as tree_lib
from mtmerge.data import suites
from mtmerge.flat import objective as flat_obj
from mtmerge.flat import sam


class ConfigError(ValueError):
  """A config this job cannot run (raised before any long work)."""


def _task_loss(encoder):
  """`(shared, head, consts, batch, task) -> (ce, {})` through a frozen
  head (`consts["heads"][task]`) and frozen non-trained params."""
  def loss(shared, head, consts, batch, task):
    del head  # zero-shot heads are frozen constants
    p = encoders.join(tree_lib.to_flat_dict(shared), consts["frozen"])
    x = {k: v for k, v in batch.items() if k != "label"}
    z = encoders.logits(consts["heads"][task], encoder.features(p, x))
    ce = optax.softmax_cross_entropy_with_integer_labels(z, batch["label"])
    return ce.mean(), {}
  return loss


def _tv_stats(tvs) -> dict:
  """Mean task-vector norm and mean pairwise cosine (over leaves)."""
  t = jax.tree.leaves(tvs)[0].shape[0]
  flat = [np.asarray(x, np.float64).reshape(t, -1)
          for x in jax.tree.leaves(tvs)]
  gram = sum(x @ x.T for x in flat)
  n = np.sqrt(np.diag(gram))
  cos = gram / np.outer(n, n)
  return {"tv_norm": round(float(n.mean()), 4),
          "tv_cos": round(float(cos[~np.eye(t, dtype=bool)].mean()), 4)}


def _merge_rows(pool, base_sel, tvs, config, tag, indiv) -> list[dict]:
  """Task arithmetic and TIES rows (grid picked on validation)."""
  rows = []
  for entry in config.methods:
    name, fixed = methods.parse(entry["method"])
    best, best_val, best_out = None, -1.0, None
    for sf in entry["grid"]["scaling_factor"]:
      out = methods.merge(name, base_sel, tvs, **fixed, scaling_factor=sf)
      val = float(np.mean(list(pool.evaluate(out, "validation").values())))
      if val > best_val:
        best, best_val, best_out = sf, val, out
    rows.append(results.accuracy_row(f"{entry.get('label', name)} [{tag}]",
                     pool.evaluate(best_out), indiv,
                     val=round(100 * best_val, 2),
                     hparams=f"scaling_factor={best}"))
  return rows


def _multitask(encoder, tasks, heads, config, rho, trainable):
  """Trained shared params of one multi-task model (`train.fit`)."""
  sel, rest = encoders.split(encoder.params, trainable)
  init = {"shared": tree_lib.from_flat_dict(sel),
          "heads": {t.name: {} for t in tasks}}
  mt = config.multitask
  obj = flat_obj.multitask_objective(
      _task_loss(encoder), init, [t.name for t in tasks], rho=rho,
      combiner=mt.combiner, scope=mt.scope,
      consts={"frozen": rest, "heads": jax.tree.map(jnp.asarray, heads)})
  ft = config.finetune
  bs = {t.name: taskdata.batcher(encoder, t, "train", mt.batch_size,
                                 shuffle=True, seed=ft.seed, limit=ft.limit,
                                 max_len=ft.max_len, multiple=ft.max_len)
        for t in tasks}
  cfg = train.TrainConfig(steps=int(mt.steps), optimizer="adamw",
                          lr=float(ft.lr), weight_decay=float(ft.weight_decay),
                          schedule="cosine", warmup=max(1, int(ft.warmup)),
                          seed=int(ft.seed), log_every=10)
  res = train.fit(obj, lambda s: {k: taskdata.batch_at(b, s) for k, b in
                                  bs.items()}, cfg, mesh=finetune.default_mesh(),
                  desc=f"multitask rho={rho}", progress=False)
  return res.params["shared"], res.log


def run(config: Any, workdir: str) -> dict:
  """Runs the job; returns the results dict also written to `workdir`."""
  t_start = time.time()
  try:
    tasks = [suites.get_task(t) for t in config.tasks]
  except KeyError as e:
    raise ConfigError(f"config.tasks: {e.args[0]}") from None
  try:
    rhos = [sam.check_rho(r) for r in config.sam_rhos]
    sam.check_rho(config.sharpness_rho)
    sam.check_rho(config.multitask.rho)
    sam.get_combiner(config.multitask.combiner)
  except sam.FlatError as e:
    raise ConfigError(str(e)) from None
  os.makedirs(workdir, exist_ok=True)
  try:
    encoder = encoders.load(config.model, num_layers=config.num_layers)
  except ValueError as e:
    raise ConfigError(f"config.num_layers: {e}") from None
  trainable = config.finetune.trainable
  heads = {t.name: heads_lib.build(encoder, t, config.heads, workdir)
           for t in tasks}
  sel, rest = encoders.split(encoder.params, trainable)
  base_sel = tree_lib.from_flat_dict(sel)
  pool = taskpool.TaskPool(encoder, tasks, heads, trainable=trainable,
                           batch_size=config.eval.batch_size,
                           max_len=config.eval.max_len,
                           multiple=config.eval.multiple,
                           limits=dict(config.eval.limits))
  sharp_batches = {t.name: _unmasked(pool.batches(t, "validation")[0])
                   for t in tasks}
  loss = _task_loss(encoder)
  jitted = jax.jit(lambda s, r, h, b: _sharpness(loss, s, r, h, b,
                                                 config.sharpness_rho))
  sharp_fn = lambda s, h, b: jitted(s, rest, h, b)
  rows = [results.accuracy_row("zero-shot", pool.evaluate(base_sel))]
  timing, info = {}, {}
  for rho in [None] + rhos:
    tag = "plain" if rho is None else f"sam rho={rho:g}"
    ft = ml_collections.ConfigDict(config.finetune.to_dict())
    if rho is not None:
      ft.sam = dict(rho=rho)
    t0 = time.time()
    tuned = [finetune.finetune_task(encoder, t, heads[t.name], ft, workdir,
                                    progress=False) for t in tasks]
    timing[f"finetune {tag} s"] = round(time.time() - t0, 1)
    indiv = {t.name: pool.accuracy(m, t) for t, m in zip(tasks, tuned)}
    sharp = [float(sharp_fn(m, heads[t.name], sharp_batches[t.name]))
             for t, m in zip(tasks, tuned)]
    tvs = jax.tree.map(lambda b, *xs: jnp.stack([x - b for x in xs]),
                       base_sel, *tuned)
    stats = _tv_stats(tvs)
    info[tag] = {"sharpness": dict(zip([t.name for t in tasks], sharp)),
                 **stats}
    rows.append(results.accuracy_row(f"individual [{tag}]", indiv, indiv,
                     sharp=round(float(np.mean(sharp)), 5), **stats))
    rows += _merge_rows(pool, base_sel, tvs, config, tag, indiv)
    print(f"{tag}: fine-tuned in {timing[f'finetune {tag} s']} s; "
          f"individual avg {rows[-3]['avg']}, task arithmetic "
          f"{rows[-2]['avg']}, ties {rows[-1]['avg']}", flush=True)
  if int(config.multitask.steps) > 0:
    for rho in (0.0, float(config.multitask.rho)):
      t0 = time.time()
      shared, log = _multitask(encoder, tasks, heads, config, rho, trainable)
      timing[f"multitask rho={rho:g} s"] = round(time.time() - t0, 1)
      sharp = [float(sharp_fn(shared, heads[t.name], sharp_batches[t.name]))
               for t in tasks]
      rows.append(results.accuracy_row(
          f"multitask {config.multitask.combiner} rho={rho:g}",
          pool.evaluate(shared), sharp=round(float(np.mean(sharp)), 5),
          hparams=f"steps={config.multitask.steps}, scope="
          f"{config.multitask.scope}"))
      info[f"multitask rho={rho:g}"] = {"final_log": log[-1] if log else {}}
  timing["total_s"] = round(time.time() - t_start, 1)
  text = results.format_table(rows)
  print(f"\nflat_sam: {encoder.name} ({config.num_layers} layers), tasks "
        f"{[t.name for t in tasks]}, test accuracy (%)\n{text}\n"
        f"timing {timing}", flush=True)
  out = {"model": encoder.name, "tasks": [t.name for t in tasks],
         "rows": rows, "flatness": info, "timing": timing,
         "config": config.to_dict()}
  results.write_json(os.path.join(workdir, "results.json"), out)
  results.atomic_write_text(os.path.join(workdir, "table.txt"), text + "\n")
  return out


def _unmasked(batch: dict) -> dict:
  """The batch's real rows (padding rows dropped), without the mask."""
  keep = batch.get("mask", np.ones(len(batch["label"]), bool))
  return {k: np.asarray(v)[keep] for k, v in batch.items() if k != "mask"}


def _sharpness(loss, sel, rest, head, batch, rho):
  """`L(theta + rho g/||g||) - L(theta)` on one batch (SAM's sharpness of
  the model `sel`), traced: one compile per task shape."""
  consts = {"frozen": rest, "heads": {"t": head}}
  f = lambda s: loss(s, {}, consts, batch, "t")[0]
  l0, g = jax.value_and_grad(f)(sel)
  return f(jax.tree.map(jnp.add, sel, sam.ascent(g, rho))) - l0
