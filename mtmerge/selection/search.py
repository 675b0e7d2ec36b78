"""The bit-space search for the k-th largest |x| and its counting primitives.

Non-negative float32 values order like their int32 bit patterns, so the
threshold is searched for in bit space: a bracket from sample quantiles
(`_bracket` of `_sample_sorted`), verified by exact counts, then Illinois
false position with bisection safeguards (`_search`), one counting pass per
iteration. Counts are int32/uint32, or `(hi, lo)` pairs (`wide_count`)
exact to 2**48 entries. See `mtmerge.selection` for the overview.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


_TINY = 2.0 ** -100


_TINY_BITS = int(np.array(_TINY, np.float32).view(np.int32))


_MAX_ITERS = 96


def _indicator_ge(a: jax.Array, thr: jax.Array) -> jax.Array:
  """Exact float 1.0/0.0 for `a >= thr` (a, thr >= 2**-100 or a == 0).

  Written with max/min/mul only: XLA:CPU vectorizes this ~4x better than a
  compare feeding a reduction. `a - prev(thr) > 0` iff `a >= thr`, and any
  positive difference is >= 2**-149, which two clamped multiplies by 2**100
  lift to exactly 1.
  """
  d = jnp.maximum(a - jnp.nextafter(thr, jnp.zeros_like(thr)), 0.0)
  return jnp.minimum(jnp.minimum(d * 2.0 ** 100, 1.0) * 2.0 ** 100, 1.0)


def _row_counts(a3: jax.Array, thr: jax.Array) -> jax.Array:
  """int32 `[T, rows]` counts of `a3 >= thr` (thr broadcastable to a3)."""
  if a3.shape[-1] < 2 ** 24:  # float32 sums of 0/1 are exact below 2**24
    return jnp.sum(_indicator_ge(a3, thr), axis=-1).astype(jnp.int32)
  return jnp.sum(a3 >= thr, axis=-1, dtype=jnp.int32)


def _bits(x):
  return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)


def _float(b):
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def _sample_sorted(a: jax.Array, m: int, values=None) -> jax.Array:
  """Sorted strided sample `[G, T, <=m]` of each (member, task) of `|a|`.

  Entry i of the sample is flat entry `i * stride` of `[R * C]`, taken as
  row `i * stride // C`, column `i * stride % C` of `a` (a gather of m
  entries): flattening `[R, C]` first would all-gather a sharded leaf.
  `values`: a positionwise map `[T, ...] -> [T, ...]` applied to the
  gathered entries (of each member) before their magnitudes are taken.
  """
  G, T, R, C = a.shape
  stride = max(1, (R * C) // max(m, 1))
  while stride > 1 and math.gcd(stride, C) != 1:  # avoid sampling one column
    stride += 1
  flat = np.arange(0, R * C, stride, dtype=np.int64)
  rows, cols = jnp.asarray(flat // C, jnp.int32), jnp.asarray(flat % C,
                                                               jnp.int32)
  got = a[:, :, rows, cols]
  if values is not None:
    got = jnp.stack([values(g) for g in got])
  return jnp.sort(jnp.abs(got.astype(jnp.float32)), axis=-1)


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
