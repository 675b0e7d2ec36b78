"""`--method` names: mtmerge's own, and mergekit's where they mean the same.

mergekit (Goddard et al. 2024, "Arcee's MergeKit") names its methods
`linear`, `ties`, `dare_ties`, ... Its `linear` with equal weights is
mtmerge's `weight_averaging`, and its `ties` is `ties_merging` per tensor
with the disjoint mean over agreeing tasks, a zero sign vote counted as
positive, lambda 1 and mergekit's top-k count `max(1, int(density * n))`
(`count='floor'`; its `density` defaults to 1: nothing trimmed). Where
mergekit's name is also mtmerge's, mtmerge's method runs. mergekit's DARE
and DELLA variants rescale the kept entries to each tensor's L1 norm, not by
1/(1-p), so `dare_linear`, `della_linear` (and `breadcrumbs_ties`, which
elects signs) are refused with the nearest mtmerge method named.
"""

from __future__ import annotations

import difflib
import textwrap
from typing import Any

# mergekit method name -> (mtmerge method, presets). Presets are defaults
# that --param may still override; mergekit's `density` and `lambda` are
# read as `threshold` and `scaling_factor`.
MERGEKIT = {
    "linear": ("weight_averaging", {}),
    "ties": ("ties_merging", {"scope": "per_tensor", "merge_func": "mean",
                              "zero_sign": "positive", "sign_method": "sum",
                              "scaling_factor": 1.0, "threshold": 1.0,
                              "count": "floor"}),
}
_MERGEKIT_PARAMS = {"density": "threshold", "lambda": "scaling_factor"}
# mergekit names with no exact counterpart: name -> (nearest, why not).
MERGEKIT_UNMATCHED = {
    "dare_linear": ("dare", "mergekit rescales the kept entries to each "
                    "tensor's L1 norm, mtmerge by 1/(1-drop_rate)"),
    "della_linear": ("della", "mergekit rescales the kept entries to each "
                     "tensor's L1 norm and elects no sign"),
    "breadcrumbs_ties": ("breadcrumbs", "mtmerge's Breadcrumbs elects no "
                         "sign"),
}
# mergekit names that are also mtmerge's: mtmerge's method and defaults run.
MERGEKIT_SAME_NAME = {
    "task_arithmetic": "mergekit's with unit weights is scaling_factor=1.0",
    "slerp": "as mergekit", "model_stock": "as mergekit",
    "breadcrumbs": "mergekit's is scope='per_tensor', scaling_factor=1.0",
    "dare_ties": "mergekit rescales to each tensor's L1 norm, mtmerge by "
                 "1/(1-drop_rate)",
    "della": "mergekit rescales to each tensor's L1 norm",
}


def help_lines() -> list[str]:
  """The mergekit names, for `mtmerge merge --help`."""
  lines = ["mergekit method names (density= and lambda= are read as "
           "threshold= and scaling_factor=):"]
  for alias, (name, preset) in MERGEKIT.items():
    params = ", ".join(f"{k}={v!r}" for k, v in preset.items())
    lines += textwrap.wrap(f"{alias} = {name}" + (f"({params})" if params
                                                   else ""), 78,
                           initial_indent="  ", subsequent_indent=" " * 6)
  lines += textwrap.wrap(
      "(mtmerge merge --config merge.yml reads mergekit's YAML files, all "
      "of these methods included)", 78, initial_indent=" " * 6,
      subsequent_indent=" " * 6)
  for alias, why in MERGEKIT_SAME_NAME.items():
    lines += textwrap.wrap(f"{alias}: mtmerge's method ({why})", 78,
                           initial_indent="  ", subsequent_indent=" " * 6)
  for alias, (near, why) in MERGEKIT_UNMATCHED.items():
    lines += textwrap.wrap(f"{alias}: refused, no exact counterpart ({why}); "
                           f"nearest: {near}", 78, initial_indent="  ",
                           subsequent_indent=" " * 6)
  return lines


def resolve(name: str, hparams: dict[str, Any]
            ) -> tuple[str, dict[str, Any]]:
  """mtmerge's method and parameters for a `--method` name.

  Args:
    name: an mtmerge method or a mergekit name in `MERGEKIT`.
    hparams: the `--param` values.

  Returns:
    `(method, hparams)`, an alias's presets under the given values.

  Raises:
    ValueError: an unknown name (naming the closest known one), or a
      mergekit name without an exact counterpart.
  """
  from mtmerge import methods  # local: imports JAX
  known = methods.names()
  if name in known:
    return name, hparams
  if name in MERGEKIT:
    target, preset = MERGEKIT[name]
    given = {_MERGEKIT_PARAMS.get(k, k): v for k, v in hparams.items()}
    if len(given) < len(hparams):
      raise ValueError(f"a parameter is given twice (as {name!r} reads "
                       f"{_MERGEKIT_PARAMS})")
    return target, {**preset, **given}
  if name in MERGEKIT_UNMATCHED:
    near, why = MERGEKIT_UNMATCHED[name]
    raise ValueError(f"mergekit's method {name!r} has no exact counterpart in "
                     f"mtmerge ({why}); the nearest is {near!r}")
  close = difflib.get_close_matches(
      name, known + list(MERGEKIT) + list(MERGEKIT_UNMATCHED), n=1,
      cutoff=0.5)
  hint = f"; did you mean {close[0]!r}?" if close else ""
  raise ValueError(f"unknown method {name!r}{hint} (see 'mtmerge merge "
                   "--help')")
