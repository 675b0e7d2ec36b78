"""Model-wide statistics of a streamed merge: per-block partials + combine.

* `RadixSelect`: the exact k-th largest |tau| per (group, task), for any
  number of ranks k, in two passes over float32 bit patterns (non-negative
  floats order like their bits). Pass 1 histograms the top 16 bits
  (sign cleared: 32768 buckets) and picks, per rank, the bucket holding the
  k-th largest; pass 2 histograms the low 16 bits of only the entries in
  that bucket, which pins the value exactly. A group is the whole model
  (global top-k) or one tensor (per-tensor top-k of a tensor too large for
  one block). The threshold follows `mtmerge.selection`'s convention:
  keep `|tau| >= thr`; magnitudes below 2**-100 count as zero (if fewer
  than k entries are above that, thr = 0 keeps everything); k <= 0 gives
  +inf. So the kept set equals the in-memory search's, entry for entry.
* `kth_largest`: the same thresholds for a tensor held whole (one block).
* `VoteTotal`: TIES' model-wide sum of elected signs from per-tensor
  integer partials, combined in float32 in leaf order exactly as
  `transforms.combine.ties_apply` adds them.
* `Moments`: per-tensor sums (Gram matrices, norms, dots) over row blocks,
  for the per-tensor statistics of Model Stock and SLERP.
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Hashable, Sequence

import numpy as np

from mtmerge import selection

_HI = 1 << 15   # top-16-bit buckets of a non-negative float32
_LO = 1 << 16


def _halves(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(low, high) uint16 halves of float32 `x` `[T, ...]`'s bits, per task.

  Strided views, no copy: the high half holds the sign, the exponent and 7
  mantissa bits.
  """
  x = np.ascontiguousarray(x, np.float32).reshape(x.shape[0], -1)
  u = x.view(np.uint16)
  if sys.byteorder == "little":
    return u[:, 0::2], u[:, 1::2]
  return u[:, 1::2], u[:, 0::2]


def _descend(hist: np.ndarray, k: int) -> tuple[int, int]:
  """(bucket, rank within it) of the k-th largest, from a histogram."""
  above = np.cumsum(hist[::-1])  # above[j]: entries in the top j+1 buckets
  j = int(np.searchsorted(above, k))  # first j with above[j] >= k
  prev = int(above[j - 1]) if j else 0
  return len(hist) - 1 - j, k - prev


class RadixSelect:
  """Exact k-th largest magnitudes per group and task, in two passes.

  Counts are int64 on the host, so a group may hold any number of entries
  (the in-memory search's counter is uint32: under 2**32 per task).

  Args:
    T: number of tasks (rows of every block's leading axis).
    ranks: group -> list of ranks k (1-based), each one int for every task
      or a sequence of T ints (one per task); k <= 0 yields +inf.
    reduce: combines a histogram over processes before each pass is
      finished (`placement.allreduce_int`; default: this process only).
  """

  def __init__(self, T: int, ranks: dict[Hashable, Sequence[int]],
               reduce: Callable[[np.ndarray], np.ndarray] | None = None):
    self.T = T
    self.reduce = reduce or (lambda h: h)
    self.ranks = {g: [np.broadcast_to(np.asarray(k, np.int64), (T,))
                      for k in ks] for g, ks in ranks.items()}
    self.hi = {g: np.zeros((T, _HI), np.int64) for g in self.ranks}
    self.lo: dict = {}
    self.pick: dict = {}
    self.result: dict[Hashable, np.ndarray] = {}

  def add_hi(self, group: Hashable, x: np.ndarray) -> None:
    """Pass 1 partial: `x` float32 `[T, ...]`, one block of the group."""
    hi = _halves(x)[1]
    h = self.hi[group]
    for t in range(self.T):
      c = np.bincount(hi[t], minlength=2 * _HI)
      h[t] += c[:_HI] + c[_HI:]  # fold the sign bit: magnitudes only

  def finish_hi(self) -> None:
    """Combines pass 1: each rank's bucket and its rank inside it."""
    for g, ks in self.ranks.items():
      self.hi[g] = self.reduce(self.hi[g])
      picks = []
      for t in range(self.T):
        row = []
        for k in ks:
          kt = int(k[t])
          row.append(None if kt <= 0 else _descend(self.hi[g][t], kt))
        picks.append(row)
      self.pick[g] = picks
      self.lo[g] = {(t, p[0]): np.zeros(_LO, np.int64)
                    for t, row in enumerate(picks) for p in row if p}
    self.hi.clear()

  def add_lo(self, group: Hashable, x: np.ndarray) -> None:
    """Pass 2 partial: low-bit histograms of the picked buckets' entries."""
    lo, hi = _halves(x)
    for t in range(self.T):
      top = None
      for (tt, b), h in self.lo[group].items():
        if tt != t:
          continue
        if top is None:
          top = hi[t] & np.uint16(0x7fff)
        h += np.bincount(lo[t][top == b], minlength=_LO)

  def finish(self) -> dict[Hashable, np.ndarray]:
    """Combines pass 2: group -> float32 thresholds `[T, len(ranks)]`."""
    for g, picks in self.pick.items():
      keys = sorted(self.lo[g])
      if keys:  # one combine of all picked buckets' histograms
        both = self.reduce(np.stack([self.lo[g][key] for key in keys]))
        self.lo[g] = dict(zip(keys, both))
      out = np.full((self.T, len(self.ranks[g])), np.inf, np.float32)
      for t, row in enumerate(picks):
        for i, p in enumerate(row):
          if p is None:
            continue
          b, r = p
          low, _ = _descend(self.lo[g][(t, b)], r)
          out[t, i] = _threshold(np.array((b << 16) | low,
                                          np.uint32).view(np.float32))
      self.result[g] = out
    self.lo.clear()
    return self.result


def _threshold(v: np.float32) -> np.float32:
  """selection's convention: magnitudes below 2**-100 count as zero."""
  bits = int(np.asarray(v, np.float32).view(np.uint32))
  return np.float32(v) if bits >= selection._TINY_BITS else np.float32(0.0)


_SAMPLE = 1 << 14


def _kth(a: np.ndarray, k: int) -> np.float32:
  """The exact k-th largest of 1-D float32 `a` (1 <= k <= a.size).

  A sorted strided sample brackets the answer (~4 sigma margins); one
  count above the bracket and a partition of the few entries inside it
  give the exact value, ~3x faster than `np.partition` of all of `a`. A
  bracket that misses falls back to the full partition.
  """
  n = a.size
  if n > 8 * _SAMPLE:
    s = np.sort(a[::n // _SAMPLE])
    m, p = s.size, k / n
    pos, margin = (1.0 - p) * m, 4.0 * math.sqrt(m * p * (1.0 - p)) + 2.0
    i, j = int(pos - margin), int(math.ceil(pos + margin))
    lo = s[i] if i >= 0 else -np.inf
    hi = s[j] if j < m else np.inf
    above = int(np.count_nonzero(a > hi))
    if above < k:
      mid = a[(a >= lo) & (a <= hi)]
      r = k - above
      if r <= mid.size:
        return np.partition(mid, mid.size - r)[mid.size - r]
  return np.partition(a, n - k)[n - k]


def kth_largest(x: np.ndarray, ks: Sequence[int]) -> np.ndarray:
  """Exact thresholds `[T, len(ks)]` of a whole tensor `x` `[T, ...]`.

  The in-block counterpart of `RadixSelect` (same convention): the k-th
  largest magnitude of each task (`_kth`).
  """
  T = x.shape[0]
  a = np.abs(np.asarray(x, np.float32).reshape(T, -1))
  n = a.shape[1]
  out = np.full((T, len(ks)), np.inf, np.float32)
  for t in range(T):
    for i, k in enumerate(ks):
      if 0 < k <= n:
        out[t, i] = _threshold(_kth(a[t], k))
  return out


class VoteTotal:
  """The model-wide sum of TIES sign votes, from exact per-tensor sums."""

  def __init__(self):
    self.parts: dict[int, int] = {}

  def add(self, leaf: int, part: int) -> None:
    self.parts[leaf] = self.parts.get(leaf, 0) + int(part)

  def total(self) -> np.float32:
    """float32 sum of the per-leaf sums in leaf order (as `ties_apply`)."""
    acc = np.float32(0.0)
    for leaf in sorted(self.parts):
      acc = np.float32(acc + np.float32(self.parts[leaf]))
    return acc


class Moments:
  """Per-tensor float64 sums of block partials (Gram matrices, dots)."""

  def __init__(self):
    self.sums: dict[Hashable, np.ndarray] = {}

  def add(self, key: Hashable, part) -> None:
    part = np.asarray(part, np.float64)
    if key in self.sums:
      self.sums[key] = self.sums[key] + part
    else:
      self.sums[key] = part

  def get(self, key: Hashable) -> np.ndarray:
    return self.sums[key]
