"""The `controllable` job: accuracy against compute for task preferences.

Aich et al., "Efficient Controllable Multi-Task Architectures" (ICCV 2023,
arXiv:2308.11744; sources and deviations in `mtmerge.controllable.distill`
and `.search`) on the offline text suite, with the frozen zero-shot heads
of the rest of the project (`mtmerge.heads`):

1. the SuperNet: MiniLM truncated to `enc_layers + dec_layers` layers, the
   first `enc_layers` shared (the encoder), one copy of the rest per task
   (the decoders), all slimmable in heads and FFN units
   (`mtmerge.controllable.slimmable`); trained ONCE with the sandwich rule
   and CI-KD through `train.fit` (`mtmerge.controllable.distill`),
   resumable from the workdir;
2. one table per split of every task's accuracy at every (encoder width,
   decoder width) pair (`acc[t, e, d]`; a task depends only on the encoder
   and its own decoder);
3. for every preference in `config.preferences` and budget in
   `config.budgets` (fractions of the full model's FLOPs) the search
   (`mtmerge.controllable.search`) picks the widths on the validation
   table; the row reports that configuration's test accuracy and FLOPs;
4. with `config.ablation_no_kd`, the same for a SuperNet trained without
   CI-KD (lambda = 0).

`run(config, workdir)` prints the table and writes `results.json`,
`table.txt` and `plot.png` (accuracy against GFLOPs per preference).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import encoders
from mtmerge import finetune
from mtmerge import heads as heads_lib
from mtmerge import plots
from mtmerge import results
from mtmerge import sharding
from mtmerge import taskdata
from mtmerge import train
from mtmerge.controllable import distill
from mtmerge.controllable import search as search_lib
from mtmerge.controllable import slimmable
from mtmerge.data import suites


class ConfigError(ValueError):
  """A config this job cannot run (raised before any long work)."""


def _model_dims(name: str) -> dict:
  """hidden, heads, FFN and layer count from the model's config.json."""
  from mtmerge.models import hub  # pylint: disable=g-import-not-at-top
  with open(os.path.join(hub.local_dir(name), "config.json"),
            encoding="utf-8") as f:
    c = json.load(f)
  return dict(hidden=int(c["hidden_size"]),
              num_heads=int(c["num_attention_heads"]),
              ffn=int(c["intermediate_size"]),
              layers=int(c["num_hidden_layers"]),
              eps=float(c.get("layer_norm_eps", 1e-12)))


def check_config(config: Any) -> tuple[list, slimmable.Space, list, list]:
  """Everything checkable before loading data: `(tasks, space,
  preferences [(name, vector)], budgets [FLOPs])`; ConfigError naming the
  offending field."""
  try:
    tasks = [suites.get_task(t) for t in config.tasks]
  except KeyError as e:
    raise ConfigError(f"config.tasks: {e.args[0]}") from None
  if len({t.name for t in tasks}) != len(tasks) or not tasks:
    raise ConfigError(f"config.tasks must name distinct tasks, got "
                      f"{list(config.tasks)}")
  names = [t.name for t in tasks]
  sp = config.space
  try:
    enc_r = slimmable.check_ratios(sp.enc_ratios, "config.space.enc_ratios")
    dec_r = slimmable.check_ratios(sp.dec_ratios, "config.space.dec_ratios")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  dims = _model_dims(config.model)
  if int(sp.enc_layers) < 1 or int(sp.dec_layers) < 1 or (
      int(sp.enc_layers) + int(sp.dec_layers) > dims["layers"]):
    raise ConfigError(
        f"config.space: enc_layers={sp.enc_layers} + dec_layers="
        f"{sp.dec_layers} must be >= 1 each and at most the model's "
        f"{dims['layers']} layers")
  space = slimmable.Space(
      hidden=dims["hidden"], num_heads=dims["num_heads"], ffn=dims["ffn"],
      enc_layers=int(sp.enc_layers), dec_layers=int(sp.dec_layers),
      enc_ratios=enc_r, dec_ratios=dec_r,
      num_classes=tuple(t.num_classes for t in tasks),
      seq_len=int(config.eval.max_len), eps=dims["eps"])
  prefs = []
  for i, p in enumerate(config.preferences):
    what = f"config.preferences[{i}]"
    if "weights" not in p:
      raise ConfigError(f"{what} needs 'weights' (and a 'name')")
    try:
      prefs.append((str(p.get("name", f"pref{i}")),
                    search_lib.check_preference(p["weights"], names, what)))
    except search_lib.SearchError as e:
      raise ConfigError(str(e)) from None
  if not prefs:
    raise ConfigError("config.preferences is empty")
  enc_cost, dec_cost = slimmable.cost_tables(space)
  full = slimmable.config_flops(space, *slimmable.full_config(space))
  budgets = []
  for i, b in enumerate(config.budgets):
    try:
      frac = float(b)
      budgets.append(search_lib.check_budget(
          frac * full, enc_cost, dec_cost,
          f"config.budgets[{i}]={b} (x {full} full-model FLOPs) ="))
    except (TypeError, ValueError) as e:
      raise ConfigError(str(e)) from None
  if not budgets:
    raise ConfigError("config.budgets is empty")
  n = config.distill.get("devices")
  if n is not None and not 1 <= int(n) <= jax.device_count():
    raise ConfigError(f"config.distill.devices={n}: need 1.."
                      f"{jax.device_count()} (None: all)")
  return tasks, space, prefs, budgets


def _train(encoder, space, tasks, heads, config, kd_weight, workdir):
  """The trained SuperNet params (`train.fit`, resumable in `workdir`)."""
  init, emb = slimmable.init_params(encoder.params, space)
  dc = config.distill
  obj = distill.objective(init, emb, heads, space, [t.name for t in tasks],
                          kd_weight, int(dc.num_random))
  bs = {t.name: taskdata.batcher(encoder, t, "train", int(dc.batch_size),
                                 shuffle=True, seed=int(dc.seed),
                                 limit=dc.limit, max_len=int(dc.max_len),
                                 multiple=int(dc.max_len)) for t in tasks}
  cfg = train.TrainConfig(steps=int(dc.steps), optimizer="adamw",
                          lr=float(dc.lr), weight_decay=float(dc.weight_decay),
                          schedule="cosine", warmup=max(1, int(dc.warmup)),
                          seed=int(dc.seed), log_every=10,
                          save_every=int(dc.save_every))
  fp = {"model": encoder.name, "tasks": [t.name for t in tasks],
        "space": space._asdict(), "kd_weight": float(kd_weight),
        "distill": {k: v for k, v in dc.to_dict().items() if k != "devices"}}
  n = dc.get("devices")
  mesh = (finetune.default_mesh() if n is None else
          sharding.make_mesh([("data", -1)], devices=jax.devices()[:int(n)]))
  res = train.fit(obj, lambda s: {k: taskdata.batch_at(b, s) for k, b in
                                  bs.items()}, cfg, mesh=mesh,
                  workdir=workdir, fingerprint=fp,
                  desc=f"supernet kd={kd_weight:g}", progress=False)
  return res.params, emb, res.log


class Evaluator:
  """Accuracy tables `acc[t, e, d]` of a SuperNet on a split.

  Two jitted programs serve every width (masks are arguments): the shared
  encoder on a batch, and one task's decoder (its slice of the stacked
  decoders, by traced index) on the encoder's output.
  """

  def __init__(self, encoder, space, tasks, heads, config):
    self.space, self.tasks, self.config = space, tasks, config
    self.encoder = encoder
    self.heads = {t.name: {k: np.asarray(v) for k, v in heads[t.name].items()}
                  for t in tasks}
    self.tab = jax.tree.map(jnp.asarray, slimmable.mask_tables(space))
    self._enc = jax.jit(lambda enc, emb, ids, m, hm, fm: slimmable.encode(
        enc, emb, ids, m, hm, fm, space))
    self._dec = jax.jit(lambda decs, t, h, m, hm, fm: slimmable.decode(
        jax.tree.map(lambda x: x[t], decs), h, m, hm, fm, space))
    self._batches = {}

  def batches(self, task, split):
    key = (task.name, split)
    if key not in self._batches:
      ev = self.config.eval
      b = taskdata.batcher(self.encoder, task, split, int(ev.batch_size),
                           limit=ev.limits.get(split), max_len=int(ev.max_len),
                           multiple=int(ev.max_len))
      self._batches[key] = list(b.epoch(0))
    return self._batches[key]

  def table(self, params, emb, split, configs=None) -> np.ndarray:
    """`acc [T, E, D]` (NaN where `configs`, a set of (e, d), excludes)."""
    sp = self.space
    ne, nd = len(sp.enc_ratios), len(sp.dec_ratios)
    acc = np.full((sp.num_tasks, ne, nd), np.nan)
    for ti, task in enumerate(self.tasks):
      head = self.heads[task.name]
      correct = np.zeros((ne, nd))
      total = 0
      for batch in self.batches(task, split):
        keep = batch.get("mask", np.ones(len(batch["label"]), bool))
        total += int(keep.sum())
        for e in range(ne):
          if configs is not None and not any(c[0] == e for c in configs):
            continue
          h = self._enc(params["encoder"], emb, batch["input_ids"],
                        batch["attention_mask"], self.tab["enc_heads"][e],
                        self.tab["enc_ffn"][e])
          for d in range(nd):
            if configs is not None and (e, d) not in configs:
              continue
            f = np.asarray(self._dec(params["decoders"], ti, h,
                                     batch["attention_mask"],
                                     self.tab["dec_heads"][d],
                                     self.tab["dec_ffn"][d]))
            pred = np.argmax(f @ head["kernel"] + head["bias"], -1)
            correct[e, d] += np.sum((pred == batch["label"])[keep])
      for e in range(ne):
        for d in range(nd):
          if configs is None or (e, d) in configs:
            acc[ti, e, d] = correct[e, d] / max(total, 1)
    return acc


def _row(label, space, names, e, ds, test, pref=None, **extra) -> dict:
  accs = {n: round(100 * float(test[t, e, d]), 2)
          for t, (n, d) in enumerate(zip(names, ds))}
  cost = slimmable.config_flops(space, e, ds)
  full = slimmable.config_flops(space, *slimmable.full_config(space))
  row = {"model": label, "preference": extra.pop("preference", ""),
         "budget": extra.pop("budget", ""), **extra,
         "config": slimmable.describe(space, e, ds),
         "gflops": slimmable.gflops(cost),
         "cost%": round(100 * cost / full, 1), **accs,
         "avg": round(float(np.mean(list(accs.values()))), 2)}
  if pref is not None:
    row["pw_acc"] = round(float(sum(p * accs[n] for p, n in zip(pref, names))
                                ), 2)
  return row


def _searched_rows(tag, space, names, prefs, budgets, fracs, val, test):
  enc_cost, dec_cost = slimmable.cost_tables(space)
  rows = []
  for pname, pref in prefs:
    for frac, budget in zip(fracs, budgets):
      ch = search_lib.search(pref, budget, val, enc_cost, dec_cost)
      rows.append(_row(tag, space, names, ch.e, ch.ds, test, pref,
                       preference=pname, budget=f"{float(frac):g}",
                       val_pw=round(100 * ch.score, 2)))
  # Control: the most preferred task's accuracy against its accuracy under
  # the uniform preference at the same budget (when one is configured).
  uni = [n for n, p in prefs if np.allclose(p, p[0])]
  for r in rows:
    pref = dict(prefs)[r["preference"]]
    if uni and not np.allclose(pref, pref[0]):
      top = names[int(np.argmax(pref))]
      base = next(x for x in rows if x["preference"] == uni[0] and
                  x["budget"] == r["budget"])
      r["top_task"] = top
      r["top_gain"] = round(r[top] - base[top], 2)
  return rows


def run(config: Any, workdir: str) -> dict:
  """Runs the job; returns the results dict also written to `workdir`."""
  t_start = time.time()
  tasks, space, prefs, budgets = check_config(config)
  names = [t.name for t in tasks]
  os.makedirs(workdir, exist_ok=True)
  encoder = encoders.load(config.model, num_layers=space.enc_layers +
                          space.dec_layers)
  heads = {t.name: heads_lib.build(encoder, t, config.heads, workdir)
           for t in tasks}
  ev = Evaluator(encoder, space, tasks, heads, config)
  full_e, full_ds = slimmable.full_config(space)
  init, emb = slimmable.init_params(encoder.params, space)
  zs = ev.table(init, emb, "test", {(full_e, full_ds[0])})
  rows = [_row("zero-shot", space, names, full_e, full_ds, zs)]
  timing, logs, tables = {}, {}, {}
  runs = [("ci-kd", float(config.distill.kd_weight))]
  if config.get("ablation_no_kd", False):
    runs.append(("no-kd", 0.0))
  for tag, kd in runs:
    t0 = time.time()
    params, emb, log = _train(encoder, space, tasks, heads, config, kd,
                              os.path.join(workdir, f"supernet-{tag}"))
    timing[f"train {tag} s"] = round(time.time() - t0, 1)
    t0 = time.time()
    val = ev.table(params, emb, "validation")
    test = ev.table(params, emb, "test")
    timing[f"tables {tag} s"] = round(time.time() - t0, 1)
    tables[tag] = {"validation": val.round(5).tolist(),
                   "test": test.round(5).tolist()}
    logs[tag] = log[-1] if log else {}
    rows.append(_row(f"supernet [{tag}]", space, names, full_e, full_ds,
                     test))
    rows += _searched_rows(f"searched [{tag}]", space, names, prefs, budgets,
                           config.budgets, val, test)
    print(f"{tag}: trained in {timing[f'train {tag} s']} s, full-width test "
          f"avg {rows[-len(prefs) * len(budgets) - 1]['avg']}", flush=True)
  timing["total_s"] = round(time.time() - t_start, 1)
  text = results.format_table(rows)
  print(f"\ncontrollable: {encoder.name} ({space.enc_layers} shared + "
        f"{space.dec_layers} per-task layers), tasks {names}, test accuracy "
        f"(%)\n{text}\ntiming {timing}", flush=True)
  enc_cost, dec_cost = slimmable.cost_tables(space)
  out = {"model": encoder.name, "tasks": names,
         "preferences": {n: p.tolist() for n, p in prefs},
         "space": space._asdict(), "rows": rows, "tables": tables,
         "costs": {"encoder": enc_cost.tolist(), "decoders": dec_cost.tolist(),
                   "full": slimmable.config_flops(space, full_e, full_ds)},
         "final_log": logs, "timing": timing, "config": config.to_dict()}
  results.write_json(os.path.join(workdir, "results.json"), out)
  results.atomic_write_text(os.path.join(workdir, "table.txt"), text + "\n")
  plot(rows, prefs, names, os.path.join(workdir, "plot.png"),
       f"controllable MTL on {len(names)} text tasks ({encoder.name})")
  return out


def plot(rows, prefs, names, path: str, title: str = "") -> str:
  """Preference-weighted test accuracy against GFLOPs, one line per
  preference (solid: CI-KD, dashed: without), zero-shot as a reference;
  right: each preferred task's accuracy under its preference and under the
  uniform one (CI-KD). Written atomically."""
  from matplotlib import figure as figure_lib
  fig = figure_lib.Figure(figsize=(11.0, 4.2))
  ax, ax2 = fig.subplots(1, 2)
  colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860",
            "#da8bc3", "#8c8c8c"]
  zs = rows[0]
  uniform = {n for n, p in prefs if np.allclose(p, p[0])}
  for i, (pname, pref) in enumerate(prefs):
    top = max(range(len(pref)), key=lambda t: pref[t])
    for tag, ls in (("ci-kd", "-"), ("no-kd", "--")):
      rs = sorted((r for r in rows if r.get("preference") == pname and
                   tag in r["model"]), key=lambda r: r["gflops"])
      if not rs:
        continue
      lab = f"{pname}" + ("" if tag == "ci-kd" else " (no CI-KD)")
      c = colors[i % len(colors)]
      ax.plot([r["gflops"] for r in rs], [r["pw_acc"] for r in rs], ls,
              marker="o", ms=3, color=c, label=lab)
      task = names[top]
      if np.allclose(pref, pref[0]) or tag != "ci-kd":
        continue  # no preferred task; the control panel shows CI-KD only
      ax2.plot([r["gflops"] for r in rs], [r[task] for r in rs], "-",
               marker="o", ms=3, color=c, label=f"{task}, preferred")
      uni = sorted((r for r in rows if r.get("preference") in uniform and
                    tag in r["model"]), key=lambda r: r["gflops"])
      ax2.plot([r["gflops"] for r in uni], [r[task] for r in uni], ":",
               marker=".", ms=3, color=c, label=f"{task}, uniform pref.")
  ax.axhline(zs["avg"], color="0.3", ls=":", lw=1,
             label=f"zero-shot avg ({zs['avg']:.1f})")
  ax.set_xlabel("GFLOPs per example (all task decoders)")
  ax.set_ylabel("preference-weighted test accuracy (%)")
  ax2.set_xlabel("GFLOPs per example (all task decoders)")
  ax2.set_ylabel("test accuracy of the task (%)")
  ax.set_title(title, fontsize=9)
  ax2.set_title("control: a task's accuracy when preferred and under "
                "the uniform preference", fontsize=9)
  ax.legend(fontsize=6)
  ax2.legend(fontsize=6)
  for a in (ax, ax2):
    a.grid(alpha=0.3)
  fig.tight_layout()
  return plots.save_png(fig, path)
