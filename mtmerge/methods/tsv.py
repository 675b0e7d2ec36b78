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

Under a mesh (`jax.set_mesh`) LAPACK's SVD would gather each matrix whole
onto every device (7B x 8 tasks on 64 devices: 11.0 GiB per device).
There the factorizations go through Gram matrices instead
(`gram_top_svd`, `gram_polar`): only the short side's `n x n` matrix is
replicated, the long side stays split, and the leaves and tasks run one
after another (2.79 GiB per device, 1.52x the arguments). Squaring costs
accuracy only for singular values near `sqrt(eps)` of the largest, far
below TSV's kept top `1/T`; the merge equals the LAPACK route to ~1e-5
(tests/test_methods.py).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import jax.numpy as jnp

from mtmerge import sharding
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


def _gram(a: jax.Array) -> jax.Array:
  """`a^T a` in float32 at full precision (an all-reduce when a's rows are
  split over devices)."""
  return jnp.matmul(a.T, a, precision=jax.lax.Precision.HIGHEST)


def _long_rows(a: jax.Array) -> jax.Array:
  """`a` (taller than wide) with its rows split over the mesh's devices:
  every product below then contracts or keeps the long axis where it lies,
  and only `n x n` matrices are replicated."""
  return sharding.rows_sharded(a, 0, whole_rows=True)


def gram_top_svd(a: jax.Array, k: int):
  """Top-k singular triplets of one matrix from its Gram matrix.

  The mesh's form of `thin_svd` truncated to k: a sharded matrix is never
  gathered. `a^T a = V diag(S^2) V^T` (`eigh` of the short side, replicated),
  `U = a V / S`. Squaring doubles the condition number's exponent: kept
  singular values near `sqrt(eps) * S_max` lose accuracy, which TSV's top
  `1/T` of a task vector's spectrum is far from (tests compare it with the
  LAPACK path).

  Returns `(U [m, k], S [k], V^T [k, n])`, S descending.
  """
  _check_2d(a)
  m, n = a.shape
  if m < n:
    u, s, vt = gram_top_svd(a.T, k)
    return vt.T, s, u.T
  a = _long_rows(a)
  lam, v = jnp.linalg.eigh(_gram(a))          # ascending
  lam, v = lam[::-1][:k], v[:, ::-1][:, :k]
  s = jnp.sqrt(jnp.maximum(lam, 0.0))
  u = jnp.matmul(a, v, precision=jax.lax.Precision.HIGHEST)
  return u / jnp.where(s > 0, s, 1.0)[None, :], s, v.T


def gram_polar(a: jax.Array) -> jax.Array:
  """`polar_factor` of one matrix from its Gram matrix: `a (a^T a)^(-1/2)`
  (the mesh's form; directions with no weight, `a^T a`'s eigenvalues below
  `eps * max`, are left out)."""
  _check_2d(a)
  m, n = a.shape
  if m < n:
    return gram_polar(a.T).T
  a = _long_rows(a)
  lam, w = jnp.linalg.eigh(_gram(a))
  tiny = jnp.finfo(jnp.float32).eps * jnp.max(lam)
  inv = jnp.where(lam > tiny, jax.lax.rsqrt(jnp.maximum(lam, tiny)), 0.0)
  return jnp.matmul(a, (w * inv[None, :]) @ w.T,
                    precision=jax.lax.Precision.HIGHEST)


def tsv_matrix(x: jax.Array, gram: bool = False) -> jax.Array:
  """TSV-merged update of one stacked 2-D leaf `[T, m, n]` (float32).

  `gram`: factorize through Gram matrices (`gram_top_svd`, `gram_polar`),
  as under a mesh, where LAPACK's SVD would gather each matrix whole.
  """
  T, m, n = x.shape
  k = max(min(m, n) // T, 1)
  us, ss, vts = [], [], []
  for t in range(T):  # one factorization per task: see the module doc
    if gram:  # task after task: one Gram matrix at a time
      xt = x[t] if not ss else sharding.pass_view(x[t], (us[-1], vts[-1]))
      u, s, vt = gram_top_svd(xt.astype(jnp.float32), k)
      # The kept vectors as buffers of their own, so each task's n x n
      # eigenvectors die before the next task's Gram matrix (XLA would
      # keep all T until the concatenation below reads their slices).
      u, vt = (sharding.pass_view(a, s) for a in (u, vt))
    else:
      u, s, vt = thin_svd(x[t].astype(jnp.float32))
    us.append(u[:, :k])
    ss.append(s[:k])
    vts.append(vt[:k, :])
  # Concatenate along the rank axis: U [m, T k], S [T k], V^T [T k, n].
  u_cat = jnp.concatenate(us, axis=1)
  s_cat = jnp.concatenate(ss)
  vt_cat = jnp.concatenate(vts, axis=0)
  polar = gram_polar if gram else polar_factor
  u_perp = polar(u_cat)
  vt_perp = polar(vt_cat)
  out = (u_perp * s_cat[None, :]) @ vt_perp
  # Under a mesh, made where U_perp's rows lie (then moved to the leaf's
  # sharding), not from an all-gathered U_perp (876 MB per device for 7B's
  # embedding).
  return _long_rows(out) if gram and m >= n else out


@functools.partial(jax.jit, static_argnames=("matrix", "gram"))
def _merge_leaf(b: jax.Array, x: jax.Array, alpha: jax.Array,
                matrix: bool, gram: bool = False) -> jax.Array:
  """`b + alpha * delta` for one leaf, in float32, cast to `b`'s dtype."""
  x = x.astype(jnp.float32)
  delta = tsv_matrix(x, gram) if matrix else jnp.mean(x, axis=0)
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
    if sharding.under_mesh():
      out = _chained(base, tvs, alpha)
    else:
      out = jax.tree.map(functools.partial(_merge_one, alpha=alpha), base,
                         tvs)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(out)):
      return out  # traced inside a caller's jit: nothing runs here
    return jax.block_until_ready(out)  # the limit must outlive the work


def _chained(base: Tree, tvs: Tree, alpha: jax.Array) -> Tree:
  """Leaf after leaf, each read after the one before (`sharding.pass_view`).

  Under a mesh in one traced program, XLA would otherwise compute every
  leaf's Gram matrices first and hold them all (7B x 8 on 64 devices:
  ~20 GiB of replicated `n x n` all-reduce buffers per device).
  """
  bs, treedef = jax.tree.flatten(base)
  out, prev = [], None
  for b, x in zip(bs, treedef.flatten_up_to(tvs)):
    if prev is not None:
      x = sharding.pass_view(x, prev)
    prev = _merge_one(b, x, alpha)
    out.append(prev)
  return jax.tree.unflatten(treedef, out)


def _merge_one(b: jax.Array, x: jax.Array, alpha: jax.Array) -> jax.Array:
  matrix = x.ndim == 3 and min(x.shape[1:]) > 0
  return _merge_leaf(b, x, alpha, matrix=matrix,
                     gram=matrix and sharding.under_mesh())
