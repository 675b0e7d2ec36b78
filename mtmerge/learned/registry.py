"""Learned merge methods by name, with their hyperparameters checked.

Every learned method is a function `fn(problem, **hyperparameters)` (see
`problem.MergeProblem`) returning a `common.LearnedResult`. Configs name
them like training-free methods, `"adamerging(granularity='layer')"`; the
run-time arguments (`train_config`, `mesh`, `rules`, `workdir`,
`progress`) are supplied by the caller and are not hyperparameters.
Modules are imported on first use.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from mtmerge.learned import common

_METHODS = {
    "adamerging": "adamerging:adamerging",
    "atlas": "atlas:atlas",
    "concrete_task_arithmetic": "concrete:concrete_task_arithmetic",
    "concrete_adamerging": "concrete:concrete_adamerging",
    "twin_merging": "twin:twin_merging",
    "skill_localization": "skill:skill_localization",
    "fisher_merging": "fisher:fisher_merging",
    "regmean": "regmean:regmean",
}
RUNTIME = ("train_config", "mesh", "rules", "workdir", "progress")


def names() -> list[str]:
  return sorted(_METHODS)


def get(name: str) -> Callable[..., Any]:
  """The method function; a clear error lists the known learned methods."""
  if name not in _METHODS:
    raise ValueError(f"unknown learned method {name!r}; known: "
                     f"{', '.join(names())}")
  module, fn = _METHODS[name].split(":")
  return getattr(importlib.import_module(f"mtmerge.learned.{module}"), fn)


def hyperparameters(name: str) -> dict[str, Any]:
  """`{name: default}` of the method's hyperparameters."""
  sig = inspect.signature(get(name))
  return {p.name: p.default for p in list(sig.parameters.values())[1:]
          if p.name not in RUNTIME and p.kind in (p.KEYWORD_ONLY,
                                                   p.POSITIONAL_OR_KEYWORD)}


def check(name: str, hparams: dict[str, Any]) -> None:
  """Raises ValueError naming an unknown method or hyperparameter."""
  known = hyperparameters(name)
  unknown = sorted(set(hparams) - set(known))
  if unknown:
    raise ValueError(f"unknown parameter {unknown[0]!r} for learned method "
                     f"{name!r}; it accepts: {', '.join(known)}")


def run(name: str, problem, hparams: dict[str, Any], **runtime) -> Any:
  """Runs learned method `name` on `problem`.

  Args:
    name: a learned method name.
    problem: the `MergeProblem`.
    hparams: its hyperparameters (checked).
    **runtime: `train_config`, `mesh`, `rules`, `workdir`, `progress`;
      those the method does not take (statistics-only methods have no
      training loop) are dropped.

  Returns:
    The method's `LearnedResult`.
  """
  check(name, hparams)
  fn = get(name)
  accepted = inspect.signature(fn).parameters
  extra = {k: v for k, v in runtime.items() if k in accepted and
           v is not None}
  out = fn(problem, **hparams, **extra)
  if not isinstance(out, common.LearnedResult):  # statistics-only methods
    out = common.LearnedResult(out, None, [], {})
  return out
