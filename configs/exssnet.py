r"""ExSSNeT (Yadav and Bansal 2023): continual learning on the text suite.

Tasks arrive in the order of `config.tasks`; each gets a supermask over one
shared masked MLP that sits on the frozen MiniLM's pooled features, and
trains only the weights no earlier task's mask uses (exclusive), with KNN
knowledge transfer for the mask's initialization. Compared with sequential
fine-tuning, SupSup (masks over fixed weights) and SSNeT (non-exclusive
weight training) by final accuracy and forgetting (`mtmerge.continual`).

Local (2 shared CPU cores; wall time in benchmarks/results/exssnet/):
  nice -n 10 python -m mtmerge.main --config configs/exssnet.py \
      --workdir runs/exssnet
Seconds-long variant (what the tests run):
  python -m mtmerge.main --config configs/exssnet.py:runlocal \
      --workdir DIR
TPU / GPU host (all training examples, wider network, longer training):
  python -m mtmerge.main --config configs/exssnet.py \
      --workdir gs://BUCKET/exssnet --config.features.limits.train=None \
      --config.hidden='(2048,)' --config.mask.steps=1000 \
      --config.weights.steps=1000
Arguments after `:` are comma-separated: `runlocal`.
"""

import ml_collections

from configs import common

# The default benchmark's eight text tasks, in a fixed order.
TASKS = ["sentiment", "subjectivity", "party", "debate_role",
         "moral_foundation", "word_domain", "word_valence", "concreteness"]


def get_config(arg=None):
  """The exssnet config; see the module docstring for `arg`."""
  args = common.parse_arg(arg, ("runlocal",), "runlocal")
  c = ml_collections.ConfigDict()
  c.job = "exssnet"
  c.model = "minilm"
  c.num_layers = 6          # frozen: only its pooled features are used
  c.tasks = list(TASKS)     # the task order
  c.heads = ml_collections.ConfigDict(dict(kind="zeroshot", scale=100.0))
  # Pooled features of the first `limits` examples of each split, embedded
  # once in batches of fixed shape.
  c.features = ml_collections.ConfigDict(dict(
      batch_size=64, max_len=32,
      limits=ml_collections.ConfigDict(dict(train=1000, test=384))))
  # The masked network: features -> hidden (ReLU) -> encoder width, no
  # biases, signed-constant weights; each mask keeps `density` of every
  # layer (the code's text default is 0.1).
  c.hidden = (1024,)
  c.density = 0.1
  c.batch_size = 32
  c.mask = ml_collections.ConfigDict(dict(steps=150, lr=1e-2))
  c.weights = ml_collections.ConfigDict(dict(steps=150, lr=1e-3))
  # KKT: KNN (k neighbours) on `examples` training examples of the new
  # task, 66% neighbours / 34% scored, under each earlier task's mask.
  c.knn = ml_collections.ConfigDict(dict(k=15, examples=200))
  c.methods = [
      dict(label="sequential FT", method="finetune"),
      dict(label="SupSup", method="supsup", kkt=""),
      dict(label="SSNeT (non-exclusive)", method="ssnet", kkt=""),
      dict(label="ExSSNeT w/o KKT", method="exssnet", kkt=""),
      dict(label="ExSSNeT", method="exssnet", kkt="best"),
  ]
  # Weight/score init and batch order; rows are means over the seeds
  # (`avg_sd`: the standard deviation of `avg` over them).
  c.seeds = (0, 1, 2)

  if "runlocal" in args:
    c.num_layers = 1
    c.tasks = ["word_valence", "concreteness"]  # 2 classes: one prompt shape
    c.features.update(batch_size=16)
    c.features.limits.update(train=32, test=16)
    c.hidden = (32,)
    c.batch_size = 8
    c.mask.update(steps=2)
    c.weights.update(steps=2)
    c.knn.update(k=3, examples=16)
    c.seeds = (0,)
  return c
