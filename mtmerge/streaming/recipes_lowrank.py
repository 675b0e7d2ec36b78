"""Streamed DELLA, TSV-Merge and PCB-Merging: per-row, per-matrix, model-wide.

* DELLA (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model
  Merging through Magnitude-Based Sampling"): MagPrune ranks each row of
  the last axis, and row blocks never split a row, so a block's ranks are
  the leaf's; its Bernoulli draws are the in-memory ones (`fold_in(key(seed),
  leaf)` and the flat counter of the leaf's `[T, rows, last]` draw, as
  streamed DARE, `kernels.drop_args`). The TIES sign election's zero votes
  need the model-wide vote total: one pass of exact per-leaf sums first.
* TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task
  Interference in Model Merging"): SVDs of whole matrices, so each 2-D
  tensor is one block, whatever `max_memory` says: memory is bounded by the
  largest matrix (its T + 1 inputs, the prefetched next block's, the
  float32 task vectors and the factorizations); other tensors stream in
  row blocks (their update is the task mean). Each matrix is factorized on
  one device, with one BLAS thread (see `methods.tsv`).
* PCB-Merging (Du et al. 2024, "Parameter Competition Balancing for Model
  Merging"), the paper variant: min-max normalizations and softmaxes over
  each task's whole vector and a global top-k of the balancing scores are
  model-wide: passes for the min/max, the softmax maxima, the softmax
  sums, the two radix-select passes, then the writing pass. The pairwise
  products hold `[T, T]` float32 per entry, so its row blocks are cut
  T-fold (`Pcb.blocks`).

Every per-block kernel calls the in-memory method's per-leaf functions
(`transforms.sparsify.magprune`, `combine.elect_sign`, `methods.tsv`,
`methods.pcb`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import task_vectors
from mtmerge import transforms as tx
from mtmerge.methods import pcb
from mtmerge.methods import tsv
from mtmerge.streaming import kernels
from mtmerge.streaming import placement
from mtmerge.streaming import recipes
from mtmerge.streaming import stats
from mtmerge.transforms import combine
from mtmerge.transforms import sparsify

METHODS = ("della", "tsv_merging", "pcb_merging")
_DELLA = ("drop_rate", "epsilon", "rescale")


def _della_tvs(b, ms, drop, drop_rate, epsilon, rescale):
  x = kernels.tvs(b, ms)
  u = kernels._block_uniform(drop, sparsify.della_rows(x).shape)
  return sparsify.magprune(x, u, drop_rate, epsilon, rescale)


@functools.partial(jax.jit, static_argnames=_DELLA)
def _della_votes(b, ms, drop, drop_rate, epsilon, rescale):
  y = _della_tvs(b, ms, drop, drop_rate, epsilon, rescale)
  return jnp.sum(combine.vote_signs(y, "sum").astype(jnp.int32))


@kernels._kernel(*_DELLA)
def _della_apply(b, ms, drop, total, scale, drop_rate, epsilon, rescale):
  y = _della_tvs(b, ms, drop, drop_rate, epsilon, rescale)
  tau = tx.run(tx.chain(tx.elect_sign("sum", total=total),
                        tx.disjoint_merge("mean")), {"x": y})
  return task_vectors.apply({"x": b}, tau, scale)["x"]


class Della(recipes.Recipe):
  """DELLA: a vote-total pass, then MagPrune + TIES per block."""

  def __init__(self, name, full, T, place=None):
    super().__init__(name, full, T, place)
    self.kw = dict(drop_rate=float(full["drop_rate"]),
                   epsilon=float(full["epsilon"]),
                   rescale=bool(full["rescale"]))
    sparsify.magnitude_rank_drop(key=jax.random.key(0), **self.kw)  # checks
    self.scale = jnp.asarray(full["scaling_factor"], jnp.float32)
    self.total = jnp.zeros((), jnp.float32)

  def _drop(self, blk):
    return kernels.drop_args(self.full["seed"], blk.leaf, blk.shape, blk.r0,
                             self.T)

  def passes(self, blocks):
    votes = stats.VoteTotal()
    yield recipes.Pass("sign votes", blocks, lambda blk, b, ms: votes.add(
        blk.leaf, placement.host(_della_votes(b, ms, self._drop(blk),
                                              **self.kw))))
    self.total = jnp.float32(votes.total())

  def apply(self, blk, b, ms, out_sharding=None):
    return _della_apply(b, ms, self._drop(blk), self.total, self.scale,
                        **self.kw, out_sharding=out_sharding)


@jax.jit
def _tsv_tvs(b, ms):
  return kernels.tvs(b, ms)


class Tsv(recipes.Recipe):
  """TSV-Merge: each 2-D tensor whole (`blocks`), `methods.tsv`'s kernel."""

  def __init__(self, name, full, T, place=None):
    super().__init__(name, full, T, place)
    self.alpha = jnp.asarray(full["alpha"], jnp.float32)

  def blocks(self, blocks):
    """One block per matrix (first of its row blocks widened); others kept."""
    out = []
    for blk in blocks:
      if len(blk.shape) != 2:
        out.append(blk)
      elif blk.r0 == 0:
        out.append(dataclasses.replace(blk, r1=blk.shape[0]))
    return out

  def apply(self, blk, b, ms, out_sharding=None):
    if self.place is not None:  # one matrix on one device (see methods.tsv)
      dev = jax.local_devices()[0]
      b, ms = jax.device_put(b, dev), jax.device_put(ms, dev)
    with tsv.one_blas_thread():
      y = jax.block_until_ready(tsv._merge_one(b, _tsv_tvs(b, ms),
                                               self.alpha))
    return y if out_sharding is None else jax.device_put(y, out_sharding)


@jax.jit
def _pcb_minmax(b, ms):
  x = kernels.tvs(b, ms)
  sq = (x * x).reshape(x.shape[0], -1)
  pair = (x[:, None] * x[None, :]).reshape(x.shape[:1] * 2 + (-1,))
  return (jnp.min(sq, -1), jnp.max(sq, -1), jnp.min(pair, -1),
          jnp.max(pair, -1))


@jax.jit
def _pcb_logit_max(b, ms, st):
  x = kernels.tvs(b, ms)
  il = pcb.intra_logits(x, st.sq_min, st.sq_max, x.shape[0])
  pl = pcb.inter_logits(x, st.pair_min, st.pair_max)
  return (jnp.max(il.reshape(x.shape[0], -1), -1),
          jnp.max(pl.reshape(pl.shape[:2] + (-1,)), -1))


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
  """PCB-Merging (paper variant): five statistics passes, then the merge."""

  def __init__(self, name, full, T, place=None):
    super().__init__(name, full, T, place)
    if full["variant"] != "paper":
      raise ValueError("pcb_merging variant='official' cannot run streamed "
                       "yet (its signed quantiles are not streamed); use "
                       "variant='paper' or the in-memory path")
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
    st = pcb.PaperStats(*[jnp.asarray(a) for a in acc], None, None, None,
                        None)
    mx = [np.full((T,), -np.inf, np.float32),
          np.full((T, T), -np.inf, np.float32)]

    def logit_max(blk, b, ms):
      r = [placement.host(a) for a in _pcb_logit_max(b, ms, st)]
      mx[0], mx[1] = np.maximum(mx[0], r[0]), np.maximum(mx[1], r[1])
    yield recipes.Pass("PCB softmax maxima", blocks, logit_max)
    st = st._replace(intra_max=jnp.asarray(mx[0]),
                     inter_max=jnp.asarray(mx[1]))
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
        beta = _pcb_beta(b, ms, self.st)
        for x in ([np.asarray(beta)] if self.place is None
                  else self.place.host_parts(beta)):
          f("model", x)
      return fn
    yield recipes.Pass("top-k buckets", blocks, add(sel.add_hi))
    sel.finish_hi()
    yield recipes.Pass("top-k exact", blocks, add(sel.add_lo))
    self.thr = jnp.asarray(sel.finish()["model"])

  def apply(self, blk, b, ms, out_sharding=None):
    return _pcb_apply(b, ms, self.st, self.thr, self.scale,
                      out_sharding=out_sharding)


def for_method(name, full, T, place=None) -> recipes.Recipe:
  return {"della": Della, "tsv_merging": Tsv, "pcb_merging": Pcb}[name](
      name, full, T, place)
