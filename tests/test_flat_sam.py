"""Task-based flat regions (Phan et al. 2022): per-task SAM perturbations
and the combined update against NumPy from the paper's equations, rho = 0,
8 devices == 1, single-task SAM fine-tuning, bad input, the runlocal job."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import flat_sam as flat_sam_config
from mtmerge import finetune
from mtmerge import sharding
from mtmerge import train
from mtmerge.flat import bench
from mtmerge.flat import objective as flat_obj
from mtmerge.flat import sam

import job_helpers

TASKS = ("a", "b")


# A 2-task linear model with closed-form gradients: f_t(x) = x W v_t,
# L_t = 0.5 mean((x W v_t - y_t)^2); W shared [3, 4], v_t a head [4].
def _problem(seed=0, n=16):
  r = np.random.default_rng(seed)
  params = {"shared": {"w": r.normal(size=(3, 4)).astype(np.float32)},
            "heads": {t: {"v": r.normal(size=(4,)).astype(np.float32)}
                      for t in TASKS}}
  batch = {t: {"x": r.normal(size=(n, 3)).astype(np.float32),
               "y": r.normal(size=(n,)).astype(np.float32)} for t in TASKS}
  return params, batch


def _task_loss(shared, head, cst, b, t):
  del cst, t
  r = b["x"] @ shared["w"] @ head["v"] - b["y"]
  return 0.5 * jnp.mean(r ** 2), {}


def _np_grads(w, v, x, y):
  w, v, x, y = (np.asarray(a, np.float64) for a in (w, v, x, y))
  r = x @ w @ v - y
  return np.outer(x.T @ r, v) / len(y), w.T @ x.T @ r / len(y)


def _np_update(params, batch, rho, combiner="mean", scope="joint"):
  """The paper's Algorithm 1 (equal-weight / PCGrad aggregation), NumPy."""
  w = np.asarray(params["shared"]["w"], np.float64)
  low, flat, heads = [], [], {}
  for t in TASKS:
    v = np.asarray(params["heads"][t]["v"], np.float64)
    gw, gv = _np_grads(w, v, batch[t]["x"], batch[t]["y"])
    if scope == "joint":
      nrm = np.sqrt(np.sum(gw ** 2) + np.sum(gv ** 2))
      ew, ev = rho * gw / (nrm + 1e-12), rho * gv / (nrm + 1e-12)
    else:
      ew = rho * gw / (np.linalg.norm(gw) + 1e-12)
      ev = rho * gv / (np.linalg.norm(gv) + 1e-12)
    gw2, gv2 = _np_grads(w + ew, v + ev, batch[t]["x"], batch[t]["y"])
    low.append(gw)
    flat.append(gw2 - gw)
    heads[t] = gv2

  def comb(gs):
    if combiner == "mean":
      return sum(gs) / len(gs)
    if combiner == "sum":
      return sum(gs)
    out = []  # PCGrad, fixed order, projections off the original gradients
    for i, g in enumerate(gs):
      g = g.copy()
      for j, o in enumerate(gs):
        d = np.sum(g * o)
        if j != i and d < 0:
          g = g - d / np.sum(o * o) * o
      out.append(g)
    return sum(out)
  return comb(low) + comb(flat), heads


@pytest.mark.parametrize("combiner,scope", [("mean", "joint"),
                                            ("pcgrad", "joint"),
                                            ("sum", "separate")])
def test_update_matches_numpy_paper_equations(combiner, scope):
  params, batch = _problem()
  # Conflicting tasks: b's targets are minus a's outputs, so PCGrad projects.
  fn = lambda s, h, b, t: _task_loss(s, h, None, b, t)
  g, info = jax.jit(lambda p, b: sam.flat_gradients(
      fn, p, b, TASKS, 0.3, combiner, scope))(params, batch)
  want_w, want_heads = _np_update(params, batch, 0.3, combiner, scope)
  np.testing.assert_allclose(g["shared"]["w"], want_w, rtol=2e-5, atol=1e-6)
  for t in TASKS:
    np.testing.assert_allclose(g["heads"][t]["v"], want_heads[t], rtol=2e-5,
                               atol=1e-6)
    assert float(info["sam_loss"][t]) > float(info["loss"][t])  # ascent
  # The combiners differ here (the test can tell them apart).
  other = _np_update(params, batch, 0.3, "sum" if combiner != "sum" else
                     "mean", scope)[0]
  assert np.abs(other - want_w).max() > 1e-3


def test_jit_equals_eager_and_no_recompile():
  params, batch = _problem(5)
  fn = lambda s, h, b, t: _task_loss(s, h, None, b, t)
  f = lambda p, b: sam.flat_gradients(fn, p, b, TASKS, 0.1, "pcgrad")[0]
  jf = jax.jit(f)
  eager = f(params, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               jf(params, batch), eager)
  jf(params, _problem(6)[1])
  assert jf._cache_size() == 1


def test_perturbation_has_radius_rho_and_gradient_direction():
  params, batch = _problem(1)
  gw, gv = _np_grads(params["shared"]["w"], params["heads"]["a"]["v"],
                     batch["a"]["x"], batch["a"]["y"])
  es, eh = sam.task_perturbation({"w": jnp.asarray(gw, jnp.float32)},
                                 {"v": jnp.asarray(gv, jnp.float32)}, 0.05)
  total = np.sqrt(np.sum(np.square(es["w"])) + np.sum(np.square(eh["v"])))
  np.testing.assert_allclose(total, 0.05, rtol=1e-5)
  np.testing.assert_allclose(es["w"] / 0.05 * np.sqrt(
      np.sum(gw ** 2) + np.sum(gv ** 2)), gw, rtol=1e-4, atol=1e-6)
  z = sam.task_perturbation({"w": jnp.asarray(gw, jnp.float32)},
                            {"v": jnp.asarray(gv, jnp.float32)}, 0.0)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(z))
  es2, eh2 = sam.task_perturbation({"w": gw.astype(np.float32)},
                                   {"v": gv.astype(np.float32)}, 0.05,
                                   "separate")
  np.testing.assert_allclose(np.linalg.norm(es2["w"]), 0.05, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(eh2["v"]), 0.05, rtol=1e-5)


def test_rho_zero_is_the_plain_multitask_gradient_exactly():
  params, batch = _problem(2)
  fn = lambda s, h, b, t: _task_loss(s, h, None, b, t)
  g, _ = jax.jit(lambda p, b: sam.flat_gradients(fn, p, b, TASKS, 0.0))(
      params, batch)
  plain = jax.jit(jax.grad(lambda p, b: sum(
      fn(p["shared"], p["heads"][t], b[t], t)[0] for t in TASKS) / 2))(
          params, batch)
  per_task = [jax.jit(jax.grad(lambda s, b, t=t: fn(
      s, params["heads"][t], b, t)[0]))(params["shared"], batch[t])
              for t in TASKS]
  np.testing.assert_array_equal(g["shared"]["w"], (
      per_task[0]["w"] + per_task[1]["w"]) / 2)  # exact: eps is exactly 0
  np.testing.assert_allclose(g["shared"]["w"], plain["shared"]["w"],
                             rtol=1e-6)
  for t in TASKS:  # a head's own task gradient (the mean loss halves it)
    np.testing.assert_allclose(g["heads"][t]["v"], 2 * plain["heads"][t]["v"],
                               rtol=1e-6)


def _fit(mesh, rho, steps=3):
  params, _ = _problem(3)
  obj = flat_obj.multitask_objective(_task_loss, params, TASKS, rho=rho)
  cfg = train.TrainConfig(steps=steps, optimizer="sgd", lr=0.1, log_every=1,
                          mesh=[("data", -1)])
  return train.fit(obj, lambda s: _problem(10 + s)[1], cfg, mesh=mesh,
                   progress=False)


def test_one_fit_step_is_sgd_on_the_paper_update_and_8_devices_equal_1():
  one = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
  eight = sharding.make_mesh([("data", -1)])
  assert eight.size == 8
  r1 = _fit(one, 0.2)
  r8 = _fit(eight, 0.2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5,
                                                       atol=1e-6),
               r1.params, r8.params)
  params, _ = _problem(3)
  want_w, want_h = _np_update(params, _problem(10)[1], 0.2)
  step1 = _fit(one, 0.2, steps=1).params
  np.testing.assert_allclose(step1["shared"]["w"], params["shared"]["w"] -
                             0.1 * want_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(step1["heads"]["b"]["v"], params["heads"]["b"][
      "v"] - 0.1 * want_h["b"], rtol=1e-5, atol=1e-6)
  assert "sharpness/a" in r1.log[0] and r1.log[0]["sharpness/a"] > 0


def test_single_task_sam_loss_gradient_is_the_perturbed_gradient():
  params, batch = _problem(4)
  p = {"w": params["shared"]["w"], "v": params["heads"]["a"]["v"]}
  loss = lambda q, c, b, r: _task_loss({"w": q["w"]}, {"v": q["v"]}, c, b,
                                       "a")
  wrapped = flat_obj.sam_loss(loss, 0.1)
  (val, m), g = jax.jit(jax.value_and_grad(wrapped, has_aux=True))(
      p, None, batch["a"], None)
  gw, gv = _np_grads(p["w"], p["v"], batch["a"]["x"], batch["a"]["y"])
  nrm = np.sqrt(np.sum(gw ** 2) + np.sum(gv ** 2))
  want = _np_grads(p["w"] + 0.1 * gw / nrm, p["v"] + 0.1 * gv / nrm,
                   batch["a"]["x"], batch["a"]["y"])
  np.testing.assert_allclose(g["w"], want[0], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(g["v"], want[1], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(val, loss(p, None, batch["a"], None)[0],
                             rtol=1e-6)
  assert float(m["sam_loss"]) > float(val)


def test_bad_input_one_clear_error():
  params, batch = _problem()
  fn = lambda s, h, b, t: _task_loss(s, h, None, b, t)
  with pytest.raises(sam.FlatError, match=r"rho must be .*-0.1"):
    sam.flat_gradients(fn, params, batch, TASKS, -0.1)
  with pytest.raises(sam.FlatError, match=r"unknown task\(s\) \['c'\]"):
    flat_obj.multitask_objective(_task_loss, params, ("a", "c"), rho=0.1)
  with pytest.raises(sam.FlatError, match="unknown sam combiner 'mgda'"):
    sam.flat_gradients(fn, params, batch, TASKS, 0.1, "mgda")
  with pytest.raises(sam.FlatError, match="rho must be"):
    finetune._sam_rho(ml_collections.ConfigDict(dict(sam=dict(rho=-1.0))))
  assert finetune._sam_rho(ml_collections.ConfigDict(dict(mode="x"))) is None
  with pytest.raises(bench.ConfigError, match=r"config.tasks: .*nope"):
    c = flat_sam_config.get_config("runlocal")
    c.tasks = ["word_domain", "nope"]
    bench.run(c, "unused-dir-never-created")


def test_runlocal_job_end_to_end(tmp_path):
  _, out = job_helpers.run_main("configs/flat_sam.py:runlocal",
                                tmp_path / "w", tmp_path / "cache")
  labels = [r["method"] for r in out["rows"]]
  assert labels == [
      "zero-shot", "individual [plain]", "task_arithmetic [plain]",
      "ties_merging [plain]", "individual [sam rho=0.05]",
      "task_arithmetic [sam rho=0.05]", "ties_merging [sam rho=0.05]",
      "multitask mean rho=0", "multitask mean rho=0.05"]
  for r in out["rows"]:
    assert 0 <= r["avg"] <= 100
  assert os.path.exists(tmp_path / "w" / "results.json")
  # SAM fine-tuning ran separately (its own run directory) and moved the
  # weights differently from the plain run.
  runs = sorted(os.listdir(tmp_path / "w" / "finetune"))
  assert runs == ["concreteness-standard", "concreteness-standard-sam0.05",
                  "word_domain-standard", "word_domain-standard-sam0.05"]
  fl = out["flatness"]
  assert fl["plain"]["tv_norm"] != fl["sam rho=0.05"]["tv_norm"]
  assert fl["plain"]["tv_norm"] > 0
