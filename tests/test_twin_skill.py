"""Twin-Merging and skill localization against references from the papers'
equations, on the tiny 2-layer MLP problem (tests/learned_helpers.py)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_helpers
from mtmerge import encoders
from mtmerge import selection
from mtmerge import sharding
from mtmerge.learned import common
from mtmerge.learned import problem as problem_lib
from mtmerge.learned import skill
from mtmerge.learned import twin


# One tiny problem per size for the whole module (it is immutable).
_tiny = functools.lru_cache(learned_helpers.tiny_problem)


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _relabeled(p, tvs, shift: float, n: int = 96, seed: int = 1):
  """`p` with new task vectors and data: task i's inputs are shifted by
  `shift` along axis i (so the task is recognizable from the input), labels
  come from theta_0 + tau_i."""
  rng = np.random.default_rng(seed)
  splits = {}
  for i, t in enumerate(p.tasks):
    theta = jax.tree.map(lambda b, v: b + v[i], p.base, tvs)
    splits[t] = {}
    for split in ("train", "validation", "test"):
      x = rng.standard_normal((n, learned_helpers.D_IN)).astype(np.float32)
      x[:, i] += shift
      y = np.asarray(jnp.argmax(encoders.logits(
          p.heads[t], p.features(theta, {"x": x})), -1)).astype(np.int32)
      splits[t][split] = {"x": x, "label": y}
  return problem_lib.from_arrays(p.tasks, p.base, tvs, p.features, p.heads,
                                 splits)


def _accuracy(p, params, task, split="test"):
  b = next(iter(p.data(task, split, 512).epoch(0)))
  return float(common.accuracy(p.logits(params, task, problem_lib.inputs_of(
      b)), b["label"]))


def _svd_ref(x, fraction):
  """Rank-r reconstruction of one matrix by numpy, r = max(1, floor(f k))."""
  m = x.reshape(-1, x.shape[-1]).astype(np.float64)
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  r = max(1, math.floor(fraction * min(m.shape)))
  return ((u[:, :r] * s[:r]) @ vt[:r]).reshape(x.shape)


def _exclusive_ref(p, fraction, lam=0.3):
  """theta* and SVD_r(theta_t - theta*) per task, by numpy."""
  star = jax.tree.map(lambda b, v: np.asarray(b) + lam * np.asarray(v).sum(0),
                      p.base, p.tvs)
  dense = []
  for t in range(p.num_tasks):
    def one(s, b, v):
      d = np.asarray(b) + np.asarray(v[t]) - s
      return d if d.ndim < 2 else _svd_ref(d, fraction)
    dense.append(jax.tree.map(one, star, p.base, p.tvs))
  return star, dense


# --------------------------------------------------------------------------
# Twin-Merging


def test_svd_compress_matches_numpy_reconstruction():
  rng = np.random.default_rng(0)
  stacked = {"w": rng.standard_normal((3, 12, 7)).astype(np.float32),
             "wide": rng.standard_normal((3, 6, 11)).astype(np.float32),
             "conv": rng.standard_normal((3, 2, 3, 4, 5)).astype(np.float32),
             "b": rng.standard_normal((3, 7)).astype(np.float32)}
  like = jax.tree.map(lambda x: x[0], stacked)
  for f in (0.1, 0.5, 1.0):
    factors = twin.svd_compress(stacked, f)
    dense = _np(twin.dense_parts(factors, like))
    for t in range(3):
      np.testing.assert_allclose(dense["w"][t], _svd_ref(stacked["w"][t], f),
                                 atol=2e-5)
      np.testing.assert_allclose(dense["wide"][t],
                                 _svd_ref(stacked["wide"][t], f), atol=2e-5)
      np.testing.assert_allclose(dense["conv"][t],
                                 _svd_ref(stacked["conv"][t], f), atol=2e-5)
    np.testing.assert_array_equal(dense["b"], stacked["b"])  # kept whole
    assert factors["w"]["u"].shape == (3, 12, max(1, math.floor(f * 7)))
    # conv: matricized [2 * 3 * 4, 5].
    assert factors["conv"]["v"].shape == (3, max(1, math.floor(f * 5)), 5)
  # rank 1 of a [24, 5] conv matricization: floor(0.1 * 5) = 0 -> 1.
  assert twin.rank_for((2, 3, 4, 5), 0.1) == 1
  assert twin.rank_for((40, 30), 0.1) == 3


def _router(p, seed=0, hidden=6):
  d = learned_helpers.D_FEAT
  router = twin.router_init(seed, d, hidden, p.num_tasks)
  stats = {"mean": np.full(d, 0.1, np.float32),
           "std": np.full(d, 0.7, np.float32)}
  return router, stats


def _router_ref(router, stats, f):
  """softmax of the 3-layer leaky-ReLU MLP on standardized features."""
  h = (f - stats["mean"]) / stats["std"]
  for i in (1, 2):
    h = h @ router[f"w{i}"] + router[f"b{i}"]
    h = np.where(h > 0, h, 0.01 * h)
  z = h @ router["w3"] + router["b3"]
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def test_routed_forward_equals_per_example_loop():
  p = _tiny()
  frac = 0.5
  star = twin.shared_expert(p.base, p.tvs, 0.3)
  factors = twin.svd_compress(twin.exclusive_parts(p.tvs, 0.3), frac)
  router, stats = _router(p)
  x = np.random.default_rng(3).standard_normal((7, 8)).astype(np.float32)
  star_ref, dense_ref = _exclusive_ref(p, frac)
  w = _router_ref(router, stats, np.asarray(p.features(star_ref, {"x": x})))
  want = []
  for i in range(len(x)):  # each example's merged params, built by hand
    params = jax.tree.map(
        lambda s, *d: s + sum(w[i, t] * d[t] for t in range(p.num_tasks)),
        star_ref, *dense_ref)
    want.append(np.asarray(p.features(params, {"x": x[i:i + 1]}))[0])
  model = twin.TwinModel(p.features, star, factors, router, stats,
                         chunk_size=3)  # 7 = 2 chunks + a remainder of 1
  np.testing.assert_allclose(np.asarray(model.routing({"x": x})), w,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(model.features({"x": x})),
                             np.stack(want), atol=2e-5)
  # Batch routing: one model from the mean weights of the real rows.
  batch_model = twin.TwinModel(p.features, star, factors, router, stats,
                               routing="batch")
  for keep in (np.ones(7, bool), np.arange(7) < 5):
    wm = w[keep].mean(0)
    params = jax.tree.map(lambda s, *d: s + sum(
        wm[t] * d[t] for t in range(p.num_tasks)), star_ref, *dense_ref)
    np.testing.assert_allclose(
        np.asarray(batch_model.features({"x": x, "mask": keep})),
        np.asarray(p.features(params, {"x": x})), atol=2e-5)


def test_one_hot_weights_give_each_task_model():
  p = _tiny()
  star = twin.shared_expert(p.base, p.tvs, 0.3)
  router, stats = _router(p)
  x = np.random.default_rng(4).standard_normal((5, 8)).astype(np.float32)
  star_ref, dense_ref = _exclusive_ref(p, 0.1)
  for frac in (0.1, 1.0):
    factors = twin.svd_compress(twin.exclusive_parts(p.tvs, 0.3), frac)
    model = twin.TwinModel(p.features, star, factors, router, stats)
    for t in range(p.num_tasks):
      onehot = np.tile(np.eye(p.num_tasks, dtype=np.float32)[t], (5, 1))
      got = np.asarray(model.features_with_weights({"x": x}, onehot))
      if frac == 1.0:  # full rank: theta* + (theta_t - theta*) = theta_t
        want = p.features(p.task_params(t), {"x": x})
      else:
        want = p.features(jax.tree.map(lambda s, d: s + d, star_ref,
                                       dense_ref[t]), {"x": x})
      np.testing.assert_allclose(got, np.asarray(want), atol=2e-5)
  with pytest.raises(ValueError, match="weights must be"):
    model.features_with_weights({"x": x}, np.ones((5, 2)))


def test_router_learns_task_identity_and_routes_to_experts():
  p = _relabeled(_tiny(), _tiny().tvs, shift=3.0)
  res = twin.twin_merging(p, rank_fraction=1.0, examples_per_task=64,
                          router_batch_size=32, router_dropout=0.0,
                          train_config=dict(steps=60, lr=1e-2),
                          progress=False)
  model = res.extra["model"]
  assert res.log[-1]["loss"] < 0.5 * res.log[0]["loss"]
  routed, shared = [], []
  for t, task in enumerate(p.tasks):
    batches = list(p.data(task, "test", 96).epoch(0))  # one batch
    w = np.asarray(model.routing(batches[0]))
    assert np.mean(np.argmax(w, -1) == t) > 0.8  # chance: 1/3
    routed.append(twin.accuracy(model, p.heads[task], batches))
    shared.append(_accuracy(p, res.params, task))
  # Full-rank experts with a near-perfect router recover the fine-tuned
  # models (labels come from them); theta* alone does not.
  assert np.mean(routed) > 0.9
  assert np.mean(routed) > np.mean(shared) + 0.2
  assert res.extra["storage_bytes"] == model.storage_bytes()


def test_twin_bad_arguments_name_the_problem():
  p = _tiny()
  for bad in (0, 0.0, 1.5, -0.1, "a"):
    with pytest.raises(ValueError, match="rank_fraction"):
      twin.twin_merging(p, rank_fraction=bad, progress=False)
  with pytest.raises(ValueError, match="routing"):
    twin.twin_merging(p, routing="token", progress=False)
  with pytest.raises(ValueError, match="router_batch_size"):
    twin.twin_merging(p, examples_per_task=4, router_batch_size=64,
                      progress=False)


# --------------------------------------------------------------------------
# Skill localization


def test_graft_fraction_and_rounding_match_hand_computation():
  s = np.array([0.0, 9.0, 10.5, 30.0, -3.0, 11.0], np.float32)
  g = np.array([1, 1, 1, 0, 0, 0], np.float32)
  b = 10.0
  sig = 1 / (1 + np.exp(-(s.astype(np.float64) - b)))
  want = g + (1 - 2 * g) * sig
  np.testing.assert_allclose(
      np.asarray(skill.graft_fraction(jnp.asarray(s), jnp.asarray(g), b)),
      want, rtol=1e-6, atol=1e-7)
  # round(gamma): base entries survive while S < b, others join once S > b.
  mask = skill.round_masks({"k": s}, {"k": g}, b)["k"]
  np.testing.assert_array_equal(mask, [1, 1, 0, 1, 0, 1])


def test_base_patch_is_global_top_fraction_by_movement():
  p = _tiny()
  masks = _np(skill.base_patch(p.tvs, 0.1))
  leaves = jax.tree.leaves(p.tvs)
  n = sum(x[0].size for x in leaves)
  k = selection.keep_count(0.1, n)
  for t in range(p.num_tasks):
    mags = np.concatenate([np.abs(np.asarray(x[t])).ravel() for x in leaves])
    kept = np.concatenate([m[t].ravel() for m in jax.tree.leaves(masks)])
    assert kept.sum() == k
    np.testing.assert_array_equal(np.sort(np.argsort(-mags)[:k]),
                                  np.flatnonzero(kept))
  for bad in (0, 1, 1.2, -0.01, True):
    with pytest.raises(ValueError, match="sparsity"):
      skill.skill_localization(p, sparsity=bad, progress=False)


def _localized_problem():
  """Fine-tuning that moved 8% of the entries a lot and the rest a little."""
  p = _tiny()
  rng = np.random.default_rng(5)
  tvs = jax.tree.map(lambda v: (np.where(rng.random(v.shape) < 0.08, 1.0, 0.03)
                                * rng.standard_normal(v.shape)
                                ).astype(np.float32), p.tvs)
  return _relabeled(p, tvs, shift=0.0, n=128)


def test_skill_localization_grafts_recover_fine_tuned_accuracy():
  p = _localized_problem()
  sparsity = 0.1
  res = skill.skill_localization(p, sparsity=sparsity, batch_size=32,
                                 train_config=dict(steps=30, lr=1e4),
                                 progress=False)
  masks = _np(res.learned)
  n = sum(m[0].size for m in jax.tree.leaves(masks))
  base = selection.keep_count(sparsity, n) / n
  np.testing.assert_allclose(res.extra["base_density"], base, rtol=1e-6)
  for d in res.extra["density"]:  # stays near the base patch's sparsity
    assert 0.5 * base <= d <= 2 * base
  for t, task in enumerate(p.tasks):
    graft = res.extra["reconstruct"](t)
    ref = jax.tree.map(lambda b, v, m: np.asarray(b) + np.where(
        m[t], np.asarray(v[t]), 0), p.base, p.tvs, masks)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 _np(graft), ref)
    ft = _accuracy(p, p.task_params(t), task)
    assert _accuracy(p, graft, task) >= ft - 0.07
  union = jax.tree.map(lambda b, v, m: np.asarray(b) + np.where(
      m, np.asarray(v), 0).sum(0), p.base, p.tvs, masks)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               res.params, union)
  nnz = sum(int(m.sum()) for m in jax.tree.leaves(masks))
  packed = sum(m.shape[0] * math.ceil(m[0].size / 8)
               for m in jax.tree.leaves(masks))
  assert res.extra["storage_bytes"] == packed + 4 * nnz
  with pytest.raises(ValueError, match="out of range"):
    res.extra["reconstruct"](3)


# Dense random task vectors: the top-10% base patch alone is poor.
_RANDOM_GRAFTS = dict(sparsity=0.1, batch_size=32, select_on=None,
                      train_config=dict(steps=60, lr=1e5), progress=False)


@pytest.fixture(scope="module")
def random_grafts():
  """Grafts of the n=128 tiny problem on the default mesh (8 devices)."""
  assert jax.device_count() == 8
  return skill.skill_localization(_tiny(n=128), **_RANDOM_GRAFTS)


def test_learned_grafts_beat_the_base_patch(random_grafts):
  p, res = _tiny(n=128), random_grafts
  masks, scores = _np(res.learned), res.extra["scores"]
  gbase = _np(skill.base_patch(p.tvs, 0.1))
  # Rounding, by hand: base entries stay while S < b, others join if S > b.
  jax.tree.map(lambda m, s, g: np.testing.assert_array_equal(
      m, np.where(g, s < 10.0, s > 10.0)), masks, scores, gbase)
  learned = np.mean([_accuracy(p, res.extra["reconstruct"](t), task)
                     for t, task in enumerate(p.tasks)])
  patch = np.mean([_accuracy(p, skill.graft(p.base, p.tvs, gbase, t), task)
                   for t, task in enumerate(p.tasks)])
  assert learned > patch + 0.1, (learned, patch)


def test_skill_sharded_over_8_devices_equals_one_device(random_grafts):
  one = skill.skill_localization(_tiny(n=128), mesh=sharding.make_mesh(
      [("data", -1)], devices=jax.devices()[:1]), **_RANDOM_GRAFTS)
  jax.tree.map(np.testing.assert_array_equal, _np(one.learned),
               _np(random_grafts.learned))
  # The scores themselves agree only loosely: summation order moves them by
  # ~1e-5 relative per step, which lr 1e5 amplifies where S nears b
  # (sigmoid' grows 5000x). The first step's loss is the same computation.
  np.testing.assert_allclose(one.log[0]["loss"],
                             random_grafts.log[0]["loss"], rtol=1e-5)
  assert one.log[0]["loss"] != one.log[-1]["loss"]


def test_skill_localization_without_steps_is_the_base_patch():
  p = _tiny()
  res = skill.skill_localization(p, sparsity=0.1, train_config=dict(steps=0),
                                 select_on=None, progress=False)
  jax.tree.map(np.testing.assert_array_equal, _np(res.learned),
               _np(skill.base_patch(p.tvs, 0.1)))

