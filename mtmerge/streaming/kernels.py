"""Jitted per-block kernels of the streamed executor.

Every kernel takes the block's raw inputs (the base rows `b` and the
models' rows stacked `ms` `[T, rows, ...]`, in their stored dtype) and
forms the float32 task vectors `ms[t] - b` itself, exactly as
`task_vectors.from_checkpoints` does, so no `[T, ...]` float32 copy
outlives a kernel. The merge arithmetic is the in-memory methods' own: a
block-local method runs its registered function on a one-leaf tree
`{"x": block}`, TIES runs
`transforms.combine`'s vote and apply kernels; thresholds come from
`stats` (the in-memory per-tensor search inside a kernel costs ~40x the
apply on XLA:CPU). The canonical one-leaf tree means
jax's cache keys on shapes only: one compile per distinct block shape.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.random import threefry2x32 as _threefry

from mtmerge import task_vectors
from mtmerge.methods import arithmetic
from mtmerge.methods import interpolate
from mtmerge.methods import masks
from mtmerge.methods import registry
from mtmerge.transforms import combine
from mtmerge.transforms import sparsify


class Drop(NamedTuple):
  """DARE's Bernoulli draw for one block (see `drop_args`).

  key: the leaf's raw key data `uint32[2]` (`fold_in(key(seed), leaf)`);
  off_hi, off_lo: `uint32[T]` 64-bit offsets of task t's first block entry
  in the flat `[T, *shape]` draw of the whole leaf.
  """
  key: Any
  off_hi: Any
  off_lo: Any


def drop_args(seed: int, leaf: int, shape: tuple, r0: int, T: int) -> Drop:
  """The `Drop` of rows `[r0, ...)` of leaf `leaf` (of shape `shape`)."""
  key = jax.random.fold_in(jax.random.key(seed), leaf)
  n = int(np.prod(shape, dtype=np.int64))
  inner = n // shape[0] if len(shape) >= 2 and shape[0] else n
  offs = [t * n + (r0 * inner if len(shape) >= 2 else 0) for t in range(T)]
  return Drop(jax.random.key_data(key),
              np.array([o >> 32 for o in offs], np.uint32),
              np.array([o & 0xffffffff for o in offs], np.uint32))


def _block_uniform(d: Drop, shape: tuple) -> jax.Array:
  """`jax.random.uniform` of the whole leaf, restricted to this block.

  With `jax_threefry_partitionable` (the default) entry i of a draw is
  threefry2x32(key, i) of its flat index i (as two uint32 halves), so a
  block needs only its own counters: the same floats as the whole draw.
  """
  T = shape[0]
  local = jax.lax.broadcasted_iota(jnp.uint32, (T, int(np.prod(
      shape[1:], dtype=np.int64))), 1)
  lo = d.off_lo[:, None] + local
  hi = d.off_hi[:, None] + (lo < local).astype(jnp.uint32)
  b1, b2 = _threefry.threefry2x32_p.bind(d.key[0], d.key[1], hi, lo)
  bits = jax.lax.shift_right_logical(b1 ^ b2, jnp.uint32(32 - 23))
  bits = bits | jnp.uint32(np.array(1.0, np.float32).view(np.uint32))
  u = jax.lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(1.0)
  return jnp.maximum(jnp.float32(0.0), u).reshape(shape)


def tvs(b, ms, drop: Drop | None = None, drop_rate: float = 0.0,
        rescale: bool = True) -> jax.Array:
  """float32 task vectors `[T, rows, ...]` of a block (DARE-dropped).

  `ms` is the models' rows stacked `[T, rows, ...]`: one elementwise
  fusion over it (a `jnp.stack` of per-model differences would be
  materialized, ~6x slower on XLA:CPU).
  """
  x = ms.astype(jnp.float32) - b.astype(jnp.float32)[None]
  if drop is not None:
    keep = 1.0 - drop_rate
    x = sparsify.keep_rescaled(x, _block_uniform(drop, x.shape) < keep,
                               keep, rescale)
  return x


_DROP = ("drop_rate", "rescale")


def _kernel(*static: str):
  """`jax.jit` of a block kernel with an optional `out_sharding` argument.

  On a mesh the executor passes the block's `NamedSharding` (rows split
  over the devices): the result is constrained to it, so the block is
  computed and left sharded, never gathered onto one device.
  """
  def deco(f):
    def run(*args, out_sharding=None, **kw):
      y = f(*args, **kw)
      if out_sharding is None:
        return y
      return jax.lax.with_sharding_constraint(y, out_sharding)
    run.__name__, run.__doc__ = f.__name__, f.__doc__
    return jax.jit(run, static_argnames=static + ("out_sharding",))
  return deco


@_kernel(*_DROP)
def tv_block(b, ms, drop=None, drop_rate=0.0, rescale=True):
  """The block's (dropped) float32 task vectors, for host-side statistics."""
  return tvs(b, ms, drop, drop_rate, rescale)


@_kernel("name", "static")
def local(b, ms, traced, name, static):
  """A block-local method on the block: its registered fn on `{"x": ...}`."""
  spec = registry.get(name)
  out = spec.fn({"x": b}, {"x": tvs(b, ms)}, **dict(static), **traced)
  return out["x"]


def _col(thr, i, x):
  return thr[:, i].reshape((x.shape[0],) + (1,) * (x.ndim - 1))


@functools.partial(jax.jit, static_argnames=_DROP + ("sign_method",))
def ties_votes(b, ms, thr, w, drop=None, drop_rate=0.0, rescale=True,
               sign_method="sum"):
  """The exact int sum of a block's TIES votes (`combine._leaf_vote`)."""
  x = tvs(b, ms, drop, drop_rate, rescale)
  t = _col(thr, 0, x)
  v = combine._leaf_vote(x, t, w, sign_method).astype(jnp.int32)
  return jnp.sum(v)


@_kernel(*_DROP, "sign_method", "zero_sign", "merge_func")
def ties_apply(b, ms, thr, total, w, scale, drop=None, drop_rate=0.0,
               rescale=True, sign_method="sum", zero_sign="majority",
               merge_func="sum"):
  """`theta_0 + scale * tau_TIES` of a block (`combine._apply_kernel`)."""
  x = tvs(b, ms, drop, drop_rate, rescale)
  t = _col(thr, 0, x)
  return combine._apply_kernel(b, x, t, None, None, total, w, scale,
                               sign_method=sign_method, zero_sign=zero_sign,
                               merge_func=merge_func)


@_kernel(*_DROP, "band")
def trim_apply(b, ms, thr, scale, drop=None, drop_rate=0.0, rescale=True,
               band=False):
  """Trim (or DARE-drop), then task arithmetic with `scale`.

  `band=False`: keep `|tau| >= thr[:, 0]` (magnitude pruning; no trim when
  `thr` is zero). `band=True`: keep `thr[:, 1] <= |tau| < thr[:, 0]`
  (Breadcrumbs: columns from the (removed, removed + kept) counts).
  """
  x = tvs(b, ms, drop, drop_rate, rescale)
  a = jnp.abs(x).astype(jnp.float32)
  if band:
    x = jnp.where((a >= _col(thr, 1, x)) & (a < _col(thr, 0, x)), x, 0)
  elif thr is not None:
    x = jnp.where(a >= _col(thr, 0, x), x, 0)
  return arithmetic.task_arithmetic({"x": b}, {"x": x}, scale)["x"]


@jax.jit
def gram(b, ms):
  """The block's partial Gram matrix `[T, T]` of flattened task vectors."""
  x = tvs(b, ms)
  x = x.reshape(x.shape[0], -1)
  return x @ x.T


@_kernel()
def stock_apply(b, ms, cos):
  """Model Stock's `theta_0 + t * mean_t tau_t` given the tensor's cosine."""
  return interpolate.model_stock_apply(b, tvs(b, ms), cos)


@jax.jit
def slerp_moments(b, ms):
  """Partial `(|a|^2, |c|^2, a.c)` of SLERP's end points over the block."""
  a, c = interpolate.slerp_ends(b, tvs(b, ms))
  return jnp.stack([jnp.sum(a * a), jnp.sum(c * c), jnp.sum(a * c)])


@_kernel()
def slerp_apply(b, ms, t, dot):
  """SLERP of the block given the tensor's direction cosine `dot`."""
  a, c = interpolate.slerp_ends(b, tvs(b, ms))
  return interpolate.slerp_mix(a, c, t, dot).astype(b.dtype)


@_kernel("k", "merge_func")
def consensus_ties_apply(b, ms, thr, total, lam, scale, k, merge_func):
  """Consensus merging on the TIES vector (`masks.consensus`), one block.

  The TIES vector from `combine`'s vote and merge kernels (sum votes, zero
  votes to the model-wide majority, no weights), then the TALL masks'
  `sum_t m_t >= k` filter and `theta_0 + scale * tau`.
  """
  x = tvs(b, ms)
  t = _col(thr, 0, x)
  v = combine._leaf_vote(x, t, None, "sum")
  s = jnp.where(v == 0, combine._fill(total, "majority"), v)
  tau = combine._leaf_merge(x, t, s, None, merge_func)
  m = masks.tall_masks({"x": x}, {"x": tau}, lam)["x"]
  keep = jnp.sum(m.astype(jnp.int32), axis=0) >= k
  merged = jnp.where(keep, tau, 0)
  return task_vectors.apply({"x": b}, {"x": merged}, scale)["x"]
