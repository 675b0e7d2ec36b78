"""mergekit's methods on one tensor: mtmerge's equivalent, else its semantics.

`equivalent` maps a tensor's resolved mergekit parameters onto the mtmerge
method that computes the same result (up to float32 rounding and
top-k ties), so the merge runs through mtmerge's own (streamed) kernels:

* `linear` (normalized): `task_arithmetic` with the first model as base
  and coefficients `w_i / sum(w)` for the others.
* `task_arithmetic`: `task_arithmetic` with `lambda * w_t / D`, D the sum
  of weights with `normalize` (when |D| >= 1e-8) else 1.
* `ties` (one density for all models, no `rescale`): `ties_merging` with
  `scope='per_tensor'`, `count='floor'` (mergekit keeps
  `max(1, int(density * n))` entries), the weights applied before the sign
  vote, a zero vote positive, the disjoint mean over agreeing weights
  (`normalize`, else the sum) and `scaling_factor=lambda`.
* `breadcrumbs` (one density and gamma, density + gamma <= 1, no
  `rescale`): `breadcrumbs` per tensor with `count='floor'`; density 1 is
  task arithmetic (mergekit then removes no outliers).
* `model_stock`, `slerp`: mtmerge's methods of the same name.

Everything else (DARE and DELLA, whose survivors mergekit rescales to the
tensor's L1 norm instead of by 1/p; `breadcrumbs_ties`; per-model
densities; `rescale: true`; `linear` without `normalize`) runs in
`compute`, float32 NumPy written from mergekit's semantics. Its random
masks use NumPy's PCG64 seeded by (seed, tensor name, model): the same
statistics as mergekit's `torch.bernoulli` (keep probability `density`,
DELLA's rank-linear probabilities), never the same bits, which no JAX or
NumPy generator can reproduce.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from mtmerge import mergekit_config


def equivalent(method: str, pm: list[dict], sh: dict[str, Any]
               ) -> tuple[str, dict[str, Any]] | None:
  """`(mtmerge method, hparams)` computing `method` on a tensor, or None."""
  T = len(pm)
  w = [float(p.get("weight", 1.0)) for p in pm]
  if method == "linear":
    if not sh["normalize"] or T < 2 or abs(sum(w)) < 1e-30:
      return None
    return "task_arithmetic", {"scaling_factor": [x / sum(w) for x in w[1:]]}
  if method == "slerp":
    return "slerp", {"t": float(sh["t"])}
  if method == "model_stock":
    return "model_stock", {}
  d = sum(w) if sh["normalize"] and abs(sum(w)) >= 1e-8 else 1.0
  lam = float(sh["lambda"])
  coeffs = [lam * x / d for x in w]
  dens = {float(p["density"]) for p in pm}
  if method == "task_arithmetic" or (method == "breadcrumbs"
                                     and dens == {1.0}):
    return "task_arithmetic", {"scaling_factor": coeffs}
  if sh["rescale"] or len(dens) != 1:
    return None
  density = dens.pop()
  if method == "ties":
    return "ties_merging", dict(
        scope="per_tensor", count="floor", threshold=density,
        merge_func="mean" if sh["normalize"] else "sum", sign_method="sum",
        zero_sign="positive", weights=w, scaling_factor=lam)
  if method == "breadcrumbs":
    gammas = {float(p["gamma"]) for p in pm}
    gamma = gammas.pop()
    if gammas or density + gamma > 1.0:
      return None
    return "breadcrumbs", dict(scope="per_tensor", count="floor",
                               threshold=density, gamma=gamma,
                               scaling_factor=coeffs)
  return None


def _rng(seed: int, name: str, t: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), zlib.crc32(name.encode()), t])


def _rescaled(x: np.ndarray, mask: np.ndarray, rescale: bool) -> np.ndarray:
  """mergekit's `rescaled_masked_tensor` with the L1 norm."""
  y = np.where(mask, x, np.float32(0))
  if not rescale:
    return y
  before, after = np.abs(x).sum(dtype=np.float32), np.abs(y).sum(
      dtype=np.float32)
  if before < 1e-7 or after < 1e-7:
    return y
  return y * np.float32(before / after)


def sparsify(x: np.ndarray, kind: str, p: dict, rescale: bool,
             rng: np.random.Generator | None) -> np.ndarray:
  """One model's task vector sparsified as mergekit's `sparsify` does."""
  density = float(p["density"])
  if density >= 1.0:
    return x
  n = x.size
  flat = np.abs(x).reshape(-1)
  mask = np.zeros(n, bool)
  if kind == "magnitude":
    k = max(1, int(density * n))
    mask[np.argsort(-flat, kind="stable")[:k]] = True
  elif kind == "magnitude_outliers":
    target, top = int(density * n), int(float(p["gamma"]) * n)
    bot = max(0, n - target - top)
    mask[np.argsort(flat, kind="stable")[bot:bot + target]] = True
  elif kind == "random":
    mask = rng.random(n) < density
  else:  # della_magprune: per row, keep prob linear in the magnitude rank
    eps = float(p["epsilon"])
    if density + eps >= 1 or density - eps <= 0:
      raise ValueError(f"DELLA: density +/- epsilon must lie in (0, 1), got "
                       f"density {density}, epsilon {eps}")
    rows = flat.reshape(x.shape[0] if x.ndim >= 2 else 1, -1)
    ranks = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1,
                       kind="stable").astype(np.float32)
    c = rows.shape[1]
    r = ranks / np.float32(c - 1) if c > 1 else np.zeros_like(ranks)
    probs = (density - eps) + r * np.float32(2 * eps)
    mask = (rng.random(rows.shape) < probs).reshape(-1)
  return _rescaled(x, mask.reshape(x.shape), rescale)


def compute(method: str, base: np.ndarray | None, xs: np.ndarray,
            pm: list[dict], sh: dict[str, Any], name: str) -> np.ndarray:
  """mergekit's `method` on one tensor, float32.

  Args:
    method: a mergekit method of the task-arithmetic family, or `linear`.
    base: the base tensor (None for `linear`).
    xs: the models' tensors stacked `[T, ...]`.
    pm, sh: `Config.tensor_params(name)`.
    name: the tensor's name (seeds random masks).
  """
  xs = xs.astype(np.float32, copy=False)
  w = np.asarray([float(p["weight"]) for p in pm], np.float32)
  if method == "linear":
    out = np.tensordot(w, xs, axes=1)
    return out / w.sum(dtype=np.float32) if sh["normalize"] else out
  kind, consensus = mergekit_config.gta(method)
  b = base.astype(np.float32)
  seed = int(sh.get("seed", 0))
  deltas = np.stack([
      sparsify(xs[t] - b, kind, pm[t], bool(sh["rescale"]),
               _rng(seed, name, t)) if kind else xs[t] - b
      for t in range(len(pm))])
  wb = w.reshape((-1,) + (1,) * b.ndim)
  deltas = deltas * wb
  if consensus:
    majority = np.where(deltas.sum(axis=0) >= 0, np.float32(1),
                        np.float32(-1))
    mask = np.sign(deltas) == majority
    mixed = (deltas * mask).sum(axis=0)
    divisor = (wb * mask).sum(axis=0)
    divisor = np.where(divisor == 0, np.float32(1), divisor)
  else:
    mixed = deltas.sum(axis=0)
    divisor = np.asarray(w.sum(), np.float32)
    if abs(divisor) < 1e-8:
      divisor = np.float32(1)
  if sh["normalize"]:
    mixed = mixed / divisor
  if float(sh["lambda"]) != 1:
    mixed = mixed * np.float32(sh["lambda"])
  return b + mixed
