r"""Dynamic Logits Fusion (Fan et al. 2024), weak-to-strong on the text suite.

The strong model is the full pretrained all-MiniLM-L6-v2 with frozen
zero-shot heads; the small experts are MiniLM truncated to its first
`num_layers` layers, fine-tuned per task against the truncated model's own
zero-shot heads (same class prompts, same class order); the untuned
truncated model is the small base. Rows: strong and small zero-shot, each
expert alone, single-task and multi-task fusion with the per-example
solver, and fixed-weight fusion (weight 1, proxy-tuning style).

Local (4 of the 8 tasks; 463 s on 2 shared CPU cores at load average
7-11, 229 s of it fine-tuning the experts; 80-95 s rerun with them cached):
  nice -n 10 python -m mtmerge.main --config configs/logits_fusion.py \
      --workdir runs/logits_fusion
All 8 tasks:
  python -m mtmerge.main --config configs/logits_fusion.py:tasks=all \
      --workdir DIR
Seconds-long variant (what the tests run):
  python -m mtmerge.main --config configs/logits_fusion.py:runlocal \
      --workdir runs/lf_runlocal
TPU / GPU host (same code, full test splits and longer fine-tuning):
  python -m mtmerge.main --config configs/logits_fusion.py:tasks=all \
      --workdir gs://BUCKET/lf --config.finetune.steps=500
Arguments after `:` are comma-separated: `runlocal`, `tasks=all`.
"""

import ml_collections

from configs import common

# Four tasks (two sentence, two word) where fine-tuning moves accuracy most
# in the default benchmark; all eight with `tasks=all`.
TASKS = ["subjectivity", "moral_foundation", "word_domain", "concreteness"]
ALL_TASKS = ["sentiment", "subjectivity", "party", "debate_role",
             "moral_foundation", "word_domain", "word_valence", "concreteness"]


def get_config(arg=None):
  """The logits-fusion config; see the module docstring for `arg`."""
  args = common.parse_arg(arg, ("runlocal", "tasks"), "runlocal, tasks=all")
  c = ml_collections.ConfigDict()
  c.job = "logits_fusion"
  c.model = "minilm"
  c.num_layers = 2          # the experts' depth (of MiniLM's 6 layers)
  c.tasks = list(ALL_TASKS if args.get("tasks") == "all" else TASKS)
  c.heads = ml_collections.ConfigDict(dict(kind="zeroshot", scale=100.0))
  # As configs/default.py: the transformer layers of each small expert are
  # fine-tuned against the frozen zero-shot head.
  c.finetune = ml_collections.ConfigDict(dict(
      mode="standard", trainable=r"layers/.*", steps=60, batch_size=32,
      lr=1e-4, warmup=4, weight_decay=0.01, save_every=20, average_last=0,
      seed=0, limit=None, max_len=32))
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=128, max_len=32, multiple=8, limit=None, solve_chunk=128))
  # The weight solver (mtmerge.fusion.logits_fusion.solve_weights): the
  # paper's range [0, 2] in steps of 0.1, refined continuously.
  c.solver = ml_collections.ConfigDict(dict(
      lo=0.0, hi=2.0, num=21, max_grid=4096, sweeps=2, iters=24, starts=4))
  c.fixed_weight = 1.0      # the fixed-weight rows (proxy-tuning's alpha)

  if "runlocal" in args:
    # Two word tasks: short inputs of one padded length share every
    # compiled forward; the solver keeps its defaults (the tests' shapes).
    c.num_layers = 1
    c.tasks = ["word_domain", "concreteness"]
    c.finetune.update(steps=2, batch_size=8, warmup=1, save_every=2,
                      limit=32)
    c.eval.update(batch_size=16, limit=16, solve_chunk=16)
  return c
