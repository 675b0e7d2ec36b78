"""OT fusion benchmark: small BERTs from different random inits, fused.

Transformer fusion with optimal transport (Imfeld et al., ICLR 2024) in
the paper's setting, offline: two parents trained from different seeds on
one text-suite task, fused by vanilla averaging and by OT (hard and soft
alignment), and fused into a narrower anchor (heterogeneous fusion); each
one-shot and after a short fine-tune (`mtmerge.fusion.ot_bench`).

Local (2-core CPU, a few minutes):
  python -m mtmerge.main --config configs/ot_fusion.py --workdir /tmp/otf
Seconds-long variant used by the tests:
  python -m mtmerge.main --config configs/ot_fusion.py:runlocal --workdir /tmp/x
Arguments after `:` are comma-separated: `runlocal`, `task=NAME`,
`descriptors=acts|weights`, `reg=FLOAT`.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, ("runlocal", "task", "descriptors", "reg"),
                          "runlocal, task=NAME, descriptors=acts|weights, "
                          "reg=FLOAT")
  c = ml_collections.ConfigDict()
  c.job = "ot_fusion"
  c.task = args.get("task", "subjectivity")
  c.max_len = 32
  c.limits = dict(train=None, test=None)
  c.model = dict(layers=2, heads=4, hidden=64, ffn=128, narrow_hidden=32,
                 narrow_ffn=64)
  c.seeds = [0, 1]
  c.narrow_seed = 2
  c.train = dict(steps=600, lr=1e-3, batch=32)
  c.finetune = dict(steps=100, lr=3e-4, batch=32)
  # Soft alignment's Sinkhorn regularization is relative to the largest
  # cost (the official config: 0.06 for weights, 0.08 for activations);
  # activations come from the first `samples` training examples.
  c.fusion = dict(descriptors=args.get("descriptors", "acts"),
                  reg=float(args.get("reg", 0.08)), samples=64,
                  residual="mean")
  if "runlocal" in args:
    c.max_len = 16
    c.limits = dict(train=128, test=64)
    c.model = dict(layers=1, heads=2, hidden=16, ffn=32, narrow_hidden=8,
                   narrow_ffn=16)
    # Equal settings: one compiled train step per width serves both.
    c.train = c.finetune = dict(steps=2, lr=1e-3, batch=16)
    c.fusion.samples = 8
  return c
