"""Independent NumPy reference implementations of model-merging methods.

Used as the oracle in tests of mtmerge. Written directly from the papers'
equations (and, where noted, from the conventions of mergekit / the official
repositories), deliberately without reference to mtmerge's own code. Pure
NumPy, float64 throughout, plain loops over parameter names and tasks; speed
does not matter here, clarity does.

Common conventions
------------------
* ``base`` is a dict name -> array (theta_0); ``finetuned`` is a list of such
  dicts with the same keys and shapes (theta_t). Task vectors are
  ``tau_t = finetuned[t] - base``. Every function returns a new dict of float64
  arrays (the caller casts).
* Arrays of any shape are supported, including 0-D scalars and 1-D vectors.
* "Number kept" for a fraction ``f`` of ``n`` entries (TIES, PCB, magnitude
  prune): ``k = floor(f * n + 0.5)`` (round half up) clipped to ``[1, n]``.
  An entry is kept when its score is ``>=`` the k-th largest score, so ties at
  the threshold are all kept (possibly more than k entries).
* "Rows" (breadcrumbs, DELLA, model_stock filter-wise): the last axis of a
  parameter with ndim >= 2 (all leading axes flattened), a 1-D parameter is one
  row, a 0-D parameter is one row of length 1.
"""

import numpy as np


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _f64(x):
  return np.asarray(x, dtype=np.float64)


def _task_vectors(base, finetuned):
  """tau_t = theta_t - theta_0 for every task, as float64 dicts."""
  taus = []
  for ft in finetuned:
    tau = {}
    for name in base:
      tau[name] = _f64(ft[name]) - _f64(base[name])
    taus.append(tau)
  return taus


def _add_scaled(base, delta, scale):
  """base + scale * delta, per parameter."""
  out = {}
  for name in base:
    out[name] = _f64(base[name]) + scale * _f64(delta[name])
  return out


def _sum_over_tasks(dicts, name):
  total = np.zeros_like(dicts[0][name], dtype=np.float64)
  for d in dicts:
    total = total + d[name]
  return total


def _num_kept(fraction, n):
  """Round-half-up count of a fraction of n, clipped to [1, n]."""
  k = int(np.floor(fraction * n + 0.5))
  return min(max(k, 1), n)


def _round_count(fraction, n):
  """Round-half-up count of a fraction of n, clipped to [0, n]."""
  k = int(np.floor(fraction * n + 0.5))
  return min(max(k, 0), n)


def _kth_largest(values, k):
  """The k-th largest (1-based) of a flat array."""
  ordered = np.sort(values.ravel())[::-1]
  return ordered[k - 1]


def _as_rows(x):
  """2-D view of x where each row is one 'row' in the sense of the module doc."""
  x = _f64(x)
  if x.ndim == 0:
    return x.reshape(1, 1)
  if x.ndim == 1:
    return x.reshape(1, -1)
  return x.reshape(-1, x.shape[-1])


def _per_task_lambdas(tall_mask_lambda, num_tasks):
  if np.ndim(tall_mask_lambda) == 0:
    return [float(tall_mask_lambda)] * num_tasks
  lams = [float(v) for v in tall_mask_lambda]
  if len(lams) != num_tasks:
    raise ValueError("need one tall_mask_lambda per task")
  return lams


def _flatten_dict(d, names):
  """Concatenate the flattened parameters of d in the order of names."""
  return np.concatenate([_f64(d[name]).ravel() for name in names])


def _unflatten(vec, like, names):
  """Inverse of _flatten_dict, shapes taken from like."""
  out = {}
  offset = 0
  for name in names:
    shape = np.shape(like[name])
    size = int(np.prod(shape, dtype=np.int64))
    out[name] = vec[offset:offset + size].reshape(shape)
    offset += size
  return out


# --------------------------------------------------------------------------
# Weight averaging, task arithmetic
# --------------------------------------------------------------------------


def weight_averaging(base, finetuned):
  """Uniform soup: mean_t theta_t."""
  out = {}
  for name in base:
    total = np.zeros(np.shape(base[name]), dtype=np.float64)
    for ft in finetuned:
      total = total + _f64(ft[name])
    out[name] = total / len(finetuned)
  return out


def task_arithmetic(base, finetuned, scaling_factor=0.3):
  """theta_0 + lambda * sum_t tau_t."""
  taus = _task_vectors(base, finetuned)
  tau_mtl = {name: _sum_over_tasks(taus, name) for name in base}
  return _add_scaled(base, tau_mtl, scaling_factor)


# --------------------------------------------------------------------------
# TIES
# --------------------------------------------------------------------------


def _ties_trim(taus, threshold, scope):
  """Keep, per task, the entries whose |tau| >= the k-th largest |tau|.

  scope='global': the k-th largest is over the concatenation of all of the
  task's parameters; scope='per_tensor': per (task, parameter).
  """
  trimmed = []
  for tau in taus:
    out = {}
    if scope == "global":
      all_abs = np.concatenate([np.abs(v).ravel() for v in tau.values()])
      k = _num_kept(threshold, all_abs.size)
      cut = _kth_largest(all_abs, k)
      for name, v in tau.items():
        out[name] = np.where(np.abs(v) >= cut, v, 0.0)
    elif scope == "per_tensor":
      for name, v in tau.items():
        if v.size == 0:
          out[name] = v.copy()
          continue
        k = _num_kept(threshold, v.size)
        cut = _kth_largest(np.abs(v), k)
        out[name] = np.where(np.abs(v) >= cut, v, 0.0)
    else:
      raise ValueError(f"unknown scope {scope!r}")
    trimmed.append(out)
  return trimmed


def _elect_signs(vectors, scope, zero_sign="majority"):
  """Elected sign per entry: sign(sum_t v_t); zeros -> a fallback sign.

  zero_sign='majority' (official TIES code, `resolve_zero_signs`): the sign
  of the sum, over every entry of the whole model, of the elected signs
  (+1 when that is 0 too), whatever the scope. 'positive': +1 (mergekit).
  """
  del scope  # the fallback is model-wide in the official code
  names = list(vectors[0].keys())
  totals = {name: _sum_over_tasks(vectors, name) for name in names}
  if zero_sign == "positive":
    fallback = 1.0
  else:
    s = np.sign(sum(np.sum(np.sign(totals[name])) for name in names))
    fallback = 1.0 if s == 0 else float(s)
  signs = {}
  for name in names:
    s = np.sign(totals[name])
    signs[name] = np.where(s == 0, fallback, s)
  return signs


def _disjoint_merge(vectors, signs, merge_func, weights=None):
  """Aggregate, per entry, only the task entries that agree with the sign.

  weights (mergekit's `ties`): the vectors are already weighted; 'mean'
  divides by the sum of the agreeing tasks' weights instead of their count.
  """
  merged = {}
  if weights is None:
    weights = [1.0] * len(vectors)
  for name in signs:
    sign = signs[name]
    agree_sum = np.zeros_like(sign)
    agree_count = np.zeros_like(sign)
    agree_maxabs = np.zeros_like(sign)
    for v, w in zip(vectors, weights):
      value = v[name]
      agrees = value * sign > 0  # strictly: zeros never agree
      agree_sum = agree_sum + np.where(agrees, value, 0.0)
      agree_count = agree_count + np.where(agrees, float(w), 0.0)
      agree_maxabs = np.maximum(agree_maxabs,
                                np.where(agrees, np.abs(value), 0.0))
    if merge_func == "sum":
      merged[name] = agree_sum
    elif merge_func == "mean":
      den = np.where(agree_count == 0, 1.0, agree_count)
      merged[name] = np.where(agree_count != 0, agree_sum / den, 0.0)
    elif merge_func == "max":
      # The agreeing entry of largest magnitude; it carries the elected sign.
      merged[name] = sign * agree_maxabs
    else:
      raise ValueError(f"unknown merge_func {merge_func!r}")
  return merged


def _ties_merge_vectors(vectors, threshold, merge_func, scope,
                        zero_sign="majority", weights=None):
  """Trim -> (weight) -> elect -> disjoint merge on task-vector dicts."""
  trimmed = _ties_trim(vectors, threshold, scope)
  if weights is not None:
    trimmed = [{name: float(w) * v for name, v in tau.items()}
               for tau, w in zip(trimmed, weights)]
  signs = _elect_signs(trimmed, scope, zero_sign)
  return _disjoint_merge(trimmed, signs, merge_func, weights)


def ties_merged_vector(base, finetuned, threshold=0.2, merge_func="sum",
                       scope="global", zero_sign="majority", weights=None):
  """The TIES merged task vector (before scaling)."""
  taus = _task_vectors(base, finetuned)
  return _ties_merge_vectors(taus, threshold, merge_func, scope, zero_sign,
                             weights)


def ties_merging(base, finetuned, scaling_factor=0.3, threshold=0.2,
                 merge_func="sum", scope="global", zero_sign="majority",
                 weights=None):
  """TIES-Merging (Yadav et al. 2023), with mergekit's `ties` options.

  threshold is the fraction of entries KEPT per task (k = round-half-up of
  threshold * n, clipped to [1, n]; ties at the cut kept). weights (mergekit,
  Goddard et al. 2024): each trimmed task vector is multiplied by w_t before
  the vote. Elected sign = sign(sum_t w_t trimmed_t); a zero becomes
  zero_sign='majority': the sign of the sum of every elected sign of the
  whole model (+1 if that is 0 too; official TIES code), or 'positive': +1
  (mergekit). merge_func: 'mean' (sum of agreeing weighted entries / sum of
  the agreeing tasks' weights (their count without weights), 0 if none),
  'sum', or 'max' (agreeing entry of largest magnitude). Result
  theta_0 + lambda * merged.
  """
  merged = ties_merged_vector(base, finetuned, threshold, merge_func, scope,
                              zero_sign, weights)
  return _add_scaled(base, merged, scaling_factor)


# --------------------------------------------------------------------------
# DARE (deterministic: masks are given)
# --------------------------------------------------------------------------


def dare_from_masks(base, finetuned, keep_masks, drop_rate, scaling_factor,
                    then="sum", ties_threshold=1.0, merge_func="sum",
                    scope="global"):
  """DARE (Yu et al. 2024) with given keep masks.

  tau_t' = keep_mask_t * tau_t / (1 - drop_rate); then
  then='sum':  theta_0 + lambda * sum_t tau_t'
  then='ties': theta_0 + lambda * TIES(tau_t', threshold=ties_threshold,
               merge_func, scope). ties_threshold=1.0 keeps every entry (pure
               sign election + disjoint merge).
  """
  if not 0.0 <= drop_rate < 1.0:
    raise ValueError("drop_rate must be in [0, 1)")
  taus = _task_vectors(base, finetuned)
  rescaled = []
  for tau, mask in zip(taus, keep_masks):
    out = {}
    for name in base:
      keep = np.asarray(mask[name], dtype=bool)
      out[name] = np.where(keep, tau[name], 0.0) / (1.0 - drop_rate)
    rescaled.append(out)
  if then == "sum":
    merged = {name: _sum_over_tasks(rescaled, name) for name in base}
  elif then == "ties":
    merged = _ties_merge_vectors(rescaled, ties_threshold, merge_func, scope)
  else:
    raise ValueError(f"unknown then {then!r}")
  return _add_scaled(base, merged, scaling_factor)


def dare_random_masks(base, num_tasks, drop_rate, seed=0):
  """Convenience: Bernoulli(1 - drop_rate) keep masks from numpy's RNG."""
  rng = np.random.default_rng(seed)
  masks = []
  for _ in range(num_tasks):
    masks.append({name: rng.random(np.shape(base[name])) >= drop_rate
                  for name in base})
  return masks


# --------------------------------------------------------------------------
# Model Breadcrumbs
# --------------------------------------------------------------------------


def _breadcrumbs_keep_1d(values, density, top_remove):
  """Mask for one row: drop the top round(top_remove*n) by magnitude, keep the
  next round(density*n), zero the rest. Ties in magnitude are ordered by
  position (stable sort, earlier index counts as larger)."""
  n = values.size
  n_remove = _round_count(top_remove, n)
  n_keep = min(_round_count(density, n), n - n_remove)
  order = np.argsort(-np.abs(values), kind="stable")  # descending magnitude
  keep = np.zeros(n, dtype=bool)
  keep[order[n_remove:n_remove + n_keep]] = True
  return keep


def breadcrumbs_masks(base, finetuned, density=0.1, top_remove=0.006,
                      scope="row"):
  """Per-task keep masks used by breadcrumbs."""
  taus = _task_vectors(base, finetuned)
  masks = []
  for tau in taus:
    out = {}
    for name, v in tau.items():
      if scope == "row":
        rows = _as_rows(v)
        keep_rows = np.zeros(rows.shape, dtype=bool)
        for i in range(rows.shape[0]):
          keep_rows[i] = _breadcrumbs_keep_1d(rows[i], density, top_remove)
        out[name] = keep_rows.reshape(v.shape)
      elif scope == "tensor":
        out[name] = _breadcrumbs_keep_1d(v.ravel(), density,
                                         top_remove).reshape(v.shape)
      else:
        raise ValueError(f"unknown scope {scope!r}")
    masks.append(out)
  return masks


def breadcrumbs(base, finetuned, density=0.1, top_remove=0.006,
                scaling_factor=0.2, scope="row"):
  """Model Breadcrumbs (Davari & Belilovsky 2023).

  Per row (scope='row', the official per-last-dimension variant) or per whole
  tensor (scope='tensor', mergekit's variant): sort |tau_t| descending, drop
  the first round(top_remove * n) entries (outliers), keep the next
  round(density * n), zero the rest; then theta_0 + lambda * sum_t masked tau_t.
  Rounding is round half up; ties in magnitude broken by position.
  """
  taus = _task_vectors(base, finetuned)
  masks = breadcrumbs_masks(base, finetuned, density, top_remove, scope)
  merged = {}
  for name in base:
    total = np.zeros(np.shape(base[name]), dtype=np.float64)
    for tau, mask in zip(taus, masks):
      total = total + np.where(mask[name], tau[name], 0.0)
    merged[name] = total
  return _add_scaled(base, merged, scaling_factor)


# --------------------------------------------------------------------------
# TALL masks and Consensus merging
# --------------------------------------------------------------------------


def tall_masks(base, finetuned, tall_mask_lambda, tau_mtl=None):
  """TALL masks (Wang et al. 2024): m_t = |tau_t| > lambda_t |tau_MTL - tau_t|.

  tau_MTL is the unscaled sum of task vectors unless given. Strict '>'.
  Returns a list (one per task) of dicts of bool arrays.
  """
  taus = _task_vectors(base, finetuned)
  lams = _per_task_lambdas(tall_mask_lambda, len(taus))
  if tau_mtl is None:
    tau_mtl = {name: _sum_over_tasks(taus, name) for name in base}
  masks = []
  for tau, lam in zip(taus, lams):
    out = {}
    for name in base:
      mtl = _f64(tau_mtl[name])
      out[name] = np.abs(tau[name]) > lam * np.abs(mtl - tau[name])
    masks.append(out)
  return masks


def tall_mask_reconstruct(base, finetuned, t, tall_mask_lambda):
  """Task t served from TALL masks: theta_0 + m_t * tau_MTL (coefficient 1)."""
  taus = _task_vectors(base, finetuned)
  tau_mtl = {name: _sum_over_tasks(taus, name) for name in base}
  masks = tall_masks(base, finetuned, tall_mask_lambda, tau_mtl)
  out = {}
  for name in base:
    out[name] = _f64(base[name]) + np.where(masks[t][name], tau_mtl[name], 0.0)
  return out


def consensus(base, finetuned, k=2, tall_mask_lambda=0.4, scaling_factor=0.3,
              base_method="task_arithmetic", ties_threshold=0.2,
              ties_merge_func="sum"):
  """Consensus merging (Wang et al. 2024).

  tau_base = sum_t tau_t ('task_arithmetic') or the unscaled TIES merged
  vector ('ties', global scope, threshold ties_threshold, ties_merge_func).
  TALL masks are computed with tau_MTL = tau_base; an entry is kept when at
  least k masks use it: theta_0 + lambda * 1{sum_t m_t >= k} * tau_base.
  """
  taus = _task_vectors(base, finetuned)
  if base_method == "task_arithmetic":
    tau_base = {name: _sum_over_tasks(taus, name) for name in base}
  elif base_method == "ties":
    tau_base = _ties_merge_vectors(taus, ties_threshold, ties_merge_func,
                                   "global")
  else:
    raise ValueError(f"unknown base_method {base_method!r}")
  masks = tall_masks(base, finetuned, tall_mask_lambda, tau_base)
  merged = {}
  for name in base:
    count = np.zeros(np.shape(base[name]), dtype=np.int64)
    for m in masks:
      count = count + m[name].astype(np.int64)
    merged[name] = np.where(count >= k, tau_base[name], 0.0)
  return _add_scaled(base, merged, scaling_factor)


# --------------------------------------------------------------------------
# PCB-Merging
# --------------------------------------------------------------------------


def _minmax(x):
  """(x - min) / (max - min) over a flat array; all zeros if max == min."""
  lo = np.min(x)
  hi = np.max(x)
  if hi == lo:
    return np.zeros_like(x)
  return (x - lo) / (hi - lo)


def _l2_normalize(x):
  """x / max(||x||_2, 1e-12) (torch.nn.functional.normalize)."""
  return x / max(np.linalg.norm(x), 1e-12)


def _softmax(x):
  e = np.exp(x - np.max(x))
  return e / np.sum(e)


def pcb_merging(base, finetuned, ratio=0.1, scaling_factor=1.0, norm="minmax"):
  """PCB-Merging, paper formulation (Du et al. 2024, Sec. 3), whole model.

  With X_i the flattened task vector of task i (all parameters concatenated,
  D entries) and N the number of tasks:
    intra_i = softmax(N * Norm(X_i * X_i))
    inter_i = sum_j softmax(Norm(X_i * X_j))      (j runs over all tasks)
    beta_i  = intra_i * inter_i
  Drop: keep the top fraction `ratio` of beta_i per task (k = round-half-up of
  ratio * D, clipped to [1, D]; ties at the cut kept), beta_hat_i = m_i beta_i.
  Rescale: tau_m = sum_i beta_hat_i X_i / sum_i beta_hat_i (per entry; 0 where
  no task keeps the entry). Result theta_0 + lambda * tau_m.
  Softmax is over the D entries of one task's vector.

  Norm: the paper writes Norm(.) without an explicit formula. The authors'
  official code uses min-max normalization over the task's entries
  ((x - min) / (max - min)) for the analogous quantity, so the default here is
  norm='minmax' (0 everywhere if max == min). norm='l2' gives the L2 unit
  normalization (x / max(||x||, 1e-12)) that mergekit's pcb.py uses.
  """
  names = list(base.keys())
  taus = _task_vectors(base, finetuned)
  X = np.stack([_flatten_dict(tau, names) for tau in taus])  # (N, D)
  num_tasks, dim = X.shape
  if norm == "minmax":
    normalize = _minmax
  elif norm == "l2":
    normalize = _l2_normalize
  else:
    raise ValueError(f"unknown norm {norm!r}")

  beta = np.zeros_like(X)
  for i in range(num_tasks):
    intra = _softmax(num_tasks * normalize(X[i] * X[i]))
    inter = np.zeros(dim)
    for j in range(num_tasks):
      inter = inter + _softmax(normalize(X[i] * X[j]))
    beta[i] = intra * inter

  k = _num_kept(ratio, dim)
  beta_hat = np.zeros_like(beta)
  for i in range(num_tasks):
    cut = _kth_largest(beta[i], k)
    beta_hat[i] = np.where(beta[i] >= cut, beta[i], 0.0)

  numerator = np.sum(beta_hat * X, axis=0)
  denominator = np.sum(beta_hat, axis=0)
  tau_m = np.where(denominator > 0,
                   numerator / np.where(denominator > 0, denominator, 1.0),
                   0.0)
  return _add_scaled(base, _unflatten(tau_m, base, names), scaling_factor)


def _official_quantile_clamp(row, min_ratio, max_ratio):
  """Clamp a flat row to [s[int(d*min_ratio)], s[int(d*(1-max_ratio)-1)]],
  s the ascending sort (the official `clamp`)."""
  d = row.size
  s = np.sort(row)
  lo = s[int(d * min_ratio)]
  hi = s[int(d * (1 - max_ratio) - 1)]
  return np.clip(row, lo, hi)


def pcb_merging_official(base, finetuned, ratio=0.1, scaling_factor=1.0,
                         clamp_ratio=0.0001):
  """PCB-Merging as in the official code (duguodong7/pcb-merging,
  pcb-merging.py `PCB_merge`), whole model flattened, N tasks, D entries:

    A   = |X| clamped per task at the ascending-sort entries
          int(D*clamp_ratio) and int(D*(1-clamp_ratio)-1)
    Xc  = sign(X) * A                                  (clamped task vectors)
    self_i  = exp(N * minmax(A_i)^2)
    cross_i = tanh(X_i * sum_j X_j)                    (unclamped X)
    score_i = self_i * cross_i
    scale_i = minmax(clamp(score_i, below at sort index int(D*(1-ratio))))
              i.e. everything at or below that quantile becomes 0, the rest is
              min-max rescaled to (0, 1]
    tau_m   = sum_i Xc_i scale_i / max(sum_i scale_i, 1e-12)
    theta_0 + lambda * tau_m

  The official default clamp_ratio is 1e-4 (pcb-merging.py; the NLP
  merge_utils variant uses 0.01), lambda about 1.2 for vision. Differences
  from the paper: quantile clipping of |tau| (and merging the clipped
  vectors), min-max normalization, exp/tanh activations instead of softmax,
  and min-max rescaled kept scores. minmax of a constant row is taken as 0
  here (the official code would produce NaN). Requires 0 < ratio <= 1.
  """
  if not 0.0 < ratio <= 1.0:
    raise ValueError("ratio must be in (0, 1]")
  names = list(base.keys())
  taus = _task_vectors(base, finetuned)
  X = np.stack([_flatten_dict(tau, names) for tau in taus])  # (N, D)
  num_tasks, _ = X.shape

  A = np.stack([_official_quantile_clamp(np.abs(X[i]), clamp_ratio,
                                         clamp_ratio)
                for i in range(num_tasks)])
  Xc = np.sign(X) * A
  total = np.sum(X, axis=0)
  scale = np.zeros_like(X)
  for i in range(num_tasks):
    self_act = np.exp(num_tasks * _minmax(A[i]) ** 2)
    cross_act = np.tanh(X[i] * total)
    score = self_act * cross_act
    scale[i] = _minmax(_official_quantile_clamp(score, 1 - ratio, 0.0))
  tau_m = np.sum(Xc * scale, axis=0) / np.maximum(np.sum(scale, axis=0), 1e-12)
  return _add_scaled(base, _unflatten(tau_m, base, names), scaling_factor)


# --------------------------------------------------------------------------
# EMR-Merging
# --------------------------------------------------------------------------


def emr_merging(base, finetuned):
  """EMR-Merging (Huang et al. 2024): Elect, Mask, Rescale.

  tau_uni = sign * max_t{|tau_t| : tau_t agrees with sign}, with
  sign = +1 where sum_t tau_t > 0 else -1 (zero counts as -1);
  M_t = (tau_t * tau_uni > 0);
  lambda_t = sum_leaves mean|tau_t| / sum_leaves mean|M_t * tau_uni|
  (0 if the denominator is 0, i.e. the mask is empty).
  Returns (tau_uni, masks, rescalers).
  """
  taus = _task_vectors(base, finetuned)
  tau_uni = {}
  for name in base:
    total = _sum_over_tasks(taus, name)
    sign = np.where(total > 0, 1.0, -1.0)
    magnitude = np.zeros_like(total)
    for tau in taus:
      agrees = tau[name] * sign > 0
      magnitude = np.maximum(magnitude, np.where(agrees, np.abs(tau[name]), 0.0))
    tau_uni[name] = sign * magnitude

  masks = []
  rescalers = np.zeros(len(taus))
  for t, tau in enumerate(taus):
    mask = {}
    numerator = 0.0
    denominator = 0.0
    for name in base:
      mask[name] = tau[name] * tau_uni[name] > 0
      if tau[name].size == 0:
        continue
      numerator += np.mean(np.abs(tau[name]))
      denominator += np.mean(np.abs(np.where(mask[name], tau_uni[name], 0.0)))
    masks.append(mask)
    rescalers[t] = numerator / denominator if denominator > 0 else 0.0
  return tau_uni, masks, rescalers


def emr_reconstruct(base, finetuned, t):
  """Task t from EMR: theta_0 + lambda_t * M_t * tau_uni."""
  tau_uni, masks, rescalers = emr_merging(base, finetuned)
  out = {}
  for name in base:
    out[name] = _f64(base[name]) + rescalers[t] * np.where(
        masks[t][name], tau_uni[name], 0.0)
  return out


# --------------------------------------------------------------------------
# Task Singular Vectors (TSV-M)
# --------------------------------------------------------------------------


def _polar_factor(M):
  """Orthogonal polar factor: M = P S Q^T  ->  P Q^T."""
  P, _, Qt = np.linalg.svd(M, full_matrices=False)
  return P @ Qt


def tsv_merging(base, finetuned, alpha=1.0):
  """TSV-Merge (Gargiulo et al. 2025).

  Per 2-D parameter (m x n), T tasks: k = max(1, floor(min(m, n) / T)); for
  each task take the top-k SVD triplets of tau_t; concatenate
  U = [U_1k .. U_Tk], S = [S_1k .. S_Tk], V = [V_1k .. V_Tk] (task order);
  U_perp, V_perp = polar factors of U, V; delta = U_perp diag(S) V_perp^T.
  Any other parameter: delta = mean_t tau_t. Result theta_0 + alpha * delta.
  """
  taus = _task_vectors(base, finetuned)
  num_tasks = len(taus)
  delta = {}
  for name in base:
    shape = np.shape(base[name])
    if len(shape) == 2 and min(shape) > 0:
      k = max(1, min(shape) // num_tasks)
      Us, Ss, Vs = [], [], []
      for tau in taus:
        U, S, Vt = np.linalg.svd(tau[name], full_matrices=False)
        Us.append(U[:, :k])
        Ss.append(S[:k])
        Vs.append(Vt[:k, :].T)
      U_cat = np.concatenate(Us, axis=1)
      S_cat = np.concatenate(Ss)
      V_cat = np.concatenate(Vs, axis=1)
      U_perp = _polar_factor(U_cat)
      V_perp = _polar_factor(V_cat)
      delta[name] = U_perp @ np.diag(S_cat) @ V_perp.T
    else:
      delta[name] = _sum_over_tasks(taus, name) / num_tasks
  return _add_scaled(base, delta, alpha)


# --------------------------------------------------------------------------
# mergekit utilities: magnitude prune, slerp, model stock
# --------------------------------------------------------------------------


def magnitude_prune(base, finetuned, density, scaling_factor=1.0):
  """Per task, per tensor: keep entries with |tau| >= the k-th largest |tau|
  (k = round-half-up of density * n clipped to [1, n]); then
  theta_0 + lambda * sum_t pruned tau_t."""
  taus = _task_vectors(base, finetuned)
  merged = {}
  for name in base:
    total = np.zeros(np.shape(base[name]), dtype=np.float64)
    for tau in taus:
      v = tau[name]
      if v.size == 0:
        continue
      cut = _kth_largest(np.abs(v), _num_kept(density, v.size))
      total = total + np.where(np.abs(v) >= cut, v, 0.0)
    merged[name] = total
  return _add_scaled(base, merged, scaling_factor)


def _slerp_tensor(t, v0, v1, epsilon, dot_threshold):
  n0 = np.linalg.norm(v0)
  n1 = np.linalg.norm(v1)
  # Normalize only when the norm exceeds epsilon (mergekit's `normalize`).
  u0 = v0 / n0 if n0 > epsilon else v0
  u1 = v1 / n1 if n1 > epsilon else v1
  dot = np.sum(u0 * u1)
  if np.abs(dot) > dot_threshold:
    return (1 - t) * v0 + t * v1
  theta_0 = np.arccos(dot)
  sin_theta_0 = np.sin(theta_0)
  theta_t = theta_0 * t
  s0 = np.sin(theta_0 - theta_t) / sin_theta_0
  s1 = np.sin(theta_t) / sin_theta_0
  return s0 * v0 + s1 * v1


def slerp(base, finetuned, t=0.5, epsilon=1e-8, dot_threshold=0.9995):
  """Per-tensor spherical interpolation from finetuned[0] (t=0) to
  finetuned[1] (t=1), mergekit convention (slerp.py): the angle comes from the
  tensors normalized to unit L2 norm (a tensor with norm <= epsilon is left
  unnormalized); if |cos| > dot_threshold (0.9995) fall back to linear
  interpolation; otherwise s0 * v0 + s1 * v1 on the ORIGINAL (unnormalized)
  tensors with s0 = sin((1-t) theta) / sin theta, s1 = sin(t theta) / sin theta.
  base is not used (mergekit interpolates between its base model and one other
  model; here the two endpoints are the two fine-tuned models)."""
  if len(finetuned) != 2:
    raise ValueError("slerp needs exactly two models")
  out = {}
  for name in base:
    v0 = _f64(finetuned[0][name])
    v1 = _f64(finetuned[1][name])
    out[name] = _slerp_tensor(t, v0, v1, epsilon, dot_threshold)
  return out


def model_stock(base, finetuned, filter_wise=False):
  """Model Stock (Jang et al. 2024), mergekit's convention (model_stock.py).

  Per tensor with N >= 2 fine-tuned models: offsets d_t = theta_t - theta_0
  flattened (filter_wise=False, mergekit's default) or per row (filter_wise=
  True: rows along the last axis, a 1-D tensor as one row); for every pair
  i < j, cos_ij = <d_i, d_j> / max(|d_i| |d_j|, 1e-6), clipped to [-1, 1];
  cos = mean over pairs; t = N cos / (1 + (N - 1) cos) (not clipped);
  result t * mean_t(theta_t) + (1 - t) * theta_0.
  """
  num_models = len(finetuned)
  if num_models < 2:
    raise ValueError("model_stock needs at least two fine-tuned models")
  out = {}
  for name in base:
    w0 = _f64(base[name])
    ws = [_f64(ft[name]) for ft in finetuned]
    shape = w0.shape
    if filter_wise:
      w0_r = _as_rows(w0)
      ws_r = [_as_rows(w) for w in ws]
    else:
      w0_r = w0.reshape(1, -1)
      ws_r = [w.reshape(1, -1) for w in ws]
    offsets = [w - w0_r for w in ws_r]
    cos_values = []
    for i in range(num_models):
      for j in range(i + 1, num_models):
        norm_product = (np.linalg.norm(offsets[i], axis=-1) *
                        np.linalg.norm(offsets[j], axis=-1))
        cos = np.sum(offsets[i] * offsets[j], axis=-1) / np.maximum(
            norm_product, 1e-6)
        cos_values.append(np.clip(cos, -1.0, 1.0))
    cos = np.mean(np.stack(cos_values), axis=0)[:, None]  # one per row
    t = num_models * cos / (1 + (num_models - 1) * cos)
    w_avg = sum(ws_r) / num_models
    out[name] = (t * w_avg + (1 - t) * w0_r).reshape(shape)
  return out


# --------------------------------------------------------------------------
# DELLA (deterministic: uniforms are given)
# --------------------------------------------------------------------------


def della_keep_probabilities(row_abs, drop_rate, epsilon):
  """MagPrune keep probabilities for one row of magnitudes.

  rank 0 = smallest magnitude (ties ordered by position, stable sort);
  r = rank / (n - 1) (r = 0 if n == 1);
  p_keep = clip((1 - drop_rate - epsilon) + 2 epsilon r, 0, 1).
  """
  n = row_abs.size
  ranks = np.empty(n, dtype=np.float64)
  ranks[np.argsort(row_abs, kind="stable")] = np.arange(n, dtype=np.float64)
  r = ranks / (n - 1) if n > 1 else np.zeros(n)
  return np.clip((1.0 - drop_rate - epsilon) + 2.0 * epsilon * r, 0.0, 1.0)


def della_from_uniforms(base, finetuned, uniforms, drop_rate=0.3,
                        epsilon=0.07, scaling_factor=1.1):
  """DELLA-Merging (Deep et al. 2024) with given uniforms in [0, 1).

  Per task, per row: keep entry where uniform < p_keep (see
  della_keep_probabilities), survivors divided by their p_keep. Then TIES
  sign election over all entries (no trimming; zero sign -> whole-model
  majority, +1 if 0) and disjoint MEAN; theta_0 + lambda * merged.
  """
  taus = _task_vectors(base, finetuned)
  pruned = []
  for tau, unif in zip(taus, uniforms):
    out = {}
    for name in base:
      v = tau[name]
      rows = _as_rows(v)
      u_rows = _as_rows(unif[name])
      new_rows = np.zeros_like(rows)
      for i in range(rows.shape[0]):
        p = della_keep_probabilities(np.abs(rows[i]), drop_rate, epsilon)
        keep = u_rows[i] < p
        safe_p = np.where(keep, p, 1.0)
        new_rows[i] = np.where(keep, rows[i] / safe_p, 0.0)
      out[name] = new_rows.reshape(v.shape)
    pruned.append(out)
  signs = _elect_signs(pruned, "global")
  merged = _disjoint_merge(pruned, signs, "mean")
  return _add_scaled(base, merged, scaling_factor)


def della_from_masks(base, finetuned, keep_masks, drop_rate=0.3,
                     epsilon=0.07, scaling_factor=1.1):
  """DELLA with given keep masks: kept entries divided by their p_keep."""
  taus = _task_vectors(base, finetuned)
  pruned = []
  for tau, mask in zip(taus, keep_masks):
    out = {}
    for name in base:
      rows = _as_rows(tau[name])
      keep = _as_rows(np.asarray(mask[name], bool))
      p = np.stack([della_keep_probabilities(np.abs(r), drop_rate, epsilon)
                    for r in rows])
      out[name] = np.where(keep, rows / np.where(keep, p, 1.0),
                           0.0).reshape(np.shape(tau[name]))
    pruned.append(out)
  signs = _elect_signs(pruned, "global")
  merged = _disjoint_merge(pruned, signs, "mean")
  return _add_scaled(base, merged, scaling_factor)


def della(base, finetuned, drop_rate=0.3, epsilon=0.07, scaling_factor=1.1,
          uniforms=None, seed=0):
  """DELLA with uniforms drawn from numpy's RNG unless given (convenience)."""
  if uniforms is None:
    rng = np.random.default_rng(seed)
    uniforms = [{name: rng.random(np.shape(base[name])) for name in base}
                for _ in finetuned]
  return della_from_uniforms(base, finetuned, uniforms, drop_rate, epsilon,
                             scaling_factor)
