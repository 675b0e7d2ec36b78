"""Tests of the pytree core: paths, regex rules, task vectors, packed masks,
exact top-k selection and the transform combinators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtmerge import selection, task_vectors, testing
from mtmerge import transforms as tx
from mtmerge import tree as tree_lib


def _tvs(T=3, seed=0, sparsity=0.0):
  base = testing.random_params(seed)
  models = testing.random_models(base, T, seed + 1, sparsity=sparsity)
  return base, task_vectors.from_models(base, models)


# --- tree -------------------------------------------------------------------

def test_paths_and_flat_roundtrip():
  base = testing.random_params()
  flat = tree_lib.to_flat_dict(base)
  assert set(flat) == set(testing.SHAPES)
  back = tree_lib.from_flat_dict(flat)
  assert jax.tree.structure(back) == jax.tree.structure(base)
  names = tree_lib.paths({"a": [1, 2], "b": {"c": 3}})
  assert names == {"a": ["a/0", "a/1"], "b": {"c": "b/c"}}


def test_regex_first_match_wins_and_uncovered_path_is_named():
  base = testing.random_params()
  groups = tree_lib.tree_map_with_regex(
      [(r".*kernel", "k"), (r"block_0/.*", "b0"), (r".*", "rest")], base)
  flat = tree_lib.to_flat_dict(groups)
  assert flat["block_0/attn/kernel"] == "k"  # first rule wins over block_0
  assert flat["block_0/attn/bias"] == "b0"
  assert flat["head/temperature"] == "rest"
  with pytest.raises(tree_lib.UncoveredPathError, match="head/temperature"):
    tree_lib.tree_map_with_regex([(r"(block|embed).*", 1)], base)
  with pytest.raises(ValueError, match="bad regex"):
    tree_lib.tree_map_with_regex([("(", 1)], base)


def test_reductions():
  a = {"x": jnp.arange(4.0), "y": jnp.ones((2, 2))}
  assert float(tree_lib.tree_sum(a)) == 10.0
  assert float(tree_lib.tree_dot(a, a)) == pytest.approx(14.0 + 4.0)
  assert float(tree_lib.tree_norm(a)) == pytest.approx(np.sqrt(18.0))
  assert tree_lib.tree_size(a) == 8
  assert tree_lib.tree_bytes(a) == 32


def test_check_same_structure_names_problem():
  a = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
  with pytest.raises(ValueError, match=r"'w'.*\(2, 3\).*\(3, 2\)"):
    tree_lib.check_same_structure(a, {"w": np.zeros((3, 2)), "b": np.zeros(3)})
  with pytest.raises(ValueError, match="lacks parameter 'b'"):
    tree_lib.check_same_structure(a, {"w": np.zeros((2, 3))})


# --- task vectors ------------------------------------------------------------

def test_from_models_stack_unstack_apply():
  base = testing.random_params()
  models = testing.random_models(base, 3)
  tvs = task_vectors.from_models(base, models)
  assert task_vectors.num_tasks(tvs) == 3
  for t, m in enumerate(task_vectors.unstack(tvs)):
    back = task_vectors.apply(base, m)
    for (k, x), (_, y) in zip(tree_lib.named_leaves(back),
                              tree_lib.named_leaves(models[t])):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, err_msg=k)
  re = task_vectors.stack(task_vectors.unstack(tvs))
  jax.tree.map(np.testing.assert_array_equal, re, tvs)


def test_apply_keeps_bfloat16():
  base = testing.random_params(dtype=jnp.bfloat16)
  tvs = task_vectors.from_models(base, testing.random_models(base, 2))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tvs))
  out = task_vectors.apply(base, task_vectors.index(tvs, 0), 0.5)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_check_finite_names_task_and_leaf():
  _, tvs = _tvs()
  bad = jax.tree.map(lambda x: x, tvs)
  bad["block_1"]["dense"]["kernel"] = bad["block_1"]["dense"]["kernel"].at[
      2, 0, 0].set(jnp.nan)
  task_vectors.check_finite(tvs)
  with pytest.raises(ValueError, match=r"task vector 2 .*block_1/dense/kernel"):
    task_vectors.check_finite(bad)


def test_pack_unpack_mask_roundtrip_and_size():
  base, tvs = _tvs(T=5)
  mask = jax.tree.map(lambda x: x > 0.02, tvs)
  packed = task_vectors.pack_mask(mask)
  for (k, p), (_, x) in zip(tree_lib.named_leaves(packed),
                            tree_lib.named_leaves(base)):
    assert p.dtype == jnp.uint8
    assert p.shape == (5, -(-max(int(np.prod(np.shape(x))), 1) // 8)), k
  back = task_vectors.unpack_mask(packed, base)
  jax.tree.map(np.testing.assert_array_equal, back, mask)
  # Independent reference: NumPy's packbits on the flattened mask.
  m = np.asarray(mask["block_0"]["attn"]["kernel"]).reshape(5, -1)
  np.testing.assert_array_equal(packed["block_0"]["attn"]["kernel"],
                                np.packbits(m, axis=-1))



def test_pack_mask_rows_layout_and_relayout():
  base, tvs = _tvs(T=5)
  mask = jax.tree.map(lambda x: x > 0.02, tvs)
  flat = task_vectors.pack_mask(mask)
  rows = task_vectors.pack_mask(mask, rows=True)
  for (k, p), (_, x) in zip(tree_lib.named_leaves(rows),
                            tree_lib.named_leaves(base)):
    s = np.shape(x)
    want = (5,) + s[:-1] + (-(-s[-1] // 8),) if len(s) >= 2 else (
        5, -(-max(int(np.prod(s)), 1) // 8))
    assert p.dtype == jnp.uint8 and p.shape == want, k
  # Each row on its own: NumPy's packbits along the last axis.
  m = np.asarray(mask["block_1"]["dense"]["kernel"])  # rows of 13 bits
  np.testing.assert_array_equal(rows["block_1"]["dense"]["kernel"],
                                np.packbits(m, axis=-1))
  for packed in (rows, flat):  # unpack_mask reads either layout
    jax.tree.map(np.testing.assert_array_equal,
                 task_vectors.unpack_mask(packed, base), mask)
  jax.tree.map(np.testing.assert_array_equal,
               task_vectors.mask_rows_to_flat(rows, base), flat)
  jax.tree.map(np.testing.assert_array_equal,
               task_vectors.mask_flat_to_rows(flat, base), rows)

# --- exact top-k selection ---------------------------------------------------

def _kept(tvs, thr):
  return jax.tree.map(lambda x, t: np.asarray(jnp.abs(x) >= t), tvs, thr)


@pytest.mark.parametrize("dist", ["normal", "cauchy", "sparse"])
@pytest.mark.parametrize("frac", [0.01, 0.2, 0.5, 1.0])
def test_global_topk_keeps_exactly_k_per_task(dist, frac):
  base, tvs = _tvs(T=3, sparsity=0.9 if dist == "sparse" else 0.0)
  if dist == "cauchy":
    rng = np.random.default_rng(3)
    tvs = jax.tree.map(lambda x: jnp.asarray(
        rng.standard_cauchy(x.shape) * 1e-3, jnp.float32), tvs)
  thr = jax.jit(lambda t: selection.topk_thresholds(t, frac))(tvs)
  flat = np.concatenate([np.abs(np.asarray(x)).reshape(3, -1)
                         for x in jax.tree.leaves(tvs)], axis=1)
  n = flat.shape[1]
  k = selection.keep_count(frac, n)
  kept = np.concatenate([m.reshape(3, -1) for m in
                         jax.tree.leaves(_kept(tvs, thr))], axis=1)
  nonzero = (flat > 0).sum(1)
  for t in range(3):
    if nonzero[t] <= k:  # fewer nonzeros than k: everything is kept
      assert kept[t].all()
    else:
      assert kept[t].sum() == k
      # The kept set is exactly the top-k by a full sort.
      order = np.argsort(-flat[t], kind="stable")
      assert kept[t][order[:k]].all() and not kept[t][order[k:]].any()


@pytest.mark.parametrize("scope", ["per_tensor", "row"])
def test_per_tensor_and_row_topk(scope):
  _, tvs = _tvs(T=2)
  thr = selection.topk_thresholds(tvs, 0.3, scope)
  for (name, x), m in zip(tree_lib.named_leaves(tvs),
                          jax.tree.leaves(_kept(tvs, thr))):
    a = np.abs(np.asarray(x))
    groups = (a.reshape(2, -1) if scope == "per_tensor" or a.ndim <= 2
              else a.reshape(-1, a.shape[-1]))
    mg = m.reshape(groups.shape)
    k = selection.keep_count(0.3, groups.shape[1])
    np.testing.assert_array_equal(mg.sum(1), np.full(len(groups), k),
                                  err_msg=name)


def test_topk_with_ties_keeps_all_tied():
  x = {"w": jnp.array([[3.0, 1.0, 1.0, 1.0, 0.5]])}
  thr = selection.topk_thresholds(x, 0.4)  # k = 2, three entries tie at 1
  np.testing.assert_array_equal(np.asarray(jnp.abs(x["w"]) >= thr["w"]),
                                [[True, True, True, True, False]])


def test_kth_largest_is_exact():
  _, tvs = _tvs(T=2)
  flat = np.sort(np.concatenate([np.abs(np.asarray(x)).reshape(2, -1)
                                 for x in jax.tree.leaves(tvs)], 1), 1)[:, ::-1]
  got = selection.kth_largest(tvs, lambda n: 17)
  np.testing.assert_array_equal(got, flat[:, 16])


def test_topk_sharded_equals_unsharded(mesh8):
  _, tvs = _tvs(T=8)
  f = jax.jit(lambda t: selection.topk_thresholds(t, 0.2))
  want = f(tvs)
  for mode in ("task", "param"):
    got = f(testing.shard(tvs, mesh8, mode))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_topk_of_mapped_values_equals_topk_of_the_mapped_tree(mesh8):
  # `values=` ranks a positionwise map of the leaves (PCB's balancing
  # scores); under a mesh it is recomputed in each counting pass.
  _, tvs = _tvs(T=4)
  values = lambda x: x * x[::-1] + 0.5 * x  # mixes the tasks at a position
  want = jax.jit(lambda t: selection.topk_thresholds(
      jax.tree.map(values, t), 0.2))(tvs)
  one = jax.jit(lambda t: selection.topk_thresholds(t, 0.2,
                                                    values=values))(tvs)
  with jax.set_mesh(mesh8):
    sharded = jax.jit(lambda t: selection.topk_thresholds(
        t, 0.2, values=values))(testing.shard(tvs, mesh8, "param"))
  jax.tree.map(np.testing.assert_array_equal, one, want)
  jax.tree.map(np.testing.assert_array_equal, sharded, want)
  with pytest.raises(ValueError, match="global scope only"):
    selection.topk_thresholds(tvs, 0.2, "per_tensor", values=values)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pass_view_is_bit_exact(dtype):
  from mtmerge import sharding
  x = jnp.asarray([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 1e-30],
                  dtype)
  for after in (jnp.float32(3.0), jnp.float32(np.nan), jnp.zeros((2, 2))):
    got = jax.jit(sharding.pass_view)(x, after)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(
        np.asarray(sharding.integer_view(got, "uint")),
        np.asarray(sharding.integer_view(x, "uint")))


# --- transforms --------------------------------------------------------------

def test_chain_state_and_run():
  _, tvs = _tvs()
  chain = tx.chain(tx.scale(2.0), tx.sum_tasks())
  state = chain.init(tvs)
  assert len(state) == 2
  out, _ = chain.apply(tvs, state)
  jax.tree.map(lambda o, x: np.testing.assert_allclose(
      o, 2 * np.sum(np.asarray(x), 0), rtol=1e-5, atol=1e-6), out, tvs)


def test_scaling_variants():
  _, tvs = _tvs()
  per_task = tx.run(tx.scale_per_task([1.0, 0.0, 2.0]), tvs)
  jax.tree.map(lambda o, x: np.testing.assert_allclose(
      o, np.asarray(x) * np.array([1.0, 0.0, 2.0]).reshape(
          (3,) + (1,) * (x.ndim - 1)), rtol=1e-6), per_task, tvs)
  by_rx = tx.run(tx.scale_by_regex([(r"block_0/.*", 0.0), (r".*", 1.0)]), tvs)
  assert not np.any(by_rx["block_0"]["attn"]["kernel"])
  np.testing.assert_array_equal(by_rx["embed"]["table"], tvs["embed"]["table"])
  per_leaf = tx.run(tx.scale_per_leaf(jax.tree.map(lambda _: 3.0, tvs)), tvs)
  np.testing.assert_allclose(per_leaf["embed"]["table"],
                             3 * np.asarray(tvs["embed"]["table"]), rtol=1e-6)
  with pytest.raises(ValueError, match="per-task"):
    tx.run(tx.scale(jnp.ones(5)), tvs)
  with pytest.raises(tree_lib.UncoveredPathError, match="embed/table"):
    tx.run(tx.scale_by_regex([(r"block.*", 1.0)]), tvs)


def test_masked_applies_only_to_selected_leaves():
  _, tvs = _tvs()
  rules = [(r"block_0/.*", True), (r".*", False)]
  t = tx.masked(tx.scale(0.0), lambda tr: tree_lib.tree_map_with_regex(
      rules, tr))
  out = tx.run(t, tvs)
  assert not np.any(out["block_0"]["attn"]["bias"])
  np.testing.assert_array_equal(out["block_1"]["dense"]["kernel"],
                                tvs["block_1"]["dense"]["kernel"])
  with pytest.raises(ValueError, match="shape-preserving"):
    tx.run(tx.masked(tx.sum_tasks(), jax.tree.map(lambda _: True, tvs)), tvs)


def test_elect_sign_and_disjoint_merge_by_hand():
  tvs = {"w": jnp.array([[1.0, -2.0, 0.0, 3.0],
                         [-4.0, -1.0, 0.0, 1.0],
                         [2.0, 0.0, 0.0, -1.0]])}
  agreed = tx.run(tx.elect_sign(), tvs)
  # votes: [-1, -3, 0 -> majority, 3]; majority sign of (-1 -1 +1) = -1.
  np.testing.assert_array_equal(agreed["w"], [[0, -2, 0, 3], [-4, -1, 0, 1],
                                              [0, 0, 0, 0]])
  mean = tx.run(tx.disjoint_merge("mean"), agreed)["w"]
  np.testing.assert_allclose(mean, [-4.0, -1.5, 0.0, 2.0])
  mx = tx.run(tx.disjoint_merge("max"), agreed)["w"]
  np.testing.assert_allclose(mx, [-4.0, -2.0, 0.0, 3.0])
  cnt = tx.elected_signs(tvs, method="count", zero_sign="positive")["w"]
  np.testing.assert_array_equal(cnt, [1.0, -1.0, 1.0, 1.0])


def test_drop_and_rescale_statistics_and_determinism():
  x = {"w": jnp.ones((2, 200, 100))}
  key = jax.random.key(7)
  out = tx.run(tx.drop_and_rescale(0.9, key), x)["w"]
  kept = np.asarray(out != 0)
  assert abs(kept.mean() - 0.1) < 0.01
  np.testing.assert_allclose(np.asarray(out)[kept], 10.0, rtol=1e-6)
  again = tx.run(tx.drop_and_rescale(0.9, key), x)["w"]
  np.testing.assert_array_equal(out, again)
  other = tx.run(tx.drop_and_rescale(0.9, jax.random.key(8)), x)["w"]
  assert np.any(np.asarray(other) != np.asarray(out))


def test_fraction_validation():
  with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
    tx.trim_by_magnitude(0.0)
  with pytest.raises(ValueError, match="drop_rate"):
    tx.drop_and_rescale(1.0, jax.random.key(0))


@pytest.mark.parametrize("fn", ["kth_largest", "kth_largest_signed"])
def test_kth_largest_counts_past_uint32(fn):
  # 2**32 entries per task (abstract: nothing is allocated): counted leaf
  # by leaf in 64-bit pairs; a single leaf that large is refused by shape.
  f = lambda t: getattr(selection, fn)(t, lambda n: n // 3)
  two = {k: jax.ShapeDtypeStruct((2, 2 ** 15, 2 ** 16), jnp.bfloat16)
         for k in "ab"}
  assert jax.eval_shape(f, two).shape == (2,)
  one = {"a": jax.ShapeDtypeStruct((2, 2 ** 16, 2 ** 16), jnp.bfloat16)}
  with pytest.raises(ValueError, match=r"shape \(65536, 65536\) has 2\*\*32 "
                     r"or more entries per task"):
    jax.eval_shape(f, one)


@pytest.mark.parametrize("fn", ["kth_largest", "kth_largest_signed"])
def test_kth_largest_wide_path_is_exact(mesh8, fn):
  # Under a mesh (and past 2**32 entries) the k-th largest is counted leaf
  # by leaf; `values` is recomputed in each pass. Same numbers as the flat
  # one-device search.
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 8, 48)).astype(np.float32)
  x[0, :2] = 0.0
  tree = {"a": jnp.asarray(x), "b": jnp.asarray(x[:, 0, :16] * 3.0)}
  values = lambda v: v * v[::-1] - 0.1
  sel = getattr(selection, fn)
  flat = lambda t: np.concatenate([np.asarray(v, np.float32).reshape(2, -1)
                                   for v in jax.tree.leaves(t)], axis=1)
  key = np.abs if fn == "kth_largest" else (lambda v: v)
  for k, t, v in ((7, tree, values), (399, tree, None)):
    ranked = np.sort(key(flat(jax.tree.map(v or (lambda a: a), t))),
                     axis=1)[:, ::-1]
    with jax.set_mesh(mesh8):
      got = jax.jit(lambda t: sel(t, lambda n: k, values=v))(
          testing.shard(t, mesh8, "param"))
    np.testing.assert_array_equal(got, ranked[:, k - 1], err_msg=str(k))


@pytest.mark.parametrize("k", [1, 5, 60, 99, 100, 150, 200])
def test_kth_largest_signed_is_exact(k):
  rng = np.random.default_rng(k)
  x = rng.standard_normal((2, 200)).astype(np.float32)
  x[1, :120] = np.abs(x[1, :120])  # task 1 mostly positive
  x[:, 150:160] = 0.0
  tree = {"a": jnp.asarray(x[:, :80].reshape(2, 8, 10)),
          "b": jnp.asarray(x[:, 80:])}
  got = selection.kth_largest_signed(tree, lambda n: k)
  want = np.sort(x, axis=1)[:, ::-1][:, k - 1]
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
@pytest.mark.parametrize("sign_method,zero_sign,weights", [
    ("sum", "majority", None), ("count", "positive", [0.5, 1.0, 2.0]),
    ("sum", "positive", [1.0, 0.2, 0.7])])
def test_fused_ties_kernel_equals_primitive_chain(merge_func, sign_method,
                                                  zero_sign, weights):
  tvs = testing.random_params(5, {"a/w": (3, 6, 5), "a/b": (3, 7),
                                  "s": (3,)})
  tvs = jax.tree.map(jnp.asarray, tvs)
  # Ties in votes: make some entries cancel exactly.
  tvs = jax.tree.map(lambda x: x.at[1].set(jnp.where(
      jnp.abs(x[0]) < 0.3, -x[0], x[1])), tvs)
  steps = [tx.trim_by_magnitude(0.6)]
  if weights is not None:
    steps.append(tx.scale_per_task(weights))
  steps += [tx.elect_sign(sign_method, zero_sign),
            tx.disjoint_merge(merge_func, weights)]
  want = tx.run(tx.chain(*steps), tvs)
  thr = selection.topk_thresholds(tvs, 0.6)
  got = jax.jit(lambda t, th: tx.trimmed_disjoint_merge(
      t, th, sign_method, zero_sign, merge_func, weights))(tvs, thr)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7), got, want)
