"""Default job: merge the real all-MiniLM-L6-v2 weights with every method.

Local (CPU, a few minutes):
  python -m mtmerge.main --config configs/default.py --workdir /tmp/mtmerge
Quick variant used by the tests (seconds):
  python -m mtmerge.main --config configs/default.py:runlocal --workdir /tmp/x
Arguments after `:` are comma-separated: `runlocal`, `tasks=N`.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, ("runlocal", "tasks"), "runlocal, tasks=N")
  c = ml_collections.ConfigDict()
  c.job = "demo"
  c.model = "minilm"
  # The transformer blocks (10.6M params); embeddings stay as pretrained, as
  # in most merging work on text encoders.
  c.merge_params = r"encoder\..*"
  c.num_tasks = int(args.get("tasks", 4))
  c.seed = 0
  c.task_vectors = ml_collections.ConfigDict(
      dict(scale=0.02, rank=4, sparse_frac=0.01))
  c.methods = [
      "weight_averaging",
      "task_arithmetic(scaling_factor=0.3)",
      "ties_merging(threshold=0.2, merge_func='sum', scaling_factor=0.3)",
      "ties_merging(threshold=0.2, merge_func='mean', scaling_factor=1.0, "
      "scope='per_tensor')",
      "dare(drop_rate=0.5, scaling_factor=0.3)",
      "dare_ties(drop_rate=0.5, scaling_factor=0.3)",
      "breadcrumbs",
      "della",
      "magnitude_prune(threshold=0.2, scaling_factor=0.3)",
      "consensus(k=2, scaling_factor=0.3)",
      "pcb_merging(ratio=0.1, scaling_factor=1.0)",
      # tsv_merging is left out of the default job: XLA:CPU's batched SVD
      # takes minutes on these matrices (it is tested in tests/).
      "model_stock",
      "slerp(t=0.5)",
      "tall_mask(tall_mask_lambda=0.4)",
      "emr_merging",
  ]
  if "runlocal" in args:
    c.merge_params = r"encoder\.layer\.0\..*"
    c.methods = [m for m in c.methods if m.split("(")[0] in
                 ("task_arithmetic", "ties_merging", "tall_mask")][:3]
  return c
