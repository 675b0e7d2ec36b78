"""The sharded trainer and AdaMerging on a tiny MLP problem.

References are written independently of `mtmerge.learned`: the merged
model, its entropy and Adam are re-derived in numpy from the AdaMerging
paper's equations, with gradients by central finite differences.
"""

import jax
import numpy as np
import pytest

import learned_helpers as lh
from mtmerge import checkpoint, sharding, train
from mtmerge.learned import adamerging, common

CFG = dict(steps=6, lr=0.05)


def _np_features(params, x):
  h = np.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  return h @ params["fc2"]["kernel"] + params["fc2"]["bias"]


def _np_loss(p, coeffs, batch):
  """Sum over tasks of the mean entropy of the layer-wise merged model."""
  merged = {m: {k: np.asarray(p.base[m][k], np.float64) + sum(
      coeffs[m][k][t] * p.tvs[m][k][t] for t in range(p.num_tasks))
                for k in ("kernel", "bias")} for m in ("fc1", "fc2")}
  total = 0.0
  for task, inputs in batch.items():
    z = _np_features(merged, inputs["x"].astype(np.float64))
    z = z @ np.asarray(p.heads[task]["kernel"], np.float64) + np.asarray(
        p.heads[task]["bias"])
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    total += np.mean(-np.sum(np.exp(logp) * logp, -1))
  return total


def _np_adamerging(p, batches, steps, lr, adam=True, b1=0.9, b2=0.999,
                   eps=1e-8, clamp_mode="project"):
  """Coefficients after `steps` steps of Adam (or SGD), kept in [0, 1].

  "project" clips the coefficients after each step; "merge" (the official
  AdaMerging code) keeps them raw and merges with clip(c), so the returned
  (effective) coefficients are clip(raw).
  """
  merge = clamp_mode == "merge"
  box = lambda x: np.clip(x, 0.0, 1.0)
  post = (lambda x: x) if merge else box
  c = {m: {k: np.full(p.num_tasks, 0.3) for k in ("kernel", "bias")}
       for m in ("fc1", "fc2")}
  mu = jax.tree.map(np.zeros_like, c)
  nu = jax.tree.map(np.zeros_like, c)
  for s in range(steps):
    batch = batches(s)
    g = jax.tree.map(np.zeros_like, c)
    for m in c:
      for k in c[m]:
        for t in range(p.num_tasks):
          h = 1e-5
          for sign in (1, -1):
            c[m][k][t] += sign * h
            eff = jax.tree.map(box, c) if merge else c
            g[m][k][t] += sign * _np_loss(p, eff, batch) / (2 * h)
            c[m][k][t] -= sign * h
    if not adam:
      c = jax.tree.map(lambda x, d: post(x - lr * d), c, g)
      continue
    mu = jax.tree.map(lambda a, b: b1 * a + (1 - b1) * b, mu, g)
    nu = jax.tree.map(lambda a, b: b2 * a + (1 - b2) * b * b, nu, g)
    c = jax.tree.map(
        lambda x, m_, v: post(x - lr * (m_ / (1 - b1 ** (s + 1))) / (
            np.sqrt(v / (1 - b2 ** (s + 1))) + eps)), c, mu, nu)
  return jax.tree.map(box, c)


@pytest.fixture(scope="module")
def prob():
  return lh.tiny_problem()


@pytest.mark.parametrize("optimizer,lr,atol", [("sgd", 0.5, 2e-5),
                                                ("adam", 0.05, 2e-3)])
def test_layerwise_adamerging_matches_numpy_reference(prob, optimizer, lr,
                                                      atol):
  res = adamerging.adamerging(
      prob, granularity="layer", batch_size=8, progress=False,
      train_config=dict(steps=3, lr=lr, optimizer=optimizer))
  batches = common.task_batches(prob, "test", 8, seed=0)
  ref = _np_adamerging(prob, batches, 3, lr, adam=optimizer == "adam")
  # SGD checks the gradient tightly; Adam's normalized step turns float32
  # rounding of tiny gradients into larger (still small) differences.
  for m in ref:
    for k in ref[m]:
      np.testing.assert_allclose(res.learned[m][k], ref[m][k], atol=atol)
  # The loss logged at step 1 is the reference loss at the initial point.
  init = jax.tree.map(lambda x: np.full(3, 0.3), ref)
  assert abs(res.log[0]["loss"] - _np_loss(prob, init, batches(0))) < 1e-4
  assert np.max(np.abs(res.learned["fc1"]["kernel"] - 0.3)) > 0.05
  # The returned model is theta_0 + sum_t lambda_t tau_t with those values.
  merged = jax.tree.map(lambda b, v, c: b + np.tensordot(c, v, 1), prob.base,
                        prob.tvs, res.learned)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               res.params, merged)


@pytest.mark.parametrize("clamp_mode", ["project", "merge"])
def test_clamp_modes_match_numpy_reference_past_the_bounds(prob, clamp_mode):
  """A step size that drives coefficients past 0 and 1 separates the modes."""
  kw = dict(granularity="layer", batch_size=8, progress=False,
            train_config=dict(steps=4, lr=40.0, optimizer="sgd"))
  res = adamerging.adamerging(prob, clamp_mode=clamp_mode, **kw)
  batches = common.task_batches(prob, "test", 8, seed=0)
  ref = _np_adamerging(prob, batches, 4, 40.0, adam=False,
                       clamp_mode=clamp_mode)
  other = _np_adamerging(prob, batches, 4, 40.0, adam=False,
                         clamp_mode={"merge": "project",
                                     "project": "merge"}[clamp_mode])
  at_bound = 0
  for m in ref:
    for k in ref[m]:
      np.testing.assert_allclose(res.learned[m][k], ref[m][k], atol=1e-4)
      at_bound += int(np.sum((ref[m][k] == 0) | (ref[m][k] == 1)))
  assert at_bound > 0  # the bounds were reached ...
  gap = max(np.max(np.abs(ref[m][k] - other[m][k])) for m in ref
            for k in ref[m])
  assert gap > 1e-2  # ... and the two modes took different paths


def test_bad_clamp_mode_is_named(prob):
  with pytest.raises(ValueError, match="clamp_mode must be one of"):
    adamerging.adamerging(prob, clamp_mode="soft", progress=False,
                          train_config=dict(steps=1))


def test_taskwise_learns_and_clamps(prob, tmp_path):
  kw = dict(granularity="task", batch_size=8, progress=False,
            train_config=dict(steps=40, lr=0.2), workdir=str(tmp_path))
  res = adamerging.adamerging(prob, **kw)
  # A bare [T] vector round-trips through the final checkpoint.
  np.testing.assert_array_equal(adamerging.adamerging(prob, **kw).learned,
                                res.learned)
  c = np.asarray(res.learned)
  assert c.shape == (3,) and np.all((c >= 0) & (c <= 1)), c
  assert res.log[-1]["loss"] < res.log[0]["loss"]


def test_one_device_equals_eight(prob):
  kw = dict(granularity="layer", batch_size=8, train_config=CFG,
            progress=False)
  one = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
  eight = sharding.make_mesh([("data", 4), ("fsdp", 2)])
  r1 = adamerging.adamerging(prob, mesh=one, **kw)
  # Kernels sharded over fsdp, batches over data: same numbers.
  r8 = adamerging.adamerging(prob, mesh=eight,
                             rules=[(".*kernel", (None, "fsdp")), (".*", None)],
                             **kw)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               r1.learned, r8.learned)
  np.testing.assert_allclose([r["loss"] for r in r1.log],
                             [r["loss"] for r in r8.log], atol=1e-6)


def test_resume_equals_uninterrupted(prob, tmp_path):
  kw = dict(granularity="layer", batch_size=8, progress=False)
  cfg = dict(CFG, save_every=2)
  full = adamerging.adamerging(prob, train_config=cfg,
                               workdir=str(tmp_path / "full"), **kw)

  class Crash(Exception):
    pass

  real = common.task_batches

  def crashing(*a, **k):
    at = real(*a, **k)
    def fn(step):
      if step == 5:
        raise Crash()
      return at(step)
    return fn

  common.task_batches = crashing
  try:
    with pytest.raises(Crash):
      adamerging.adamerging(prob, train_config=cfg,
                            workdir=str(tmp_path / "resumed"), **kw)
  finally:
    common.task_batches = real
  resumed = adamerging.adamerging(prob, train_config=cfg,
                                  workdir=str(tmp_path / "resumed"), **kw)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
               full.learned, resumed.learned)
  assert [r["step"] for r in resumed.log] == list(range(1, 7))
  # A finished run is returned from its final checkpoint.
  again = adamerging.adamerging(prob, train_config=cfg,
                                workdir=str(tmp_path / "resumed"), **kw)
  jax.tree.map(np.testing.assert_array_equal, full.learned, again.learned)
  # A different config in the same directory is refused.
  with pytest.raises(checkpoint.ConfigMismatchError, match="init"):
    adamerging.adamerging(prob, train_config=cfg, init=0.5,
                          workdir=str(tmp_path / "resumed"), **kw)


def test_adamerging_plus_uses_ties_processed_vectors(prob):
  tvs = jax.tree.map(np.asarray, adamerging.ties_processed(prob.tvs, 0.2))
  flat = np.concatenate([np.abs(v).reshape(3, -1) for v in jax.tree.leaves(
      prob.tvs)], axis=1)
  kth = np.sort(flat, axis=1)[:, -int(np.ceil(0.2 * flat.shape[1]))]
  for orig, got in zip(jax.tree.leaves(prob.tvs), jax.tree.leaves(tvs)):
    trimmed = np.where(np.abs(orig) >= kth.reshape((3,) + (1,) * (
        orig.ndim - 1)), orig, 0)
    elected = np.sign(trimmed.sum(0))
    want = np.where(np.sign(trimmed) == elected, trimmed, 0)
    np.testing.assert_allclose(got, want)
  res = adamerging.adamerging(prob, plus=True, batch_size=8,
                              train_config=dict(steps=2), progress=False)
  merged = jax.tree.map(lambda b, v, c: b + np.tensordot(c, v, 1), prob.base,
                        tvs, res.learned)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               res.params, merged)


def _objective(prob, value_fn):
  return train.Objective(
      init={"w": np.ones(3, np.float32)},
      loss=lambda c, k, batch, rng: (value_fn(c["w"], batch), {}),
      consts=None)


def test_nonfinite_loss_and_coefficients_are_named(prob):
  batches = lambda s: {"x": np.ones((8, 2), np.float32)}
  cfg = train.TrainConfig.from_dict(dict(steps=3, lr=0.1))
  with pytest.raises(FloatingPointError, match="non-finite loss .* step 0"):
    train.fit(_objective(prob, lambda w, b: np.nan * w.sum()), batches, cfg,
              progress=False)
  with pytest.raises(FloatingPointError, match="'w' became non-finite"):
    train.fit(train.Objective({"w": np.ones(3, np.float32)},
                              lambda c, k, b, r: ((c["w"] ** 2).sum(), {}),
                              project=lambda c: {"w": c["w"] / 0.0}),
              batches, cfg, progress=False)


def test_bad_inputs_fail_before_training(prob):
  with pytest.raises(ValueError, match="unknown training option.*'stpes'"):
    train.TrainConfig.from_dict(dict(stpes=3))
  with pytest.raises(ValueError, match="optimizer must be"):
    train.TrainConfig.from_dict(dict(optimizer="lion"))
  cfg = train.TrainConfig.from_dict(dict(steps=2))
  obj = train.Objective({"w": np.ones(3, np.float32)},
                        lambda c, k, b, r: ((c["w"] * b["x"].sum()).sum(), {}))
  with pytest.raises(ValueError, match=r"batch leaf 'x' of shape \(6, 2\).*"
                     "multiple of the 8"):
    train.fit(obj, lambda s: {"x": np.ones((6, 2), np.float32)}, cfg,
              progress=False)
  with pytest.raises(ValueError, match="mesh axes .* need a multiple of 3"):
    train.fit(obj, lambda s: {"x": np.ones((8, 2), np.float32)},
              train.TrainConfig.from_dict(dict(steps=2, mesh=[("data", 3)])),
              progress=False)
  with pytest.raises(ValueError, match="granularity must be one of"):
    adamerging.adamerging(prob, granularity="block", progress=False)


def test_finished_run_with_a_bare_final_is_loaded(tmp_path):
  """Fine-tuning runs finished before train.fit wrote bare final params."""
  run = checkpoint.Run(str(tmp_path), {"task": "x"})
  run.finish({"w": np.full(3, 7.0, np.float32)})
  obj = train.Objective({"w": np.ones(3, np.float32)},
                        lambda c, k, b, r: ((c["w"] ** 2).sum(), {}))
  res = train.fit(obj, lambda s: {"x": np.ones((8, 1), np.float32)},
                  train.TrainConfig(steps=2), run=run, progress=False)
  np.testing.assert_array_equal(res.params["w"], [7.0, 7.0, 7.0])
  run.close()
