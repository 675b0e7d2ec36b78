r"""Task-based flat regions (Phan et al. 2022): SAM task vectors and MTL.

Do task vectors fine-tuned into flat regions (single-task SAM) merge better
with task arithmetic and TIES than plainly fine-tuned ones? Plus the
multi-task method itself (per-task SAM perturbations, equal-weight
combination) against plain multi-task training. MiniLM truncated to its
first 2 layers, 4 of the 8 text tasks, frozen zero-shot heads, a few dozen
steps: a CPU-sized check, not the paper's setting (`mtmerge.flat.bench`).

Local (2 shared CPU cores; wall time in benchmarks/results/flat_sam/):
  nice -n 10 python -m mtmerge.main --config configs/flat_sam.py \
      --workdir runs/flat_sam
Seconds-long variant (what the tests run):
  python -m mtmerge.main --config configs/flat_sam.py:runlocal \
      --workdir DIR
TPU / GPU host (all tasks, full model, longer fine-tuning):
  python -m mtmerge.main --config configs/flat_sam.py:tasks=all \
      --workdir gs://BUCKET/flat --config.num_layers=6 \
      --config.finetune.steps=500
Arguments after `:` are comma-separated: `runlocal`, `tasks=all`.
"""

import ml_collections

from configs import common

TASKS = ["subjectivity", "moral_foundation", "word_domain", "concreteness"]
ALL_TASKS = ["sentiment", "subjectivity", "party", "debate_role",
             "moral_foundation", "word_domain", "word_valence", "concreteness"]
STEPS = 40


def get_config(arg=None):
  """The flat_sam config; see the module docstring for `arg`."""
  args = common.parse_arg(arg, ("runlocal", "tasks"), "runlocal, tasks=all")
  c = ml_collections.ConfigDict()
  c.job = "flat_sam"
  c.model = "minilm"
  c.num_layers = 2
  c.tasks = list(ALL_TASKS if args.get("tasks") == "all" else TASKS)
  c.heads = ml_collections.ConfigDict(dict(kind="zeroshot", scale=100.0))
  # As configs/default.py: transformer layers fine-tuned against the frozen
  # zero-shot head, AdamW with warmup-cosine.
  c.finetune = ml_collections.ConfigDict(dict(
      mode="standard", trainable=r"layers/.*", steps=STEPS, batch_size=32,
      lr=1e-4, warmup=4, weight_decay=0.01, save_every=STEPS, average_last=0,
      seed=0, limit=None, max_len=32))
  # SAM radii of the flat fine-tuning runs (one family of task vectors
  # each; 0.05 is SAM's and the FS-MTL code's default). One radius fits
  # the 2-core budget; more with e.g. --config.sam_rhos='(0.05, 0.5)'.
  c.sam_rhos = (0.05,)
  c.sharpness_rho = 0.05    # radius of the measured sharpness column
  c.methods = [
      dict(method="task_arithmetic", label="task_arithmetic",
           grid=dict(scaling_factor=[0.3, 0.5, 0.7, 1.0])),
      dict(method="ties_merging(threshold=0.2, merge_func='sum')",
           label="ties_merging", grid=dict(scaling_factor=[0.5, 0.8, 1.2])),
  ]
  # One model on all tasks (mtmerge.flat.objective.multitask_objective),
  # rho = 0 against rho; steps=0 skips it. Each step is one batch of every
  # task (4 x 16 examples), two gradient passes per task.
  c.multitask = ml_collections.ConfigDict(dict(
      steps=30, batch_size=16, rho=0.05, combiner="mean", scope="joint"))
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=128, max_len=32, multiple=8,
      limits=ml_collections.ConfigDict(dict(validation=64, test=384))))

  if "runlocal" in args:
    c.num_layers = 1
    c.tasks = ["word_domain", "concreteness"]
    c.sam_rhos = (0.05,)
    c.finetune.update(steps=2, batch_size=8, warmup=1, save_every=2,
                      limit=32)
    c.multitask.update(steps=2, batch_size=8)
    c.methods = [dict(m, grid=dict(scaling_factor=m["grid"][
        "scaling_factor"][:1])) for m in c.methods]
    c.eval.update(batch_size=16)
    c.eval.limits.update(validation=16, test=16)
  return c
