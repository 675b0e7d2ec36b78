"""One-model-per-task compressed form: a shared vector plus bit-packed masks.

TALL masks (Wang et al. 2024, "Localizing Task Information for Improved Model
Merging and Compression") and EMR-Merging (Huang et al. 2024) serve task t as
`theta_0 + rescale_t * (m_t * tau)`: instead of T checkpoints they store one
vector `tau`, T masks at 1 bit per entry, and T scalars.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import task_vectors
from mtmerge import tree as tree_lib

Tree = Any


class Compressed(NamedTuple):
  """Shared vector + packed per-task masks + per-task rescalers (a pytree).

  Attributes:
    tau: the shared task vector (structure of the params).
    masks: bit-packed masks, uint8 leaves `[T, *shape[:-1],
      ceil(shape[-1] / 8)]` (`task_vectors.pack_mask(rows=True)`: each row
      packed on its own, so a mask shards like its parameter; files hold
      the flat `[T, ceil(size / 8)]`, see `compressed_io.save`).
    rescalers: float32 `[T]` (1.0 for TALL masks).
  """
  tau: Tree
  masks: Tree
  rescalers: jax.Array

  @property
  def num_tasks(self) -> int:
    return int(self.rescalers.shape[0])


def compress(tau: Tree, masks: Tree, rescalers: jax.Array | None = None
             ) -> Compressed:
  """Packs bool masks `[T, ...]` and bundles them with `tau`."""
  T = task_vectors.num_tasks(masks)
  r = jnp.ones((T,), jnp.float32) if rescalers is None else jnp.asarray(
      rescalers, jnp.float32)
  return Compressed(tau, task_vectors.pack_mask(masks, rows=True), r)


def task_vector(c: Compressed, t) -> Tree:
  """Task t's vector `rescale_t * m_t * tau` (t may be traced)."""
  masks = task_vectors.unpack_mask(
      jax.tree.map(lambda p: p[t][None], c.masks), c.tau)
  return jax.tree.map(
      lambda x, m: (c.rescalers[t] * jnp.where(m[0], x.astype(jnp.float32),
                                               0)).astype(x.dtype),
      c.tau, masks)


def reconstruct(base: Tree, c: Compressed, t: int) -> Tree:
  """Task t's model `theta_0 + rescale_t * m_t * tau`, in base's dtypes."""
  T = c.num_tasks
  if not 0 <= int(t) < T:
    raise ValueError(f"task index {t} out of range: the compressed model "
                     f"holds {T} tasks (0..{T - 1})")
  tree_lib.check_same_structure(base, c.tau, "base", "compressed vector")
  return _reconstruct(base, c, jnp.asarray(t, jnp.int32))


@jax.jit
def _reconstruct(base, c, t):
  return task_vectors.apply(base, task_vector(c, t))


def storage_bytes(c: Compressed) -> int:
  """Bytes of the compressed form (vector + packed masks + rescalers).

  The masks count as stored in files: `T * ceil(size / 8)` bytes per leaf.
  """
  T = c.num_tasks
  mask_bytes = sum(T * -(-int(np.prod(np.shape(x), dtype=np.int64)) // 8)
                   for x in jax.tree.leaves(c.tau))
  return tree_lib.tree_bytes(c.tau) + mask_bytes + int(c.rescalers.size * 4)
