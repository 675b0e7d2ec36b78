"""OT fusion benchmark: independently trained small BERTs, fused.

The setting of Imfeld et al. (ICLR 2024, "Transformer Fusion with Optimal
Transport"), offline and CPU-sized: parents with the same architecture,
trained from different random initializations (and data orders) on the
same task of the offline text suite, then

* homogeneous fusion: vanilla averaging of the two parents against OT
  fusion (anchor: the first parent) with hard alignment and with soft
  alignment from weights and from activations, the Sinkhorn entropy of
  each picked from a grid by one-shot validation accuracy;
* heterogeneous fusion: the same parents fused into a narrower, separately
  trained anchor (OT fusion compresses), against the naive baseline of
  averaging the parents' leading neurons with the anchor;

every model evaluated one-shot and after a short fine-tune with the one
trainer (`mtmerge.train.fit`; parents get the same extra steps, so the
comparison is at equal compute). Writes `results.json` and `results.txt`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtmerge import results
from mtmerge import train
from mtmerge import tree as tree_lib
from mtmerge.data import suites
from mtmerge.fusion import ot_fusion
from mtmerge.fusion import ot_model
from mtmerge.models import bert


def load_data(task: str, max_len: int, limits: dict) -> tuple[dict, int, int]:
  """Tokenized splits with a compact vocabulary (the train split's tokens).

  Returns:
    `({split: {ids, mask, label}}, vocab size, classes)`; tokens unseen in
    train map to `[UNK]`.
  """
  from mtmerge.models import hub  # local: tokenizers
  from mtmerge.models import tokenizer as tokenizer_lib
  from mtmerge.data import pipeline
  tok = tokenizer_lib.Tokenizer(os.path.join(hub.local_dir("minilm"),
                                             "tokenizer.json"))
  spec = suites.get_task(task)
  raw = {}
  for split in ("train", "validation", "test"):
    src = suites.load_split(spec, split)
    n = min(len(src), limits.get(split) or len(src))
    rows = [src[i] for i in range(n)]
    out = tok([pipeline.as_text(r["text"]) for r in rows], max_length=max_len,
              pad_to_multiple_of=max_len)
    raw[split] = dict(ids=out["input_ids"], mask=out["attention_mask"],
                      label=np.asarray([r["label"] for r in rows], np.int32))
  special = [tok.pad_id, 100, 101, 102]  # [PAD] [UNK] [CLS] [SEP]
  keep = np.unique(np.concatenate([special, raw["train"]["ids"].ravel()]))
  table = np.full(max(tok.vocab_size, int(keep.max()) + 1),
                  int(np.searchsorted(keep, 100)), np.int32)
  table[keep] = np.arange(len(keep))
  for d in raw.values():
    d["ids"] = table[d["ids"]]
  return raw, len(keep), spec.num_classes


_LOSSES = {}


def _loss(num_heads):
  """One loss function per head count, so the trainer's step cache hits."""
  if num_heads not in _LOSSES:
    def loss(p, consts, batch, rng):
      del consts, rng
      logits = ot_model.forward(p, batch["ids"], batch["mask"], num_heads)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           batch["label"])
      acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
      return ce.mean(), {"accuracy": acc}
    _LOSSES[num_heads] = loss
  return _LOSSES[num_heads]


def fit(params, data, num_heads, cfg, seed) -> dict:
  """Trains all params with `train.fit`; `seed` draws the batches.

  The trainer's own seed stays 0 (the loss uses no randomness), so runs
  with equal shapes and optimizer settings share one compiled step.
  """
  if not int(cfg.steps):
    return params
  n = len(data["label"])
  bs = int(cfg.batch)

  def batches(step):
    idx = np.random.default_rng([seed, step]).choice(n, bs, replace=False)
    return {k: v[idx] for k, v in data.items()}
  tcfg = train.TrainConfig(steps=int(cfg.steps), lr=float(cfg.lr),
                           optimizer="adamw", weight_decay=0.01,
                           clip_norm=1.0, seed=0, log_every=50)
  out = train.fit(train.Objective(params, _loss(num_heads)), batches, tcfg,
                  progress=False, desc=f"seed {seed}")
  return {k: np.asarray(v) for k, v in out.params.items()}


def run(config, workdir: str) -> list[dict[str, Any]]:
  """Trains the parents, fuses them, fine-tunes, writes the results table.

  Args:
    config: see `configs/ot_fusion.py`.
    workdir: output directory (results.json, results.txt).

  Returns:
    One row per (setting, model): one-shot and fine-tuned test accuracy.
  """
  t0 = time.time()
  data, vocab, classes = load_data(config.task, config.max_len,
                                   dict(config.limits))
  m = config.model
  mk = lambda hidden, ffn: bert.BertConfig(
      vocab_size=vocab, hidden_size=hidden, num_hidden_layers=m.layers,
      num_attention_heads=m.heads, intermediate_size=ffn,
      max_position_embeddings=config.max_len,
      initializer_range=m.init_scale)
  wide, narrow = mk(m.hidden, m.ffn), mk(m.narrow_hidden, m.narrow_ffn)
  heads = m.heads
  print(f"task {config.task}: {len(data['train']['label'])} train / "
        f"{len(data['validation']['label'])} validation / "
        f"{len(data['test']['label'])} test, vocab {vocab}; parents "
        f"{m.layers} layers x {m.hidden} wide, narrow anchor "
        f"{m.narrow_hidden}", flush=True)
  acc = lambda p, split="test": ot_model.accuracy(p, data[split], heads)
  parents = [fit(ot_model.init(wide, classes, s), data["train"], heads,
                 config.train, s) for s in config.seeds]
  anchor = fit(ot_model.init(narrow, classes, config.narrow_seed),
               data["train"], heads, config.train, config.narrow_seed)
  fz = config.fusion
  acts = [ot_model.activations(p, data["train"], heads, fz.samples)
          for p in [anchor, *parents]]  # the anchor's first
  flat = lambda t: {k: np.asarray(v) for k, v in
                    tree_lib.to_flat_dict(t).items()}

  def ot_rows(models, model_acts):
    """Hard (weights) and soft (weights, acts) fusion; soft's entropy is
    picked from `fz.regs` by one-shot validation accuracy."""
    out = [("OT hard (weights)", 0.0, flat(ot_fusion.fuse(
        models, heads, residual=fz.residual)))]
    for name, a in (("weights", None), ("acts", model_acts)):
      cands = [(r, flat(ot_fusion.fuse(models, heads, reg=r, acts=a,
                                       residual=fz.residual)))
               for r in fz.regs]
      reg, p = max(cands, key=lambda c: acc(c[1], "validation"))
      out.append((f"OT soft ({name})", reg, p))
    return out
  settings = {
      "homogeneous": [
          ("parent 0", None, parents[0]), ("parent 1", None, parents[1]),
          ("vanilla average", None, flat(ot_fusion.vanilla_average(parents))),
          *ot_rows(parents, acts[1:])],
      "heterogeneous": [
          ("narrow anchor", None, anchor),
          ("vanilla (leading neurons)", None, flat(ot_fusion.vanilla_average(
              [anchor, *parents]))),
          *ot_rows([anchor, *parents], acts)]}
  rows = []
  for setting, models in settings.items():
    for name, reg, p in models:
      tuned = fit(p, data["train"], heads, config.finetune, 100)
      rows.append(dict(setting=setting, model=name,
                       width=int(p["embeddings/word/embedding"].shape[1]),
                       reg="" if reg is None else reg,
                       one_shot=acc(p), finetuned=acc(tuned)))
      print(f"{setting:13s} {name:26s} one-shot {rows[-1]['one_shot']:.3f} "
            f"fine-tuned {rows[-1]['finetuned']:.3f}", flush=True)
  table = results.format_table(rows, "{:.3f}")
  meta = dict(task=config.task, seconds=round(time.time() - t0, 1),
              config=config.to_dict(), devices=str(jax.devices()[0]))
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    results.write_json(os.path.join(workdir, "results.json"),
                       dict(meta=meta, rows=rows))
    results.atomic_write_text(os.path.join(workdir, "results.txt"),
                              table + "\n")
  print(table)
  return rows
