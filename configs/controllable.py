r"""Efficient controllable multi-task architectures (Aich et al. 2023).

One width-slimmable multi-task model (a shared MiniLM encoder layer and a
per-task decoder layer, slimmable in attention heads and FFN units) is
trained once with the sandwich rule and configuration-invariant knowledge
distillation; the search then maps each task preference vector and compute
budget (a fraction of the full model's FLOPs) to widths, picked on the
validation split and reported on test (`mtmerge.controllable.bench`). The
four text tasks of configs/flat_sam.py, frozen zero-shot heads, 100 steps
of 8 examples per task: a CPU-sized check, not the paper's setting.

Local (2 shared CPU cores; wall time in benchmarks/results/controllable/):
  nice -n 10 python -m mtmerge.main --config configs/controllable.py \
      --workdir runs/controllable
CI-KD weight 10 instead of 1, without the lambda = 0 SuperNet (committed
under benchmarks/results/controllable/kd_weight10/):
  nice -n 10 python -m mtmerge.main --config configs/controllable.py \
      --workdir runs/controllable_kd10 --config.distill.kd_weight=10 \
      --config.ablation_no_kd=False
Seconds-long variant (what the tests run):
  python -m mtmerge.main --config configs/controllable.py:runlocal \
      --workdir DIR
GPU / TPU host (all 8 tasks, 4 shared + 2 per-task layers, longer):
  python -m mtmerge.main --config configs/controllable.py:tasks=all \
      --workdir gs://BUCKET/controllable --config.space.enc_layers=4 \
      --config.space.dec_layers=2 --config.distill.steps=2000
Arguments after `:` are comma-separated: `runlocal`, `tasks=all`.
"""

import ml_collections

from configs import common

TASKS = ["subjectivity", "moral_foundation", "word_domain", "concreteness"]
ALL_TASKS = ["sentiment", "subjectivity", "party", "debate_role",
             "moral_foundation", "word_domain", "word_valence", "concreteness"]


def _preferences(tasks, top=0.7):
  """Uniform, then each task preferred in turn (`top`, the rest equal)."""
  n = len(tasks)
  rest = (1.0 - top) / (n - 1)
  prefs = [dict(name="uniform", weights=[1.0 / n] * n)]
  for t in tasks:
    prefs.append(dict(name=t, weights={u: (top if u == t else rest)
                                       for u in tasks}))
  return prefs


def get_config(arg=None):
  """The controllable config; see the module docstring for `arg`."""
  args = common.parse_arg(arg, ("runlocal", "tasks"), "runlocal, tasks=all")
  c = ml_collections.ConfigDict()
  c.job = "controllable"
  c.model = "minilm"
  c.tasks = list(ALL_TASKS if args.get("tasks") == "all" else TASKS)
  c.heads = ml_collections.ConfigDict(dict(kind="zeroshot", scale=100.0))
  # Shared encoder = MiniLM's first `enc_layers` layers; each task's decoder
  # starts as a copy of the next `dec_layers`. One width ratio for the
  # whole encoder, one per decoder (heads and FFN units slimmed together).
  c.space = ml_collections.ConfigDict(dict(
      enc_layers=1, dec_layers=1, enc_ratios=(0.25, 0.5, 0.75, 1.0),
      dec_ratios=(0.25, 0.5, 0.75, 1.0)))
  # Sandwich rule: full + smallest + `num_random` random configurations a
  # step; kd_weight is CI-KD's lambda. batch_size is per task.
  c.distill = ml_collections.ConfigDict(dict(
      steps=100, batch_size=8, lr=1e-4, warmup=10, weight_decay=0.01,
      kd_weight=1.0, num_random=1, seed=0, limit=None, max_len=32,
      save_every=50, devices=None))  # devices: None = all (a data mesh)
  # Also train lambda = 0 (same steps, same seed) and search it the same
  # way, to see what CI-KD changes; --config.ablation_no_kd=False halves
  # the run.
  c.ablation_no_kd = True
  c.preferences = _preferences(c.tasks)
  c.budgets = (0.3, 0.4, 0.5, 0.6, 0.8, 1.0)  # fractions of full FLOPs
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=128, max_len=32,
      limits=ml_collections.ConfigDict(dict(validation=128, test=384))))

  if "runlocal" in args:
    # Two 2-class tasks: their prompts have one shape, so the zero-shot
    # heads share one compiled forward.
    c.tasks = ["word_valence", "concreteness"]
    c.preferences = _preferences(c.tasks, top=0.8)[:2]
    c.space.update(enc_ratios=(0.5, 1.0), dec_ratios=(0.5, 1.0))
    # One device: the step compiles in about 2/3 of the time of 8 fake
    # CPU devices; tests/test_controllable.py checks the sharded loss.
    c.distill.update(steps=1, batch_size=8, warmup=1, limit=32,
                     save_every=0, devices=1)
    c.ablation_no_kd = False
    c.budgets = (0.7, 1.0)
    c.eval.update(batch_size=16)
    c.eval.limits.update(validation=16, test=16)
  return c
