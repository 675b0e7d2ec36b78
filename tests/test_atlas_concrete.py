"""aTLAS and Concrete masks on the tiny MLP problem, against references
written from the papers' equations (numpy loops, hand-written gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_helpers
from mtmerge import train
from mtmerge.learned import atlas
from mtmerge.learned import augment
from mtmerge.learned import common
from mtmerge.learned import concrete

FAST = dict(steps=6, lr=0.05, save_every=2)


@pytest.fixture(scope="module")
def prob():
  return learned_helpers.tiny_problem()


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _accuracy(prob, params, task, split):
  x = next(iter(prob.data(task, split, 64).epoch(0)))
  return float(common.accuracy(prob.logits(params, task, {"x": x["x"]}),
                               x["label"]))


def _interrupted(monkeypatch, run, at_step=5):
  """Runs `run()` with batches failing at `at_step`, then again (resumes)."""
  real = train.fit

  class Crash(Exception):
    pass

  def crashing(objective, batches, *a, **k):
    def fn(step):
      if step == at_step:
        raise Crash()
      return batches(step)
    return real(objective, fn, *a, **k)
  monkeypatch.setattr(train, "fit", crashing)
  with pytest.raises(Crash):
    run()
  monkeypatch.setattr(train, "fit", real)
  return run()


# ----------------------------------------------------------------- aTLAS


def test_partitioned_merge_matches_numpy_loop(prob):
  groups = _np(atlas.partition_groups(prob.base, 3, seed=1))
  again = _np(atlas.partition_groups(prob.base, 3, seed=1))
  rng = np.random.default_rng(0)
  coeffs = jax.tree.map(lambda _: rng.standard_normal((3, 3)).astype(
      np.float32), prob.base)
  merge = jax.jit(common.weighted_merge)
  merged = _np(merge(prob.base, prob.tvs, coeffs, groups))
  for path in (("fc1", "kernel"), ("fc2", "bias")):
    b, v = prob.base[path[0]][path[1]], prob.tvs[path[0]][path[1]]
    g, c = groups[path[0]][path[1]], coeffs[path[0]][path[1]]
    np.testing.assert_array_equal(g, again[path[0]][path[1]])
    assert g.shape == b.shape and g.dtype == np.int8 and set(
        np.unique(g)) <= {0, 1, 2}
    want = np.array(b, np.float64)
    for e in np.ndindex(b.shape):  # entry by entry: its group's coefficient
      want[e] += sum(c[t, g[e]] * v[t][e] for t in range(3))
    np.testing.assert_allclose(merged[path[0]][path[1]], want, atol=1e-5)
  # K = 1 (all entries in group 0) is the per-leaf version.
  per_leaf = jax.tree.map(lambda c: c[:, 0], coeffs)
  zeros = jax.tree.map(lambda g: np.zeros_like(g), groups)
  one = merge(prob.base, prob.tvs, jax.tree.map(lambda c: c[:, :1], coeffs),
              zeros)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), one,
               merge(prob.base, prob.tvs, per_leaf))
  assert _np(atlas.init_coeffs(prob.base, 2, 3))["fc1"]["bias"].shape == (2, 3)
  assert _np(atlas.init_coeffs(prob.base, 2))["fc1"]["bias"].shape == (2,)


@pytest.mark.parametrize("partitions", [1, 2])
def test_coefficient_gradient_is_per_leaf_inner_product(prob, partitions):
  rng = np.random.default_rng(partitions)
  shape = (3,) if partitions == 1 else (3, partitions)
  coeffs = jax.tree.map(lambda _: (0.3 * rng.standard_normal(shape)).astype(
      np.float32), prob.base)
  groups = (None if partitions == 1 else
            _np(atlas.partition_groups(prob.base, partitions)))
  obj = atlas.make_objective(prob, "task_addition", prob.tvs, coeffs, groups)
  batch = common.task_batches(prob, "validation", 16, labels=True)(0)
  loss_grad = jax.jit(jax.value_and_grad(
      lambda c: obj.loss(c, obj.consts, batch, jax.random.key(0))[0]))
  loss = lambda c: loss_grad(c)[0]
  grad = _np(loss_grad(coeffs)[1])

  # Reference: dL/dc[t, leaf(, g)] = <dL/dtheta_leaf, tau_t,leaf (in g)>.
  def ce_sum(theta):
    total = 0.0
    for t, b in batch.items():
      logp = jax.nn.log_softmax(prob.logits(theta, t, {"x": b["x"]}))
      total += -jnp.mean(logp[jnp.arange(len(b["label"])), b["label"]])
    return total
  theta = common.weighted_merge(prob.base, prob.tvs, coeffs, groups)
  dtheta = _np(jax.jit(jax.grad(ce_sum))(theta))
  for k1 in dtheta:
    for k2 in dtheta[k1]:
      d, v = dtheta[k1][k2], np.asarray(prob.tvs[k1][k2])
      for t in range(3):
        if partitions == 1:
          want = np.sum(d * v[t])
        else:
          g = groups[k1][k2]
          want = [np.sum((d * v[t])[g == j]) for j in range(partitions)]
        np.testing.assert_allclose(grad[k1][k2][t], want, rtol=1e-4,
                                   atol=1e-5)
  # And a central finite difference on one coefficient.
  eps = 1e-2
  def bump(s):
    c = jax.tree.map(np.array, coeffs)
    c["fc2"]["kernel"].reshape(-1)[0] += s
    return c
  fd = (float(loss(bump(eps))) - float(loss(bump(-eps)))) / (2 * eps)
  np.testing.assert_allclose(grad["fc2"]["kernel"].reshape(-1)[0], fd,
                             rtol=2e-2)


def test_few_shot_indices_pick_k_per_class_deterministically():
  labels = np.random.default_rng(0).integers(0, 4, 200)
  idx = atlas.few_shot_indices(labels, 5, 4, seed=3)
  assert len(idx) == 20 and len(set(idx)) == 20
  np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), 5)
  np.testing.assert_array_equal(idx, atlas.few_shot_indices(labels, 5, 4, 3))
  assert not np.array_equal(idx, atlas.few_shot_indices(labels, 5, 4, 4))
  with pytest.raises(ValueError, match="class 3 has 0 examples"):
    atlas.few_shot_indices(labels[labels < 3], 1, 4)


def test_bad_arguments_are_named(prob):
  cases = [
      (dict(objective="fancy"), "unknown objective 'fancy'"),
      (dict(target="z"), r"target must be distinct tasks .*'z'"),
      (dict(sources=("a", "a")), "sources must be distinct"),
      (dict(objective="few_shot", k_shot=1), "few_shot needs one target"),
      (dict(objective="few_shot", target="a", k_shot=0), "k_shot >= 1"),
      (dict(objective="few_shot", target="a", k_shot=1000),
       "task 'a' split 'train': k_shot=1000 but class 0 has"),
      (dict(objective="negation", target="a"), "needs a control task"),
      (dict(objective="negation", target="a", control="a"), "other than"),
      (dict(control="b"), "control='b' for task_addition"),
      (dict(partitions=0), "partitions >= 1"),
      (dict(objective="test_time", threshold=1.0), "threshold < 1"),
  ]
  for kw, match in cases:
    with pytest.raises(ValueError, match=match):
      atlas.atlas(prob, progress=False, **kw)
  with pytest.raises(ValueError, match=r"no default augmentation .*\['x'\]"):
    atlas.atlas(prob, objective="test_time", batch_size=8, progress=False)


def test_task_addition_lowers_validation_loss(prob):
  res = atlas.atlas(prob, batch_size=16, train_config=dict(steps=15, lr=0.05),
                    progress=False)
  obj = atlas.make_objective(prob, "task_addition", prob.tvs,
                             atlas.init_coeffs(prob.base, 3))
  full = {t: next(iter(prob.data(t, "validation", 64).epoch(0)))
          for t in prob.tasks}
  full = {t: {"x": b["x"], "label": b["label"]} for t, b in full.items()}
  f = lambda c: float(obj.loss(c, obj.consts, full, jax.random.key(0))[0])
  assert f(res.learned) < f(obj.init) - 0.3
  assert res.extra["sources"] == prob.tasks and res.extra["groups"] is None
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               res.params, common.weighted_merge(prob.base, prob.tvs,
                                                 res.learned))


def test_negation_forgets_target_and_keeps_control(prob):
  res = atlas.atlas(prob, objective="negation", target="a", control="c",
                    batch_size=16, train_config=dict(steps=20, lr=0.02),
                    progress=False)
  assert res.extra["sources"] == ("a",)
  for split in ("validation", "test"):
    base = [_accuracy(prob, prob.base, t, split) for t in ("a", "c")]
    got = [_accuracy(prob, res.params, t, split) for t in ("a", "c")]
    assert got[0] < base[0] - 0.05, (split, base, got)
    assert got[1] > base[1] - 0.05, (split, base, got)


def test_trusted_samples_and_ufm_loss_match_numpy():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(3), size=90)
  idx, target = atlas.trusted_samples(probs)  # k = min(90 / 3 / 10, 100) = 3
  want = set()
  for c in range(3):
    want |= set(sorted(range(90), key=lambda i: probs[i, c])[-3:])
  np.testing.assert_array_equal(idx, sorted(want))
  np.testing.assert_array_equal(target, probs[idx].argmax(1))
  plain, strong = rng.normal(size=(2, 6, 3)) * 3
  tgt = np.array([-1, -1, 2, -1, 0, -1])
  q = np.exp(plain) / np.exp(plain).sum(1, keepdims=True)
  q[tgt >= 0] = np.eye(3)[tgt[tgt >= 0]]
  w = q.max(1) > 0.8
  logq = strong - np.log(np.exp(strong).sum(1, keepdims=True))
  want = -(q * logq).sum(1)[w].sum() / w.sum()
  got = atlas.ufm_loss(jnp.asarray(plain), jnp.asarray(strong),
                       jnp.asarray(tgt), 0.8)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_test_time_trusted_sets_and_batches(prob):
  noise = lambda x, r: {"x": x["x"] + 0.3 * jax.random.normal(r, x["x"].shape)}
  res = atlas.atlas(prob, objective="test_time", target=("a", "b"),
                    augment=noise, threshold=0.5, trusted_per_class=2,
                    batch_size=16, train_config=dict(steps=8, lr=0.05),
                    progress=False)
  for t in ("a", "b"):  # the trusted sets come from theta_0's predictions
    x = next(iter(prob.data(t, "test", 64).epoch(0)))["x"]
    p0 = np.asarray(jax.nn.softmax(prob.logits(prob.base, t, {"x": x})))
    np.testing.assert_array_equal(res.extra["trusted"][t],
                                  atlas.trusted_samples(p0, 2)[0])
  at, _ = atlas._ufm_batches(prob, ("a",), "test", 16, None, 0, 2)
  b = at(3)["a"]
  assert b["inputs"]["x"].shape == (16, 8) and (b["target"] >= 0).sum() == 4
  assert np.isfinite([r["loss"] for r in res.log]).all()
  assert set(res.log[0]) >= {"ufm/a", "ufm/b"}


def test_default_augment_text_and_images():
  ids = np.tile(np.arange(1, 33, dtype=np.int32), (64, 1))
  am = np.ones((64, 32), np.int32)
  am[:, 20:] = 0
  out = jax.jit(augment.default_augment)(
      {"input_ids": ids, "attention_mask": am}, jax.random.key(0))
  np.testing.assert_array_equal(out["input_ids"], ids)
  dropped = (am == 1) & (np.asarray(out["attention_mask"]) == 0)
  assert not dropped[:, [0, 19]].any() and (out["attention_mask"][:, 20:]
                                            == 0).all()
  assert 0.15 < dropped[:, 1:19].mean() < 0.25
  masked = jax.jit(augment.token_dropout, static_argnames="mask_id")(
      {"input_ids": ids, "attention_mask": am}, jax.random.key(0),
      mask_id=103)
  np.testing.assert_array_equal(masked["input_ids"] == 103, dropped)
  img = np.random.default_rng(0).normal(size=(8, 6, 5, 3)).astype(np.float32)
  aug, key = jax.jit(augment.image_augment), jax.random.key(1)
  u = np.asarray(jax.random.uniform(key, (8, 4 + 6 * 5 * 3)))
  # A full-area crop without noise leaves each image as is or mirrored.
  flip_only = np.asarray(aug(img, key, 1.0, 0.5, 0.0))
  mirrored = u[:, 3] < 0.5
  assert 0 < mirrored.sum() < 8
  np.testing.assert_allclose(flip_only, np.where(
      mirrored[:, None, None, None], img[:, :, ::-1], img), atol=1e-5)
  # A crop is a bilinear scale-and-translate of the image.
  crop = np.asarray(aug(img, key, 0.3, 0.0, 0.0))
  side = np.sqrt(0.3 + 0.7 * u[:, 0])
  start = np.stack([u[:, 1] * (1 - side) * 6, u[:, 2] * (1 - side) * 5], 1)
  want = jax.jit(jax.vmap(lambda x, s, t: jax.image.scale_and_translate(
      x, (6, 5, 3), (0, 1), jnp.stack([1 / s, 1 / s]), -t / s, "linear",
      antialias=False)))(img, side, start)
  np.testing.assert_allclose(crop, want, atol=1e-5)
  noisy = np.asarray(aug(img, key, 1.0, 0.0, 0.1))
  assert 0.09 < np.std(noisy - img) < 0.11
  out = jax.eval_shape(augment.default_augment, {"image": img}, key)["image"]
  assert out.shape == img.shape and out.dtype == img.dtype


def test_few_shot_partitioned_resume_equals_uninterrupted(prob, tmp_path,
                                                          monkeypatch):
  kw = dict(objective="few_shot", target="a", sources=("a", "b", "c"),
            k_shot=2, partitions=2, batch_size=8, train_config=FAST,
            progress=False)
  full = atlas.atlas(prob, workdir=str(tmp_path / "full"), **kw)
  labels = prob.data("a", "train", 64).source
  shots = full.extra["shots"]
  np.testing.assert_array_equal(np.bincount(
      [labels[i]["label"] for i in shots], minlength=4), 2)
  resumed = _interrupted(monkeypatch, lambda: atlas.atlas(
      prob, workdir=str(tmp_path / "resumed"), **kw))
  jax.tree.map(np.testing.assert_array_equal, full.learned, resumed.learned)
  jax.tree.map(np.testing.assert_array_equal, full.params, resumed.params)
  assert [r["step"] for r in resumed.log] == list(range(1, 7))


# -------------------------------------------------------------- Concrete


def test_concrete_sample_is_relaxed_bernoulli_and_rescaled():
  rng = np.random.default_rng(0)
  logits, u = rng.normal(size=50), rng.uniform(size=50)
  want = 1 / (1 + np.exp(-(logits + np.log(u) - np.log(1 - u)) / 0.5))
  np.testing.assert_allclose(concrete.relaxed_bernoulli(
      jnp.asarray(logits), jnp.asarray(u), 0.5), want, rtol=1e-5, atol=1e-7)
  # Samples of a tree: P(m > 1/2) = sigmoid(logit), the binary concrete's
  # defining property; leaves get independent noise; a key fixes the draw.
  l = np.repeat(np.array([[-1.0], [0.0], [2.0]], np.float32), 3000, axis=1)
  tree = {"a": l, "b": l.copy()}
  draw = jax.jit(concrete.sample_mask, static_argnums=2)
  m = _np(draw(tree, jax.random.key(3), 0.5))
  np.testing.assert_allclose((m["a"] > 0.5).mean(1), 1 / (1 + np.exp(
      -l[:, 0])), atol=0.03)
  assert ((0 <= m["a"]) & (m["a"] <= 1)).all()
  assert np.abs(np.corrcoef(m["a"].ravel(), m["b"].ravel())[0, 1]) < 0.5
  jax.tree.map(np.testing.assert_array_equal, m,
               _np(draw(tree, jax.random.key(3), 0.5)))
  scaled = _np(concrete.rescale(m))
  for leaf in jax.tree.leaves(scaled):
    np.testing.assert_allclose(leaf.mean(), 1.0, rtol=1e-5)
  np.testing.assert_allclose(scaled["a"], m["a"] / m["a"].mean(), rtol=1e-5)
  np.testing.assert_array_equal(concrete.rescale([np.zeros(3)])[0], 0.0)


def test_hard_mask_and_masked_task_vectors(prob):
  logits = {"fc1": {"bias": np.array([-1.0, 0.0, 2.0] * 5 + [3.0]),
                    "kernel": np.ones((8, 16))},
            "fc2": {"bias": np.zeros(8), "kernel": -np.ones((16, 8))}}
  mask = concrete.hard_mask(logits)
  np.testing.assert_array_equal(mask["fc1"]["bias"],
                                logits["fc1"]["bias"] > 0)
  tvs = _np(concrete.masked_tvs(prob.tvs, mask))
  v = np.asarray(prob.tvs["fc1"]["bias"])
  m = logits["fc1"]["bias"] > 0
  np.testing.assert_allclose(tvs["fc1"]["bias"], v * m / m.mean(), rtol=1e-6)
  np.testing.assert_array_equal(tvs["fc2"]["bias"], 0.0)  # nothing kept
  np.testing.assert_allclose(tvs["fc1"]["kernel"], prob.tvs["fc1"]["kernel"])


@pytest.fixture(scope="module")
def prob2(prob):
  """Tasks a and b only: the Concrete steps compile faster."""
  return prob._replace(tasks=("a", "b"), heads={t: prob.heads[t] for t in "ab"},
                       tvs=jax.tree.map(lambda v: np.asarray(v)[:2], prob.tvs))


@pytest.fixture(scope="module")
def concrete_ta(prob2, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("concrete") / "full")
  return workdir, concrete.concrete_task_arithmetic(
      prob2, batch_size=16, train_config=dict(FAST, steps=6, lr=0.1),
      workdir=workdir, progress=False)


def test_concrete_task_arithmetic_learns_and_merges_hard_mask(prob2,
                                                              concrete_ta):
  _, res = concrete_ta
  mask = res.extra["mask"]
  jax.tree.map(lambda m, l: np.testing.assert_array_equal(m, l > 0), mask,
               res.learned)
  want = jax.tree.map(lambda b, v, m: b + 0.3 * np.asarray(v).sum(0) * m
                      / max(m.mean(), 1e-30), _np(prob2.base), _np(prob2.tvs),
                      mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               res.params, want)
  # The learned logits lower the expected entropy (same batches and noise).
  tv_sum = jax.tree.map(lambda v: np.asarray(v).sum(0, keepdims=True),
                        prob2.tvs)
  obj = concrete.mask_objective(prob2, tv_sum, np.full((1,), 0.3, np.float32))
  batches = common.task_batches(prob2, "test", 16)
  f = jax.jit(lambda l, b, r: obj.loss(l, obj.consts, b, r)[0])
  mean = lambda l: np.mean([f(l, batches(s), jax.random.key(s))
                            for s in range(8)])
  assert mean(res.learned) < mean(obj.init) - 0.05


def test_concrete_resume_equals_uninterrupted(prob2, concrete_ta, tmp_path,
                                              monkeypatch):
  _, full = concrete_ta
  resumed = _interrupted(monkeypatch, lambda: concrete.concrete_task_arithmetic(
      prob2, batch_size=16, train_config=dict(FAST, steps=6, lr=0.1),
      workdir=str(tmp_path / "resumed"), progress=False))
  jax.tree.map(np.testing.assert_array_equal, full.learned, resumed.learned)
  jax.tree.map(np.testing.assert_array_equal, full.extra["mask"],
               resumed.extra["mask"])


def test_concrete_adamerging_merges_masked_vectors(prob2):
  res = concrete.concrete_adamerging(
      prob2, granularity="task", batch_size=8,
      mask_train_config=dict(steps=4, lr=0.1),
      train_config=dict(steps=4, lr=0.05), progress=False)
  logits, coeffs = res.learned["logits"], res.learned["coeffs"]
  assert coeffs.shape == (2,) and (0 <= coeffs).all() and (coeffs <= 1).all()
  jax.tree.map(lambda m, l: np.testing.assert_array_equal(m, l > 0),
               res.extra["mask"], logits)
  want = jax.tree.map(
      lambda b, v, m: b + np.tensordot(coeffs, np.asarray(v) * m
                                       / max(m.mean(), 1e-30), axes=1),
      _np(prob2.base), _np(prob2.tvs), res.extra["mask"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               res.params, want)
  assert [r["phase"] for r in res.log] == ["mask"] * 4 + ["adamerging"] * 4
  with pytest.raises(ValueError, match="temperature"):
    concrete.concrete_adamerging(prob2, temperature=0.0, progress=False)
  with pytest.raises(ValueError, match="clamp"):
    concrete.concrete_adamerging(prob2, clamp=(1.0, 0.0), progress=False)
  with pytest.raises(ValueError, match="granularity"):
    concrete.concrete_adamerging(prob2, granularity="entry", progress=False)
