"""Eager validators for method hyperparameters (one clear line each).

They run in `MethodSpec.check`, before any JAX work, on concrete Python
values from the CLI, a config or a notebook.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence


def _num(name: str, value: Any) -> float:
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a number, got {value!r}")
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number, got {value!r}") from None
  if not math.isfinite(x):
    raise ValueError(f"{name} must be finite, got {value!r}")
  return x


def fraction(name: str, allow_zero: bool = False) -> Callable[[Any], None]:
  """A fraction in (0, 1] (or [0, 1) with `allow_zero`, e.g. a drop rate)."""
  def check(value):
    x = _num(name, value)
    ok = (0.0 <= x < 1.0) if allow_zero else (0.0 < x <= 1.0)
    if not ok:
      rng = "[0, 1)" if allow_zero else "(0, 1]"
      raise ValueError(f"{name} must be in {rng}, got {value!r}")
  return check


def number(name: str, lo: float | None = None, hi: float | None = None
           ) -> Callable[[Any], None]:
  """A finite number, optionally within [lo, hi]."""
  def check(value):
    x = _num(name, value)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
      raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
  return check


def coeff(name: str, per_task: bool = False) -> Callable[[Any], None]:
  """A finite number, or (with `per_task`) a list of finite numbers."""
  def check(value):
    if isinstance(value, (list, tuple)):
      if not per_task:
        raise ValueError(f"{name} must be a single number, got {value!r}")
      for x in value:
        _num(name, x)
    else:
      _num(name, value)
  return check


def integer(name: str, lo: int | None = None) -> Callable[[Any], None]:
  def check(value):
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"{name} must be an integer, got {value!r}")
    if lo is not None and value < lo:
      raise ValueError(f"{name} must be >= {lo}, got {value!r}")
  return check


def choice(name: str, options: Sequence[str]) -> Callable[[Any], None]:
  def check(value):
    if value not in options:
      raise ValueError(f"{name} must be one of {', '.join(options)}; got "
                       f"{value!r}")
  return check
