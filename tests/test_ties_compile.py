"""Orchestrated TIES: per-leaf-shape kernels, same results as the whole jit.

`ties_merging` is registered with `jit=False`: `merge()` runs a jitted
threshold search, then `combine.ties_apply`'s vote and apply kernels once
per leaf, compiled once per leaf shape. These tests check that it equals
the whole-method jit bit for bit and the NumPy reference, compiles one
program per distinct shape (and none on a new `scaling_factor`), resolves
zero votes with the model-wide majority across leaves, and keeps shardings.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_numpy as ref
from mtmerge import methods, selection, sharding, task_vectors, testing
from mtmerge import tree as tree_lib
from mtmerge.methods import arithmetic, registry
from mtmerge.transforms import combine


def _whole_jit(base, tvs, **hp):
  """The method as one jitted program (what `merge` ran before)."""
  spec = methods.get("ties_merging")
  full = spec.check(hp, task_vectors.num_tasks(tvs))
  static = {k: v for k, v in full.items() if k in spec.static}
  traced = {k: v for k, v in full.items() if k not in spec.static}
  return registry.jitted(spec, static)(base, tvs, traced)


def _assert_same(got, want):
  for (k, a), (_, b) in zip(tree_lib.named_leaves(got),
                            tree_lib.named_leaves(want)):
    assert a.dtype == b.dtype and a.shape == b.shape, k
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32), err_msg=k)


def test_registry_flag():
  assert methods.get("ties_merging").jit is False
  assert methods.get("task_arithmetic").jit is True
  assert methods.get("dare_ties").jit is True


def test_merge_runs_orchestrated_methods_eagerly(monkeypatch):
  base = testing.random_params(0)
  tvs = task_vectors.from_models(base, testing.random_models(base, 3, 1))
  calls = []
  real = registry.jitted

  def spy(spec, static):
    calls.append(spec.name)
    return real(spec, static)
  monkeypatch.setattr(registry, "jitted", spy)
  methods.merge("ties_merging", base, tvs)
  methods.merge("task_arithmetic", base, tvs)
  assert calls == ["task_arithmetic"]


@pytest.mark.parametrize("hp, dtype", [
    (dict(threshold=0.2, merge_func="sum"), np.float32),
    (dict(threshold=0.3, merge_func="mean", scope="per_tensor",
          zero_sign="positive", weights=[1.0, 0.5, 2.0], scaling_factor=1.0),
     np.float32),
    (dict(threshold=1.0, merge_func="max", sign_method="count"), np.float32),
    (dict(threshold=0.4, merge_func="sum"), jnp.bfloat16),
])
def test_equals_whole_method_jit_bitwise(hp, dtype):
  base = testing.random_params(0, dtype=dtype)
  models = testing.random_models(base, 3, 1)
  tvs = jax.tree.map(lambda x: jnp.asarray(x, dtype),
                     task_vectors.from_models(base, models))
  _assert_same(methods.merge("ties_merging", base, tvs, **hp),
               _whole_jit(base, tvs, **hp))


def test_one_program_per_leaf_shape_and_reference():
  # 30 leaves of 3 shapes no other test uses; T = 3.
  shapes = {}
  for i in range(10):
    shapes.update({f"l{i}/w": (11, 7), f"l{i}/b": (7,),
                   f"l{i}/k": (3, 11, 2)})
  base = testing.random_params(5, shapes)
  models = testing.random_models(base, 3, 6)
  tvs = task_vectors.from_models(base, models)
  sizes = lambda: (combine._vote_kernel._cache_size(),
                   combine._apply_kernel._cache_size(),
                   arithmetic._flat_thresholds._cache_size())
  before = sizes()
  got = methods.merge("ties_merging", base, tvs, threshold=0.3,
                      scaling_factor=0.4)
  after = sizes()
  assert [a - b for a, b in zip(after, before)] == [3, 3, 1]
  # A new traced value (lambda) compiles nothing.
  got2 = methods.merge("ties_merging", base, tvs, threshold=0.3,
                       scaling_factor=0.8)
  assert sizes() == after
  # Zero votes going positive need no model-wide sum: one kernel per shape.
  got3 = methods.merge("ties_merging", base, tvs, threshold=0.3,
                       zero_sign="positive")
  assert [a - b for a, b in zip(sizes(), after)] == [0, 3, 0]
  _assert_same(got3, _whole_jit(base, tvs, threshold=0.3,
                                zero_sign="positive"))
  b, fts = testing.to_numpy(base), [testing.to_numpy(m) for m in models]
  for out, lam in ((got, 0.4), (got2, 0.8)):
    want = ref.ties_merging(b, fts, scaling_factor=lam, threshold=0.3,
                            merge_func="sum")
    for k, x in testing.to_numpy(out).items():
      np.testing.assert_allclose(x, want[k], rtol=2e-5, atol=2e-6,
                                 err_msg=k)


@pytest.mark.parametrize("other_sign", [-1.0, 1.0])
def test_zero_votes_take_the_model_wide_majority(other_sign):
  # Leaf "a": task 1 = -task 0, so every vote is exactly 0. Leaf "b" has
  # more entries, all of sign `other_sign` in both tasks: it decides the
  # model-wide majority that fills a's zero votes.
  a0 = np.array([0.5, -0.25, 0.75, 1.0], np.float32)
  b0 = other_sign * np.linspace(0.1, 0.9, 9, dtype=np.float32).reshape(3, 3)
  base = {"a": np.zeros(4, np.float32), "b": np.ones((3, 3), np.float32)}
  tvs = {"a": np.stack([a0, -a0]), "b": np.stack([b0, 0.5 * b0])}
  got = methods.merge("ties_merging", base, tvs, threshold=1.0,
                      merge_func="sum", scaling_factor=1.0)
  # The agreeing entry of each pair is the one with sign `other_sign`.
  want_a = np.where(np.sign(a0) == other_sign, a0, -a0)
  np.testing.assert_array_equal(np.asarray(got["a"]), want_a)
  np.testing.assert_allclose(np.asarray(got["b"]), 1.0 + 1.5 * b0,
                             rtol=1e-6)
  models = [{k: base[k] + tvs[k][t] for k in base} for t in range(2)]
  want = ref.ties_merging(base, models, scaling_factor=1.0, threshold=1.0,
                          merge_func="sum")
  np.testing.assert_allclose(np.asarray(got["a"]), want["a"], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("sign_method, weights", [
    ("sum", None), ("sum", [1.0, 0.5, 1.0]), ("count", None)])
def test_vote_sums_in_task_order_through_either_view(dtype, sign_method, weights):
  # Entry 0: (2**24 + 1) - 2**24 in task order is 0 in float32 (2**24 + 1
  # rounds to 2**24), +1 in any order that adds the opposite pair first.
  # The traced whole-model program reads the slices through an integer
  # view (`split`), the per-leaf kernels directly: same sums, same bits.
  big = 2.0 ** 24
  x = np.array([[big, 3.0, -1.0, 0.0], [1.0, -3.0, 1.0, 0.0],
                [-big, 0.0, 0.0, 0.0]], np.float32)
  x = jnp.asarray(x, dtype)
  thr = jnp.zeros((3, 1), jnp.float32)
  w = None if weights is None else jnp.asarray(weights, jnp.float32)
  got = {r: np.asarray(jax.jit(functools.partial(
      combine._leaf_vote, sign_method=sign_method, split=r))(x, thr, w))
      for r in (False, True)}
  np.testing.assert_array_equal(got[True], got[False])
  acc = np.zeros(4, np.float32)  # the task-order sum, in numpy
  for t in range(3):
    y = np.asarray(x[t], np.float32)
    if w is not None:
      y = np.asarray(jnp.asarray(y * np.float32(w[t]), dtype), np.float32)
    acc = acc + (y if sign_method == "sum" else np.sign(y))
  np.testing.assert_array_equal(got[True], np.sign(acc))
  if sign_method == "sum" and dtype == np.float32 and weights is None:
    assert got[True][0] == 0.0  # the order-sensitive entry
  # The whole-model traced TIES and the eager kernels agree on it too.
  base = {"a": jnp.zeros((4,), dtype)}
  hp = dict(threshold=1.0, merge_func="sum", sign_method=sign_method,
            weights=weights)
  _assert_same(methods.merge("ties_merging", base, {"a": x}, **hp),
               _whole_jit(base, {"a": x}, **hp))


@pytest.fixture(scope="module")
def eight():
  """8 task vectors and their unsharded merge, shared by the mesh tests."""
  # Few distinct shapes (fewer sharded kernels to compile), awkward ones kept.
  base = testing.random_params(2, {k: testing.SHAPES[k] for k in (
      "embed/table", "block_0/attn/kernel", "block_1/norm/scale",
      "head/temperature")})
  tvs = task_vectors.from_models(base, testing.random_models(base, 8, 3))
  return base, tvs, methods.merge("ties_merging", base, tvs)


@pytest.mark.parametrize("mode", ["task", "param"])
def test_sharded_inputs_keep_shardings(mesh8, eight, mode):
  base, tvs, want = eight
  b = testing.shard(base, mesh8, mode, lead=0)
  got = methods.merge("ties_merging", b, testing.shard(tvs, mesh8, mode))
  _assert_same(got, want)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(b)):
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (
        x.sharding, y.sharding)


def test_task_and_fsdp_mesh(eight):
  base, tvs, want = eight
  mesh = sharding.make_mesh([("task", 4), ("fsdp", 2)])
  rules = [(r"embed/table", ("fsdp", None)), (r".*/kernel", (None, "fsdp")),
           (r".*", None)]
  base_sh = sharding.shardings_from_rules(base, rules, mesh)
  tvs_sh = sharding.task_vector_sharding(tvs, mesh, rules)
  assert tree_lib.to_flat_dict(tvs_sh)["block_0/attn/kernel"].spec == (
      jax.sharding.PartitionSpec("task", None, "fsdp"))
  got = methods.merge("ties_merging", jax.device_put(base, base_sh),
                      jax.device_put(tvs, tvs_sh))
  _assert_same(got, want)
  for x, s in zip(jax.tree.leaves(got), jax.tree.leaves(base_sh)):
    assert x.sharding.is_equivalent_to(s, x.ndim)


def test_global_topk_flat_view_with_padding():
  # 2 x 20011 entries per task: the flat view has 2 rows and 1 padded zero.
  tvs = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(
      (2, 101, 198)), jnp.float32),
         "v": jnp.asarray(np.random.default_rng(1).laplace(size=(2, 13)),
                          jnp.float32)}
  n = 101 * 198 + 13
  flat = np.concatenate([np.abs(np.asarray(tvs[k])).reshape(2, -1)
                         for k in ("v", "w")], axis=1)
  thr = jax.jit(lambda t: selection.topk_thresholds(t, 0.3))(tvs)
  k = selection.keep_count(0.3, n)
  kept = np.concatenate([np.abs(np.asarray(tvs[key])).reshape(2, -1) >=
                         np.asarray(thr[key]).reshape(2, 1)
                         for key in ("v", "w")], axis=1)
  for t in range(2):
    order = np.argsort(-flat[t], kind="stable")
    assert kept[t].sum() == k
    assert kept[t][order[:k]].all()
  np.testing.assert_array_equal(
      selection.kth_largest(tvs, lambda m: 57),
      np.sort(flat, axis=1)[:, ::-1][:, 56])


@pytest.mark.parametrize("dtype, hp", [
    (np.float32, dict(drop_rate=0.5, merge_func="sum")),
    (jnp.bfloat16, dict(drop_rate=0.3, merge_func="mean",
                        weights=[1.0, 0.5, 2.0], rescale=False)),
])
def test_dare_ties_drops_per_slice_as_the_dropped_copy(dtype, hp):
  # threshold 1 (default): each TIES pass recomputes the survivors from
  # the bool masks (`prep`); equal bit for bit to TIES on a dropped copy.
  from mtmerge import transforms as tx
  base = testing.random_params(0, dtype=dtype)
  tvs = jax.tree.map(lambda x: jnp.asarray(x, dtype), task_vectors.from_models(
      base, testing.random_models(base, 3, 1)))
  got = methods.merge("dare_ties", base, tvs, seed=3, scaling_factor=0.7,
                      **hp)

  @jax.jit
  def reference(base, tvs):
    dropped = tx.run(tx.drop_and_rescale(
        hp["drop_rate"], jax.random.key(3), hp.get("rescale", True)), tvs)
    tau = arithmetic.ties_vector(dropped, 1.0, hp["merge_func"],
                                 weights=hp.get("weights"))
    return task_vectors.apply(base, tau, 0.7)
  _assert_same(got, reference(base, tvs))
