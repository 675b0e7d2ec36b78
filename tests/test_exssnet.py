"""ExSSNeT (Yadav and Bansal 2023): top-k supermask and straight-through
gradient against NumPy from the paper's equations, exclusive weight
training (earlier tasks bit-for-bit unchanged, only exclusive weights
move), KNN transfer against a brute-force reference, 8 devices == 1, bad
input, the runlocal job.

Every sequence here uses the runlocal config's settings and shapes, so the
whole file shares one compiled mask step and one weight step per mesh."""

import os

import jax
import numpy as np
import pytest

from configs import exssnet as exssnet_config
from mtmerge import finetune
from mtmerge import sharding
from mtmerge import train
from mtmerge.continual import bench
from mtmerge.continual import exssnet as ex
from mtmerge.continual import supermask as sm

CONFIG = exssnet_config.get_config("runlocal")
_RUNS = {}


def _settings(method="exssnet", kkt="best"):
  return bench.settings(CONFIG, method, kkt)


def _tasks(T=3, D=384, C=3, n=32, m=16, seed=0):
  """Toy tasks of the runlocal shapes: Gaussian classes, frozen heads."""
  r = np.random.default_rng(seed)
  out = []
  for t in range(T):
    proto = r.normal(size=(C, D))
    def draw(k):
      y = r.integers(0, C, k)
      x = proto[y] + 0.7 * r.normal(size=(k, D))
      x /= np.linalg.norm(x, axis=1, keepdims=True)
      return x.astype(np.float32), y.astype(np.int32)
    head = {"kernel": 10 * r.normal(size=(D, C)).astype(np.float32),
            "bias": np.zeros(C, np.float32)}
    head = jax.tree.map(np.asarray, finetune.pad_classes(head, 8))
    out.append(ex.Task(f"t{t}", *draw(n), *draw(m), head, C))
  return out


def _run(method, kkt="best"):
  if (method, kkt) not in _RUNS:
    _RUNS[method, kkt] = ex.run_sequence(_tasks(), _settings(method, kkt),
                                         keep_history=True)
  return _RUNS[method, kkt]


# --------------------------------------------------- supermask vs NumPy


def _np_topk(scores, density):
  """The paper's h(.): sort the |scores|, zero the lowest
  int((1 - k) n), keep the rest (the code ranks |s|)."""
  flat = np.abs(scores).ravel()
  idx = np.argsort(flat, kind="stable")
  j = int((1 - density) * flat.size)
  out = np.zeros(flat.size, bool)
  out[idx[j:]] = True
  return out.reshape(scores.shape)


def test_topk_supermask_and_straight_through_gradient_match_numpy(
    monkeypatch):
  r = np.random.default_rng(0)
  w = {"a": r.normal(size=(6, 5)).astype(np.float32),
       "b": r.normal(size=(5, 7)).astype(np.float32)}
  s = {k: r.normal(size=v.shape).astype(np.float32) for k, v in w.items()}
  x = r.normal(size=(4, 6)).astype(np.float32)
  y = r.normal(size=(4, 7)).astype(np.float32)
  d = 0.3

  def loss(scores):  # L = 0.5 mean_b ||x Wa' Wb' - y||^2, W' = W * h(S)
    m = sm.supermask(scores, d)
    return 0.5 * ((x @ (w["a"] * m["a"]) @ (w["b"] * m["b"]) - y) ** 2
                  ).sum(1).mean()
  (val, g), m = jax.jit(lambda sc: (jax.value_and_grad(loss)(sc),
                                    sm.supermask(sc, d)))(s)
  ma, mb = _np_topk(s["a"], d), _np_topk(s["b"], d)
  assert ma.sum() == 30 - int(0.7 * 30) and mb.sum() == 35 - int(0.7 * 35)
  np.testing.assert_array_equal(m["a"], ma.astype(np.float32))  # exact
  np.testing.assert_array_equal(m["b"], mb.astype(np.float32))
  # Edge-popup's straight-through estimate: dL/dS = dL/dW' * W (* sign S,
  # since the code ranks |S|), with dL/dW' the usual dense gradients.
  wa, wb = w["a"] * ma, w["b"] * mb
  h = x @ wa
  e = (h @ wb - y) / len(x)
  ga, gb = x.T @ (e @ wb.T), h.T @ e
  np.testing.assert_allclose(val, 0.5 * ((h @ wb - y) ** 2).sum(1).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(g["a"], ga * w["a"] * np.sign(s["a"]),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g["b"], gb * w["b"] * np.sign(s["b"]),
                             rtol=1e-4, atol=1e-6)
  assert np.abs(g["a"][~ma]).max() > 0  # dropped weights get gradient too
  # The host masks and the large-layer search path give the same masks.
  host = sm.host_masks(s, d)
  np.testing.assert_array_equal(host["a"], ma)
  monkeypatch.setattr(sm, "SORT_MAX", 0)
  stacked = {k: np.stack([v, -2 * v]) for k, v in s.items()}
  big = jax.jit(lambda t: sm.topk_masks(t, d, stacked=True))(stacked)
  for k in s:
    np.testing.assert_array_equal(big[k][0], _np_topk(s[k], d))
    np.testing.assert_array_equal(big[k][1], _np_topk(s[k], d))


def test_union_exclusive_apply_delta():
  r = np.random.default_rng(1)
  stacked = {"k": r.random((3, 4, 5)) < 0.3}
  mask = r.random((4, 5)) < 0.5
  u = sm.union(stacked, 2)["k"]
  np.testing.assert_array_equal(u, stacked["k"][0] | stacked["k"][1])
  assert not sm.union(stacked, 0)["k"].any()
  ex_ = sm.exclusive({"k": mask}, {"k": u})["k"]
  np.testing.assert_array_equal(ex_, mask & ~u)
  w = {"k": r.normal(size=(4, 5)).astype(np.float32)}
  out = sm.apply_delta(w, {"k": np.full((4, 5), np.float32(0.5))},
                       {"k": ex_})["k"]
  np.testing.assert_array_equal(out[~ex_], w["k"][~ex_])
  np.testing.assert_array_equal(out[ex_], w["k"][ex_] + np.float32(0.5))


# ----------------------------------------------------- exclusive training


def test_earlier_tasks_bit_exact_and_only_exclusive_weights_move():
  res = _run("exssnet")
  tasks = _tasks()
  assert res.unchanged == [True, True, True]
  masks = res.masks
  for t in range(1, 3):
    before, after = res.history[t - 1], res.history[t]
    earlier = sm.union(masks, t)
    editable = sm.exclusive(jax.tree.map(lambda m: m[t], masks), earlier)
    moved = 0
    for p in before:
      b, a = before[p]["kernel"], after[p]["kernel"]
      e, u = editable[p]["kernel"], earlier[p]["kernel"]
      changed = a != b
      assert not (changed & ~e).any(), f"task {t} moved a non-exclusive {p}"
      np.testing.assert_array_equal(a[u], b[u])  # earlier masks: bit-exact
      moved += int(changed.sum())
    assert moved > 0  # it did train
    # task t's mask overlaps earlier ones, so exclusivity really excluded
    assert any((m[t] & earlier[p]["kernel"]).any()
               for p, m in ((p, masks[p]["kernel"]) for p in masks))
  # Earlier tasks' logits, recomputed: bit-for-bit equal at the end.
  for j in range(2):
    mj = jax.tree.map(lambda m: m[j], masks)
    z_then = ex._eval_logits(res.history[j], mj, tasks[j].head,
                             tasks[j].x_test)
    z_end = ex._eval_logits(res.weights, mj, tasks[j].head, tasks[j].x_test)
    np.testing.assert_array_equal(np.asarray(z_then), np.asarray(z_end))
  # (The baselines' rows in the runlocal job test show that sequential FT
  # and non-exclusive SSNeT do change earlier outputs.)


# ----------------------------------------------------------- KNN transfer


def _np_knn_acc(reps, y, k):
  """Brute force: every test point against every neighbour, stable order
  on ties, majority vote with ties to the smallest label."""
  s = int(len(reps) * 0.66)
  correct = 0
  for i in range(s, len(reps)):
    dist = [float(np.sum((reps[i].astype(np.float64) - reps[j]) ** 2))
            for j in range(s)]
    near = sorted(range(s), key=lambda j: (dist[j], j))[:k]
    counts = np.bincount(y[near], minlength=y.max() + 1)
    correct += int(np.argmax(counts) == y[i])
  return correct / (len(reps) - s)


def _np_reps(w, mask, x):
  h = x.astype(np.float64)
  ks = [np.where(mask[f"layer_{i}"]["kernel"], w[f"layer_{i}"]["kernel"], 0)
        for i in range(len(w))]
  for k in ks[:-1]:
    h = np.maximum(h @ k, 0)
  return h


def test_knn_transfer_choice_matches_brute_force():
  # Integer features: distances are exact in float32, ties are real.
  r = np.random.default_rng(3)
  tr, te = r.integers(0, 4, (20, 3)).astype(np.float32), r.integers(
      0, 4, (9, 3)).astype(np.float32)
  ytr = r.integers(0, 3, 20).astype(np.int32)
  got = np.asarray(jax.jit(ex.knn_predict, static_argnums=(3, 4))(
      tr, ytr, te, 5, 3))
  want = []
  for q in te:
    dist = ((tr - q) ** 2).sum(1)
    near = sorted(range(20), key=lambda j: (dist[j], j))[:5]
    want.append(np.argmax(np.bincount(ytr[near], minlength=3)))
  np.testing.assert_array_equal(got, want)
  # The choice rule (chance = 1/C).
  assert ex.kkt_choice([0.2, 0.3, 0.25], 4, "best") == [1]
  assert ex.kkt_choice([0.2, 0.3, 0.25], 2, "best") == []
  assert ex.kkt_choice([0.2, 0.3, 0.25], 2, "always") == [1]
  assert ex.kkt_choice([0.2, 0.3, 0.28], 4, "all") == [1, 2]
  # In a run: the KNN accuracies and choice at every task, recomputed by
  # brute force from the weights and masks the run had then.
  res, tasks, s = _run("exssnet"), _tasks(), _settings()
  for t in range(1, 3):
    idx = np.random.default_rng([s.seed, 7, t]).permutation(
        len(tasks[t].x_train))[:s.knn_examples]
    x, y = tasks[t].x_train[idx], tasks[t].y_train[idx]
    accs = [_np_knn_acc(_np_reps(res.history[t - 1], jax.tree.map(
        lambda m, i=i: m[i], res.masks), x), y, s.knn_k) for i in range(t)]
    assert list(res.info[t]["kkt_acc"].values()) == pytest.approx(accs,
                                                                 abs=1e-4)
    chosen = [f"t{i}" for i in ex.kkt_choice(accs, 3, "best")]
    assert res.info[t]["kkt_from"] == chosen
  # ... and the chosen task's scores started the new task's training: two
  # Adam steps move a score by at most ~2 lr, far less than the distance
  # to the fresh random scores it would otherwise have started from.
  t1 = res.info[1]["kkt_from"]
  assert t1, "expected a transfer on this problem"
  src = int(t1[0][1:])
  fresh = sm.init_scores(np.random.default_rng([s.seed, 1, 1]),
                         res.history[0])
  for p in res.scores:
    new = res.scores[p]["kernel"][1]
    assert np.abs(new - res.scores[p]["kernel"][src]).max() <= (
        2.1 * CONFIG.mask.lr)
    assert np.abs(new - fresh[p]["kernel"]).max() > 5 * CONFIG.mask.lr


# ------------------------------------------------------------ bad input


def test_bad_input_one_line_errors(tmp_path, capsys, monkeypatch):
  for bad in (0.0, 1.0, -0.1, 1.5, float("nan"), "dense"):
    with pytest.raises(sm.MaskError, match=r"mask density must be .*\(0, 1\)"):
      sm.check_density(bad)
  with pytest.raises(ex.ContinualError, match="kkt must be one of"):
    ex.Settings(kkt="nearest").check()
  with pytest.raises(ex.ContinualError, match="method must be one of"):
    ex.Settings(method="ewc").check()
  with pytest.raises(ex.ContinualError, match=r"task order names \['t0'\]"):
    ex.run_sequence(_tasks(2)[:1] * 2, _settings())
  c = exssnet_config.get_config("runlocal")
  c.density = 1.5
  with pytest.raises(bench.ConfigError, match=r"^config.density: mask "
                     r"density must be in \(0, 1\), got 1.5$"):
    bench.run(c, str(tmp_path / "never"))
  c = exssnet_config.get_config("runlocal")
  c.tasks = ["word_domain", "nope", "concreteness"]
  with pytest.raises(bench.ConfigError, match=r"config.tasks: unknown "
                     r"task\(s\) \['nope'\] in the task order"):
    bench.run(c, str(tmp_path / "never"))
  c.tasks = ["word_domain", "word_domain"]
  with pytest.raises(bench.ConfigError, match="more than once"):
    bench.run(c, str(tmp_path / "never"))
  assert not os.path.exists(tmp_path / "never")  # nothing started
  # The CLI prints one line and exits 2.
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mtmerge import main as main_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("MTMERGE_COMPILE_CACHE", "0")
  bad = tmp_path / "bad_config.py"
  bad.write_text("from configs import exssnet\n"
                 "def get_config(arg=None):\n"
                 "  c = exssnet.get_config('runlocal')\n"
                 "  c.density = 1.5\n"
                 "  return c\n")
  argv = ["mtmerge", f"--config={bad}", f"--workdir={tmp_path / 'w'}"]
  flags.FLAGS(argv)
  with pytest.raises(SystemExit) as e:
    main_lib.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["mtmerge: error: config.density: mask density must be in "
                 "(0, 1), got 1.5"]


# ------------------------------------------------------------- the job


def test_runlocal_job_end_to_end(tmp_path):
  out = bench.run(exssnet_config.get_config("runlocal"), str(tmp_path / "w"))
  rows = {r["method"]: r for r in out["rows"]}
  assert list(rows) == ["zero-shot (frozen encoder)", "sequential FT",
                        "SupSup", "SSNeT (non-exclusive)", "ExSSNeT w/o KKT",
                        "ExSSNeT"]
  for r in out["rows"]:
    assert 0 <= r["avg"] <= 100
  for label in ("SupSup", "ExSSNeT w/o KKT", "ExSSNeT"):
    assert rows[label]["bitexact"] == "yes"
    assert rows[label]["forgetting"] == 0
  # Training shared weights changes earlier tasks' outputs.
  assert rows["sequential FT"]["bitexact"] == "no"
  assert rows["SSNeT (non-exclusive)"]["bitexact"] == "no"
  assert 0 < rows["ExSSNeT"]["trainable"] < 1
  assert rows["sequential FT"]["trainable"] == 1
  d = out["detail"]["ExSSNeT"]
  assert np.shape(d["acc_matrix"]) == (1, 2, 2)  # one seed, 2 x 2 tasks
  assert "kkt_acc" in d["per_task"][0][1]
  for f in ("results.json", "table.txt"):
    assert os.path.exists(tmp_path / "w" / f)
  # Every task of every method (and the toy runs above, same shapes)
  # reused one mask step, one weight step and one evaluation program.
  steps = [fn for _, fn in train._STEP_CACHE]  # pylint: disable=protected-access
  assert len(steps) == 2 and all(fn._cache_size() == 1 for fn in steps)
  assert ex._eval_logits._cache_size() == 1


# ------------------------------------------------------ 8 devices == 1
# Last: its 1-device steps would evict the shared 8-device ones.


def test_8_devices_equal_1():
  assert jax.device_count() == 8
  one = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
  r1 = ex.run_sequence(_tasks(), _settings(), mesh=one)
  r8 = _run("exssnet")  # the default mesh: all 8 devices
  np.testing.assert_array_equal(r1.acc, r8.acc)
  jax.tree.map(np.testing.assert_array_equal, r1.masks, r8.masks)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               r1.weights, r8.weights)
  assert r1.info == r8.info
