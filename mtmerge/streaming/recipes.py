"""How each method runs streamed: statistics passes, then one apply pass.

A recipe is not a new copy of a method. It names which model-wide
reductions the method needs (`stats`), gathers them in passes over the
blocks, and hands them to the method's own per-block kernels (`kernels`).
Methods without a recipe are refused by name (`for_method`).

* block-local (`local`): weight_averaging, task_arithmetic, Breadcrumbs and
  magnitude pruning with `scope='row'`, Consensus on task arithmetic;
  `model_stock` and `slerp` (per-tensor cosines: as the in-memory method
  on a tensor in one block, from summed row-block partials otherwise).
* top-k (`TopK`): ties_merging, dare_ties, magnitude_prune and breadcrumbs
  (global or per-tensor scope), Consensus on the TIES vector, dare: thresholds from `stats.RadixSelect`
  (global, or per tensor for tensors split over blocks) or
  `stats.kth_largest` (a tensor in one block), the TIES
  vote total from `stats.VoteTotal` when `zero_sign='majority'`, DARE's
  mask redrawn identically in every pass.
* `recipes_masks`: TALL masks and EMR (the compressed directory);
  `recipes_lowrank`: DELLA, TSV (whole matrices: `Recipe.blocks`);
  `recipes_pcb`: PCB-Merging, both variants.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax.numpy as jnp
import numpy as np

from mtmerge.methods import interpolate
from mtmerge.methods import registry
from mtmerge.streaming import kernels
from mtmerge.streaming import placement
from mtmerge.streaming import reader
from mtmerge.streaming import stats
from mtmerge import transforms as tx
from mtmerge.transforms import combine
from mtmerge.transforms import sparsify

_LOCAL = ("weight_averaging", "task_arithmetic")
_TOPK = ("ties_merging", "dare_ties", "magnitude_prune", "breadcrumbs",
         "dare")
_WHOLE_ONLY = ("model_stock", "slerp")  # per-tensor statistics


@dataclasses.dataclass
class Pass:
  """One read of (some of) the blocks: `fn(block, base, models)` each."""
  label: str
  blocks: list
  fn: Callable[[reader.Block, Any, list], None]


class Recipe:
  """Base: no statistics; `apply` gives a block's merged rows."""

  def __init__(self, name: str, full: dict[str, Any], T: int,
               place: placement.Placement | None = None):
    self.name, self.full, self.T, self.place = name, full, T, place

  def passes(self, blocks: list) -> Iterator[Pass]:
    return iter(())

  def blocks(self, blocks: list) -> list:
    """The blocks this method needs (TSV: whole matrices); default as planned."""
    return blocks

  def apply(self, blk: reader.Block, b, ms, out_sharding=None):
    """The block's merged rows (constrained to `out_sharding` on a mesh)."""
    raise NotImplementedError

  def host_parts(self, x) -> list[np.ndarray]:
    """A block-shaped array on the host in parts that add up: whole on one
    device; on a mesh, this process's shards (no device holds the whole
    block), whose histograms `stats.RadixSelect` sums."""
    return [np.asarray(x)] if self.place is None else (
        self.place.host_parts(x))


class Local(Recipe):
  """A method whose result on a block is its result on the whole model there."""

  def __init__(self, name, full, T, place=None):
    super().__init__(name, full, T, place)
    spec = registry.get(name)
    self.static = tuple(sorted((k, registry._freeze(v)) for k, v in
                               full.items() if k in spec.static))
    self.traced = {k: v for k, v in full.items() if k not in spec.static}

  def passes(self, blocks):
    split = [blk for blk in blocks if not blk.whole]
    if self.name in _WHOLE_ONLY and split:
      # Per-tensor statistics of tensors split over blocks: summed partials.
      mom = stats.Moments()
      fn = kernels.gram if self.name == "model_stock" else (
          kernels.slerp_moments)
      yield Pass("per-tensor moments", split, lambda blk, b, ms: mom.add(
          blk.name, placement.host(fn(b, ms))))
      self.moments = mom

  def apply(self, blk, b, ms, out_sharding=None):
    o = dict(out_sharding=out_sharding)
    if blk.whole or self.name not in _WHOLE_ONLY:
      return kernels.local(b, ms, self.traced, name=self.name,
                           static=self.static, **o)
    m = self.moments.get(blk.name)
    eps = float(self.full["epsilon"])
    if self.name == "model_stock":
      g = jnp.asarray(m, jnp.float32)
      cos = interpolate.mean_cos_from_gram(g, jnp.sqrt(jnp.diagonal(g)), eps)
      return kernels.stock_apply(b, ms, cos, **o)
    na, nc = np.sqrt(m[0]), np.sqrt(m[1])
    dot = m[2] / ((na if na > eps else 1.0) * (nc if nc > eps else 1.0))
    return kernels.slerp_apply(b, ms, jnp.float32(self.full["t"]),
                               jnp.float32(dot), **o)


class TopK(Recipe):
  """Magnitude top-k (TIES, pruning, Breadcrumbs) and DARE, streamed."""

  def __init__(self, name, full, T, place=None):
    super().__init__(name, full, T, place)
    f = full
    self.consensus = name == "consensus"  # on the TIES vector
    self.ties = name in ("ties_merging", "dare_ties", "consensus")
    if self.consensus:
      full = f = dict(full, scope="global", sign_method="sum",
                      zero_sign="majority")
      self.full = full
    self.scope = f.get("scope", "global")
    self.drop = name in ("dare", "dare_ties")
    self.seed = f.get("seed", 0)
    self.dkw = dict(drop_rate=float(f["drop_rate"]),
                    rescale=bool(f["rescale"])) if self.drop else {}
    self.band = name == "breadcrumbs"
    if self.band:
      sparsify.remove_outliers_and_trim(f["threshold"], f["gamma"])  # checks
      self.counts = sparsify.breadcrumbs_counts(f["threshold"], f["gamma"],
                                                f["count"])
    elif name == "dare" or float(f["threshold"]) >= 1.0:
      self.counts = None  # nothing trimmed
    else:
      sparsify.check_fraction("threshold", f["threshold"])
      self.counts = (sparsify.RankCount("keep", float(f["threshold"]),
                                        rounding=f.get("count", "round")),)
    self.scale = jnp.asarray(f.get("scaling_factor", 1.0), jnp.float32)
    if self.consensus:
      self.lam = tx.check_coeffs(f["tall_mask_lambda"], T,
                                 "tall_mask_lambda")
    w = f.get("weights")
    self.w = None if w is None else combine._weights(w, T)
    self.thr: dict = {}
    self.total = jnp.zeros((), jnp.float32)

  def _drop(self, blk):
    if not self.drop:
      return None
    return kernels.drop_args(self.seed, blk.leaf, blk.shape, blk.r0, self.T)

  def _x(self, blk, b, ms):
    """The block's float32 task vectors on the host (`host_parts`)."""
    return self.host_parts(kernels.tv_block(b, ms, self._drop(blk),
                                            **self.dkw))

  def _group(self, blk):
    return "model" if self.scope == "global" else blk.name

  def passes(self, blocks):
    if self.counts is not None:
      if self.scope == "global":
        n = sum(int(np.prod(blk.shape, dtype=np.int64)) for blk in blocks
                if blk.r0 == 0)
        ranks = {"model": [c(n) for c in self.counts]}
        sel_blocks = blocks
      else:
        # On a mesh every tensor goes through the radix passes: exact, and
        # its blocks stay sharded (`kth_largest` needs a tensor on the host).
        sel_blocks = [blk for blk in blocks
                      if not blk.whole or self.place is not None]
        ranks = {blk.name: [c(int(np.prod(blk.shape, dtype=np.int64)))
                            for c in self.counts] for blk in sel_blocks}
      if sel_blocks:
        sel = stats.RadixSelect(self.T, ranks, placement.allreduce_int)

        def add(f):
          return lambda blk, b, ms: [f(self._group(blk), x)
                                     for x in self._x(blk, b, ms)]
        yield Pass("top-k buckets", sel_blocks, add(sel.add_hi))
        sel.finish_hi()
        yield Pass("top-k exact", sel_blocks, add(sel.add_lo))
        self.thr = sel.finish()
    if self.ties and self.full["zero_sign"] == "majority":
      votes = stats.VoteTotal()

      def vote(blk, b, ms):
        votes.add(blk.leaf, placement.host(kernels.ties_votes(
            b, ms, self._thr(blk, b, ms), self.w, self._drop(blk),
            **self.dkw, sign_method=self.full["sign_method"])))
      yield Pass("sign votes", blocks, vote)
      self.total = jnp.float32(votes.total())

  def _thr(self, blk, b=None, ms=None):
    """`[T, ranks]` thresholds of a block (None: nothing trimmed)."""
    if self.counts is None:
      return jnp.zeros((self.T, 1), jnp.float32) if self.ties else None
    if self.scope == "global" or not blk.whole:
      return jnp.asarray(self.thr[self._group(blk)])
    if blk.name not in self.thr:  # a whole tensor: exact, on the host
      n = int(np.prod(blk.shape, dtype=np.int64))
      self.thr[blk.name] = stats.kth_largest(self._x(blk, b, ms)[0],
                                             [c(n) for c in self.counts])
    thr = self.thr[blk.name]
    if not (self.ties and self.full["zero_sign"] == "majority"):
      del self.thr[blk.name]  # needed once
    return jnp.asarray(thr)

  def apply(self, blk, b, ms, out_sharding=None):
    thr = self._thr(blk, b, ms)
    d = self._drop(blk)
    o = dict(out_sharding=out_sharding)
    if self.consensus:
      return kernels.consensus_ties_apply(
          b, ms, thr, self.total, self.lam, self.scale,
          k=int(self.full["k"]), merge_func=self.full["merge_func"], **o)
    if self.ties:
      f = self.full
      return kernels.ties_apply(b, ms, thr, self.total, self.w, self.scale,
                                d, **self.dkw, sign_method=f["sign_method"],
                                zero_sign=f["zero_sign"],
                                merge_func=f["merge_func"], **o)
    return kernels.trim_apply(b, ms, thr, self.scale, d, **self.dkw,
                              band=self.band, **o)


def for_method(name: str, full: dict[str, Any], T: int,
               place: placement.Placement | None = None) -> Recipe:
  """The recipe of `name` with validated hparams `full` (on `place`).

  Raises:
    ValueError: naming the method when it cannot be streamed (yet).
  """
  from mtmerge.streaming import recipes_lowrank, recipes_masks, recipes_pcb
  for mod in (recipes_masks, recipes_lowrank, recipes_pcb):  # Recipe modules
    if name in mod.METHODS:
      return mod.for_method(name, full, T, place)
  if name == "consensus" and full["base_method"] == "ties":
    return TopK(name, full, T, place)
  if name in _LOCAL or name in _WHOLE_ONLY or (
      name == "consensus" and full["base_method"] == "task_arithmetic") or (
          name in ("breadcrumbs", "magnitude_prune")
          and full["scope"] == "row"):
    return Local(name, full, T, place)
  if name in _TOPK:
    return TopK(name, full, T, place)
  raise ValueError(f"method {name!r} cannot run streamed yet (streamed: "
                   f"{', '.join(supported())}); use the in-memory path")


def supported() -> list[str]:
  """Methods with a streamed form (some only for some hparams)."""
  from mtmerge.streaming import recipes_lowrank, recipes_masks, recipes_pcb
  return sorted(set(_LOCAL + _TOPK + _WHOLE_ONLY + ("consensus",)
                    + recipes_masks.METHODS + recipes_lowrank.METHODS
                    + recipes_pcb.METHODS))


def streams(name: str, full: dict[str, Any]) -> bool:
  """True if `for_method(name, full, T)` would succeed."""
  try:
    for_method(name, full, 2)
  except ValueError:
    return False
  return True
