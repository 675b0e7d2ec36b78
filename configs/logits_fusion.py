r"""Dynamic Logits Fusion (Fan et al. 2024), weak-to-strong on the text suite.

The strong model is the full pretrained all-MiniLM-L6-v2 with frozen
zero-shot heads; the small experts are MiniLM truncated to its first
`num_layers` layers, fine-tuned per task against the truncated model's own
zero-shot heads (same class prompts, same class order); the untuned
truncated model is the small base. Rows: strong and small zero-shot, each
expert alone, single-task and multi-task fusion with the per-example
solver, and fixed-weight fusion (weight 1, proxy-tuning style).

Local (4 of the 8 tasks; 209 s on 2 shared CPU cores at load average 6,
132 s of it fine-tuning the experts; 39-71 s reruns with them cached):
  nice -n 10 python -m mtmerge.main --config configs/logits_fusion.py \
      --workdir runs/logits_fusion
All 8 tasks:
  python -m mtmerge.main --config configs/logits_fusion.py:tasks=all \
      --workdir DIR
The joint search over the whole weight box (ours, not the paper's):
  ... --config.solver.search=joint
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
  c.strong_layers = None    # the strong model's depth (None: all 6)
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
  # paper's search, [0, 2] in steps of 0.1, one expert at a time when
  # several are fused; search="joint" (ours) searches the product grid and
  # refines continuously (max_grid, sweeps, iters, starts apply to it).
  c.solver = ml_collections.ConfigDict(dict(
      search="paper", lo=0.0, hi=2.0, num=21, max_grid=4096, sweeps=2,
      iters=24, starts=8))
  c.fixed_weight = 1.0      # the fixed-weight rows (proxy-tuning's alpha)

  if "runlocal" in args:
    # Two 2-class word tasks: short inputs of one padded length and heads
    # of one shape share every compiled forward; the solver keeps its
    # defaults; save_every=0: no resume points, only the final experts;
    # only the last dense layer is tuned (a short backward to compile).
    # A 2-layer strong model: fewer layers to compile.
    c.num_layers = 1
    c.strong_layers = 2
    c.tasks = ["word_valence", "concreteness"]
    c.finetune.update(steps=2, batch_size=8, warmup=1, save_every=0,
                      limit=32, trainable=r"layers/0/mlp/output/.*")
    c.eval.update(batch_size=16, limit=16, solve_chunk=16)
  return c
