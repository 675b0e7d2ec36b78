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
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Tree = Any
Scope = Literal["global", "per_tensor", "row"]

_TINY = 2.0 ** -100
_TINY_BITS = int(np.array(_TINY, np.float32).view(np.int32))
_MAX_ITERS = 96


def keep_count(fraction: float, n: int) -> int:
  """Number of entries kept for a kept-fraction: round-half-up, in [1, n]."""
  return int(min(max(math.floor(fraction * n + 0.5), 1), n))


def _indicator_ge(a: jax.Array, thr: jax.Array) -> jax.Array:
  """Exact float 1.0/0.0 for `a >= thr` (a, thr >= 2**-100 or a == 0).

  Written with max/min/mul only: XLA:CPU vectorizes this ~4x better than a
  compare feeding a reduction. `a - prev(thr) > 0` iff `a >= thr`, and any
  positive difference is >= 2**-149, which two clamped multiplies by 2**100
  lift to exactly 1.
  """
  d = jnp.maximum(a - jnp.nextafter(thr, jnp.zeros_like(thr)), 0.0)
  return jnp.minimum(jnp.minimum(d * 2.0 ** 100, 1.0) * 2.0 ** 100, 1.0)


def _view3(x: jax.Array) -> jax.Array:
  """`[T, rows, cols]` view of a stacked leaf, cols = the param's last dim."""
  if x.ndim <= 2:
    return x.reshape(x.shape[0], 1, -1)
  return x.reshape(x.shape[0], -1, x.shape[-1])


def _row_counts(a3: jax.Array, thr: jax.Array) -> jax.Array:
  """int32 `[T, rows]` counts of `a3 >= thr` (thr broadcastable to a3)."""
  if a3.shape[-1] < 2 ** 24:  # float32 sums of 0/1 are exact below 2**24
    return jnp.sum(_indicator_ge(a3, thr), axis=-1).astype(jnp.int32)
  return jnp.sum(a3 >= thr, axis=-1, dtype=jnp.int32)


def _bits(x):
  return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)


def _float(b):
  return jax.lax.bitcast_convert_type(b, jnp.float32)


class _Groups(NamedTuple):
  """Leaves stacked by view shape: far fewer, larger fusions.

  XLA:CPU pays a per-fusion cost that dominates a counting pass over ~150
  leaves (measured 3.4x slower than over 4 stacked groups), so each search
  pass runs over `arrays[g]` `[G, T, rows, cols]` (float32 x, signed),
  built once. Passes take `|x|` on the fly: stacking `|x|` instead made XLA
  emit one abs fusion and one temporary per leaf. `members[g]` lists the
  leaf indices stacked in group g.
  """
  arrays: list
  members: list


def _sharded() -> bool:
  """True while tracing under `jax.set_mesh` (a sharded program).

  There the searches count each leaf where it lies, in its own dtype: a
  stacked float32 copy of the task vectors (1-2x their size per device)
  and a concatenation of sharded leaves (a gather) are what one device's
  XLA:CPU program wants, not a mesh's.
  """
  return not jax.sharding.get_abstract_mesh().empty


def _upper(arrays: list, axis) -> jax.Array:
  """An upper bound of `|a|` for the search's bracket (`[T]` or `[G, T]`).

  One device: the exact max (a tight bracket when the sample's misses).
  Under a mesh: the largest finite float32, since a full-size max pass is
  a per-device copy of every leaf on XLA:CPU and the sampled bracket
  almost always holds; the search then bisects the float range. The kept
  entries are the same either way (`count(|x| >= thr) >= k`, maximal).
  """
  if _sharded():
    shape = tuple(d for i, d in enumerate(arrays[0].shape)
                  if i not in axis)
    return jnp.full(shape, np.finfo(np.float32).max, jnp.float32)
  return jnp.max(jnp.stack([jnp.max(jnp.abs(a), axis=axis).astype(
      jnp.float32) for a in arrays]), axis=0)


def _in_loop(arrays: list, bits: jax.Array) -> list:
  """`arrays`, made to look loop-variant inside the search's while loop.

  Under a mesh only: otherwise XLA hoists `abs(convert(leaf))` out of the
  loop as an invariant and carries a float32 copy of every task vector
  through it (measured: 2x the bf16 task vectors per device).
  """
  if not _sharded():
    return arrays
  return list(jax.lax.optimization_barrier((arrays, bits))[0])


def _unstacked(leaves) -> _Groups:
  """One group per leaf, `[1, T, rows, cols]` views, no copies."""
  return _Groups([_view3(x)[None] for x in leaves],
                 [[i] for i in range(len(leaves))])


def _group(leaves) -> _Groups:
  if _sharded():
    return _unstacked(leaves)
  arrays, members = [], []
  for idx in _members([x.shape for x in leaves]):
    arrays.append(jnp.stack([_view3(leaves[i]).astype(jnp.float32)
                             for i in idx]))
    members.append(idx)
  # Without the barrier XLA rewrites every reduction and strided sample of a
  # stack into one per leaf (reduce(concat) -> concat(reduce)): ~370 more
  # fusions at 152 leaves, each costing compile time, for no run-time gain.
  return _Groups(list(jax.lax.optimization_barrier(arrays)), members)


_FLAT_COLS = 2 ** 14  # row length of the global search's flat view


def _flat_group(leaves) -> _Groups:
  """All leaves as one group `[1, T, R, C]`: the global search's layout.

  The global scope needs no row structure, so every leaf is flattened and
  concatenated per task (zero-padded to R * C entries; zeros are never
  counted). One group means one counting fusion per pass instead of one per
  distinct leaf shape, which cuts the search's XLA compile time ~3x at 152
  leaves; it is the same single copy of the task vectors as `_group`'s.
  """
  T = leaves[0].shape[0]
  n = sum(int(np.prod(x.shape[1:], dtype=np.int64)) for x in leaves)
  rows = max(1, -(-n // _FLAT_COLS))
  cols = max(1, -(-n // rows))  # padding < rows entries per task
  parts = [x.reshape(T, -1).astype(jnp.float32) for x in leaves]
  if rows * cols > n:
    parts.append(jnp.zeros((T, rows * cols - n), jnp.float32))
  flat = jnp.concatenate(parts, axis=1).reshape(1, T, rows, cols)
  return _Groups([jax.lax.optimization_barrier(flat)],
                 [list(range(len(leaves)))])


def _sample_sorted(a: jax.Array, m: int) -> jax.Array:
  """Sorted strided sample `[G, T, <=m]` of each (member, task) of `|a|`.

  Entry i of the sample is flat entry `i * stride` of `[R * C]`, taken as
  row `i * stride // C`, column `i * stride % C` of `a` (a gather of m
  entries): flattening `[R, C]` first would all-gather a sharded leaf.
  """
  G, T, R, C = a.shape
  stride = max(1, (R * C) // max(m, 1))
  while stride > 1 and math.gcd(stride, C) != 1:  # avoid sampling one column
    stride += 1
  flat = np.arange(0, R * C, stride, dtype=np.int64)
  rows, cols = jnp.asarray(flat // C, jnp.int32), jnp.asarray(flat % C,
                                                               jnp.int32)
  return jnp.sort(jnp.abs(a[:, :, rows, cols].astype(jnp.float32)), axis=-1)


def _bracket(sample: jax.Array, k: jax.Array, n: int):
  """Sample quantiles bracketing the k-th largest, with ~4 sigma margins.

  Args:
    sample: ascending samples `[S, m]` per search group.
    k: `[S]` target counts; n: entries per search group.

  Returns:
    (lo, hi) candidate thresholds `[S]` (floats; hi may be +inf).
  """
  m = sample.shape[-1]
  p = k.astype(jnp.float32) / np.float32(n)  # n may exceed int32
  pos = (1.0 - p) * m
  margin = 4.0 * jnp.sqrt(m * p * (1.0 - p)) + 2.0
  lo_i = jnp.floor(pos - margin).astype(jnp.int32)
  hi_i = jnp.ceil(pos + margin).astype(jnp.int32)
  take = lambda i: jnp.take_along_axis(
      sample, jnp.clip(i, 0, m - 1)[:, None], axis=-1)[:, 0]
  lo = jnp.where(lo_i < 0, 0.0, take(lo_i))
  hi = jnp.where(hi_i > m - 1, jnp.inf, take(hi_i))
  return lo, hi


def _pair_ops(wide: bool):
  """`(ge, eq, where, diff)` on counts: plain ints, or wide `(hi, lo)` pairs.

  A wide count is uint32 `[..., 2]` worth `hi * 2**16 + lo` with
  `lo < 2**16`: exact up to 2**48 entries, where one uint32 stops at
  2**32. `diff(a, b)` is float32 `a - b` (it only steers the search).
  """
  f32 = jnp.float32
  if not wide:
    def diff(a, b):
      return jnp.where(a >= b, (a - b).astype(f32), -(b - a).astype(f32))
    return (lambda a, b: a >= b), (lambda a, b: a == b), jnp.where, diff

  def ge(a, b):
    return (a[..., 0] > b[..., 0]) | ((a[..., 0] == b[..., 0]) &
                                      (a[..., 1] >= b[..., 1]))

  def diff(a, b):
    up = ge(a, b)
    d = jnp.where(up[..., None], a - b, b - a)  # uint32, no wrap-around
    # hi's difference times 2**16 outweighs any lo difference: sign exact.
    d = jnp.where(a[..., 0] >= b[..., 0], 1.0, -1.0) * d[..., 0].astype(
        f32) * 65536.0 + (a[..., 1].astype(f32) - b[..., 1].astype(f32))
    return d
  return (ge, lambda a, b: jnp.all(a == b, axis=-1),
          lambda c, a, b: jnp.where(c[..., None], a, b), diff)


def wide_count(c: jax.Array) -> jax.Array:
  """uint32 counts `[..., G]` summed over G as wide `(hi, lo)` pairs."""
  c = c.astype(jnp.uint32)
  hi = jnp.sum(c >> 16, axis=-1, dtype=jnp.uint32)
  lo = jnp.sum(c & 0xffff, axis=-1, dtype=jnp.uint32)
  return jnp.stack([hi + (lo >> 16), lo & 0xffff], axis=-1)


def _search(count_fn, k, maxval, lo_cand, hi_cand, wide: bool = False):
  """Largest threshold with count(thr) >= k, starting from a sampled bracket.

  One `lax.while_loop` whose body calls `count_fn` exactly once: the first
  iterations count the candidate bracket ends (and, where a candidate
  misses, the full-range floor), the rest are Illinois steps. Tracing the
  counting pass once instead of four times (two ends, a conditional floor,
  the step) cuts the search's XLA compile time ~2x; the passes run are the
  same.

  Args:
    count_fn: bits `[S]` int32 -> counts `[S]` (same dtype as k) of entries
      with |x| >= float(bits).
    k: `[S]` targets (>= 1).
    maxval: `[S]` max |x| per search group.
    lo_cand, hi_cand: `[S]` candidate bracket from a sample (verified here;
      groups whose bracket misses fall back to [2**-100, max]).

    wide: counts and k are `wide_count` pairs `[S, 2]` (more than 2**32
      entries per search group).

  Returns:
    float32 thresholds `[S]`; 0 where fewer than k entries are nonzero.
  """
  ge, eq, where, diff = _pair_ops(wide)
  shape = k.shape[:-1] if wide else k.shape
  tiny = jnp.full(shape, _TINY_BITS, jnp.int32)
  top = jnp.maximum(_bits(maxval) + 1, tiny + 1)
  lo = jnp.clip(_bits(lo_cand), tiny, top)
  hi = jnp.where(jnp.isinf(hi_cand), top,
                 jnp.clip(_bits(hi_cand) + 1, tiny, top))
  big = jnp.full(shape, 2 ** 31 - 1, jnp.int32)
  no = jnp.zeros(shape, bool)
  zf = jnp.zeros(shape, jnp.float32)
  # phase 0: count lo; 1: count hi; 2: count the floor; 3: Illinois steps.
  init = dict(phase=jnp.zeros((), jnp.int32), lo=lo, hi=hi, f_lo=zf, f_hi=zf,
              c_lo=jnp.zeros_like(k), c_hi=jnp.zeros_like(k), done=no,
              keep_all=no, side=jnp.zeros(shape, jnp.int32), w1=big,
              w2=big, it=jnp.zeros((), jnp.int32))

  def start(s, c_hi, c_tiny):
    """The verified bracket, once both ends (and the floor) are counted."""
    lo, hi, c_lo = s["lo"], s["hi"], s["c_lo"]
    lo_ok, hi_ok = ge(c_lo, k), ~ge(c_hi, k) & (hi > lo)
    lo = jnp.where(lo_ok, lo, tiny)
    c_lo = where(lo_ok, c_lo, c_tiny)
    hi = jnp.where(hi_ok, hi, top)
    c_hi = where(hi_ok, c_hi, jnp.zeros_like(c_hi))
    # Fewer than k nonzero entries (only possible after the fallback): keep
    # all.
    keep_all = ~lo_ok & ge(k, c_lo)
    return dict(s, phase=jnp.full((), 3, jnp.int32), lo=lo, hi=hi,
                f_lo=(c_lo - k).astype(jnp.float32) if not wide else diff(
                    c_lo, k),
                f_hi=-(k - c_hi).astype(jnp.float32) if not wide else diff(
                    c_hi, k), c_lo=c_lo, c_hi=c_hi,
                keep_all=keep_all,
                done=keep_all | eq(c_lo, k) | (hi - lo <= 1))

  def after_lo(s, c, mid):
    del mid
    return dict(s, phase=jnp.ones((), jnp.int32), c_lo=c)

  def after_hi(s, c, mid):
    del mid
    need_floor = jnp.any(~ge(s["c_lo"], k))
    return jax.lax.cond(
        need_floor,
        lambda: dict(s, phase=jnp.full((), 2, jnp.int32), c_hi=c),
        lambda: start(s, c, s["c_lo"]))

  def after_floor(s, c, mid):
    del mid
    return start(s, s["c_hi"], c)

  def step(s, c_mid, mid):
    # Illinois false position on count(bits) - k: f_lo > 0 > f_hi.
    lo, hi = s["lo"], s["hi"]
    width = hi - lo
    f_mid = diff(c_mid, k)
    go_up = ge(c_mid, k)  # mid is a valid threshold: move lo up
    active = ~s["done"]
    up, down = active & go_up, active & ~go_up
    # Illinois: the end kept twice in a row gets its value halved.
    f_lo = jnp.where(up, f_mid, jnp.where(down & (s["side"] == -1),
                                          s["f_lo"] / 2, s["f_lo"]))
    f_hi = jnp.where(down, f_mid, jnp.where(up & (s["side"] == 1),
                                            s["f_hi"] / 2, s["f_hi"]))
    new_lo = jnp.where(up, mid, lo)
    new_hi = jnp.where(down, mid, hi)
    c_lo = where(up, c_mid, s["c_lo"])
    done = s["done"] | eq(c_lo, k) | (new_hi - new_lo <= 1)
    return dict(s, lo=new_lo, hi=new_hi, f_lo=f_lo, f_hi=f_hi, c_lo=c_lo,
                done=done,
                side=jnp.where(up, 1, jnp.where(down, -1, s["side"])),
                w1=jnp.where(active, width, s["w1"]),
                w2=jnp.where(active, s["w1"], s["w2"]),
                it=s["it"] + 1)

  def mid_of(s):
    lo, hi = s["lo"], s["hi"]
    width = hi - lo
    frac = s["f_lo"] / jnp.maximum(s["f_lo"] - s["f_hi"], 1e-30)
    interp = lo + jnp.floor(frac * width.astype(jnp.float32)).astype(jnp.int32)
    # Safeguard: bisect when two steps failed to halve the bracket (plateaus
    # of tied values), so the worst case stays O(32) passes.
    use_bisect = width > s["w2"] // 2
    return jnp.clip(jnp.where(use_bisect, lo + width // 2, interp),
                    lo + 1, hi - 1)

  def cond(s):
    return (s["phase"] < 3) | ((~jnp.all(s["done"])) &
                               (s["it"] < _MAX_ITERS))

  def body(s):
    ph = s["phase"]
    mid = mid_of(s)
    probe = jnp.where(ph == 0, s["lo"], jnp.where(
        ph == 1, s["hi"], jnp.where(ph == 2, tiny, mid)))
    c = count_fn(probe)
    return jax.lax.switch(jnp.minimum(ph, 3),
                          (after_lo, after_hi, after_floor, step), s, c, mid)

  out = jax.lax.while_loop(cond, body, init)
  return jnp.where(out["keep_all"], 0.0, _float(out["lo"]))


_GLOBAL_SAMPLE = 2 ** 16  # per task, over the whole model
_TENSOR_SAMPLE = 2 ** 11  # per task and tensor


def _global_thresholds(groups: _Groups, k: jax.Array, n: int) -> jax.Array:
  """`[T]` thresholds over all groups; k uint32 `[T]`, n entries per task."""
  T = groups.arrays[0].shape[1]

  def count_fn(bits):
    thr = _float(bits)[None, :, None, None]
    return sum(jnp.sum(_row_counts(jnp.abs(a), thr), axis=(0, 2)).astype(
        jnp.uint32) for a in groups.arrays)
  maxval = jnp.max(jnp.stack([jnp.max(jnp.abs(a), axis=(0, 2, 3))
                              for a in groups.arrays]), axis=0)
  samples = []
  for a in groups.arrays:
    G, _, R, C = a.shape
    m = max(1, int(_GLOBAL_SAMPLE * R * C / n))
    s = _sample_sorted(a, m)                       # [G, T, m_g]
    samples.append(jnp.transpose(s, (1, 0, 2)).reshape(T, -1))
  sample = jnp.sort(jnp.concatenate(samples, axis=1), axis=1)
  lo, hi = _bracket(sample, k, n)
  return _search(count_fn, k, maxval, lo, hi)


def _wide_global_thresholds(leaves, kn: int, n: int) -> jax.Array:
  """`[T]` global thresholds counted leaf by leaf in wide pairs.

  For a model of 2**32 or more entries per task, or a sharded program:
  every leaf is counted where it lies (no concatenated copy, no gather),
  each leaf's uint32 count split into a `wide_count` pair, so the model
  may hold up to 2**48 entries per task (one leaf: under 2**32).
  """
  T = leaves[0].shape[0]
  for x in leaves:
    if int(np.prod(x.shape[1:], dtype=np.int64)) >= 2 ** 32:
      raise ValueError(f"a leaf of shape {x.shape[1:]} has 2**32 or more "
                       "entries per task; split it")
  if n >= 2 ** 48:
    raise ValueError(f"global top-k over {n} entries per task: at most "
                     "2**48 are counted exactly")
  groups = _unstacked(leaves)

  def count_fn(bits):
    thr = _float(bits)[None, :, None, None]
    per_leaf = [jnp.sum(_row_counts(jnp.abs(a), thr), axis=(0, 2),
                        dtype=jnp.uint32)
                for a in _in_loop(groups.arrays, bits)]
    return wide_count(jnp.stack(per_leaf, axis=-1))       # [T, 2]
  maxval = _upper(groups.arrays, (0, 2, 3))
  samples = []
  for a in groups.arrays:
    _, _, R, C = a.shape
    m = max(1, int(_GLOBAL_SAMPLE * R * C / n))
    samples.append(_sample_sorted(a, m)[0])                # [T, m_leaf]
  sample = jnp.sort(jnp.concatenate(samples, axis=1), axis=1)
  k = jnp.broadcast_to(jnp.asarray([kn >> 16, kn & 0xffff], jnp.uint32),
                       (T, 2))
  lo, hi = _bracket(sample, jnp.full((T,), float(kn), jnp.float32), n)
  return _search(count_fn, k, maxval, lo, hi, wide=True)


def _members(shapes) -> list[list[int]]:
  """Leaf indices grouped by view shape, in `_group`'s order."""
  by_shape: dict = {}
  for i, s in enumerate(shapes):
    by_shape.setdefault(_view3_shape(s), []).append(i)
  return list(by_shape.values())


def _view3_shape(shape) -> tuple[int, ...]:
  """The shape of `_view3` of a stacked leaf of this shape."""
  if len(shape) <= 2:
    return (shape[0], 1, int(np.prod(shape[1:], dtype=np.int64)))
  return (shape[0], int(np.prod(shape[1:-1], dtype=np.int64)), shape[-1])


def threshold_offsets(tvs: Tree, scope: Scope = "global") -> list[int]:
  """Where each leaf's thresholds start in `flat_thresholds`' vector.

  Leaf i (in `jax.tree.leaves` order) owns `T` entries (global,
  per_tensor; one per task) or `T * rows` (row) from `offsets[i]`; every
  leaf shares entries 0..T-1 for the global scope. Shapes only, no JAX work.
  """
  shapes = [np.shape(x) for x in jax.tree.leaves(tvs)]
  if scope == "global":
    return [0] * len(shapes)
  offsets, start = [0] * len(shapes), 0
  for idx in _members(shapes):
    v = _view3_shape(shapes[idx[0]])
    size = v[0] * (v[1] if scope == "row" else 1)
    for j, i in enumerate(idx):
      offsets[i] = start + j * size
    start += len(idx) * size
  return offsets


def flat_thresholds(tvs: Tree, fraction: float | Tree,
                    scope: Scope = "global",
                    count: Callable[[int], int] | None = None) -> jax.Array:
  """`topk_thresholds` as one float32 vector; see `threshold_offsets`.

  A jitted caller gets one output instead of one per leaf: at 152 leaves the
  per-leaf outputs of a per-tensor search are ~150 slicing fusions, which
  take most of its XLA compile time.
  """
  leaves = jax.tree.leaves(tvs)
  if not leaves:
    raise ValueError("topk_thresholds got an empty tree")
  if scope not in ("global", "per_tensor", "row"):
    raise ValueError(f"unknown scope {scope!r}; expected global, per_tensor "
                     "or row")
  fracs = (jax.tree.leaves(fraction) if not isinstance(fraction, (int, float))
           else [fraction] * len(leaves))
  T = leaves[0].shape[0]
  if count is None:
    kf = [lambda n, f=float(f): keep_count(f, n) for f in fracs]
  else:
    kf = [count] * len(leaves)

  if scope == "global":
    n = sum(int(np.prod(x.shape[1:], dtype=np.int64)) for x in leaves)
    kn = int(kf[0](n))
    if kn <= 0:
      return jnp.full((T,), jnp.inf, jnp.float32)
    if n < 2 ** 32 and not _sharded():
      return _global_thresholds(_flat_group(leaves),
                                jnp.full((T,), kn, jnp.uint32), n)
    return _wide_global_thresholds(leaves, kn, n)

  # Per-tensor and per-row searches run jointly over one flat vector of
  # search groups, so one pass counts every group of every leaf.
  groups = _group(leaves)
  per_tensor = scope == "per_tensor"
  ks, maxes, los, his, shapes = [], [], [], [], []
  for a, idx in zip(groups.arrays, groups.members):
    G, _, R, C = a.shape
    n = R * C if per_tensor else C
    k = jnp.asarray(np.array([kf[i](n) for i in idx], np.int32))
    if per_tensor:
      k = jnp.broadcast_to(k[:, None], (G, T))
      mx = _upper([a], (2, 3))
      lo, hi = _bracket(_sample_sorted(a, _TENSOR_SAMPLE).reshape(G * T, -1),
                        jnp.maximum(k, 1).reshape(-1), n)
    else:  # rows are short: search the full range
      k = jnp.broadcast_to(k[:, None, None], (G, T, R))
      mx = jnp.max(jnp.abs(a), axis=3).astype(jnp.float32)
      lo = jnp.zeros((G * T * R,), jnp.float32)
      hi = jnp.full((G * T * R,), jnp.inf, jnp.float32)
    ks.append(k.reshape(-1)); maxes.append(mx.reshape(-1))
    los.append(lo); his.append(hi); shapes.append(k.shape)
  splits = np.cumsum([int(np.prod(s)) for s in shapes])[:-1].tolist()

  def count_fn(bits):
    out = []
    for a, b, shp in zip(_in_loop(groups.arrays, bits),
                         jnp.split(bits, splits), shapes):
      thr = _float(b).reshape(shp)
      if per_tensor:
        out.append(jnp.sum(_row_counts(jnp.abs(a), thr[..., None, None]),
                           axis=2))
      else:
        out.append(_row_counts(jnp.abs(a), thr[..., None]))
    return jnp.concatenate([c.reshape(-1) for c in out])

  kk = jnp.concatenate(ks)
  thr = _search(count_fn, jnp.maximum(kk, 1), jnp.concatenate(maxes),
                jnp.concatenate(los), jnp.concatenate(his))
  return jnp.where(kk <= 0, jnp.inf, thr)


def leaf_thresholds(flat: jax.Array, offset: Any, shape) -> jax.Array:
  """One leaf's thresholds from `flat_thresholds`, broadcastable to it.

  Args:
    flat: the vector from `flat_thresholds` (global or per_tensor scope).
    offset: the leaf's entry of `threshold_offsets` (an int, or a traced
      int32 scalar so one compiled kernel serves every leaf of a shape).
    shape: the stacked leaf's shape `[T, ...]`.

  Returns:
    `[T, 1, ..., 1]` float32.
  """
  T = shape[0]
  if isinstance(offset, int):
    part = flat[offset:offset + T]
  else:
    part = jax.lax.dynamic_slice(flat, (offset,), (T,))
  return part.reshape((T,) + (1,) * (len(shape) - 1))


def topk_thresholds(tvs: Tree, fraction: float | Tree,
                    scope: Scope = "global",
                    count: Callable[[int], int] | None = None) -> Tree:
  """Per-leaf magnitude thresholds keeping the top `fraction` of entries.

  Args:
    tvs: stacked task vectors, leaves `[T, ...]`.
    fraction: kept fraction in (0, 1] (a float, or for `per_tensor`/`row`
      a tree of floats matching `tvs`).
    scope: `global` = one threshold per task over all leaves (TIES paper);
      `per_tensor` = one per task and leaf (mergekit); `row` = one per task
      and row of the leaf's last axis (Model Breadcrumbs).
    count: optional `n -> k` giving the number kept out of a group of `n`
      entries, overriding `fraction`'s `keep_count`; k = 0 keeps nothing
      (threshold +inf).

  Returns:
    A tree whose leaves are float32 thresholds broadcastable against the
    leaf: `[T, 1, ..., 1]` (global, per_tensor) or `[T, ..., 1]` (row).
    Keep `|tau| >= thr`.
  """
  leaves, treedef = jax.tree.flatten(tvs)
  flat = flat_thresholds(tvs, fraction, scope, count)
  out = []
  for x, off in zip(leaves, threshold_offsets(tvs, scope)):
    if scope != "row" or x.ndim <= 2:
      out.append(leaf_thresholds(flat, off, x.shape))
    else:
      size = int(np.prod(x.shape[:-1], dtype=np.int64))
      out.append(flat[off:off + size].reshape(x.shape[:-1] + (1,)))
  return jax.tree.unflatten(treedef, out)


def topk_mask(tvs: Tree, fraction: float | Tree,
              scope: Scope = "global") -> Tree:
  """Bool mask of the top `fraction` entries by magnitude (see thresholds)."""
  thr = topk_thresholds(tvs, fraction, scope)
  return jax.tree.map(
      lambda x, t: (jnp.abs(x).astype(jnp.float32) >= t) & (x != 0), tvs, thr)


def _kth_largest_views(leaves: list, k: jax.Array, n: int) -> jax.Array:
  """Exact k-th largest (k: uint32 `[T]`, 1 <= k) of non-negative leaves."""
  groups = _flat_group(leaves)
  thr = _global_thresholds(groups, k, n)[None, :, None, None]
  mags = [jnp.abs(a) for a in groups.arrays]
  mins = [jnp.min(jnp.where(a >= thr, a, jnp.inf), axis=(0, 2, 3))
          for a in mags]
  return jnp.min(jnp.stack(mins), axis=0)


def kth_largest(tvs: Tree, count: Callable[[int], int]) -> jax.Array:
  """Exact k-th largest |x| per task over all leaves (global scope), `[T]`.

  `count(n)` gives k (1 <= k <= n) for n entries per task. One extra pass
  after the threshold search: the smallest magnitude that is kept.
  """
  leaves = jax.tree.leaves(tvs)
  n = sum(int(np.prod(x.shape[1:], dtype=np.int64)) for x in leaves)
  k = jnp.full((leaves[0].shape[0],), int(count(n)), jnp.uint32)
  return _kth_largest_views(leaves, k, n)


def kth_largest_signed(tree: Tree, count: Callable[[int], int]) -> jax.Array:
  """Exact k-th largest signed value per task over all leaves, `[T]`.

  Splits the search by sign so it stays exact (no shifting, which would
  round): the k-th largest is among the positives if there are at least k,
  zero if the non-negatives reach k, else the j-th largest negative, which
  is minus the (n_neg - j + 1)-th largest magnitude among the negatives.
  """
  leaves = jax.tree.leaves(tree)
  T = leaves[0].shape[0]
  n = sum(int(np.prod(x.shape[1:], dtype=np.int64)) for x in leaves)
  k = jnp.full((T,), int(count(n)), jnp.uint32)
  views = [_view3(x).astype(jnp.float32) for x in leaves]
  n_pos = sum(jnp.sum((v > 0).reshape(T, -1), axis=1, dtype=jnp.uint32)
              for v in views)
  n_neg = sum(jnp.sum((v < 0).reshape(T, -1), axis=1, dtype=jnp.uint32)
              for v in views)
  n_nonneg = jnp.uint32(n) - n_neg
  pos = _kth_largest_views([jnp.maximum(v, 0.0) for v in views],
                           jnp.clip(k, 1, jnp.maximum(n_pos, 1)), n)
  j = jnp.where(k > n_nonneg, k - n_nonneg, 1)
  neg = -_kth_largest_views([jnp.maximum(-v, 0.0) for v in views],
                            jnp.clip(n_neg - j + 1, 1, jnp.maximum(n_neg, 1)),
                            n)
  return jnp.where(k <= n_pos, pos, jnp.where(k <= n_nonneg, 0.0, neg))
