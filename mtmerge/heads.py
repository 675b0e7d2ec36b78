"""Per-task classification heads: frozen zero-shot heads or linear probes.

The papers' protocol (Ilharco et al. 2023, "Editing Models with Task
Arithmetic"; TIES, AdaMerging, TALL masks and aTLAS all follow it): each
task's head is built ONCE from the pretrained model by zero-shot
prompting (CLIP's recipe, Radford et al. 2021): class phrases in several
templates are embedded, normalized, averaged and renormalized
(`mtmerge.models.zeroshot.build_head`). The encoder is fine-tuned against
that frozen head, and merged models are evaluated with the same heads, so
the head never absorbs task knowledge: a task's accuracy moves only with
the encoder, and the interference between task vectors shows.

A zero-shot head is stored as the linear head every other part of the
code uses, `{"kernel": scale * H.T [D, C], "bias": 0}`: encoder features
are unit-norm, so `features @ kernel` is `scale * cos(features, H)`, CLIP's
logits with `scale = exp(logit_scale)`.

`kind="linear_probe"` keeps the earlier protocol (a logistic-regression
head fit on frozen pretrained features, `finetune.linear_probe`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mtmerge import encoders
from mtmerge.data import prompts
from mtmerge.data import suites
from mtmerge.models import zeroshot

KINDS = ("zeroshot", "linear_probe")


def task_prompts(task: suites.TaskSpec, templates=None
                 ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """`(class phrases, templates)` for a task's zero-shot head.

  Args:
    task: the task.
    templates: templates to use instead of the task's own.
  """
  if task.modality == "text":
    names, own = prompts.text_prompts(task.name)
  else:
    names = (zeroshot.CLASSNAMES.get(task.name) or tuple(
        zeroshot.clean_classname(n) for n in suites.class_names(task)))
    own = zeroshot.TEMPLATES.get(task.name, zeroshot.TEMPLATES["sun397"])
  templates = tuple(templates or own)
  bad = [t for t in templates if t.count("{}") != 1]
  if bad:
    raise ValueError(f"task {task.name!r}: template {bad[0]!r} must format "
                     "the class name exactly once (one '{}')")
  if len(names) != task.num_classes:
    raise ValueError(f"task {task.name!r} has {task.num_classes} classes but "
                     f"{len(names)} class phrases {names}")
  return tuple(names), templates


def text_embedder(encoder: encoders.Encoder, max_len: int = 32):
  """`(encode, tokenize)` for prompts, with the pretrained weights.

  `encode(input_ids, attention_mask) -> [B, D]`, `tokenize(texts) -> dict`.
  For a text encoder (MiniLM) the prompts go through the encoder itself;
  an image encoder needs its text tower (an `embed_text` pair).
  """
  if encoder.modality == "text":
    fn = jax.jit(encoder.features)
    return (lambda ids, mask: fn(encoder.params, {
        "input_ids": ids, "attention_mask": mask})), (
            lambda texts: encoder.tokenizer(texts, max_length=max_len,
                                            pad_to_multiple_of=16))
  embed = getattr(encoder, "embed_text", None)
  if embed is None:
    raise ValueError(f"encoder {encoder.name!r} ({encoder.modality}) has no "
                     "text tower for zero-shot heads; use "
                     "heads.kind='linear_probe'")
  return embed


def zeroshot_head(encoder: encoders.Encoder, task: Any, scale: float = 100.0,
                  templates=None) -> dict[str, np.ndarray]:
  """The frozen zero-shot head of `task` as a linear head.

  Args:
    encoder: the pretrained encoder (its features are unit-norm).
    task: task name or TaskSpec.
    scale: logit scale; None: the encoder's own (`Encoder.logit_scale`,
      CLIP's `exp(logit_scale)`), else 100.
    templates: prompt templates overriding the task's own.

  Returns:
    `{"kernel": [D, C] float32, "bias": [C] zeros}`.
  """
  task = suites.get_task(task)
  names, templates = task_prompts(task, templates)
  if scale is None:
    scale = getattr(encoder, "logit_scale", None) or 100.0
  encode, tokenize = text_embedder(encoder)
  h = np.asarray(zeroshot.build_head(encode, tokenize, names, templates))
  return {"kernel": (float(scale) * h.T).astype(np.float32),
          "bias": np.zeros((len(names),), np.float32)}


def build(encoder: encoders.Encoder, task: Any, config: Any,
          workdir: str) -> dict[str, np.ndarray]:
  """A task's frozen head by `config.kind` (see the module docstring).

  Args:
    encoder: the pretrained encoder.
    task: task name or TaskSpec.
    config: `kind` (zeroshot | linear_probe), `scale` and `templates`
      (zeroshot), `probe` (the linear probe's fields,
      `finetune.linear_probe`).
    workdir: cache root of linear probes.
  """
  from mtmerge import finetune  # local: finetune imports this module
  kind = config.get("kind", "zeroshot")
  if kind == "zeroshot":
    head = zeroshot_head(encoder, task, config.get("scale", 100.0),
                         config.get("templates"))
  elif kind == "linear_probe":
    head = finetune.linear_probe(encoder, task, config.probe, workdir)
  else:
    raise ValueError(f"heads.kind must be one of {KINDS}, got {kind!r}")
  check(head, suites.get_task(task), encoder.dim)
  return head


def check(head: dict, task: suites.TaskSpec, dim: int | None) -> None:
  """Refuses a head whose shape does not fit the task and the encoder."""
  shape = tuple(np.shape(head.get("kernel")))
  want = (dim, task.num_classes) if dim else (shape[0], task.num_classes)
  if shape != want:
    raise ValueError(f"head for task {task.name!r} has kernel shape {shape}, "
                     f"need {want} ([features, classes])")


def digest(head: dict) -> str:
  """A short hash of a head (part of fine-tuning checkpoint fingerprints)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for k in sorted(head):
    h.update(np.ascontiguousarray(np.asarray(head[k], np.float32)).tobytes())
  return h.hexdigest()[:16]
