"""Modelpool: published task checkpoints instead of fine-tuning.

FusionBench (Tang et al. 2024, "FusionBench: A Comprehensive Benchmark of
Deep Model Fusion") publishes the CLIP-ViT models of the task-arithmetic
benchmark (Ilharco et al. 2023) fine-tuned per task, e.g.
`tanganke/clip-vit-base-patch32_<task>`: Hugging Face `CLIPVisionModel`
checkpoints of the vision tower, fine-tuned against frozen zero-shot heads
from the pretrained `openai/clip-vit-base-patch32`. With
`config.task_models` the benchmark reads them as its tuned models (their
differences to the pretrained vision tower are the task vectors) and skips
fine-tuning.

`config.task_models` is a mapping `task -> repository or directory`, or a
format string with `{task}` (e.g. `"org/model_{task}"`). Repositories are
read from the Hugging Face cache (`mtmerge.models.hub.snapshot`; with
`HF_HUB_OFFLINE=1` nothing is downloaded).

Every check here raises `ValueError` with one line naming the repository,
the task or the dataset, so the benchmark stops before long work:
`check_sources` (every task is registered; the model, every task
checkpoint and every dataset exist, in that order) and `load` (each checkpoint's parameter paths and shapes
fit the encoder's fine-tuned part).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from mtmerge import encoders
from mtmerge import tree as tree_lib
from mtmerge.data import suites


def repositories(config: Any, tasks: Sequence[Any]) -> dict[str, str]:
  """`{task: repository}` from `config.task_models` ({} when unset)."""
  spec = config.get("task_models")
  if not spec:
    return {}
  names = [suites.get_task(t).name for t in tasks]
  if isinstance(spec, str):
    if "{task}" not in spec:
      raise ValueError(f"config.task_models {spec!r} must contain '{{task}}' "
                       "(or be a mapping task -> repository)")
    return {t: spec.format(task=t) for t in names}
  spec = dict(spec)
  missing = [t for t in names if t not in spec]
  if missing:
    raise ValueError(f"config.task_models has no checkpoint for task(s) "
                     f"{missing}; it names {sorted(spec)}")
  return {t: str(spec[t]) for t in names}


def check_sources(config: Any) -> None:
  """Every task is registered; the model, every task checkpoint and every
  dataset exist.

  Cheap (no weights are read): run before any long work.

  Raises:
    ValueError: one line naming the unregistered tasks, or the first
      missing repository or dataset.
  """
  from mtmerge.models import hub  # pylint: disable=g-import-not-at-top
  unknown = [str(t) for t in config.tasks if not _registered(t)]
  if unknown:
    raise ValueError(f"config.tasks: {len(unknown)} task(s) not in any suite "
                     f"of mtmerge.data.suites: {', '.join(unknown)} (known "
                     f"tasks: {', '.join(suites.task_names())})")
  tasks = [suites.get_task(t) for t in config.tasks]
  repos = repositories(config, tasks)
  if repos and config.finetune.get("mode", "standard") != "standard":
    raise ValueError("config.task_models are standard fine-tuned checkpoints;"
                     f" finetune.mode={config.finetune.mode!r} needs "
                     "fine-tuning (drop task_models)")
  path = hub.local_dir(config.model)
  image = any(suites.get_task(t).modality == "image" for t in tasks)
  if (image and config.heads.get("kind") == "zeroshot" and
      not os.path.isfile(os.path.join(path, "tokenizer.json"))):
    raise ValueError(f"model {config.model!r} ({path}) has no tokenizer.json"
                     ", which zero-shot heads need for its text tower")
  _check_weights(f"model {config.model!r}", path)
  for task, repo in repos.items():
    try:
      _check_weights(f"task model {repo!r} (task {task!r})",
                     hub.local_dir(repo))
    except ValueError as e:
      raise ValueError(f"task model for {task!r}: {e}") from None
  for t in tasks:
    t = suites.get_task(t)
    if t.offline:
      continue  # prepared from installed packages on first use
    for split in suites.SPLITS:
      try:
        suites.load_split(t, split)
      except (FileNotFoundError, ImportError) as e:
        raise ValueError(str(e).splitlines()[0]) from None
      except Exception as e:  # pylint: disable=broad-except
        # e.g. TFDS's DatasetNotFoundError for a name not in its catalog.
        raise ValueError(f"task {t.name!r}: TFDS dataset {t.tfds_name!r} "
                         f"cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})"
                         ) from None


def _registered(name: Any) -> bool:
  try:
    suites.get_task(name)  # suite-qualified or TFDS name
    return True
  except KeyError:
    return False


def _check_weights(what: str, path: str) -> None:
  names = ("model.safetensors", "model.safetensors.index.json")
  if not any(os.path.isfile(os.path.join(path, n)) for n in names):
    raise ValueError(f"{what} at {path} has no model.safetensors (PyTorch "
                     ".bin weights are not read; download the safetensors "
                     "files)")


def load(config: Any, encoder: encoders.Encoder, tasks: Sequence[Any],
         trainable: str) -> list[dict] | None:
  """The task checkpoints' `trainable` params, in task order (None: unset).

  Args:
    config: the benchmark config (`task_models`).
    encoder: the pretrained encoder (the paths and shapes to match).
    tasks: task names or TaskSpecs.
    trainable: regex of the merged paths (e.g. `vision/.*`); a checkpoint
      must hold every one of them with the pretrained shape (it may hold
      more, e.g. a projection, which stays pretrained).

  Raises:
    ValueError: a checkpoint that does not load or does not fit, naming it.
  """
  from mtmerge import models  # pylint: disable=g-import-not-at-top
  repos = repositories(config, tasks)
  if not repos:
    return None
  want, _ = encoders.split(encoder.params, trainable)
  out = []
  for task, repo in repos.items():
    what = f"task model {repo!r} (task {task!r})"
    try:
      model, _ = models.load(repo)
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"{what}: {str(e).splitlines()[0]}") from None
    _, params = models.split_params(model)
    got = tree_lib.to_flat_dict(encoders.canonical(params))
    _check_fits(what, encoder.name, want, got)
    out.append(tree_lib.from_flat_dict(
        {k: np.asarray(got[k], np.asarray(want[k]).dtype) for k in want}))
  return out


def _check_fits(what: str, model: str, want: Mapping[str, Any],
                got: Mapping[str, Any]) -> None:
  missing = sorted(set(want) - set(got))
  bad = [f"{k} {tuple(np.shape(got[k]))} vs {tuple(np.shape(want[k]))}"
         for k in sorted(set(want) & set(got))
         if tuple(np.shape(got[k])) != tuple(np.shape(want[k]))]
  problems = []
  if missing:
    problems.append(f"{len(missing)} of the merged parameters missing "
                    f"({', '.join(missing[:4])})")
  if bad:
    problems.append(f"{len(bad)} shape mismatch(es) ({', '.join(bad[:4])})")
  if problems:
    raise ValueError(f"{what} does not match the model {model!r}: "
                     + "; ".join(problems))
