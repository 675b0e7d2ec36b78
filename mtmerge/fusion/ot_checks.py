"""Checks that transformers can be fused by `mtmerge.fusion.ot_fusion`.

OT fusion (Imfeld et al., ICLR 2024) aligns neurons, never layers, heads
or input vocabularies: parents must share their depth, head count,
vocabulary, position and token-type tables and classifier classes, while
widths (hidden size, MLP size, head size) may differ. Every violation is
one `FusionError` line naming the problem and the models' values.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from mtmerge import tree as tree_lib

Params = dict[str, Any]
EMBEDDINGS = ("word", "position", "token_type")


class FusionError(ValueError):
  """Parents that cannot be aligned (one line naming the problem)."""


def describe(params: Params, num_heads: int, name: str = "model") -> dict:
  """Shape facts of a BERT param tree, validated.

  Args:
    params: BERT encoder params (nested or flat `/`-joined dict), with an
      optional `head/{kernel,bias}`.
    num_heads: attention heads.
    name: how errors name this model.

  Returns:
    `{layers, hidden, ffn, heads, vocab, positions, types, classes}`.

  Raises:
    FusionError: missing or unexpected parameters, or a hidden size that
      the heads do not divide.
  """
  flat = tree_lib.to_flat_dict(params)
  ids = {int(m.group(1)) for k in flat if (m := re.match(r"layers/(\d+)/", k))}
  depth = max(ids) + 1 if ids else 0
  if "embeddings/word/embedding" not in flat:
    raise FusionError(f"{name} has no embeddings/word/embedding (not a BERT "
                      "param tree)")
  want = {f"embeddings/{e}/embedding" for e in EMBEDDINGS} | {
      "embeddings/norm/scale", "embeddings/norm/bias"}
  for i in range(depth):
    for p in ("attention/query", "attention/key", "attention/value",
              "attention/out", "mlp/intermediate", "mlp/output"):
      want |= {f"layers/{i}/{p}/kernel", f"layers/{i}/{p}/bias"}
    for p in ("attention_norm", "mlp_norm"):
      want |= {f"layers/{i}/{p}/scale", f"layers/{i}/{p}/bias"}
  head = {"head/kernel", "head/bias"} & set(flat)
  if set(flat) - head != want or len(head) == 1:
    bad = sorted(set(flat) ^ (want | head))
    raise FusionError(f"{name} is not a {depth}-layer BERT param tree: "
                      f"missing or unexpected {bad[:4]}")
  vocab, hidden = np.shape(flat["embeddings/word/embedding"])
  if hidden % num_heads:
    raise FusionError(f"{name}: hidden size {hidden} is not divisible by its "
                      f"{num_heads} heads")
  return dict(layers=depth, hidden=hidden, heads=num_heads, vocab=vocab,
              ffn=np.shape(flat["layers/0/mlp/intermediate/kernel"])[1]
              if depth else 0,
              positions=np.shape(flat["embeddings/position/embedding"])[0],
              types=np.shape(flat["embeddings/token_type/embedding"])[0],
              classes=np.shape(flat["head/kernel"])[1] if head else None)


def check_compatible(models: Sequence[Params],
                     num_heads: int | Sequence[int]) -> list[dict]:
  """Validates that `models` can be fused; returns `describe` of each.

  Raises:
    FusionError: fewer than two models, or differing depths, head counts,
      vocabularies, position tables, token types or classifier heads.
  """
  if len(models) < 2:
    raise FusionError(f"fusion needs at least two models, got {len(models)}")
  heads = ([num_heads] * len(models) if np.ndim(num_heads) == 0
           else list(num_heads))
  if len(heads) != len(models):
    raise FusionError(f"{len(heads)} head counts for {len(models)} models")
  info = [describe(m, h, f"model {i}") for i, (m, h) in
          enumerate(zip(models, heads))]
  for key, what in (("layers", "depths (layers)"), ("heads", "head counts"),
                    ("vocab", "vocabulary sizes"),
                    ("positions", "position tables"),
                    ("types", "token-type tables"),
                    ("classes", "classifier heads (classes)")):
    vals = [d[key] for d in info]
    if len(set(vals)) > 1:
      raise FusionError(f"cannot fuse: {what} differ across models: {vals}")
  return info
