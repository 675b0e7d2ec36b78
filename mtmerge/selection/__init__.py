"""Exact top-k magnitude thresholds without sorting.

TIES, magnitude pruning, Breadcrumbs and TALL-style trimming all need "the
k-th largest |x|" of a task vector, either over the whole model (global
scope), per tensor, or per row. A full sort of an 88M-entry task vector is
slow on CPU and impossible to shard cleanly; instead we search for the
threshold in the space of float32 bit patterns, where the order of
non-negative floats equals the order of their int32 bit patterns:

* the starting bracket comes from quantiles of a small sorted strided
  sample (~4 sigma margins), verified by two exact counts (falling back to
  the full range where it misses);
* each iteration is one fused counting pass `count(|x| >= thr)` over the
  leaves (a reduction, so it shards over any mesh axis), concatenated into
  one flat view for the global scope and stacked by shape otherwise: XLA
  compile time grows with the number of fusions, so few large arrays both
  run and compile faster than ~150 leaves (the global search compiles in
  ~1 s at 152 leaves);
* the next threshold is Illinois false position on the count in bit space,
  with a bisection step whenever two steps failed to halve the bracket, so
  it needs at most ~2x32 passes (9 at 88M x 8 tasks, Gaussian entries);
* it stops when `count(|x| >= thr) == k` exactly, or when the bracket is one
  ulp wide (ties at the k-th value: all tied entries are kept).

`flat_thresholds` returns every leaf's thresholds as one vector (see
`threshold_offsets`), so a jitted caller has one output instead of one per
leaf; `topk_thresholds` returns them as a tree.

Convention: entries are kept when `|x| >= thr`; the number kept is exactly
`k` unless there are ties at the k-th largest magnitude. Magnitudes below
`2**-100` count as zero (a zero entry contributes nothing to any merge).

Modules: `search` (the bit-space search and its counting primitives),
`groups` (how leaves are viewed and stacked for the counting passes),
`scopes` (thresholds over the model, per tensor, per row) and `kth` (the
k-th largest value of a whole tree). Everything public is re-exported
here.
"""

from mtmerge.selection.groups import entries_per_task
from mtmerge.selection.kth import (kth_largest, kth_largest_signed,
                                   signed_kth, signed_ranks)
from mtmerge.selection.scopes import (
    Scope, Tree, flat_thresholds, keep_count, leaf_thresholds,
    threshold_offsets, topk_mask, topk_thresholds)
from mtmerge.selection.search import _TINY, _TINY_BITS, wide_count

__all__ = ["Scope", "entries_per_task", "flat_thresholds", "keep_count", "kth_largest",
           "kth_largest_signed", "leaf_thresholds", "signed_kth",
           "signed_ranks", "threshold_offsets", "topk_mask",
           "topk_thresholds", "wide_count"]
