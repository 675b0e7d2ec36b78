"""Helpers for tests and notebooks: random param trees and sharding them.

`random_params` builds trees with the leaf kinds real models have (scalars,
vectors, matrices, 3-D kernels, shapes that do and do not divide 8), so every
method is exercised on awkward shapes, not just square matrices.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

Tree = Any

SHAPES: dict[str, tuple[int, ...]] = {
    "embed/table": (40, 16),
    "block_0/attn/kernel": (16, 24),
    "block_0/attn/bias": (24,),
    "block_0/mlp/kernel": (16, 4, 8),
    "block_1/dense/kernel": (24, 13),
    "block_1/norm/scale": (13,),
    "head/temperature": (),
}


def random_params(seed: int = 0, shapes: dict[str, tuple[int, ...]] = None,
                  dtype=np.float32) -> dict[str, Any]:
  """A nested dict of N(0, 1) leaves with `/`-separated names from `shapes`."""
  from mtmerge import tree as tree_lib
  rng = np.random.default_rng(seed)
  flat = {k: rng.standard_normal(s).astype(np.float32).astype(dtype)
          for k, s in (shapes or SHAPES).items()}
  return tree_lib.from_flat_dict(flat)


def random_models(base: Tree, num: int, seed: int = 1, scale: float = 0.1,
                  sparsity: float = 0.0) -> list[Tree]:
  """`num` fine-tuned variants `base + scale * N(0, 1)` (optionally sparse)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    def one(x):
      d = rng.standard_normal(np.shape(x)).astype(np.float32) * scale
      if sparsity:
        d = np.where(rng.random(np.shape(x)) < sparsity, 0.0, d)
      return (np.asarray(x, np.float32) + d).astype(np.asarray(x).dtype)
    out.append(jax.tree.map(one, base))
  return out


def leaf_spec(shape: Sequence[int], axis_size: int, mode: str, lead: int = 1,
              axis: str = "x") -> P:
  """PartitionSpec sharding the task axis (`task`) or a param dim (`param`).

  Picks the first eligible dim divisible by `axis_size`; replicates when none
  is, so trees with awkward shapes still shard what they can.
  """
  dims = range(0, lead) if mode == "task" else range(lead, len(shape))
  for d in dims:
    if shape[d] % axis_size == 0 and shape[d] > 0:
      spec = [None] * len(shape)
      spec[d] = axis
      return P(*spec)
  return P()


def shard(tree: Tree, mesh: jax.sharding.Mesh, mode: str, lead: int = 1,
          axis: str = "x") -> Tree:
  """`device_put`s each leaf with `leaf_spec` over `mesh`."""
  size = mesh.shape[axis]
  return jax.tree.map(
      lambda x: jax.device_put(
          jnp.asarray(x),
          NamedSharding(mesh, leaf_spec(np.shape(x), size, mode, lead, axis))),
      tree)


def to_numpy(tree: Tree) -> dict[str, np.ndarray]:
  """Flat `{path: float64 ndarray}` view (for NumPy references)."""
  from mtmerge import tree as tree_lib
  return {k: np.asarray(jnp.asarray(v, jnp.float32), np.float64)
          for k, v in tree_lib.named_leaves(tree)}
