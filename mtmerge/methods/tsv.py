"""TSV-Merge: Task Singular Vectors (Gargiulo et al. 2025, "Task Singular
Vectors: Reducing Task Interference in Model Merging"; official
AntoAndGar/task_singular_vectors).

Per 2-D leaf, each task's update is truncated to its top `k = min(m, n) // T`
singular triplets; the concatenated left and right singular vectors are
decorrelated by replacing each with its orthogonal polar factor, and the
merged update is `U_perp diag(S) V_perp^T`. Other leaves are averaged.

Every factorization here is of ONE matrix, never a batch. jaxlib 0.10's
CPU LAPACK kernels split a batch into chunks on XLA's intra-op thread pool
and block a pool thread until the chunks finish; when as many batched
factorizations run at once as the pool has threads (2 on a 2-core host,
reached by the independent leaves of a whole-model program), every thread
waits on work that no thread is left to run, and the merge hangs with idle
CPUs. A single matrix is factorized inline on the calling thread. Tall (or
wide) matrices go through a thin QR first, so LAPACK's SVD only sees a
square `min(m, n)` factor: `x = Q R`, `R = U_r S V^T`, `x = (Q U_r) S V^T`,
and the polar factor is `Q polar(R)` (Golub & Van Loan, Matrix
Computations, 4th ed., 8.6.3 and 9.4.3).

Those LAPACK calls run in OpenBLAS (scipy's, which jaxlib uses) while XLA
already runs independent leaves on every core; OpenBLAS's own threads then
oversubscribe the cores and spin (MiniLM, T=3, on a busy 2-core host: 126 s
with OpenBLAS' default threads, 13 s with one), so the merge holds OpenBLAS
to one thread while it runs.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import jax.numpy as jnp

from mtmerge.methods import registry
from mtmerge.methods import validate as v

Tree = Any


def one_blas_thread():
  """A context limiting BLAS/LAPACK libraries to one thread (if possible).

  `tsv_merging` runs inside it. Run a whole-program `jax.jit` of it (as
  `registry.jitted` builds) inside it too: there XLA runs the leaves'
  factorizations concurrently and OpenBLAS' own threads make MiniLM crawl
  (over 300 s for T=3 on a busy 2-core host).
  """
  try:
    import scipy.linalg  # noqa: F401  (loads the OpenBLAS jaxlib calls)
    import threadpoolctl  # a scikit-learn dependency
  except ImportError:
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def _check_2d(a: jax.Array) -> None:
  if a.ndim != 2:
    raise ValueError(f"expected one matrix, got shape {tuple(a.shape)} "
                     "(batched factorizations can deadlock XLA:CPU)")


def thin_svd(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Thin SVD `a = U diag(S) V^T` of one matrix, via QR when not square.

  Args:
    a: `[m, n]` float32.

  Returns:
    `(U [m, r], S [r], V^T [r, n])`, `r = min(m, n)`, `S` descending.
  """
  _check_2d(a)
  m, n = a.shape
  if m < n:
    u, s, vt = thin_svd(a.T)
    return vt.T, s, u.T
  if m == n:
    return jnp.linalg.svd(a, full_matrices=False)
  q, r = jnp.linalg.qr(a, mode="reduced")
  ur, s, vt = jnp.linalg.svd(r, full_matrices=False)
  return q @ ur, s, vt


def polar_factor(a: jax.Array) -> jax.Array:
  """The orthogonal polar factor `P Q^T` of one matrix `a = P S Q^T`.

  For `m > n`: `a = Q R` and `polar(a) = Q polar(R)`, one `n x n` SVD.
  """
  _check_2d(a)
  m, n = a.shape
  if m < n:
    return polar_factor(a.T).T
  if m > n:
    q, r = jnp.linalg.qr(a, mode="reduced")
    return q @ polar_factor(r)
  p, _, qt = jnp.linalg.svd(a, full_matrices=False)
  return p @ qt


def tsv_matrix(x: jax.Array) -> jax.Array:
  """TSV-merged update of one stacked 2-D leaf `[T, m, n]` (float32)."""
  T, m, n = x.shape
  k = max(min(m, n) // T, 1)
  us, ss, vts = [], [], []
  for t in range(T):  # one factorization per task: see the module doc
    u, s, vt = thin_svd(x[t].astype(jnp.float32))
    us.append(u[:, :k])
    ss.append(s[:k])
    vts.append(vt[:k, :])
  # Concatenate along the rank axis: U [m, T k], S [T k], V^T [T k, n].
  u_cat = jnp.concatenate(us, axis=1)
  s_cat = jnp.concatenate(ss)
  vt_cat = jnp.concatenate(vts, axis=0)
  u_perp = polar_factor(u_cat)
  vt_perp = polar_factor(vt_cat)
  return (u_perp * s_cat[None, :]) @ vt_perp


@functools.partial(jax.jit, static_argnames="matrix")
def _merge_leaf(b: jax.Array, x: jax.Array, alpha: jax.Array,
                matrix: bool) -> jax.Array:
  """`b + alpha * delta` for one leaf, in float32, cast to `b`'s dtype."""
  x = x.astype(jnp.float32)
  delta = tsv_matrix(x) if matrix else jnp.mean(x, axis=0)
  return (b.astype(jnp.float32) + alpha * delta).astype(b.dtype)


@registry.register("tsv_merging", validators={"alpha": v.coeff("alpha")},
                   jit=False)
def tsv_merging(base: Tree, tvs: Tree, alpha: Any = 1.0) -> Tree:
  """TSV-M: per 2-D leaf low-rank, decorrelated merge; `theta_0 + alpha * delta`.

  Args:
    alpha: global scaling (paper searches 0.1-3.0; FusionBench default 1.0).

  Leaves that are not matrices (biases, norms, 3-D+ kernels) get the mean
  task vector, as in the official code. Runs orchestrated (`jit=False`):
  one jitted kernel per distinct leaf shape, leaf by leaf.
  """
  alpha = jnp.asarray(alpha, jnp.float32)
  with one_blas_thread():
    out = jax.tree.map(functools.partial(_merge_one, alpha=alpha), base, tvs)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(out)):
      return out  # traced inside a caller's jit: nothing runs here
    return jax.block_until_ready(out)  # the limit must outlive the work


def _merge_one(b: jax.Array, x: jax.Array, alpha: jax.Array) -> jax.Array:
  matrix = x.ndim == 3 and min(x.shape[1:]) > 0
  return _merge_leaf(b, x, alpha, matrix=matrix)
