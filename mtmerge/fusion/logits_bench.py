"""The `logits_fusion` job: Dynamic Logits Fusion on the offline text suite.

Fan et al., 2024, "On Giant's Shoulders: Effortless Weak to Strong by
Dynamic Logits Fusion" (arXiv:2406.15480), in the project's classification
analog of its LLM setting (`mtmerge.fusion.logits_fusion` has the method,
the paper's objective and search, and what the sources hold):

1. the strong model is the full pretrained MiniLM with frozen zero-shot
   heads (`mtmerge.heads`); the small base is MiniLM truncated to its first
   `config.num_layers` layers with its own zero-shot heads from the same
   class prompts (same classes, same order: checked, one error otherwise);
2. one small expert per task: the truncated model fine-tuned against its
   frozen head (`mtmerge.finetune`, cached and resumable);
3. the test split of every task is scored once by every model (experts
   stacked on a task axis and `vmap`ped); every row is then logit
   arithmetic on those cached logits. An expert scores a foreign task
   through that task's head, as an LLM expert scores any token.

`run(config, workdir)` prints the table and writes `results.json`,
`results.csv` and `table.txt` into the workdir.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import encoders
from mtmerge import finetune
from mtmerge import heads as heads_lib
from mtmerge import results
from mtmerge import taskdata
from mtmerge import tree as tree_lib
from mtmerge.data import suites
from mtmerge.fusion import logits_fusion


class ConfigError(ValueError):
  """A config this job cannot run (raised before any long work)."""


def _solve(zl, ze, zs, opts, chunk):
  """Solver weights `[N, T]` in fixed-size chunks (one compile, bounded
  memory: every candidate is evaluated per example)."""
  n, c = zl.shape
  pad, extra = -n % chunk, -c % 8

  def padded(x, ax):
    # Rows to whole chunks; classes to a multiple of 8 at logit -1e4
    # (probability exactly 0 in every model, so every KL is unchanged):
    # tasks with different class counts share one compiled solver.
    x = np.pad(x, [(0, pad) if a == ax else (0, 0) for a in range(x.ndim)])
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)],
                  constant_values=-1e4)
  zl, ze, zs = padded(zl, 0), padded(ze, 1), padded(zs, 0)
  out = [np.asarray(logits_fusion.solve_weights(
      zl[i:i + chunk], ze[:, i:i + chunk], zs[i:i + chunk], **opts))
         for i in range(0, n + pad, chunk)]
  return np.concatenate(out)[:n]


def _head_classes(head: dict, names: tuple[str, ...]) -> tuple[str, ...]:
  """The classes a head scores: the task's class phrases, one per output
  column (columns beyond the phrases are unnamed)."""
  width = int(np.shape(head["kernel"])[1])
  return tuple(names[:width]) + tuple(f"<unnamed {i}>" for i in range(
      len(names), width))


def _forwards(strong, small):
  """Jitted logits of the strong model and of the small models stacked on
  a model axis (the untuned base first, then the experts); heads are
  arguments, so tasks with the same class count and padded length share
  one compiled program each."""
  f_strong = jax.jit(lambda h, p, x: encoders.logits(h, strong.features(
      p, x)))
  f_small = jax.jit(jax.vmap(lambda h, p, x: encoders.logits(
      h, small.features(p, x)), in_axes=(None, 0, None)))
  return f_strong, f_small


def _task_logits(strong, small, small_stack, task, s_head, w_head, config,
                 fns):
  """`(strong [N, C], small base [N, C], experts [T, N, C], labels [N])`;
  `small_stack`: the base's and the experts' params on one leading axis."""
  b = taskdata.batcher(small, task, "test", config.eval.batch_size,
                       limit=config.eval.get("limit"),
                       max_len=config.eval.max_len,
                       multiple=config.eval.multiple, sort_by_length=True)
  f_strong, f_small = fns
  out = {"zl": [], "zs": [], "ze": [], "y": []}
  for batch in b.epoch(0):
    keep = batch.get("mask", np.ones(len(batch["label"]), bool))
    x = {k: v for k, v in batch.items() if k not in ("label", "mask")}
    out["zl"].append(np.asarray(f_strong(s_head, strong.params, x))[keep])
    z = np.asarray(f_small(w_head, small_stack, x))[:, keep]
    out["zs"].append(z[0])
    out["ze"].append(z[1:])
    out["y"].append(batch["label"][keep])
  return (np.concatenate(out["zl"]), np.concatenate(out["zs"]),
          np.concatenate(out["ze"], axis=1), np.concatenate(out["y"]))


def run(config: Any, workdir: str) -> dict:
  """Runs the job; returns the results dict also written to `workdir`."""
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  try:
    tasks = [suites.get_task(t) for t in config.tasks]
  except KeyError as e:
    raise ConfigError(f"config.tasks: {e.args[0]}") from None
  if not tasks:
    raise ConfigError("config.tasks is empty: no experts to fuse")
  if config.finetune.mode != "standard":
    raise ConfigError("logits_fusion fine-tunes standard experts only; "
                      f"got finetune.mode={config.finetune.mode!r}")
  strong_layers = config.get("strong_layers")  # None: all of them
  try:
    strong = encoders.load(config.model, num_layers=strong_layers)
  except ValueError as e:
    raise ConfigError(f"config.strong_layers: {e}") from None
  try:
    small = encoders.load(config.model, num_layers=config.num_layers)
  except ValueError as e:
    raise ConfigError(f"config.num_layers: {e}") from None
  print(f"strong {strong.name}: {tree_lib.tree_size(strong.params)} params; "
        f"small experts: first {config.num_layers} layers, "
        f"{tree_lib.tree_size(small.params)} params; tasks "
        f"{[t.name for t in tasks]}", flush=True)
  names = {t.name: heads_lib.task_prompts(t)[0] for t in tasks}
  s_heads = {t.name: heads_lib.build(strong, t, config.heads, workdir)
             for t in tasks}
  w_heads = {t.name: heads_lib.build(small, t, config.heads, workdir)
             for t in tasks}
  for t in tasks:  # before any fine-tuning
    # Every expert scores a task through the small head, the strong model
    # through its own: the class sets must agree, index by index.
    try:
      logits_fusion.check_class_sets(
          _head_classes(s_heads[t.name], names[t.name]),
          {f"{u.name} expert": _head_classes(w_heads[t.name], names[t.name])
           for u in tasks})
    except logits_fusion.FusionError as e:
      raise ConfigError(f"task {t.name!r}: {e}") from None
  t0 = time.time()
  _, rest = encoders.split(small.params, config.finetune.trainable)
  tuned = []
  for t in tasks:
    sel = finetune.finetune_task(small, t, w_heads[t.name], config.finetune,
                                 os.path.join(workdir, "experts"),
                                 progress=False)
    tuned.append(encoders.join(tree_lib.to_flat_dict(sel), rest))
  # [1 + T, ...]: the untuned small model, then the experts.
  stacked = jax.tree.map(lambda *x: jnp.stack(x), small.params, *tuned)
  finetune_s = time.time() - t0
  print(f"experts fine-tuned in {finetune_s:.0f} s", flush=True)

  opts = dict(config.solver)
  chunk = int(config.eval.get("solve_chunk", 128))
  fixed = float(config.fixed_weight)
  accs: dict[str, dict[str, float]] = {}
  wmean: dict[str, list[float]] = {}
  diag: dict[str, dict[str, Any]] = {}
  t0 = time.time()
  acc = lambda z, y: float(np.mean(np.argmax(z, -1) == y))
  fns = _forwards(strong, small)
  for ti, t in enumerate(tasks):
    zl, zs, ze, y = _task_logits(strong, small, stacked, t,
                                 s_heads[t.name], w_heads[t.name], config,
                                 fns)
    n = t.name
    rec = lambda row, v: accs.setdefault(row, {}).__setitem__(n, v)
    rec("strong zero-shot", acc(zl, y))
    rec(f"small zero-shot ({config.num_layers} layers)", acc(zs, y))
    for j, u in enumerate(tasks):
      rec(f"expert {u.name} alone", acc(ze[j], y))
    rec("own expert alone", acc(ze[ti], y))
    own = ze[ti:ti + 1]
    w1 = _solve(zl, own, zs, opts, chunk)
    rec("single-task fusion (solver)",
        acc(logits_fusion.fuse(zl, own, zs, w1), y))
    rec(f"single-task fusion (w={fixed:g})",
        acc(logits_fusion.fuse(zl, own, zs, np.full((1,), fixed)), y))
    wt = _solve(zl, ze, zs, opts, chunk)
    rec("multi-task fusion (solver)", acc(logits_fusion.fuse(zl, ze, zs, wt),
                                          y))
    rec(f"multi-task fusion (w={fixed:g} each)", acc(logits_fusion.fuse(
        zl, ze, zs, np.full((len(tasks),), fixed)), y))
    wmean.setdefault("single-task fusion (solver)", []).append(
        float(w1.mean()))
    wmean.setdefault("multi-task fusion (solver)", []).append(
        float(wt[:, ti].mean()))
    # Where do the solved weights go: examples on which the own expert and
    # the strong model disagree (where the expert can change the answer).
    dis = np.argmax(own[0], -1) != np.argmax(zl, -1)
    diag[n] = {"disagree": round(float(dis.mean()), 3),
               "w_disagree": round(float(w1[dis, 0].mean()), 3),
               "w_agree": round(float(w1[~dis, 0].mean()), 3),
               "corr_w_disagree": round(float(np.corrcoef(
                   w1[:, 0], dis)[0, 1]), 3) if 0 < dis.mean() < 1 else None}
    print(f"  {n}: {len(y)} test examples; solver weights: own expert "
          f"{w1.mean():.2f} alone ({diag[n]['w_disagree']:.2f} where it "
          f"disagrees with the strong model, {diag[n]['disagree']:.0%} of "
          f"examples; {diag[n]['w_agree']:.2f} elsewhere), "
          f"{wt[:, ti].mean():.2f} among {len(tasks)} (others "
          f"{np.delete(wt, ti, 1).mean():.2f})", flush=True)
  eval_s = time.time() - t0

  rows = []
  for label, per_task in accs.items():
    row = {"method": label, **{k: round(100 * v, 2)
                               for k, v in per_task.items()}}
    row["avg"] = round(100 * float(np.mean(list(per_task.values()))), 2)
    if label in wmean:
      row["own_w"] = round(float(np.mean(wmean[label])), 3)
    rows.append(row)
  timing = {"finetune_s": round(finetune_s, 1), "eval_s": round(eval_s, 1),
            "total_s": round(time.time() - t_start, 1)}
  text = (f"Dynamic Logits Fusion: strong {strong.name} "
          f"({strong_layers or 'all'} layers, "
          f"zero-shot heads) + {len(tasks)} experts of its first "
          f"{config.num_layers} layers; test accuracy (%)\n" +
          results.format_table(rows) +
          "\n  own_w: mean solved weight of the task's own expert\n"
          f"wall {timing['total_s']:.0f} s (fine-tuning "
          f"{timing['finetune_s']:.0f} s, evaluation {timing['eval_s']:.0f} s)")
  print("\n" + text, flush=True)
  out = {"model": strong.name, "num_layers": config.num_layers,
         "tasks": [t.name for t in tasks], "rows": rows,
         "single_task_weights": diag, "timing": timing,
         "config": config.to_dict()}
  results.write_json(os.path.join(workdir, "results.json"), out)
  results.write_csv(os.path.join(workdir, "results.csv"), rows)
  results.atomic_write_text(os.path.join(workdir, "table.txt"), text + "\n")
  return out
