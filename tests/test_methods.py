"""Every registered method against the independent NumPy reference
(tests/reference_numpy.py, written from the papers' equations), plus the
properties every method must have: jit == eager, no recompilation, sharded
over 8 devices == unsharded, bfloat16 in -> bfloat16 out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_numpy as ref
from mtmerge import methods, task_vectors, testing
from mtmerge import tree as tree_lib
from mtmerge.methods import registry

T = 3


@pytest.fixture(scope="module")
def setup():
  base = testing.random_params(0)
  models = testing.random_models(base, T, seed=1)
  tvs = task_vectors.from_models(base, models)
  return base, models, tvs


def _np(tree):
  return testing.to_numpy(tree)


def _assert_close(got, want, rtol=2e-5, atol=2e-6):
  got = _np(got)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol,
                               err_msg=k)


def _ref_args(base, models):
  return _np(base), [_np(m) for m in models]


CASES = [
    # (method, our hparams, reference fn, reference kwargs)
    ("weight_averaging", {}, ref.weight_averaging, {}),
    ("task_arithmetic", {"scaling_factor": 0.3}, ref.task_arithmetic,
     {"scaling_factor": 0.3}),
    ("task_arithmetic", {"scaling_factor": [0.1, 0.5, 1.0]}, None, None),
    ("ties_merging", {"threshold": 0.2, "merge_func": "sum"},
     ref.ties_merging, {"threshold": 0.2, "merge_func": "sum"}),
    ("ties_merging", {"threshold": 0.3, "merge_func": "mean",
                      "scaling_factor": 1.0},
     ref.ties_merging, {"threshold": 0.3, "merge_func": "mean",
                        "scaling_factor": 1.0}),
    ("ties_merging", {"threshold": 0.5, "merge_func": "max",
                      "scope": "per_tensor"},
     ref.ties_merging, {"threshold": 0.5, "merge_func": "max",
                        "scope": "per_tensor"}),
    ("ties_merging", {"threshold": 0.3, "merge_func": "mean",
                      "scope": "per_tensor", "zero_sign": "positive",
                      "weights": [0.5, 1.0, 2.0], "scaling_factor": 1.0},
     ref.ties_merging, {"threshold": 0.3, "merge_func": "mean",
                        "scope": "per_tensor", "zero_sign": "positive",
                        "weights": [0.5, 1.0, 2.0], "scaling_factor": 1.0}),
    ("ties_merging", {"threshold": 0.4, "merge_func": "sum",
                      "weights": [2.0, 0.5, 1.0]},
     ref.ties_merging, {"threshold": 0.4, "merge_func": "sum",
                        "weights": [2.0, 0.5, 1.0]}),
    ("magnitude_prune", {"threshold": 0.3}, ref.magnitude_prune,
     {"density": 0.3}),
    ("breadcrumbs", {"threshold": 0.2, "gamma": 0.05, "scaling_factor": 0.4},
     ref.breadcrumbs, {"density": 0.2, "top_remove": 0.05,
                       "scaling_factor": 0.4}),
    ("breadcrumbs", {"threshold": 0.3, "gamma": 0.02, "scope": "per_tensor"},
     ref.breadcrumbs, {"density": 0.3, "top_remove": 0.02,
                       "scaling_factor": 0.2, "scope": "tensor"}),
    ("consensus", {"k": 2, "tall_mask_lambda": 0.4, "scaling_factor": 0.5},
     ref.consensus, {"k": 2, "tall_mask_lambda": 0.4, "scaling_factor": 0.5}),
    ("consensus", {"k": 2, "tall_mask_lambda": [0.2, 0.5, 0.8],
                   "base_method": "ties"},
     ref.consensus, {"k": 2, "tall_mask_lambda": [0.2, 0.5, 0.8],
                     "scaling_factor": 0.3, "base_method": "ties"}),
    ("pcb_merging", {"ratio": 0.2, "scaling_factor": 1.2}, ref.pcb_merging,
     {"ratio": 0.2, "scaling_factor": 1.2}),
    ("pcb_merging", {"ratio": 0.1, "variant": "official"},
     ref.pcb_merging_official, {"ratio": 0.1, "scaling_factor": 1.0}),
    ("tsv_merging", {"alpha": 0.7}, ref.tsv_merging, {"alpha": 0.7}),
    ("model_stock", {}, ref.model_stock, {}),
]


@pytest.mark.parametrize("name,hp,ref_fn,ref_kw", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_numpy_reference(setup, name, hp, ref_fn, ref_kw):
  base, models, tvs = setup
  got = methods.merge(name, base, tvs, **hp)
  if ref_fn is None:  # per-task scaling: the reference is a loop over tasks
    b, fts = _ref_args(base, models)
    want = {k: b[k] + sum(c * (ft[k] - b[k]) for c, ft in zip(
        hp["scaling_factor"], fts)) for k in b}
  else:
    want = ref_fn(*_ref_args(base, models), **ref_kw)
  _assert_close(got, want)


def test_slerp_matches_reference(setup):
  base, models, tvs = setup
  b, fts = _ref_args(base, models)
  two = jax.tree.map(lambda x: x[:2], tvs)
  _assert_close(methods.merge("slerp", base, two, t=0.3),
                ref.slerp(b, fts[:2], t=0.3))
  one = jax.tree.map(lambda x: x[:1], tvs)  # mergekit: base -> model
  _assert_close(methods.merge("slerp", base, one, t=0.7),
                ref.slerp(b, [b, fts[0]], t=0.7))


def test_ties_zero_sign_matches_reference():
  """Entries whose trimmed votes cancel exactly take the fallback sign: the
  whole model's majority (negative here) or +1 (mergekit)."""
  base = {"w": np.zeros((4, 6), np.float32), "b": np.zeros((6,), np.float32)}
  t0 = -np.ones((4, 6), np.float32)  # most entries vote negative ...
  t1 = -np.ones((4, 6), np.float32)
  t0[0], t1[0] = 2.0, -2.0  # ... but row 0 cancels exactly
  fts = [{"w": t0, "b": -np.ones(6, np.float32)},
         {"w": t1, "b": np.full(6, -0.5, np.float32)},
         {"w": np.zeros((4, 6), np.float32), "b": np.zeros(6, np.float32)}]
  tvs = task_vectors.from_models(base, fts)
  for zero_sign in ("majority", "positive"):
    got = methods.merge("ties_merging", base, tvs, threshold=1.0,
                        merge_func="mean", zero_sign=zero_sign,
                        scaling_factor=1.0)
    want = ref.ties_merging(base, fts, 1.0, 1.0, "mean",
                            zero_sign=zero_sign)
    _assert_close(got, want)
    assert float(np.asarray(got["w"])[0, 0]) == (
        -2.0 if zero_sign == "majority" else 2.0)


# DARE and DELLA draw random masks. The reference never builds them with
# mtmerge's PRNG scheme: each task's mask is read off mtmerge's output with
# the other tasks zeroed (a task's drop depends on its own vector only), its
# statistics are tested against the drop probabilities of the papers, and
# the full merge is checked against the reference given those masks.
DROP_SHAPES = {"w": (48, 512), "b": (512,)}


@pytest.fixture(scope="module")
def drop_setup():
  base = testing.random_params(0, DROP_SHAPES)
  models = testing.random_models(base, T, seed=1)
  return base, models, task_vectors.from_models(base, models)


def _only_task(tvs, t):
  return jax.tree.map(lambda x: x.at[np.arange(T) != t].set(0.0), tvs)


def _binomial_ok(kept, prob, n):
  """|kept/n - prob| within 5 standard deviations."""
  return abs(kept / n - prob) <= 5 * np.sqrt(prob * (1 - prob) / n)


def test_dare_drop_statistics_rescaling_and_merge(drop_setup):
  base, models, tvs = drop_setup
  b, fts = _ref_args(base, models)
  taus = [{k: ft[k] - b[k] for k in b} for ft in fts]
  p, lam, seed = 0.4, 0.5, 5
  masks = []
  for t in range(T):
    got = _np(methods.merge("dare", base, _only_task(tvs, t), drop_rate=p,
                            scaling_factor=lam, seed=seed))
    delta = {k: got[k] - b[k] for k in b}
    mask = {k: delta[k] != 0 for k in b}
    for k in b:  # survivors are tau / (1 - p), times lambda
      np.testing.assert_allclose(delta[k][mask[k]],
                                 lam * taus[t][k][mask[k]] / (1 - p),
                                 rtol=1e-4, atol=1e-6, err_msg=k)
      assert _binomial_ok(mask[k].sum(), 1 - p, mask[k].size), (t, k)
    masks.append(mask)
  # Independent across tasks and tensors (not one mask reused).
  both = np.logical_and(masks[0]["w"], masks[1]["w"])
  assert _binomial_ok(both.sum(), (1 - p) ** 2, both.size)
  assert not np.array_equal(masks[0]["w"][0], masks[0]["b"])
  _assert_close(methods.merge("dare", base, tvs, drop_rate=p,
                              scaling_factor=lam, seed=seed),
                ref.dare_from_masks(b, fts, masks, p, lam))
  _assert_close(
      methods.merge("dare_ties", base, tvs, drop_rate=p, seed=seed,
                    threshold=0.5, merge_func="mean", scaling_factor=0.8),
      ref.dare_from_masks(b, fts, masks, p, 0.8, then="ties",
                          ties_threshold=0.5, merge_func="mean"))
  other = _np(methods.merge("dare", base, _only_task(tvs, 0), drop_rate=p,
                            scaling_factor=lam, seed=seed + 1))
  assert not np.array_equal(other["w"] != b["w"], masks[0]["w"])


def test_della_drop_statistics_rescaling_and_merge(drop_setup):
  base, models, tvs = drop_setup
  b, fts = _ref_args(base, models)
  taus = [{k: ft[k] - b[k] for k in b} for ft in fts]
  p, eps, lam, seed = 0.3, 0.1, 1.0, 3
  masks = []
  for t in range(T):
    got = _np(methods.merge("della", base, _only_task(tvs, t), drop_rate=p,
                            epsilon=eps, scaling_factor=lam, seed=seed))
    mask = {}
    for k in b:
      delta = got[k] - b[k]
      rows = taus[t][k].reshape(-1, taus[t][k].shape[-1])
      prob = np.stack([ref.della_keep_probabilities(np.abs(r), p, eps)
                       for r in rows]).reshape(delta.shape)
      mask[k] = delta != 0
      # Survivors are tau / p_keep (the paper's rescaling), times lambda.
      np.testing.assert_allclose(delta[mask[k]],
                                 lam * taus[t][k][mask[k]] / prob[mask[k]],
                                 rtol=1e-4, atol=1e-6, err_msg=k)
      # Keep rates follow the rank-dependent probabilities: the smallest
      # third of each row is kept less often than the largest third.
      lo, hi = prob < 1 - p - eps / 3, prob > 1 - p + eps / 3
      for sel in (lo, hi):
        assert _binomial_ok(mask[k][sel].sum(), prob[sel].mean(),
                            sel.sum()), (t, k)
    masks.append(mask)
  _assert_close(methods.merge("della", base, tvs, drop_rate=p, epsilon=eps,
                              scaling_factor=lam, seed=seed),
                ref.della_from_masks(b, fts, masks, p, eps, lam))


@pytest.mark.parametrize("shape", [(40, 6), (6, 40), (7, 7)])
def test_tsv_thin_svd_and_polar_factor_match_numpy(shape):
  """TSV's QR-then-small-SVD route against NumPy's direct SVD (float64)."""
  from mtmerge.methods import tsv
  a = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
  u, s, vt = (np.asarray(x, np.float64) for x in tsv.thin_svd(jnp.asarray(a)))
  pw, sw, qtw = np.linalg.svd(a.astype(np.float64), full_matrices=False)
  np.testing.assert_allclose(s, sw, rtol=1e-5)
  np.testing.assert_allclose(u @ np.diag(s) @ vt, a, atol=1e-5)
  # Singular vectors are unique up to sign (distinct singular values).
  np.testing.assert_allclose(np.abs(np.sum(u * pw, axis=0)), 1.0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(tsv.polar_factor(jnp.asarray(a))),
                             pw @ qtw, atol=1e-5)
  with pytest.raises(ValueError, match="one matrix"):
    tsv.polar_factor(jnp.zeros((2,) + shape))


@pytest.mark.parametrize("shape", [(40, 6), (6, 40), (12, 12)])
def test_tsv_gram_factorizations_match_numpy(shape):
  """The mesh's Gram-matrix route (top-k triplets, polar factor) against
  NumPy's float64 SVD, on a matrix with a decaying spectrum."""
  from mtmerge.methods import tsv
  rng = np.random.default_rng(5)
  r = min(shape)
  p, _ = np.linalg.qr(rng.standard_normal((shape[0], r)))
  q, _ = np.linalg.qr(rng.standard_normal((shape[1], r)))
  a = ((p * 0.7 ** np.arange(r)) @ q.T).astype(np.float32)
  k = r // 2
  u, s, vt = (np.asarray(x, np.float64)
              for x in tsv.gram_top_svd(jnp.asarray(a), k))
  pw, sw, qtw = np.linalg.svd(a.astype(np.float64), full_matrices=False)
  assert u.shape == (shape[0], k) and vt.shape == (k, shape[1])
  np.testing.assert_allclose(s, sw[:k], rtol=1e-5)
  np.testing.assert_allclose(u @ np.diag(s) @ vt,
                             pw[:, :k] @ np.diag(sw[:k]) @ qtw[:k], atol=1e-5)
  np.testing.assert_allclose(np.abs(np.sum(u * pw[:, :k], axis=0)), 1.0,
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(tsv.gram_polar(jnp.asarray(a))),
                             pw @ qtw, atol=1e-4)


@pytest.mark.parametrize("lam", [0.4, [0.2, 0.4, 0.6]])
def test_tall_mask_reconstructs_each_task(setup, lam):
  base, models, tvs = setup
  c = methods.merge("tall_mask", base, tvs, tall_mask_lambda=lam)
  assert isinstance(c, methods.Compressed) and c.num_tasks == T
  b, fts = _ref_args(base, models)
  for t in range(T):
    _assert_close(methods.reconstruct(base, c, t),
                  ref.tall_mask_reconstruct(b, fts, t, lam))
  # Storage: one vector + T bit-packed masks (~1/32 of a float32 model each).
  size = methods.storage_bytes(c)
  model = tree_lib.tree_bytes(base)
  assert size < model * (1 + T / 32) + 64 * len(jax.tree.leaves(base)) + 64


def test_emr_reconstructs_each_task(setup):
  base, models, tvs = setup
  c = methods.merge("emr_merging", base, tvs)
  b, fts = _ref_args(base, models)
  _, _, rescalers = ref.emr_merging(b, fts)
  np.testing.assert_allclose(c.rescalers, rescalers, rtol=1e-5)
  for t in range(T):
    _assert_close(methods.reconstruct(base, c, t), ref.emr_reconstruct(b, fts, t))
  with pytest.raises(ValueError, match="task index 3 out of range"):
    methods.reconstruct(base, c, 3)


# --- properties of every method ----------------------------------------------

def _tasks_for(spec, tvs):
  if spec.max_tasks is not None and task_vectors.num_tasks(tvs) > spec.max_tasks:
    return jax.tree.map(lambda x: x[:spec.max_tasks], tvs)
  return tvs


def _outputs(x):
  return jax.tree.leaves(x)


# One leaf of each rank: every distinct shape costs one XLA compile per op
# when run eagerly, which made this the slowest test of the suite.
EAGER_SHAPES = {"block/kernel": (16, 24), "block/bias": (24,),
                "block/mlp": (4, 2, 8), "head/temperature": ()}


@pytest.fixture(scope="module")
def small_setup():
  base = testing.random_params(0, EAGER_SHAPES)
  return base, task_vectors.from_models(base, testing.random_models(base, T))


@pytest.mark.parametrize("name", methods.names())
def test_jit_equals_eager_and_no_recompile(small_setup, name):
  base, tvs = small_setup
  spec = methods.get(name)
  tvs = _tasks_for(spec, tvs)
  full = spec.check({}, task_vectors.num_tasks(tvs))
  static = {k: v for k, v in full.items() if k in spec.static}
  traced = {k: v for k, v in full.items() if k not in spec.static}
  f = registry.jitted(spec, static)
  jitted = f(base, tvs, traced)
  with jax.disable_jit():
    eager = spec.fn(base, tvs, **full)
  for a, b in zip(_outputs(jitted), _outputs(eager)):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=1e-5, atol=1e-6)
  # Second call with the same shapes (and different traced values): cached.
  n = f._cache_size()
  traced2 = {k: (v * 0.5 if isinstance(v, float) else v)
             for k, v in traced.items()}
  jax.block_until_ready(f(base, tvs, traced2))
  assert f._cache_size() == n


# One leaf of each kind the 8-device mesh meets (compile time grows with
# the leaf count): 2-D split on its first axis, 2-D whose last axis 8 does
# not divide, 3-D, 1-D, and a 0-D leaf that stays replicated.
SHARDED_SHAPES = {"block/kernel": (16, 24), "block/bias": (24,),
                  "block/mlp": (16, 4, 8), "out/kernel": (24, 13),
                  "head/temperature": ()}


@pytest.mark.parametrize("mode", ["task", "param"])
@pytest.mark.parametrize("name", methods.names())
def test_sharded_equals_unsharded(mesh8, name, mode):
  base = testing.random_params(2, SHARDED_SHAPES)
  spec = methods.get(name)
  n = 8 if spec.max_tasks is None else spec.max_tasks
  tvs = task_vectors.from_models(base, testing.random_models(base, n, 3))
  want = methods.merge(name, base, tvs)
  got = methods.merge(name, testing.shard(base, mesh8, mode, lead=0),
                      testing.shard(tvs, mesh8, mode))
  for a, b in zip(_outputs(got), _outputs(want)):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=1e-5, atol=1e-6)


# Shapes whose last axis splits over 8 devices, so row-wise work (DELLA's
# per-row ranks, TALL's packed rows) must move rows to devices whole.
MESH_SHAPES = {"block/kernel": (16, 24), "block/bias": (24,),
               "out/kernel": (8, 16)}


@pytest.mark.parametrize("name", ["della", "model_stock", "pcb_merging",
                                  "pcb_merging(variant='official')",
                                  "dare_ties", "ties_merging", "tsv_merging"])
def test_under_set_mesh_equals_unsharded(mesh8, name):
  # Under `jax.set_mesh` the memory-bounded sharded forms run (aot_check's
  # setting): DELLA ranks by a second sort, Model Stock's Gram matrix by a
  # float32-accumulating dot, TIES passes through integer views, PCB
  # recomputes its scores in each pass and counts its order statistics
  # leaf by leaf, TSV factorizes through Gram matrices leaf after leaf
  # (equal to LAPACK's SVDs to ~1e-5).
  base = testing.random_params(2, MESH_SHAPES)
  tvs = task_vectors.from_models(base, testing.random_models(base, 4, 3))
  name, hp = methods.parse(name)
  want = methods.merge(name, base, tvs, **hp)
  with jax.set_mesh(mesh8):
    got = methods.merge(name, testing.shard(base, mesh8, "param", lead=0),
                        testing.shard(tvs, mesh8, "param"), **hp)
  for a, b in zip(_outputs(got), _outputs(want)):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pcb_softmax_maxima_equal_the_logits_maxima(dtype):
  # `with_softmax_maxima` takes them from the min/max statistics (the logits
  # are monotone in the products); a pass over the logits finds the same
  # (exactly for bf16 task vectors, to an ulp for float32 ones).
  from mtmerge.methods import pcb
  rng = np.random.default_rng(0)
  leaves = [jnp.asarray(rng.normal(size=(3, 7, 5)), dtype),
            jnp.asarray(rng.normal(size=(3, 11)) * 1e-3, dtype)]
  leaves[1] = leaves[1].at[2].set(0.0)     # a task that is 0 in one leaf
  leaves.append(jnp.full((3, 4), 0.25, dtype))

  @jax.jit
  def both(leaves):
    st = pcb.paper_stats(leaves, 3)
    xs = [x.astype(jnp.float32) for x in leaves]
    il = [pcb.intra_logits(x, st.sq_min, st.sq_max, 3) for x in xs]
    pl = [pcb.inter_logits(x, st.pair_min, st.pair_max) for x in xs]
    return (st.intra_max, st.inter_max,
            jnp.max(jnp.stack([jnp.max(x, axis=(1, 2)) if x.ndim == 3 else
                               jnp.max(x, axis=1) for x in il]), 0),
            jnp.max(jnp.stack([jnp.max(x.reshape(3, 3, -1), axis=2)
                               for x in pl]), 0))
  intra, inter, intra_want, inter_want = both(leaves)
  if dtype == jnp.bfloat16:  # products of bf16 values are exact: equal
    np.testing.assert_array_equal(intra, intra_want)
    np.testing.assert_array_equal(inter, inter_want)
  else:  # an FMA-contracted logit may land an ulp from its monotone image
    np.testing.assert_allclose(intra, intra_want, rtol=3e-7, atol=0)
    np.testing.assert_allclose(inter, inter_want, rtol=3e-7, atol=0)
  np.testing.assert_array_equal(np.asarray(intra), [3.0, 3.0, 3.0])


# Few leaves (each shape compiles once per merge, and this test merges twice
# per method), one of each rank, large enough for 1-in-200 to mean something.
BF16_SHAPES = {"block/kernel": (32, 48), "block/bias": (48,),
               "block/mlp": (4, 8, 16), "head/temperature": ()}


@pytest.mark.parametrize("name", methods.names())
def test_bfloat16_in_bfloat16_out(name):
  base = testing.random_params(0, BF16_SHAPES, dtype=jnp.bfloat16)
  spec = methods.get(name)
  n = 3 if spec.max_tasks is None else spec.max_tasks
  models = testing.random_models(base, n, 1)
  tvs = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                     task_vectors.from_models(base, models))
  out = methods.merge(name, base, tvs)
  # The same (bf16-exact) inputs merged in float32, rounded to bf16 once.
  base32 = jax.tree.map(lambda x: x.astype(jnp.float32), base)
  tvs32 = jax.tree.map(lambda x: x.astype(jnp.float32), tvs)
  want = methods.merge(name, base32, tvs32)
  if spec.compressed:
    out = methods.reconstruct(base, out, 0)
    want = methods.reconstruct(base32, want, 0)
  for (k, x), (_, b), (_, w) in zip(tree_lib.named_leaves(out),
                                    tree_lib.named_leaves(base),
                                    tree_lib.named_leaves(want)):
    assert x.dtype == jnp.bfloat16, k
    assert x.shape == b.shape, k
    # bf16 tolerance: the result's rounding (2^-8 of it) plus a few bf16
    # roundings of intermediates as large as the leaf's largest update (DARE's
    # rescaled task vectors, say, are held in the leaf's dtype). A comparison
    # that bf16 rounding moves (a mask, a rank, a sign) may flip an entry at
    # its boundary: at most 1 in 200 entries (at least 1) may differ more.
    x = np.asarray(x, np.float32)
    w = np.asarray(w, np.float32)
    upd = np.abs(w - np.asarray(b, np.float32)).max(initial=0.0)
    bad = np.abs(x - w) > 2.0**-8 * np.abs(w) + 2.0**-7 * upd
    assert bad.sum() <= max(1, bad.size // 200), (
        k, int(bad.sum()), bad.size, float(np.abs(x - w).max()), upd)


# --- bad input ----------------------------------------------------------------

def test_bad_hyperparameters_are_named(setup):
  base, _, tvs = setup
  with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
    methods.merge("ties_merging", base, tvs, threshold=1.5)
  with pytest.raises(ValueError, match="unknown parameter 'treshold'"):
    methods.merge("ties_merging", base, tvs, treshold=0.2)
  with pytest.raises(ValueError, match="unknown method 'tie'"):
    methods.merge("tie", base, tvs)
  with pytest.raises(ValueError, match="merge_func must be one of"):
    methods.merge("ties_merging", base, tvs, merge_func="median")
  with pytest.raises(ValueError, match="at least 2 fine-tuned models"):
    methods.merge("task_arithmetic", base, jax.tree.map(lambda x: x[:1], tvs))
  with pytest.raises(ValueError, match="one per task"):
    methods.merge("task_arithmetic", base, tvs, scaling_factor=[0.1, 0.2])


def test_parse_method_spec():
  assert methods.parse("ties_merging(threshold=0.2, merge_func='sum')") == (
      "ties_merging", {"threshold": 0.2, "merge_func": "sum"})
  assert methods.parse("emr_merging") == ("emr_merging", {})
  with pytest.raises(ValueError, match="unknown method"):
    methods.parse("nope(a=1)")
  with pytest.raises(ValueError, match="key=value"):
    methods.parse("ties_merging(0.2)")
