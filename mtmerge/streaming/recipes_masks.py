"""Streamed TALL masks and EMR-Merging: the compressed form, block by block.

* TALL masks (Wang et al. 2024, "Localizing Task Information for Improved
  Model Merging and Compression"): `tau_MTL` and the masks
  `|tau_t| > lambda_t |tau_MTL - tau_t|` are entrywise, so with
  `base_method='task_arithmetic'` one writing pass suffices; with
  `base_method='ties'` the TIES vector's model-wide statistics (global
  top-k thresholds, the sign-vote total) come first, from the same passes
  as streamed TIES (`recipes.TopK`).
* EMR-Merging (Huang et al. 2024, "EMR-Merging: Tuning-Free
  High-Performance Model Merging"): tau_uni and the masks are entrywise;
  the rescalers `sum_leaves mean|tau_t| / sum_leaves mean|M_t tau_uni|` are
  model-wide, so a first pass gathers each leaf's partial sums.

The output is the in-memory path's compressed directory
(`compressed_io.save`): `tau.safetensors` (the shared vector in
the base's dtypes), `masks.safetensors` (uint8 `[T, ceil(numel / 8)]` per
tensor, big-endian bits as `np.packbits`) and `compressed.json`, readable
by `compressed_io.load` and `mtmerge reconstruct`. Blocks start
at a multiple of 8 entries (`reader.plan(..., row_multiple=8)`), so every
block packs into whole bytes of its own. The per-block arithmetic is
`methods.masks`' own per-leaf functions.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import atomic_files
from mtmerge import checkpoint_io
from mtmerge import compressed_io
from mtmerge import transforms as tx
from mtmerge.methods import masks
from mtmerge.streaming import atomic
from mtmerge.streaming import kernels
from mtmerge.streaming import placement
from mtmerge.streaming import reader
from mtmerge.streaming import recipes
from mtmerge.streaming import writer
from mtmerge.transforms import combine

METHODS = ("tall_mask", "emr_merging")


@jax.jit
def _tall_ta(b, ms, lam):
  x = kernels.tvs(b, ms)
  tau = masks._base_vector({"x": x}, "task_arithmetic", None, None)
  return tau["x"], masks.tall_masks({"x": x}, tau, lam)["x"]


@functools.partial(jax.jit, static_argnames="merge_func")
def _tall_ties(b, ms, thr, total, lam, merge_func="sum"):
  x = kernels.tvs(b, ms)
  t = kernels._col(thr, 0, x)
  # The TIES vector as `arithmetic.ties_vector` (global scope, sum votes,
  # zero votes to the model-wide majority), from `combine`'s kernels.
  v = combine._leaf_vote(x, t, None, "sum")
  s = jnp.where(v == 0, combine._fill(total, "majority"), v)
  tau = combine._leaf_merge(x, t, s, None, merge_func)
  return tau, masks.tall_masks({"x": x}, {"x": tau}, lam)["x"]


@jax.jit
def _emr(b, ms):
  x = kernels.tvs(b, ms)
  u = masks.emr_unified(x)
  return u, masks.emr_masks(x, u)


@jax.jit
def _emr_means(b, ms):
  """A block's `(mean|tau_t|, mean|M_t tau_uni|)` (`masks.emr_mean_abs`)."""
  x = kernels.tvs(b, ms)
  u = masks.emr_unified(x)
  return masks.emr_mean_abs(x, u, masks.emr_masks(x, u))


class Compressed(recipes.Recipe):
  """TALL masks or EMR: statistics passes, then `(tau, packed masks)` blocks."""

  def __init__(self, name, full, T, place=None):
    super().__init__(name, full, T, place)
    self.rescalers = np.ones((T,), np.float32)
    self.ties = None
    if name == "tall_mask":
      self.lam = tx.check_coeffs(full["tall_mask_lambda"], T,
                                 "tall_mask_lambda")
      if full["base_method"] == "ties":
        self.ties = recipes.TopK("ties_merging", dict(
            threshold=full["threshold"], scope="global", sign_method="sum",
            zero_sign="majority", merge_func=full["merge_func"],
            count="round", weights=None, scaling_factor=1.0), T, place)

  def passes(self, blocks):
    if self.ties is not None:
      yield from self.ties.passes(blocks)
    if self.name != "emr_merging":
      return
    # Per leaf: the mean itself for a leaf in one block (as in memory), or
    # the float64 numel-weighted means of its row blocks over its size.
    whole, sums = {}, {}

    def add(blk, b, ms):
      means = [placement.host(a) for a in _emr_means(b, ms)]
      if blk.whole:
        whole[blk.leaf] = means
        return
      acc = sums.setdefault(blk.leaf, [0.0, 0.0, blk.shape])
      acc[0] = acc[0] + means[0].astype(np.float64) * blk.numel
      acc[1] = acc[1] + means[1].astype(np.float64) * blk.numel
    yield recipes.Pass("EMR rescalers", blocks, add)
    for leaf, (a, c, shape) in sums.items():
      n = int(np.prod(shape, dtype=np.int64))
      whole[leaf] = [np.float32(a / n), np.float32(c / n)]
    num = den = np.zeros((self.T,), np.float32)
    for leaf in sorted(whole):  # leaf order, float32: the in-memory sum
      num = num + np.asarray(whole[leaf][0], np.float32)
      den = den + np.asarray(whole[leaf][1], np.float32)
    self.rescalers = np.asarray(masks.emr_rescalers(jnp.asarray(num),
                                                    jnp.asarray(den)))

  def apply(self, blk, b, ms, out_sharding=None):
    """`(tau rows float32, bool masks [T, rows, ...])` of a block."""
    if self.name == "emr_merging":
      return _emr(b, ms)
    if self.ties is None:
      return _tall_ta(b, ms, self.lam)
    return _tall_ties(b, ms, self.ties._thr(blk, b, ms), self.ties.total,
                      self.lam, merge_func=self.full["merge_func"])


def for_method(name, full, T, place=None) -> recipes.Recipe:
  return Compressed(name, full, T, place)


def compress_files(method: str, base: str, models, out: str,
                   max_memory: int, progress: bool = True, mesh=None,
                   **hparams):
  """Streams a compressed method (TALL masks, EMR) into `out` (a directory).

  Memory: the executor's per-block buffers (`executor.bytes_per_entry` per
  entry, blocks of at least 8 rows) plus the bool masks of one block; what
  survives between passes is per-tensor thresholds (TALL on TIES) or `[T]`
  sums (EMR).

  `mesh` as `merge_files` (`placement.make`): each block's rows are split
  over the devices in shards of a multiple of 8 rows (blocks of a multiple
  of 8 x devices rows; a tensor's last rows, fewer than that, are
  replicated), so every shard packs into whole bytes of its own; the
  kernels run sharded and the shards come to the host one by one, tau cast
  to the base's dtype and masks packed shard by shard. With several JAX
  processes each reads only its rows and writes its shards' bytes into
  files process 0 created (`streaming.atomic`), as `merge_files` does;
  the statistics (TIES thresholds and votes, EMR's per-leaf means) are
  reductions over global arrays, the same on every process.

  Returns:
    `{"out", "bytes", "full_bytes", "ratio", "passes", "blocks",
    "peak_block_bytes", "devices", "processes"}`.
  """
  from mtmerge import methods
  from mtmerge.streaming import executor
  spec = methods.get(method)
  full = spec.check(hparams, len(models))
  T = len(models)
  place = placement.make(mesh, shard_rows=8)
  recipe = Compressed(method, full, T, place)
  if max_memory <= 0:
    raise ValueError(f"max_memory must be positive, got {max_memory}")
  rows = 8 if place is None else 8 * place.size
  multi = place is not None and place.multi
  main = jax.process_index() == 0
  inputs = reader.Inputs(base, models)
  try:
    lay = inputs.layout
    per = executor.bytes_per_entry(inputs) + T  # + one block's bool masks
    blocks = reader.plan(inputs, per, int(max_memory), None,
                         row_multiple=rows)
    ex = executor.Executor(inputs, progress, place)
    for p in recipe.passes(blocks):
      ex.run(p)
    info = {}

    def write(tmp):
      names = inputs.floats
      shapes = {k: tuple(lay.shapes[k]) for k in names}
      dts = {k: checkpoint_io.np_dtype(lay.dtypes[k]) for k in names}
      nb = {k: -(-int(np.prod(s, dtype=np.int64)) // 8)
            for k, s in shapes.items()}
      if multi and not main:  # the files exist once process 0 made them
        atomic.barrier("mtmerge-output-created")
      tau_w = writer.ShardWriter(os.path.join(tmp, compressed_io.TAU),
                                 names, shapes, dts, create=main)
      mask_w = writer.ShardWriter(
          os.path.join(tmp, compressed_io.MASKS), names,
          {k: (T, nb[k]) for k in names}, {k: np.dtype(np.uint8)
                                          for k in names}, create=main)
      if multi and main:
        atomic.barrier("mtmerge-output-created")

      def masks_at(name, first, m):  # bool [T, ...] from entry `first`
        packed = np.packbits(np.asarray(m).reshape(T, -1), axis=-1)
        for t in range(T):
          mask_w.write_at(name, t * nb[name] + first // 8, packed[t])

      def one(blk, b, ms):
        tau, m = recipe.apply(blk, b, ms)
        if place is None:
          tau_w.write_at(blk.name, blk.first, checkpoint_io.cast(
              tau, dts[blk.name]))
          masks_at(blk.name, blk.first, m)
          return
        # Shard by shard: no device or host holds the whole block.
        sb, sm = place.shardings(blk)
        for at, data in place.pieces(blk, jax.device_put(tau, sb)):
          tau_w.write_at(blk.name, at, checkpoint_io.cast(
              data, dts[blk.name]))
        for at, data in place.pieces(blk, jax.device_put(m, sm), axis=1):
          masks_at(blk.name, at, data)
      try:
        ex.run(recipes.Pass("write", blocks, one))
        tau_w.close(check=not multi)
        mask_w.close(check=not multi)
      except BaseException:
        tau_w.abort()
        mask_w.abort()
        raise
      if main:
        meta = compressed_io.meta_json(method, full, recipe.rescalers, lay)
        with open(os.path.join(tmp, compressed_io.CJSON), "w",
                  encoding="utf-8") as f:
          json.dump(meta, f, indent=2, default=repr)
          f.write("\n")
    if multi:
      dest = atomic.write(out, write, is_dir=True)
    else:
      dest = atomic_files.atomic_write(out, write, is_dir=True)
  finally:
    inputs.close()
  nbytes = atomic_files.disk_bytes(dest)
  full_bytes = T * sum(os.path.getsize(lay.path_of(f)) for f in lay.files)
  info.update(out=dest, bytes=nbytes, full_bytes=full_bytes,
              ratio=nbytes / max(full_bytes, 1), passes=ex.passes,
              blocks=len(blocks), peak_block_bytes=ex.peak_bytes,
              devices=place.size if place else 1,
              processes=jax.process_count())
  return info


