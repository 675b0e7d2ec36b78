r"""The search: a user's task preference and compute budget -> widths.

Aich et al. (ICCV 2023, arXiv:2308.11744; see `mtmerge.controllable.
distill` for the sources) translate the two user constraints, a task
preference vector r (r_t >= 0, sum r_t = 1) and a compute budget c, into
the width configuration of the shared encoder and of every task decoder,
without retraining. Their rule: a more preferred task gets a larger
decoder budget, and the shared encoder is searched, within what the budget
leaves, for the best overall multi-task performance.

Here that rule is one exact constrained maximization over a table
measured once on the validation split after training (`acc[t, e, d]`: task
t's accuracy with encoder width e and its decoder at width d; a task's
prediction depends only on the encoder and its own decoder, so the table
has E x D entries per task, not the whole product space):

  maximize   sum_t r_t acc[t, e, d_t]
  subject to enc_cost[e] + sum_t dec_cost[t, d_t] <= c,
             r_i > r_j  =>  d_i >= d_j   (the paper's ordering rule;
                                          `ordered=False` drops it),

ties broken by lower cost, then by the lexicographically larger
`(e, d in order of decreasing preference)`. The paper's abstract gives the
search by its rule; how it scores encoder candidates was not readable
here, so this version keeps the rule (as the ordering constraint) and
makes "the best encoder for the budget" precise as the exact optimum of
the preference-weighted validation accuracy. Rather than enumerating the
E x D^T configurations, for each encoder width the decoders are chosen by
dynamic programming over the tasks in order of decreasing preference,
keeping per state only the Pareto front of (cost, value) partial choices;
the result is the same optimum (`brute_force` is the enumeration the tests
compare against), with work that grows with the fronts, not with D^T.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Sequence

import numpy as np


class SearchError(ValueError):
  """Bad preference or budget (one line naming it)."""


class Choice(NamedTuple):
  """A searched configuration: encoder width index `e`, decoder width
  indices `ds` (task order), its preference-weighted validation `score`
  and its `cost` (FLOPs)."""
  e: int
  ds: tuple[int, ...]
  score: float
  cost: int


def check_preference(pref, tasks: Sequence[str], what: str = "preference"
                     ) -> np.ndarray:
  """A preference as a float vector in task order, checked.

  Args:
    pref: a sequence of T weights (task order) or a `{task: weight}` dict
      (tasks left out weigh 0).
    tasks: the task names.
    what: how the error message names it.

  Raises:
    SearchError: wrong length, unknown task names, negative or non-finite
      weights, or weights that do not sum to one.
  """
  tasks = list(tasks)
  if isinstance(pref, dict) or hasattr(pref, "items"):
    pref = dict(pref.items())
    unknown = sorted(k for k in pref if k not in tasks)
    if unknown:
      raise SearchError(f"{what}: unknown task(s) {unknown}; tasks are "
                        f"{tasks}")
    vec = [pref.get(t, 0.0) for t in tasks]
  else:
    vec = list(pref)
    if len(vec) != len(tasks):
      raise SearchError(f"{what} has {len(vec)} weights for {len(tasks)} "
                        f"tasks {tasks}")
  try:
    r = np.asarray(vec, np.float64)
  except (TypeError, ValueError):
    raise SearchError(f"{what} must hold numbers, got {vec}") from None
  if not np.all(np.isfinite(r)) or np.any(r < 0):
    raise SearchError(f"{what} weights must be finite and >= 0, got "
                      f"{r.tolist()}")
  if abs(r.sum() - 1.0) > 1e-6:
    raise SearchError(f"{what} must sum to one, got {r.tolist()} (sum "
                      f"{r.sum():.6g})")
  return r


def min_cost(enc_cost: np.ndarray, dec_cost: np.ndarray) -> int:
  """Cost of the smallest configuration (every width at its smallest)."""
  return int(np.min(enc_cost) + np.sum(np.min(dec_cost, axis=1)))


def check_budget(budget: float, enc_cost: np.ndarray, dec_cost: np.ndarray,
                 what: str = "budget") -> float:
  """The budget, or SearchError when not even the smallest configuration
  fits it."""
  b = float(budget)
  low = min_cost(enc_cost, dec_cost)
  if not math.isfinite(b) or b < low:
    raise SearchError(f"{what} {b:.6g} FLOPs is below the smallest "
                      f"configuration's cost {low} FLOPs")
  return b


def _order(pref: np.ndarray) -> list[int]:
  return sorted(range(len(pref)), key=lambda t: -pref[t])  # stable


def _check(pref, acc, enc_cost, dec_cost):
  acc = np.asarray(acc, np.float64)
  enc_cost = np.asarray(enc_cost, np.int64)
  dec_cost = np.asarray(dec_cost, np.int64)
  t, e, d = acc.shape
  if enc_cost.shape != (e,) or dec_cost.shape != (t, d) or len(pref) != t:
    raise SearchError(f"table shapes do not fit: acc {acc.shape}, enc_cost "
                      f"{enc_cost.shape}, dec_cost {dec_cost.shape}, "
                      f"preference {len(pref)}")
  return acc, enc_cost, dec_cost


def _better(a: tuple, b: tuple | None) -> bool:
  """Is candidate `a = (score, cost, key)` preferred to `b`?"""
  return b is None or (a[0], -a[1], a[2]) > (b[0], -b[1], b[2])


def _choice(best, order, num_t: int) -> Choice:
  """`(value, cost, (encoder, decoder widths in `order`))` as a Choice with
  the decoder widths in task order."""
  ds = [0] * num_t
  for t, d in zip(order, best[2][1:]):
    ds[t] = d
  return Choice(best[2][0], tuple(ds), float(best[0]), best[1])


def search(pref: np.ndarray, budget: float, acc: np.ndarray,
           enc_cost: np.ndarray, dec_cost: np.ndarray, *,
           ordered: bool = True) -> Choice:
  """The best configuration for a preference under a budget (exact).

  Args:
    pref: `[T]` preference (`check_preference`).
    budget: FLOPs (`check_budget`).
    acc: `[T, E, D]` validation accuracy of task t at encoder width e and
      decoder width d.
    enc_cost: `[E]` encoder FLOPs per width.
    dec_cost: `[T, D]` decoder FLOPs per task and width.
    ordered: enforce the ordering rule (more preferred -> no narrower
      decoder).

  Returns:
    The `Choice` maximizing the objective of the module docstring.
  """
  pref = np.asarray(pref, np.float64)
  acc, enc_cost, dec_cost = _check(pref, acc, enc_cost, dec_cost)
  budget = check_budget(budget, enc_cost, dec_cost)
  num_t, num_e, num_d = acc.shape
  order = _order(pref)
  # Cheapest completion of the tasks after position i (pruning bound).
  tail = np.concatenate([np.cumsum(np.min(dec_cost[order[::-1]], 1))[::-1],
                         [0]])
  best = None
  for e in range(num_e):
    room = budget - enc_cost[e]
    if room < tail[0]:
      continue
    # state key: (cap on this group's widths, min width in this group);
    # value: Pareto front of (cost, value, choices in processing order).
    states = {(num_d - 1, num_d): [(0, 0.0, ())]}
    for i, t in enumerate(order):
      new_group = i == 0 or pref[t] != pref[order[i - 1]]
      grown: dict[tuple[int, int], list] = {}
      for (cap, gmin), front in states.items():
        if new_group:
          cap, gmin = min(cap, gmin), num_d
        top = cap if ordered else num_d - 1
        for d in range(top + 1):
          c0 = dec_cost[t, d]
          key = (cap, min(gmin, d))
          for cost, value, ch in front:
            cost2 = cost + c0
            if cost2 + tail[i + 1] <= room:
              grown.setdefault(key, []).append(
                  (cost2, value + pref[t] * acc[t, e, d], ch + (d,)))
      states = {k: _pareto(v) for k, v in grown.items()}
    for front in states.values():
      for cost, value, ch in front:
        cand = (value, int(enc_cost[e] + cost), (e,) + ch)
        if _better(cand, best):
          best = cand
  return _choice(best, order, num_t)


def _pareto(front: list) -> list:
  """Drops partial choices another one beats in both cost and value (ties:
  the lexicographically larger choice stays, as the final tie-break)."""
  front.sort(key=lambda s: (s[0], -s[1], tuple(-x for x in s[2])))
  out, top = [], -math.inf
  for s in front:
    if s[1] > top:
      out.append(s)
      top = s[1]
  return out


def brute_force(pref: np.ndarray, budget: float, acc: np.ndarray,
                enc_cost: np.ndarray, dec_cost: np.ndarray, *,
                ordered: bool = True) -> Choice:
  """`search` by enumerating all E x D^T configurations (the reference)."""
  pref = np.asarray(pref, np.float64)
  acc, enc_cost, dec_cost = _check(pref, acc, enc_cost, dec_cost)
  budget = check_budget(budget, enc_cost, dec_cost)
  num_t, num_e, num_d = acc.shape
  order = _order(pref)
  best = None
  for e in range(num_e):
    for ds in itertools.product(range(num_d), repeat=num_t):
      if ordered and any(pref[i] > pref[j] and ds[i] < ds[j]
                         for i in range(num_t) for j in range(num_t)):
        continue
      cost = int(enc_cost[e] + sum(dec_cost[t, d] for t, d in enumerate(ds)))
      if cost > budget:
        continue
      value = 0.0
      for t in order:  # the same summation order as `search`
        value = value + pref[t] * acc[t, e, ds[t]]
      cand = (value, cost, (e,) + tuple(ds[t] for t in order))
      if _better(cand, best):
        best = cand
  return _choice(best, order, num_t)
