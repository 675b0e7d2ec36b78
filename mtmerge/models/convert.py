"""Weight import as a pure name/shape mapping: external key -> Flax path.

A converter is a list of `Rule`s. Each external key (Hugging Face or
open_clip name) must match exactly one rule's regex (first match wins); the
rule's template, with the regex's groups substituted, gives the `/`-joined
path in the Flax parameter tree, and its optional transform reshapes the
array (e.g. a PyTorch `Linear.weight [out, in]` becomes a Flax
`kernel [in, out]`). `convert` then checks the result against the target
model's parameter shapes and reports every problem by name in one error:
external keys no rule maps, keys mapped twice, Flax paths left missing,
shape mismatches.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


class ConversionError(ValueError):
  """A checkpoint's keys or shapes do not fit the target model."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """`pattern` (full match on the external key) -> `target` (Flax path).

  `target` uses `re` replacement syntax (`\\1`, `\\g<name>`).
  """
  pattern: str
  target: str
  transform: Transform | None = None


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight `[out, in]` -> Flax Dense kernel `[in, out]`."""
  return np.ascontiguousarray(w.T)


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """PyTorch Conv2d weight `[O, I, H, W]` -> Flax Conv kernel `[H, W, I, O]`."""
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def _first(items: Sequence[str], n: int = 8) -> str:
  shown = ", ".join(items[:n])
  return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def convert(source: Mapping[str, np.ndarray],
            rules: Iterable[Rule],
            target_shapes: Mapping[str, tuple[int, ...]] | None = None,
            *,
            ignore: Iterable[str] = (),
            what: str = "checkpoint") -> dict[str, np.ndarray]:
  """Maps external tensors onto Flax paths.

  Args:
    source: external key -> array (e.g. from `safetensors.numpy.load_file`).
    rules: the converter's rules; first full match wins.
    target_shapes: Flax path -> expected shape (e.g. from `nnx.eval_shape`).
      When given, every path must be produced with exactly that shape.
    ignore: regexes of external keys to drop silently (buffers such as
      `position_ids`, heads the target model does not have).
    what: names the checkpoint in error messages (usually its file path).

  Returns:
    Flat dict: Flax path -> numpy array.

  Raises:
    ConversionError: listing unmapped keys, duplicate targets, missing
      paths and shape mismatches (the first few of each, by name).
  """
  compiled = [(re.compile(r.pattern), r) for r in rules]
  ignored = [re.compile(p) for p in ignore]
  out: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  unmapped, dupes, mismatched = [], [], []
  for key, value in source.items():
    if any(p.fullmatch(key) for p in ignored):
      continue
    for pattern, rule in compiled:
      m = pattern.fullmatch(key)
      if m:
        break
    else:
      unmapped.append(key)
      continue
    path = m.expand(rule.target)
    if path in out:
      dupes.append(f"{key} and {origin[path]} -> {path}")
      continue
    array = np.asarray(value)
    if rule.transform is not None:
      array = rule.transform(array)
    out[path], origin[path] = array, key
  missing = []
  if target_shapes is not None:
    missing = sorted(set(target_shapes) - set(out))
    extra = sorted(set(out) - set(target_shapes))
    unmapped += [f"{origin[p]} (-> {p}, not in the model)" for p in extra]
    for p in sorted(set(out) & set(target_shapes)):
      if tuple(out[p].shape) != tuple(target_shapes[p]):
        mismatched.append(f"{origin[p]} -> {p}: {tuple(out[p].shape)} vs "
                          f"model {tuple(target_shapes[p])}")
  problems = []
  if unmapped:
    problems.append(f"{len(unmapped)} unmapped key(s): {_first(unmapped)}")
  if dupes:
    problems.append(f"{len(dupes)} key(s) mapped twice: {_first(dupes)}")
  if missing:
    problems.append(f"{len(missing)} model parameter(s) missing: "
                    f"{_first(missing)}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatch(es): "
                    f"{_first(mismatched)}")
  if problems:
    raise ConversionError(f"{what} does not match the model: " +
                          "; ".join(problems))
  return out
