"""Streamed DELLA and TSV-Merge: per-row and per-matrix statistics.

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

Every per-block kernel calls the in-memory method's per-leaf functions
(`transforms.sparsify.magprune`, `combine.elect_sign`, `methods.tsv`);
PCB-Merging is `recipes_pcb`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mtmerge import task_vectors
from mtmerge import transforms as tx
from mtmerge.methods import tsv
from mtmerge.streaming import kernels
from mtmerge.streaming import placement
from mtmerge.streaming import recipes
from mtmerge.streaming import stats
from mtmerge.transforms import combine
from mtmerge.transforms import sparsify

METHODS = ("della", "tsv_merging")
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


def for_method(name, full, T, place=None) -> recipes.Recipe:
  return {"della": Della, "tsv_merging": Tsv}[name](name, full, T, place)
