"""Controllable multi-task architectures (Aich et al. 2023): the slimmed
layer against a NumPy layer that slices the weights, the sandwich + CI-KD
loss against NumPy from the paper's equations, the search against
brute-force enumeration, FLOPs against a hand count, 8 devices == 1, bad
input, the runlocal job."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import controllable as controllable_config
from mtmerge import main as main_lib
from mtmerge import runtime
from mtmerge import sharding
from mtmerge.controllable import bench
from mtmerge.controllable import distill
from mtmerge.controllable import search
from mtmerge.controllable import slimmable

H, N_HEADS, F, L, VOCAB = 8, 2, 12, 5, 11
TASKS = ("a", "b")
SPACE = slimmable.Space(hidden=H, num_heads=N_HEADS, ffn=F, enc_layers=1,
                        dec_layers=1, enc_ratios=(0.5, 1.0),
                        dec_ratios=(0.5, 1.0), num_classes=(2, 3), seq_len=L,
                        eps=1e-6)


def _lin(r, n_in, n_out):
  return {"kernel": r.normal(size=(n_in, n_out)).astype(np.float32) * 0.5,
          "bias": r.normal(size=(n_out,)).astype(np.float32) * 0.1}


def _norm(r):
  return {"scale": (1 + 0.1 * r.normal(size=(H,))).astype(np.float32),
          "bias": (0.1 * r.normal(size=(H,))).astype(np.float32)}


def _layer(r):
  return {"attention": {n: _lin(r, H, H) for n in ("query", "key", "value",
                                                    "out")},
          "attention_norm": _norm(r),
          "mlp": {"intermediate": _lin(r, H, F), "output": _lin(r, F, H)},
          "mlp_norm": _norm(r)}


def _pretrained(seed=0):
  r = np.random.default_rng(seed)
  emb = lambda n: {"embedding": r.normal(size=(n, H)).astype(np.float32)}
  return {"embeddings": {"word": emb(VOCAB), "position": emb(L),
                         "token_type": emb(2), "norm": _norm(r)},
          "layers": {"0": _layer(r), "1": _layer(r)}}


# --- NumPy references, written from BERT's and the paper's equations -------

def _np_ln(p, x, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_gelu(x):
  from math import erf
  return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


def _np_layer(p, x, mask, heads, units):
  """The layer with ONLY the first `heads` heads and `units` FFN units: the
  weights are sliced (no masks)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  dh = H // N_HEADS
  a = heads * dh
  att = p["attention"]
  lin = lambda q, z, cols=None, rows=None: (
      z @ q["kernel"][rows or slice(None), cols or slice(None)] +
      q["bias"][cols or slice(None)])
  q, k, v = (lin(att[n], x, cols=slice(0, a)) for n in ("query", "key",
                                                         "value"))
  ctx = np.zeros(x.shape[:-1] + (a,))
  for j in range(heads):
    s = slice(j * dh, (j + 1) * dh)
    logits = q[..., s] @ np.swapaxes(k[..., s], -1, -2) / np.sqrt(dh)
    logits = np.where(mask[:, None, :] > 0, logits, -1e30)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ctx[..., s] = w @ v[..., s]
  out = ctx @ att["out"]["kernel"][:a] + att["out"]["bias"]
  x = _np_ln(p["attention_norm"], x + out)
  inner = _np_gelu(x @ p["mlp"]["intermediate"]["kernel"][:, :units] +
                   p["mlp"]["intermediate"]["bias"][:units])
  y = inner @ p["mlp"]["output"]["kernel"][:units] + p["mlp"]["output"][
      "bias"]
  return _np_ln(p["mlp_norm"], x + y)


def _np_embed(p, ids):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = (p["word"]["embedding"][ids] + p["position"]["embedding"][
      np.arange(ids.shape[-1])] + p["token_type"]["embedding"][0])
  return _np_ln(p["norm"], x)


def _batch(seed, b=8):
  r = np.random.default_rng(seed)
  out = {}
  for t, c in zip(TASKS, SPACE.num_classes):
    lens = r.integers(2, L + 1, size=b)
    mask = (np.arange(L)[None] < lens[:, None]).astype(np.int32)
    out[t] = {"input_ids": (r.integers(1, VOCAB, size=(b, L)) * mask
                            ).astype(np.int32),
              "attention_mask": mask,
              "label": r.integers(0, c, size=b).astype(np.int32)}
  return out


def _heads(seed=1):
  r = np.random.default_rng(seed)
  return {t: {"kernel": (3 * r.normal(size=(H, c))).astype(np.float32),
              "bias": np.zeros(c, np.float32)}
          for t, c in zip(TASKS, SPACE.num_classes)}


def _np_sandwich_loss(pre, heads, batch, es, dss, kd_weight, decoders=None,
                      teacher=None):
  """L = sum_w mean_t CE_t(w) + lambda sum_{w != w_max} CIKD(w), NumPy
  (`decoders`: per-task decoder layers, default all pretrained layer 1;
  `teacher`: params whose full-width encoder output is the CI-KD target,
  default `pre`: the stop-gradient made explicit for finite differences)."""
  decoders = decoders or [pre["layers"]["1"]] * len(TASKS)
  units = lambda r: slimmable.widths(SPACE, r)
  ces, hs = [], []
  for e, ds in zip(es, dss):
    ce_t, h_t = [], []
    for i, t in enumerate(TASKS):
      x, m = batch[t]["input_ids"], batch[t]["attention_mask"]
      h = _np_layer(pre["layers"]["0"], _np_embed(pre["embeddings"], x), m,
                    *units(SPACE.enc_ratios[e]))
      z = _np_layer(decoders[i], h, m, *units(SPACE.dec_ratios[ds[i]]))
      pooled = (z * m[..., None]).sum(1) / m.sum(1, keepdims=True)
      f = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
      logits = f @ heads[t]["kernel"] + heads[t]["bias"]
      logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True))
                             .sum(-1, keepdims=True)) - logits.max(
                                 -1, keepdims=True)
      ce_t.append(-logp[np.arange(len(x)), batch[t]["label"]].mean())
      h_t.append(h)
    ces.append(np.mean(ce_t))
    hs.append(h_t)
  if teacher is not None:
    hs[0] = [_np_layer(teacher["layers"]["0"], _np_embed(
        teacher["embeddings"], batch[t]["input_ids"]),
                       batch[t]["attention_mask"],
                       *units(SPACE.enc_ratios[es[0]])) for t in TASKS]
  kd = []
  for s in range(1, len(es)):
    num = sum(((hs[0][i] - hs[s][i]) ** 2 * batch[t]["attention_mask"][
        ..., None]).sum() for i, t in enumerate(TASKS))
    den = sum(batch[t]["attention_mask"].sum() for t in TASKS) * H
    kd.append(num / den)
  return sum(ces) + kd_weight * sum(kd)


# --- tests --------------------------------------------------------------------

def test_slimmed_layer_equals_numpy_layer_with_sliced_units():
  pre = _pretrained()
  r = np.random.default_rng(3)
  x = r.normal(size=(3, L, H)).astype(np.float32)
  mask = np.array([[1] * L, [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], np.int32)
  fn = jax.jit(lambda p, x, m, hm, fm: slimmable.layer(
      p, x, slimmable.attention_bias(m), hm, fm, N_HEADS, 1e-6))
  for heads, units in ((1, 6), (2, 12), (1, 12), (2, 1)):
    hm = (np.arange(N_HEADS) < heads).astype(np.float32)
    fm = (np.arange(F) < units).astype(np.float32)
    got = fn(pre["layers"]["0"], x, mask, hm, fm)
    want = _np_layer(pre["layers"]["0"], x.astype(np.float64), mask, heads,
                     units)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  assert fn._cache_size() == 1  # every width: one compiled program
  # The ratios' widths and mask tables.
  assert slimmable.widths(SPACE, 0.5) == (1, 6)
  tab = slimmable.mask_tables(SPACE)
  np.testing.assert_array_equal(tab["enc_ffn"].sum(1), [6, 12])
  np.testing.assert_array_equal(tab["dec_heads"], [[1, 0], [1, 1]])


def test_flops_of_a_width_config_match_a_hand_count():
  # One layer, L=5 tokens, H=8, head size 4; multiply-adds, times 2:
  # half width: 1 head (4 dims), 6 FFN units
  #   Q,K,V 3*5*8*4=480, scores+context 2*5*5*4=200, out 5*4*8=160,
  #   FFN 2*5*8*6=480 -> 1320 MACs -> 2640 FLOPs
  assert slimmable.layer_flops(SPACE, 1, 6) == 2640
  # full width: 2 heads (8 dims), 12 units: 960 + 400 + 320 + 960 = 2640 MACs
  assert slimmable.layer_flops(SPACE, 2, 12) == 5280
  assert slimmable.enc_flops(SPACE, 0) == 2640
  # task b's decoder at full width plus its 3-class head (2*8*3 = 48)
  assert slimmable.dec_flops(SPACE, 1, 1) == 5280 + 48
  # encoder half, task a's decoder half (+ 2*8*2 head), task b's full
  assert slimmable.config_flops(SPACE, 0, (0, 1)) == 2640 + 2672 + 5328
  enc, dec = slimmable.cost_tables(SPACE)
  np.testing.assert_array_equal(enc, [2640, 5280])
  np.testing.assert_array_equal(dec, [[2672, 5312], [2688, 5328]])


def test_search_equals_brute_force_enumeration():
  r = np.random.default_rng(0)
  for trial in range(40):
    t, e, d = 3, int(r.integers(1, 4)), 3
    acc = r.random((t, e, d))
    if trial % 4 == 0:  # ties everywhere: the tie-breaks must agree too
      acc = np.round(acc * 3) / 3
    enc = np.sort(r.integers(10, 80, e))
    dec = np.sort(r.integers(5, 40, (t, d)), axis=1)
    pref = r.dirichlet(np.ones(t)) if trial % 3 else np.array([.5, .25, .25])
    low = search.min_cost(enc, dec)
    budget = r.uniform(low, enc[-1] + dec[:, -1].sum() + 5)
    for ordered in (True, False):
      got = search.search(pref, budget, acc, enc, dec, ordered=ordered)
      want = search.brute_force(pref, budget, acc, enc, dec, ordered=ordered)
      assert got == want, (trial, ordered)
      assert got.cost <= budget
      assert got.cost == enc[got.e] + sum(dec[i, x] for i, x in
                                          enumerate(got.ds))
      if ordered:  # the paper's rule: more preferred -> no narrower decoder
        assert all(got.ds[i] >= got.ds[j] for i in range(t) for j in range(t)
                   if pref[i] > pref[j])
  # Control: accuracy grows with decoder width; with room for one wide
  # decoder it goes to the preferred task, whichever that is.
  acc = np.tile(np.array([0.5, 0.6, 0.7])[None, None], (3, 1, 1))
  enc, dec = np.array([10]), np.tile(np.array([1, 2, 3]), (3, 1))
  for top in range(3):
    pref = np.full(3, 0.2)
    pref[top] = 0.6
    ch = search.search(pref, 10 + 5, acc, enc, dec)
    assert ch.ds[top] == 2 and sum(ch.ds) == 2, ch


def _objective():
  init, emb = slimmable.init_params(_pretrained(), SPACE)
  return distill.objective(init, emb, _heads(), SPACE, TASKS, 0.7, 1)


def test_sandwich_ci_kd_loss_matches_numpy_and_8_devices_equal_1():
  # CI-KD alone: mean over real tokens and features of the squared gap.
  r = np.random.default_rng(7)
  te, st = r.normal(size=(2, 3, 4, 5)), r.normal(size=(2, 3, 4, 5))
  m = r.integers(0, 2, size=(2, 3, 4))
  want = ((te - st) ** 2 * m[..., None]).sum() / (m.sum() * 5)
  np.testing.assert_allclose(distill.ci_kd(jnp.asarray(te, jnp.float32),
                                           jnp.asarray(st, jnp.float32),
                                           m), want, rtol=1e-5)
  # The whole sandwich loss (full + smallest + 1 random configuration), on
  # one device, against NumPy.
  obj = _objective()
  batch, key = _batch(0), jax.random.key(4)
  es, dss = distill.sample_configs(key, SPACE, 1)
  np.testing.assert_array_equal(es[:2], [1, 0])  # teacher, smallest
  np.testing.assert_array_equal(dss[:2], [[1, 1], [0, 0]])
  np_loss = lambda pre: _np_sandwich_loss(pre, _heads(), batch,
                                          np.asarray(es), np.asarray(dss),
                                          0.7)
  loss1, metrics = jax.jit(obj.loss)(obj.init, obj.consts, batch, key)
  np.testing.assert_allclose(loss1, np_loss(_pretrained()), rtol=2e-5)
  assert float(metrics["ci_kd"]) > 0 and float(metrics["ce_min"]) > 0
  # 8 devices (batch split over a data axis, params replicated): the same
  # loss, and its derivative along random directions of every trainable
  # leaf (forward mode: one small program) equal to NumPy central
  # differences with the CI-KD target held fixed (the stop-gradient).
  mesh = sharding.make_mesh([("data", -1)])
  assert mesh.size == 8
  put = lambda tree, spec: jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, spec)), tree)
  jvp = jax.jit(lambda p, c, b, v: jax.jvp(
      lambda q: obj.loss(q, c, b, key)[0], (p,), (v,)))
  consts8, batch8 = put(obj.consts, P()), put(batch, P("data"))
  for seed in (0, 1):
    rv = np.random.default_rng(seed)
    v = jax.tree.map(lambda x: rv.normal(size=x.shape).astype(np.float32),
                     obj.init)
    loss8, dloss = jvp(put(obj.init, P()), consts8, batch8, put(v, P()))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
    fd = [_np_loss_at(jax.tree.map(lambda p, d, s=sign: np.asarray(
        p, np.float64) + s * 1e-6 * d, obj.init, v), batch, es, dss)
          for sign in (1, -1)]
    np.testing.assert_allclose(dloss, (fd[0] - fd[1]) / 2e-6, rtol=2e-3)
  assert jvp._cache_size() == 1


def _np_loss_at(params, batch, es, dss):
  """The NumPy sandwich loss of SuperNet `params` ({"encoder",
  "decoders"}), the CI-KD teacher fixed at the pretrained encoder."""
  pre = _pretrained()
  mine = {"embeddings": pre["embeddings"],
          "layers": {"0": params["encoder"]["0"]}}
  decs = [jax.tree.map(lambda x, i=i: x[i], params["decoders"]["0"])
          for i in range(len(TASKS))]
  return _np_sandwich_loss(mine, _heads(), batch, np.asarray(es),
                           np.asarray(dss), 0.7, decoders=decs, teacher=pre)


def test_bad_input_one_line_config_error(monkeypatch, capsys):
  with pytest.raises(search.SearchError, match="must sum to one"):
    search.check_preference([0.5, 0.6], TASKS)
  with pytest.raises(search.SearchError, match=r"has 3 weights for 2"):
    search.check_preference([0.2, 0.3, 0.5], TASKS)
  with pytest.raises(search.SearchError, match=r"unknown task\(s\) \['c'\]"):
    search.check_preference({"a": 0.5, "c": 0.5}, TASKS)
  enc, dec = slimmable.cost_tables(SPACE)
  with pytest.raises(search.SearchError, match="below the smallest"):
    search.check_budget(search.min_cost(enc, dec) - 1, enc, dec)

  def err(**changes):
    c = controllable_config.get_config("runlocal")
    for k, v in changes.items():
      c[k] = v
    with pytest.raises(bench.ConfigError) as e:
      bench.run(c, "unused-dir-never-created")
    assert "\n" not in str(e.value)
    return str(e.value)
  assert "config.tasks" in err(tasks=["word_domain", "nope"])
  assert err(preferences=[dict(name="x", weights=[0.5, 0.6])]).startswith(
      "config.preferences[0] must sum to one")
  assert "has 1 weights for 2 tasks" in err(
      preferences=[dict(weights=[1.0])])
  assert "unknown task(s) ['sentiment']" in err(
      preferences=[dict(weights={"sentiment": 1.0})])
  assert "config.budgets[0]=0.05" in err(budgets=(0.05,))
  assert not os.path.exists("unused-dir-never-created")
  # mtmerge/main.py prints it as one line and exits 2.
  c = controllable_config.get_config("runlocal")
  c.budgets = (0.05,)
  monkeypatch.setattr(main_lib, "_CONFIG", type("V", (), {"value": c}))
  monkeypatch.setattr(main_lib, "_WORKDIR", type("V", (), {"value": "x"}))
  monkeypatch.setattr(runtime, "enable_compile_cache", lambda: None)
  with pytest.raises(SystemExit) as e:
    main_lib.main([])
  assert e.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "mtmerge: error: config.budgets[0]=0.05"), lines


def test_runlocal_job_end_to_end(tmp_path):
  c = controllable_config.get_config("runlocal")
  out = bench.run(c, str(tmp_path / "w"))
  rows = out["rows"]
  assert [r["model"] for r in rows[:2]] == ["zero-shot", "supernet [ci-kd]"]
  searched = rows[2:]
  assert len(searched) == len(c.preferences) * len(c.budgets)
  full = out["costs"]["full"]
  for r in searched:
    assert r["gflops"] * 1e9 <= float(r["budget"]) * full + 1e6
    for t in c.tasks:
      assert 0 <= r[t] <= 100
  assert rows[0]["cost%"] == rows[1]["cost%"] == 100.0
  # The budget of 1.0 admits the full model; 0.7 does not.
  assert all(r["cost%"] <= 70.0 for r in searched if r["budget"] == "0.7")
  for name in ("results.json", "table.txt", "plot.png"):
    assert os.path.getsize(tmp_path / "w" / name) > 0
  with open(tmp_path / "w" / "results.json") as f:
    saved = json.load(f)
  assert np.asarray(saved["tables"]["ci-kd"]["test"]).shape == (2, 2, 2)
  assert saved["final_log"]["ci-kd"]["step"] == c.distill.steps
