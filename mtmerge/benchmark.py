"""The default job: fine-tune per task, merge with every method, evaluate.

`run(config, workdir)`:

1. loads the pretrained encoder and the task suite (offline TFDS builders
   prepared into the cache on first use);
2. builds each task's frozen head once from the pretrained model
   (`mtmerge.heads`: zero-shot heads from class prompts, the papers'
   protocol, or linear probes) and fine-tunes the encoder per task against
   it (cached, resumable; `mtmerge.finetune`);
3. stacks the task vectors of the trainable params and, for every method
   in `config.methods`, picks its hyperparameters on the validation split
   (average accuracy over tasks, as the papers do) and reports test
   accuracy per task; compressed methods (TALL masks, EMR) are evaluated
   per task on their reconstruction;
4. runs the learned methods of `config.learned` (AdaMerging, aTLAS,
   Concrete masks, Twin-Merging, skill localization, Fisher, RegMean;
   `mtmerge.benchmark_learned`) on the same task vectors;
5. prints the table and writes `results.json`, `results.csv` and
   `results.png` into the workdir.

Rows: `zero-shot` (the pretrained encoder with the frozen heads; `linear
probe` under that protocol), `individual` (each task's own fine-tuned
model: the upper reference), then one row per method. Columns are
explained by `COLUMNS` (printed under the table).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import auto as tqdm

from mtmerge import benchmark_learned
from mtmerge import encoders
from mtmerge import finetune
from mtmerge import heads as heads_lib
from mtmerge import plots
from mtmerge import results
from mtmerge import taskpool
from mtmerge import tree as tree_lib
from mtmerge.data import suites


class ConfigError(ValueError):
  """A config the benchmark cannot run (raised before any long work)."""


COLUMNS = (
    ("<task>, avg", "test accuracy (%) per task and its mean over tasks"),
    ("norm", "normalized accuracy: mean over tasks of acc / individual acc "
     "(%), as in the TIES and AdaMerging papers"),
    ("val", "mean validation accuracy (%) of the hyperparameters picked"),
    ("storage", "bytes stored relative to one model's merged part (TALL "
     "masks, EMR, Twin-Merging and skill localization keep more or less)"),
    ("s", "wall seconds of the row (grid, training, evaluation)"),
    ("hparams", "the fixed and picked hyperparameters"),
)


class _Stages:
  """Per-stage progress lines: `[2/5 12 s] fine-tuning ...`."""

  def __init__(self, total: int):
    self.total, self.i, self.t0 = total, 0, time.time()

  def __call__(self, msg: str) -> None:
    self.i += 1
    print(f"[{self.i}/{self.total} {time.time() - self.t0:4.0f} s] {msg}",
          flush=True)


def _method_entries(config) -> list[tuple[str, str, dict, dict]]:
  """`(label, method name, fixed hparams, grid)` per configured method."""
  from mtmerge import methods
  out = []
  for entry in config.methods:
    entry = dict(entry)
    unknown = set(entry) - {"method", "grid", "label"}
    if unknown or "method" not in entry:
      raise ConfigError(f"method entry {entry} must have 'method' (e.g. "
                       f"\"ties_merging(threshold=0.2)\") and optionally "
                       f"'grid' and 'label'; unknown keys {sorted(unknown)}")
    try:
      name, fixed = methods.parse(entry["method"])
      grid = dict(entry.get("grid") or {})
      spec = methods.get(name)  # unknown method: error listing known ones
      for hp in benchmark_learned.grid_points(grid):
        spec.check({**fixed, **hp}, len(config.tasks))
    except (ValueError, KeyError) as e:
      msg = e.args[0] if e.args else e
      raise ConfigError(f"config.methods entry {entry['method']!r}: {msg}"
                        ) from None
    out.append((entry.get("label") or name, name, fixed, grid))
  return out


def _stack_task_vectors(base_sel: dict, tuned: list[dict]) -> dict:
  return jax.tree.map(lambda b, *xs: jnp.stack([x - b for x in xs]),
                      base_sel, *tuned)


def _row(label, accs, indiv, extra=None):
  extra = dict(extra or {})
  hparams = extra.pop("hparams", None)
  row = results.accuracy_row(label, accs, indiv, **extra)
  if hparams is not None:  # last: the widest column
    row["hparams"] = hparams
  return row


def table_text(rows: list[dict]) -> str:
  """The printed table (no grids) followed by what each column means."""
  text = results.format_table([{k: v for k, v in r.items() if k != "grid"}
                               for r in rows])
  legend = "\n".join(f"  {k:<12} {v}" for k, v in COLUMNS)
  return f"{text}\ncolumns:\n{legend}"


def run(config: Any, workdir: str) -> dict:
  """Runs the benchmark; returns the results dict also written to disk."""
  from mtmerge import methods
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  _check_sources(config)  # tasks, model, task checkpoints, datasets exist
  try:
    tasks = [suites.get_task(t) for t in config.tasks]
  except KeyError as e:
    raise ConfigError(f"config.tasks: {e.args[0]}") from None
  entries = _method_entries(config)  # bad config fails before any work
  learned_entries = benchmark_learned.entries(config, ConfigError)
  mesh, rules = benchmark_learned.runtime(config, ConfigError)  # built once
  head_kind = config.heads.kind
  if head_kind not in heads_lib.KINDS:
    raise ConfigError(f"config.heads.kind must be one of {heads_lib.KINDS}, "
                      f"got {head_kind!r}")
  if head_kind == "zeroshot":
    for t in tasks:  # prompts exist and format every class, before work
      try:
        heads_lib.task_prompts(t, config.heads.get("templates"))
      except (KeyError, ValueError) as e:
        raise ConfigError(f"config.heads: {e.args[0]}") from None
  stage = _Stages(5 if learned_entries else 4)
  stage(f"loading {config.model} and preparing {len(tasks)} tasks")
  encoder = encoders.load(config.model, num_layers=config.get("num_layers"))
  for t in tasks:
    for split in suites.SPLITS:
      suites.load_split(t, split)
  mode, trainable = config.finetune.mode, config.finetune.trainable
  print(f"encoder {encoder.name}: {tree_lib.tree_size(encoder.params)} "
        f"params; tasks {[t.name for t in tasks]}; heads {head_kind}; "
        f"fine-tuning {mode} ({trainable})", flush=True)
  task_models = _task_models(config, encoder, tasks, trainable)

  heads, tuned = {}, []
  timing = {}
  t0 = time.time()
  stage(f"{head_kind} heads and fine-tuning {len(tasks)} tasks x "
        f"{config.finetune.steps} steps")
  for t in tasks:
    heads[t.name] = heads_lib.build(encoder, t, config.heads, workdir)
  timing["heads_s"] = time.time() - t0
  t0 = time.time()
  tuned = task_models
  if tuned is None:
    tuned = []
    for t in tasks:
      t1 = time.time()
      tuned.append(finetune.finetune_task(encoder, t, heads[t.name],
                                          config.finetune, workdir,
                                          mesh=mesh, rules=rules))
      print(f"  {t.name}: fine-tuned in {time.time() - t1:.0f} s", flush=True)
  timing["finetune_s"] = time.time() - t0

  sel, _ = encoders.split(encoder.params, trainable)
  base_sel = tree_lib.from_flat_dict(sel)
  if mode == "tangent":  # merging happens in the tangent space around 0
    base_sel = jax.tree.map(jnp.zeros_like, base_sel)
  tvs = _stack_task_vectors(base_sel, tuned)
  pool = taskpool.TaskPool(encoder, tasks, heads, trainable=trainable,
                           mode=mode, batch_size=config.eval.batch_size,
                           max_len=config.eval.max_len,
                           multiple=config.eval.get("multiple", 16),
                           limits=dict(config.eval.limits))

  t0 = time.time()
  stage(f"{len(entries)} training-free methods (grids on validation)")
  rows = []
  indiv = {t.name: pool.accuracy(m, t) for t, m in zip(tasks, tuned)}
  rows.append(_row("zero-shot" if head_kind == "zeroshot" else
                   "linear probe", pool.evaluate(base_sel), indiv))
  rows.append(_row("individual", indiv, indiv))
  timing["reference_eval_s"] = time.time() - t0
  full_bytes = tree_lib.tree_bytes(base_sel)

  bar = tqdm.tqdm(entries, desc="methods", leave=False, disable=None)
  for label, name, fixed, grid in bar:
    bar.set_postfix_str(label)
    t0 = time.time()
    spec = methods.get(name)
    if spec.compressed:
      # One model per task: like the TALL-mask paper, pick each task's
      # hyperparameters on that task's own validation accuracy.
      best_t = [(-1.0, None, None)] * len(tasks)
      val_scores = []
      for hp in benchmark_learned.grid_points(grid):
        out = methods.merge(name, base_sel, tvs, **fixed, **hp)
        vals = [pool.accuracy(_recon(out, base_sel, i), t, "validation")
                for i, t in enumerate(tasks)]
        val_scores.append({**hp, **{t.name: round(100 * a, 2)
                                    for t, a in zip(tasks, vals)}})
        best_t = [b if b[0] >= a else (a, hp, out)
                  for b, a in zip(best_t, vals)]
      accs = {t.name: pool.accuracy(_recon(b[2], base_sel, i), t)
              for i, (t, b) in enumerate(zip(tasks, best_t))}
      best_val = float(np.mean([b[0] for b in best_t]))
      best = {k: [b[1][k] for b in best_t] for k in grid}
      store = methods.storage_bytes(best_t[0][2]) / full_bytes
    else:
      best, best_val, best_out, val_scores = {}, -1.0, None, []
      candidates = _grid_models(name, base_sel, tvs, fixed, grid)
      for hp, out in candidates:
        val = float(np.mean(list(pool.evaluate(out, "validation").values())))
        val_scores.append({**hp, "val": round(100 * val, 2)})
        if val > best_val:
          best, best_val, best_out = hp, val, out
      accs = pool.evaluate(best_out)
      store = 1.0
    rows.append(_row(label, accs, indiv, {
        "hparams": ", ".join(f"{k}={v}" for k, v in {**fixed, **best}.items()),
        "val": round(100 * best_val, 2),
        "storage": round(store, 3), "s": round(time.time() - t0, 1),
        "grid": val_scores}))
    tqdm.tqdm.write(f"{label}: test avg {rows[-1]['avg']:.2f} (validation "
                    f"{rows[-1]['val']:.2f}) in {rows[-1]['s']} s")
  if learned_entries:
    from mtmerge.learned import problem as problem_lib
    t0 = time.time()
    stage(f"{len(learned_entries)} learned methods")
    problem = problem_lib.from_encoder(
        encoder, tasks, heads, base_sel, tvs, trainable=trainable, mode=mode,
        max_len=config.eval.max_len)
    rows += benchmark_learned.rows(
        config, workdir, problem, pool, base_sel, learned_entries,
        lambda label, accs, extra: _row(label, accs, indiv, extra),
        mesh=mesh, rules=rules)
    timing["learned_s"] = time.time() - t0
  timing["total_s"] = time.time() - t_start

  stage("writing results")
  table_rows = [{k: v for k, v in r.items() if k != "grid"} for r in rows]
  print(f"\nmtmerge benchmark: {encoder.name}, {len(tasks)} tasks, "
        f"{head_kind} heads, fine-tuning mode {mode}, test split\n" +
        table_text(rows))
  _print_published(config, rows)
  print(f"wall time {timing['total_s']:.0f} s (fine-tuning "
        f"{timing['finetune_s']:.0f} s)")
  out = {"model": encoder.name, "mode": mode, "heads": head_kind,
         "columns": dict(COLUMNS),
         "tasks": [t.name for t in tasks], "rows": rows, "timing": timing,
         "config": config.to_dict()}
  results.write_json(os.path.join(workdir, "results.json"), out)
  results.write_csv(os.path.join(workdir, "results.csv"), table_rows)
  plots.bar_chart(table_rows, [t.name for t in tasks],
                  os.path.join(workdir, "results.png"),
                  title=f"{encoder.name}: {len(tasks)} tasks, {head_kind} "
                  f"heads ({mode})",
                  learned=[e[0] for e in learned_entries])
  return out


# Methods whose merge is `theta_0 + lambda * D` with D independent of the
# scalar lambda, and lambda's name (tests/test_benchmark_grid.py checks
# each).
LINEAR_IN_SCALE = {
    "task_arithmetic": "scaling_factor", "ties_merging": "scaling_factor",
    "dare": "scaling_factor", "dare_ties": "scaling_factor",
    "breadcrumbs": "scaling_factor", "della": "scaling_factor",
    "magnitude_prune": "scaling_factor", "consensus": "scaling_factor",
    "pcb_merging": "scaling_factor", "tsv_merging": "alpha"}


def _linear_grid(name: str, grid: dict) -> bool:
  """True when the grid is several lambdas of a linear method."""
  scale = LINEAR_IN_SCALE.get(name)
  return (scale is not None and set(grid) == {scale} and
          len(list(grid[scale])) > 1)


def _grid_models(name, base_sel, tvs, fixed, grid):
  """Yields `(hparams, merged)` for every grid point.

  For a `LINEAR_IN_SCALE` method whose grid is only its lambda, D is
  merged once (on a zero base, so `0 + 1 * D` is D exactly) and each point
  is `theta_0 + lambda * D`: one merge instead of one per lambda (DELLA's
  per-row ranks, PCB's statistics and TSV's SVDs are the slow part). Each
  point equals `methods.merge` at that lambda up to float32 rounding (a
  few ulp: the method's fused program may round in another order;
  tests/test_benchmark_grid.py), and the picked point is the row's test
  model (merging it again cost up to 8 s a row).
  """
  from mtmerge import methods
  from mtmerge import task_vectors
  points = benchmark_learned.grid_points(grid)
  if _linear_grid(name, grid):
    scale = LINEAR_IN_SCALE[name]
    zeros = jax.tree.map(jnp.zeros_like, base_sel)
    d = methods.merge(name, zeros, tvs, **fixed, **{scale: 1.0})
    apply = jax.jit(task_vectors.apply)  # one program for every lambda
    for hp in points:
      yield hp, apply(base_sel, d, hp[scale])
    return
  for hp in points:
    yield hp, methods.merge(name, base_sel, tvs, **fixed, **hp)


def _recon(compressed, base_sel, i):
  """Task i's trainable params from a compressed multi-task form."""
  from mtmerge import methods
  return methods.reconstruct(base_sel, compressed, i)


def _check_sources(config) -> None:
  """Stops in seconds when a task, the model, a task checkpoint or a
  dataset is missing (`mtmerge.modelpool.check_sources`)."""
  from mtmerge import modelpool
  try:
    modelpool.check_sources(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _task_models(config, encoder, tasks, trainable):
  """`config.task_models` read as the tuned models (no fine-tuning), or
  None when unset (`mtmerge.modelpool.load`)."""
  from mtmerge import modelpool
  try:
    tuned = modelpool.load(config, encoder, tasks, trainable)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if tuned is not None:
    print(f"task models: {len(tuned)} published checkpoints read; "
          "fine-tuning skipped", flush=True)
  return tuned


def _print_published(config, rows) -> None:
  """Measured average accuracy beside `config.published` (label -> dict of
  source -> number), the papers' numbers for the same setting."""
  published = dict(config.get("published") or {})
  if not published:
    return
  sources = sorted({k for v in published.values() for k in dict(v)})
  table = []
  for r in rows:
    pub = dict(published.get(r["method"], {}))
    table.append({"method": r["method"], "avg": r["avg"], "norm": r.get(
        "norm"), **{s: pub.get(s, "") for s in sources}})
  print(f"\npublished average accuracy (%) beside the measured "
        f"({config.get('published_note', '')}):\n" +
        results.format_table(table))
