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


def _leaf_keys(seed, tvs):
  leaves, treedef = jax.tree.flatten(tvs)
  return leaves, treedef, [jax.random.fold_in(jax.random.key(seed), i)
                           for i in range(len(leaves))]


def _per_task(treedef, leaves_by_task):
  flat = [tree_lib.to_flat_dict(jax.tree.unflatten(treedef, [
      np.asarray(x[t]) for x in leaves_by_task])) for t in range(T)]
  return flat


def test_dare_matches_reference_with_same_masks(setup):
  base, models, tvs = setup
  leaves, treedef, keys = _leaf_keys(5, tvs)
  keep = [jax.random.bernoulli(k, 0.6, x.shape) for x, k in zip(leaves, keys)]
  masks = _per_task(treedef, keep)
  b, fts = _ref_args(base, models)
  _assert_close(methods.merge("dare", base, tvs, drop_rate=0.4,
                              scaling_factor=0.5, seed=5),
                ref.dare_from_masks(b, fts, masks, 0.4, 0.5))
  _assert_close(
      methods.merge("dare_ties", base, tvs, drop_rate=0.4, seed=5,
                    threshold=0.5, merge_func="mean", scaling_factor=0.8),
      ref.dare_from_masks(b, fts, masks, 0.4, 0.8, then="ties",
                          ties_threshold=0.5, merge_func="mean"))


def test_della_matches_reference_with_same_uniforms(setup):
  base, models, tvs = setup
  leaves, treedef, keys = _leaf_keys(3, tvs)
  def view(x):  # DELLA draws one uniform per entry of the [T, rows, cols] view
    cols = x.shape[-1] if x.ndim > 2 else int(np.prod(x.shape[1:]))
    return (x.shape[0], int(np.prod(x.shape[1:])) // cols, cols)
  unif = [jax.random.uniform(k, view(x)).reshape(x.shape)
          for x, k in zip(leaves, keys)]
  b, fts = _ref_args(base, models)
  _assert_close(methods.merge("della", base, tvs, drop_rate=0.3,
                              epsilon=0.1, scaling_factor=1.1, seed=3),
                ref.della_from_uniforms(b, fts, _per_task(treedef, unif),
                                        0.3, 0.1, 1.1))


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


@pytest.mark.parametrize("mode", ["task", "param"])
@pytest.mark.parametrize("name", methods.names())
def test_sharded_equals_unsharded(mesh8, name, mode):
  base = testing.random_params(2)
  spec = methods.get(name)
  n = 8 if spec.max_tasks is None else spec.max_tasks
  tvs = task_vectors.from_models(base, testing.random_models(base, n, 3))
  want = methods.merge(name, base, tvs)
  got = methods.merge(name, testing.shard(base, mesh8, mode, lead=0),
                      testing.shard(tvs, mesh8, mode))
  for a, b in zip(_outputs(got), _outputs(want)):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", methods.names())
def test_bfloat16_in_bfloat16_out(name):
  base = testing.random_params(0, dtype=jnp.bfloat16)
  spec = methods.get(name)
  n = 3 if spec.max_tasks is None else spec.max_tasks
  models = testing.random_models(base, n, 1)
  tvs = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                     task_vectors.from_models(base, models))
  out = methods.merge(name, base, tvs)
  if spec.compressed:
    out = methods.reconstruct(base, out, 0)
  for (k, x), (_, b) in zip(tree_lib.named_leaves(out),
                            tree_lib.named_leaves(base)):
    assert x.dtype == jnp.bfloat16, k
    assert x.shape == b.shape, k
    assert np.all(np.isfinite(np.asarray(x, np.float32))), k


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
