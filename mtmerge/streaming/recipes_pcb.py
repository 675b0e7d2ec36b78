"""Streamed PCB-Merging, both variants: model-wide statistics in passes.

PCB-Merging (Du et al. 2024, "Parameter Competition Balancing for Model
Merging"; `methods.pcb`):

* `paper`: min-max normalizations and softmaxes over each task's whole
  vector and a global top-k of the balancing scores are model-wide: passes
  for the min/max, the softmax sums, the two radix-select passes, then the
  writing pass (the softmax maxima follow from the min/max,
  `pcb.with_softmax_maxima`). The pairwise products hold
  `[T, T]` float32 per entry, so its row blocks are cut T-fold
  (`Pcb.blocks`).
* `official` (the released code): |tau|'s clip bounds are order
  statistics of each task's whole vector (two radix-select passes, which
  also take |tau|'s min and max: the clipped range is theirs clipped); the
  scores' quantile is a signed k-th largest (a pass counting positive and
  negative scores, with their min and max, then radix selects of the
  positive and the negated negative scores, as
  `selection.kth_largest_signed` splits it), then the writing pass.

Every per-block kernel calls `methods.pcb`'s per-leaf functions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import selection
from mtmerge import task_vectors
from mtmerge.methods import pcb
from mtmerge.streaming import kernels
from mtmerge.streaming import placement
from mtmerge.streaming import recipes
from mtmerge.streaming import stats
from mtmerge.transforms import sparsify

METHODS = ("pcb_merging",)


@jax.jit
def _pcb_minmax(b, ms):
  x = kernels.tvs(b, ms)
  sq = (x * x).reshape(x.shape[0], -1)
  pair = (x[:, None] * x[None, :]).reshape(x.shape[:1] * 2 + (-1,))
  return (jnp.min(sq, -1), jnp.max(sq, -1), jnp.min(pair, -1),
          jnp.max(pair, -1))


@jax.jit
def _pcb_exp_sums(b, ms, st):
  x = kernels.tvs(b, ms)
  il = pcb.intra_logits(x, st.sq_min, st.sq_max, x.shape[0])
  pl = pcb.inter_logits(x, st.pair_min, st.pair_max)
  return pcb.exp_sum(il, st.intra_max), pcb.exp_sum(pl, st.inter_max, 2)


@jax.jit
def _pcb_beta(b, ms, st):
  x = kernels.tvs(b, ms)
  return pcb.paper_beta(x, st, x.shape[0])


@kernels._kernel()
def _pcb_apply(b, ms, st, thr, scale):
  x = kernels.tvs(b, ms)
  beta = pcb.paper_beta(x, st, x.shape[0])
  beta = jnp.where(beta >= kernels._col(thr, 0, beta), beta, 0.0)
  return task_vectors.apply({"x": b}, {"x": pcb.paper_merge(beta, x)},
                            scale)["x"]


class Pcb(recipes.Recipe):
  """PCB-Merging (paper variant): four statistics passes, then the merge."""

  def __init__(self, name, full, T, place=None):
    super().__init__(name, full, T, place)
    self.scale = jnp.asarray(full["scaling_factor"], jnp.float32)
    self.count = sparsify.RankCount("keep", float(full["ratio"]))

  def blocks(self, blocks):
    """Row blocks cut T-fold: the pairwise scores take `[T, T]` per entry.

    The budget's accounting (`executor.bytes_per_entry`) is linear in T;
    a T-fold cut keeps the pairwise temporaries' share of it bounded.
    Pieces keep a multiple of the mesh's device count rows when they can.
    """
    m = self.place.size if self.place is not None else 1
    out = []
    for blk in blocks:
      rows = blk.r1 - blk.r0
      per = -(-rows // self.T)
      per = max(m, -(-per // m) * m) if rows >= m else rows
      if len(blk.shape) < 2 or per >= rows:
        out.append(blk)
        continue
      out += [dataclasses.replace(blk, r0=r, r1=min(blk.r1, r + per))
              for r in range(blk.r0, blk.r1, per)]
    return out

  def passes(self, blocks):
    T = self.T
    acc = [np.full((T,), np.inf, np.float32), np.full((T,), -np.inf,
                                                       np.float32),
           np.full((T, T), np.inf, np.float32),
           np.full((T, T), -np.inf, np.float32)]

    def minmax(blk, b, ms):  # exact in any order
      r = [placement.host(a) for a in _pcb_minmax(b, ms)]
      for i, f in enumerate((np.minimum, np.maximum) * 2):
        acc[i] = f(acc[i], r[i])
    yield recipes.Pass("PCB min/max", blocks, minmax)
    st = pcb.with_softmax_maxima(pcb.PaperStats(
        *[jnp.asarray(a) for a in acc], None, None, None, None), T)
    leaf_sums: dict = {}

    def exp_sums(blk, b, ms):  # float32 per leaf, leaves in order: as memory
      r = [placement.host(a) for a in _pcb_exp_sums(b, ms, st)]
      prev = leaf_sums.get(blk.leaf)
      leaf_sums[blk.leaf] = r if prev is None else [p + q for p, q in
                                                    zip(prev, r)]
    yield recipes.Pass("PCB softmax sums", blocks, exp_sums)
    zi = zp = 0
    for leaf in sorted(leaf_sums):
      zi, zp = zi + leaf_sums[leaf][0], zp + leaf_sums[leaf][1]
    self.st = st._replace(intra_sum=jnp.asarray(zi, jnp.float32),
                          inter_sum=jnp.asarray(zp, jnp.float32))
    n = sum(int(np.prod(blk.shape, dtype=np.int64)) for blk in blocks
            if blk.r0 == 0)
    sel = stats.RadixSelect(T, {"model": [self.count(n)]},
                            placement.allreduce_int)

    def add(f):
      def fn(blk, b, ms):
        for x in self.host_parts(_pcb_beta(b, ms, self.st)):
          f("model", x)
      return fn
    yield recipes.Pass("top-k buckets", blocks, add(sel.add_hi))
    sel.finish_hi()
    yield recipes.Pass("top-k exact", blocks, add(sel.add_lo))
    self.thr = jnp.asarray(sel.finish()["model"])

  def apply(self, blk, b, ms, out_sharding=None):
    return _pcb_apply(b, ms, self.st, self.thr, self.scale,
                      out_sharding=out_sharding)


@jax.jit
def _tvs_abs_range(b, ms):
  """The block's float32 task vectors and, per task, min and max of |tau|."""
  x = kernels.tvs(b, ms)
  a = jnp.abs(x).reshape(ms.shape[0], -1)
  return x, jnp.min(a, -1), jnp.max(a, -1)


def _score(b, ms, c):
  x = kernels.tvs(b, ms)
  a = pcb.official_clip(x, c["lo"], c["hi"])
  return x, a, pcb.official_score(x, a, c["a_min"], c["a_max"], x.shape[0])


@jax.jit
def _score_stats(b, ms, c):
  """Per task: positive and negative counts, min and max of the scores."""
  s = _score(b, ms, c)[2].reshape(ms.shape[0], -1)
  return (jnp.sum(s > 0, -1, dtype=jnp.int32),
          jnp.sum(s < 0, -1, dtype=jnp.int32), jnp.min(s, -1),
          jnp.max(s, -1))


@jax.jit
def _signed_parts(b, ms, c):
  """The scores split for the signed select: `max(s, 0)`, `max(-s, 0)`."""
  s = _score(b, ms, c)[2]
  return jnp.maximum(s, 0.0), jnp.maximum(-s, 0.0)


@kernels._kernel()
def _official_apply(b, ms, c, scale):
  x, a, s = _score(b, ms, c)
  merged = pcb.official_merge(x, a, s, c["q"], c["s_min"], c["s_max"])
  return task_vectors.apply({"x": b}, {"x": merged}, scale)["x"]


class PcbOfficial(recipes.Recipe):
  """PCB-Merging (official variant): five statistics passes, then the merge."""

  def __init__(self, name, full, T, place=None):
    super().__init__(name, full, T, place)
    self.scale = jnp.asarray(full["scaling_factor"], jnp.float32)
    self.c: dict = {}

  def passes(self, blocks):
    T = self.T
    n = sum(int(np.prod(blk.shape, dtype=np.int64)) for blk in blocks
            if blk.r0 == 0)
    k_lo, k_hi, k_q = pcb.official_ranks(n, float(self.full["ratio"]))
    sel = stats.RadixSelect(T, {"model": [k_lo, k_hi]},
                            placement.allreduce_int)
    amin = np.full((T,), np.inf, np.float32)
    amax = np.full((T,), -np.inf, np.float32)

    def buckets(blk, b, ms):
      nonlocal amin, amax
      x, lo, hi = _tvs_abs_range(b, ms)
      amin = np.minimum(amin, placement.host(lo))
      amax = np.maximum(amax, placement.host(hi))
      for part in self.host_parts(x):
        sel.add_hi("model", part)
    yield recipes.Pass("|tau| top-k buckets", blocks, buckets)
    sel.finish_hi()

    def exact(blk, b, ms):
      for x in self.host_parts(kernels.tv_block(b, ms)):
        sel.add_lo("model", x)
    yield recipes.Pass("|tau| top-k exact", blocks, exact)
    lo, hi = sel.finish()["model"].T
    # clip is monotone: the clipped vectors' range is the range clipped.
    c = {"lo": lo, "hi": hi, "a_min": np.clip(amin, lo, hi),
         "a_max": np.clip(amax, lo, hi)}
    c = {k: jnp.asarray(v, jnp.float32) for k, v in c.items()}
    counts = np.zeros((2, T), np.int64)
    smin = np.full((T,), np.inf, np.float32)
    smax = np.full((T,), -np.inf, np.float32)

    def score_stats(blk, b, ms):
      nonlocal smin, smax
      pos, neg, mn, mx = (placement.host(v) for v in _score_stats(b, ms, c))
      counts[0] += pos
      counts[1] += neg
      smin, smax = np.minimum(smin, mn), np.maximum(smax, mx)
    yield recipes.Pass("PCB score signs", blocks, score_stats)
    # The signed k-th largest as `selection.kth_largest_signed` splits it.
    n_pos, n_neg = counts
    k_pos, k_neg = selection.signed_ranks(k_q, n, n_pos, n_neg, xp=np)
    sq = stats.RadixSelect(T, {"pos": [k_pos], "neg": [k_neg]},
                           placement.allreduce_int)

    def signed(f):
      def fn(blk, b, ms):
        pos, neg = _signed_parts(b, ms, c)
        for g, v in (("pos", pos), ("neg", neg)):
          for x in self.host_parts(v):
            f(g, x)
      return fn
    yield recipes.Pass("PCB score top-k buckets", blocks, signed(sq.add_hi))
    sq.finish_hi()
    yield recipes.Pass("PCB score top-k exact", blocks, signed(sq.add_lo))
    got = sq.finish()
    q = selection.signed_kth(k_q, n, n_pos, n_neg, got["pos"][:, 0],
                             got["neg"][:, 0], xp=np)
    self.c = dict(c, q=jnp.asarray(q, jnp.float32),
                  s_min=jnp.asarray(smin), s_max=jnp.asarray(smax))

  def apply(self, blk, b, ms, out_sharding=None):
    return _official_apply(b, ms, self.c, self.scale,
                           out_sharding=out_sharding)


def for_method(name, full, T, place=None) -> recipes.Recipe:
  del name
  cls = PcbOfficial if full["variant"] == "official" else Pcb
  return cls("pcb_merging", full, T, place)
