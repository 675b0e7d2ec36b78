"""Tests of Transformer fusion with optimal transport (mtmerge.fusion.ot_*)."""

import functools
import itertools
import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtmerge import tree as tree_lib
from mtmerge.fusion import ot_align
from mtmerge.fusion import ot_bench
from mtmerge.fusion import ot_fusion
from mtmerge.fusion import ot_model
from mtmerge.models import bert

H, NH, F, V = 16, 4, 32, 64


def _cfg(hidden=H, heads=NH, layers=2, ffn=F, vocab=V):
  return bert.BertConfig(vocab_size=vocab, hidden_size=hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=ffn, max_position_embeddings=12)


def _params(seed, classes=3, **kw):
  """Random BERT params (BERT's init scale) plus a classifier head."""
  cfg = _cfg(**kw)
  rng = np.random.default_rng(seed)
  flat = {k: (np.ones(v) if k.endswith("norm/scale") else 0.0) +
          rng.normal(scale=0.05, size=v) for k, v in bert.param_shapes(
              cfg).items()}
  flat["head/kernel"] = rng.normal(size=(cfg.hidden_size, classes))
  flat["head/bias"] = rng.normal(size=classes)
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def _permute(p, seed, heads=NH):
  """A function-preserving neuron permutation of a BERT (and its head)."""
  rng = np.random.default_rng(seed)
  p = dict(p)
  hid = p["embeddings/word/embedding"].shape[1]
  dh = hid // heads
  r = rng.permutation(hid)
  for k in list(p):
    if k.startswith("embeddings/") and k.endswith("/embedding"):
      p[k] = p[k][:, r]
    elif k.endswith(("norm/scale", "norm/bias")):
      p[k] = p[k][r]
  p["head/kernel"] = p["head/kernel"][r]
  depth = len({k.split("/")[1] for k in p if k.startswith("layers/")})
  for i in range(depth):
    a = f"layers/{i}/attention"
    hp = rng.permutation(heads)
    qk = np.concatenate([hp[h] * dh + rng.permutation(dh)
                         for h in range(heads)])
    vo = np.concatenate([hp[h] * dh + rng.permutation(dh)
                         for h in range(heads)])
    for n, pm in (("query", qk), ("key", qk), ("value", vo)):
      p[f"{a}/{n}/kernel"] = p[f"{a}/{n}/kernel"][r][:, pm]
      p[f"{a}/{n}/bias"] = p[f"{a}/{n}/bias"][pm]
    p[f"{a}/out/kernel"] = p[f"{a}/out/kernel"][vo][:, r]
    p[f"{a}/out/bias"] = p[f"{a}/out/bias"][r]
    m = f"layers/{i}/mlp"
    pf = rng.permutation(p[f"{m}/intermediate/bias"].shape[0])
    p[f"{m}/intermediate/kernel"] = p[f"{m}/intermediate/kernel"][r][:, pf]
    p[f"{m}/intermediate/bias"] = p[f"{m}/intermediate/bias"][pf]
    p[f"{m}/output/kernel"] = p[f"{m}/output/kernel"][pf][:, r]
    p[f"{m}/output/bias"] = p[f"{m}/output/bias"][r]
  return p


def _flat(tree):
  return {k: np.asarray(v) for k, v in tree_lib.to_flat_dict(tree).items()}


def _close(a, b, atol):
  a, b = _flat(a), _flat(b)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


def _logits(p, cfg=None):
  p = _flat(p)
  return np.asarray(_forward(cfg or _cfg(), p))


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, p):
  p = dict(p)
  head = {k: p.pop(k) for k in ("head/kernel", "head/bias")}
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 7))
  mask = jnp.ones((3, 7))
  model = bert.from_flat_params(cfg, p)
  pooled = bert.mean_pool(model(ids, mask), mask)
  return pooled @ head["head/kernel"] + head["head/bias"]


@pytest.fixture(scope="module")
def models():
  return _params(0), _params(1)


def test_permutation_helper_preserves_function(models):
  a, _ = models
  np.testing.assert_allclose(_logits(_permute(a, 5)), _logits(a), atol=1e-5)


def test_permuted_copy_hard_is_exact(models):
  a, _ = models
  b = _permute(a, 7)
  fused = ot_fusion.fuse([a, b], NH)
  for k, v in _flat(fused).items():
    np.testing.assert_array_equal(v, a[k], err_msg=k)
  # The other anchor returns the permuted copy; dtypes and shapes kept.
  fused = _flat(ot_fusion.fuse([a, b], NH, anchor=1))
  for k, v in fused.items():
    np.testing.assert_array_equal(v, b[k], err_msg=k)
    assert v.dtype == np.float32


def test_permuted_copy_soft_small_entropy(models):
  a, _ = models
  b = _permute(a, 8)
  _close(ot_fusion.fuse([a, b], NH, reg=0.02), a, atol=1e-5)
  # A large entropy blurs the maps: not the model any more (the test can
  # fail), while vanilla averaging is far off even at the permuted copy.
  blurred = _flat(ot_fusion.fuse([a, b], NH, reg=1.0))
  assert np.abs(blurred["layers/1/mlp/output/kernel"] -
                a["layers/1/mlp/output/kernel"]).max() > 1e-3
  vanilla = _flat(ot_fusion.vanilla_average([a, b]))
  assert np.abs(vanilla["embeddings/word/embedding"] -
                a["embeddings/word/embedding"]).max() > 1e-2


@pytest.mark.parametrize("reg,atol", [(0.0, 1e-6), (0.1, 1e-5)])
def test_equivariant_to_permutations(models, reg, atol):
  a, b = models
  base = ot_fusion.fuse([a, b], NH, reg=reg)
  # Permuting the aligned parent (b; a is the anchor) changes nothing ...
  _close(ot_fusion.fuse([a, _permute(b, 3)], NH, reg=reg), base, atol)
  # ... permuting the anchor permutes the result the same way,
  moved = ot_fusion.fuse([_permute(a, 4), b], NH, reg=reg)
  _close(moved, _permute(_flat(base), 4), atol)
  # and the fused function is the same.
  np.testing.assert_allclose(_logits(moved), _logits(base), atol=1e-4)


def _np_sinkhorn(c, reg, iters=3000):
  n, m = c.shape
  k = np.exp(-c / reg)
  u, v = np.ones(n), np.ones(m)
  for _ in range(iters):
    u = (1 / n) / (k @ v)
    v = (1 / m) / (k.T @ u)
  return u[:, None] * k * v[None, :]


def _np_emd(c):
  """OT between uniform marginals as a linear program (scipy linprog)."""
  n, m = c.shape
  eq = np.zeros((n + m, n * m))
  for i in range(n):
    eq[i, i * m:(i + 1) * m] = 1
  for j in range(m):
    eq[n + j, j::m] = 1
  b = np.concatenate([np.full(n, 1 / n), np.full(m, 1 / m)])
  return optimize.linprog(c.ravel(), A_eq=eq, b_eq=b, bounds=(0, None),
                          method="highs").x.reshape(n, m)


def test_solvers_against_references():
  rng = np.random.default_rng(0)
  c = rng.random((6, 6))
  np.testing.assert_allclose(ot_align.sinkhorn(jnp.asarray(c, jnp.float32),
                                               0.1), _np_sinkhorn(c, 0.1),
                             atol=1e-6)
  best = min(itertools.permutations(range(6)),
             key=lambda p: sum(c[i, p[i]] for i in range(6)))
  np.testing.assert_allclose(ot_align.exact(c), np.eye(6)[list(best)] / 6,
                             atol=1e-7)
  for shape in ((4, 6), (6, 4), (3, 5)):  # heterogeneous: exact EMD
    c = rng.random(shape)
    np.testing.assert_allclose(ot_align.exact(c), _np_emd(c), atol=1e-6)


def _ref_align(s, t, heads):
  """The paper's equations in NumPy, one neuron at a time (hard OT)."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  dist = lambda x, y: np.linalg.norm(unit(x)[:, None] - unit(y)[None], axis=2)
  desc = lambda k, b: np.concatenate([k.T, b[:, None]], 1)
  plan = lambda x, y: _np_emd(dist(x, y) / dist(x, y).max())
  # Output axis: each target neuron is the T-weighted mean of its sources.
  out_ax = lambda w, tm: np.stack([(w * tm[:, j]).sum(-1) / tm[:, j].sum()
                                   for j in range(tm.shape[1])], -1)
  # Input axis: a target input reads the sources' rows, row-normalized.
  in_ax = lambda w, tm: np.stack([sum(tm[i, j] / tm[i].sum() * w[i]
                                      for i in range(tm.shape[0]))
                                  for j in range(tm.shape[1])])
  o = {}
  tabs = [f"embeddings/{e}/embedding" for e in ("word", "position",
                                                "token_type")]
  res = plan(np.concatenate([s[k] for k in tabs]).T,
             np.concatenate([t[k] for k in tabs]).T)
  for k in tabs:
    o[k] = out_ax(s[k], res)
  for k in ("embeddings/norm/scale", "embeddings/norm/bias"):
    o[k] = out_ax(s[k], res)
  for i in range(2):
    a = f"layers/{i}/attention"
    ks = {n: in_ax(s[f"{a}/{n}/kernel"], res) for n in
          ("query", "key", "value")}
    ds = {n: desc(ks[n], s[f"{a}/{n}/bias"]) for n in ks}
    dt = {n: desc(t[f"{a}/{n}/kernel"], t[f"{a}/{n}/bias"]) for n in ks}
    groups = [(np.concatenate([ds["query"], ds["key"]], 1),
               np.concatenate([dt["query"], dt["key"]], 1)),
              (ds["value"], dt["value"])]
    hs, ht = groups[0][0].shape[0] // heads, groups[0][1].shape[0] // heads
    costs = [[[dist(x[a_ * hs:(a_ + 1) * hs], y[b_ * ht:(b_ + 1) * ht])
               for b_ in range(heads)] for a_ in range(heads)]
             for x, y in groups]
    hcost = np.zeros((heads, heads))
    within = []
    for g, cg in enumerate(costs):
      top = max(c.max() for row in cg for c in row)
      pl = [[_np_emd(c / top) for c in row] for row in cg]
      within.append(pl)
      hcost += [[(pl[a_][b_] * cg[a_][b_] / top).sum() for b_ in range(heads)]
                for a_ in range(heads)]
    hplan = _np_emd(hcost / hcost.max())
    maps = []
    for pl in within:
      full = np.zeros((heads * hs, heads * ht))
      for a_, b_ in itertools.product(range(heads), range(heads)):
        full[a_ * hs:(a_ + 1) * hs, b_ * ht:(b_ + 1) * ht] = (
            hplan[a_, b_] * pl[a_][b_])
      maps.append(full)
    for n, tm in (("query", maps[0]), ("key", maps[0]), ("value", maps[1])):
      o[f"{a}/{n}/kernel"] = out_ax(ks[n], tm)
      o[f"{a}/{n}/bias"] = out_ax(s[f"{a}/{n}/bias"], tm)
    prev = maps[1]
    for name, nrm in (("attention/out", "attention_norm"),
                      ("mlp/intermediate", None), ("mlp/output", "mlp_norm")):
      p = f"layers/{i}/{name}"
      k = in_ax(s[p + "/kernel"], prev)
      tm = plan(desc(k, s[p + "/bias"]), desc(t[p + "/kernel"],
                                             t[p + "/bias"]))
      o[p + "/kernel"], o[p + "/bias"] = out_ax(k, tm), out_ax(
          s[p + "/bias"], tm)
      if nrm is None:
        prev = tm
        continue
      res = 0.5 * (res + tm)
      for q in ("scale", "bias"):
        o[f"layers/{i}/{nrm}/{q}"] = out_ax(s[f"layers/{i}/{nrm}/{q}"], res)
      prev = res
  o["head/kernel"], o["head/bias"] = in_ax(s["head/kernel"], res), s[
      "head/bias"]
  return o


def test_numpy_reference_heterogeneous():
  """The equations on a narrower target (16 -> 8 wide, MLP 32 -> 24), where
  maps are rectangular; equal widths are the special case n * T. (The
  source has the other tests' shapes and the target the runlocal job's
  narrow anchor: the eager kernels compile once for the file.)"""
  s = _params(0, vocab=10)
  t = _params(1, hidden=8, ffn=24, vocab=10)
  got, _ = ot_fusion.align(s, t, NH)
  _close(got, _ref_align(s, t, NH), atol=2e-5)
  fused = _flat(ot_fusion.fuse([t, s], NH))
  for k, v in fused.items():
    np.testing.assert_allclose(v, 0.5 * (np.asarray(got[k]) + t[k]),
                               atol=1e-6)
  # Three parents into the narrow anchor (soft): its shapes, a working model.
  fused = _flat(ot_fusion.fuse([t, s, _permute(s, 1)], NH, reg=0.05))
  assert {k: v.shape for k, v in fused.items()} == {
      k: v.shape for k, v in t.items()}
  logits = _logits(fused, _cfg(hidden=8, ffn=24, vocab=10))
  assert np.all(np.isfinite(logits)) and logits.std() > 0


def test_sharded_equals_single_device(models, mesh8):
  a, b = models
  want = ot_fusion.fuse([a, b], NH)
  sh = jax.sharding.NamedSharding
  P = jax.sharding.PartitionSpec

  def place(p):  # vocab rows and MLP width split over the 8 devices
    spec = lambda k: (P("x", None) if k.endswith(("word/embedding",
                                                  "intermediate/kernel"))
                      and p[k].shape[0] % 8 == 0 else P())
    return {k: jax.device_put(v, sh(mesh8, spec(k))) for k, v in p.items()}
  got = ot_fusion.fuse([place(a), place(b)], NH)
  assert len(jax.tree.leaves(place(a))[0].sharding.device_set) == 8
  _close(got, want, atol=1e-6)


@pytest.mark.parametrize("other,heads,match", [
    (dict(layers=3), NH, r"depths \(layers\) differ"),
    (dict(heads=2), (NH, 2), "head counts differ"),
    (dict(vocab=32), NH, "vocabulary sizes differ"),
    (None, (NH, 3), "hidden size 16 is not divisible by its 3 heads"),
])
def test_bad_input_one_clear_error(models, other, heads, match):
  a, _ = models
  b = _params(1, **other) if other else a
  with pytest.raises(ot_fusion.FusionError, match=match):
    ot_fusion.fuse([a, b], heads)
  with pytest.raises(ot_fusion.FusionError, match="at least two models"):
    ot_fusion.fuse([a], NH)
  broken = dict(a)
  del broken["layers/1/mlp_norm/bias"]
  with pytest.raises(ot_fusion.FusionError, match="missing or unexpected"):
    ot_fusion.fuse([a, broken], NH)


def test_pure_forward_matches_bert_and_activation_alignment(models):
  """ot_model.forward == the NNX BERT; activation descriptors recover a
  permuted copy exactly too (its activations are the permuted ones)."""
  a, _ = models
  np.testing.assert_allclose(_logits(a), np.asarray(_pure_logits(a)),
                             atol=1e-5)
  b = _permute(a, 9)
  data = dict(ids=np.random.default_rng(1).integers(0, V, (4, 6)),
              mask=np.ones((4, 6), np.int32))
  acts = [ot_model.activations(p, data, NH, 4) for p in (a, b)]
  for k, v in _flat(ot_fusion.fuse([a, b], NH, acts=acts)).items():
    np.testing.assert_array_equal(v, a[k], err_msg=k)


@jax.jit
def _pure_logits(p):
  ids = np.random.default_rng(0).integers(0, V, (3, 7))
  return ot_model.forward(p, ids, jnp.ones((3, 7)), NH)


def test_runlocal_config_runs(tmp_path):
  from configs import ot_fusion as config_lib
  config = config_lib.get_config("runlocal")
  rows = ot_bench.run(config, str(tmp_path))
  assert [(r["setting"], r["model"]) for r in rows][:3] == [
      ("homogeneous", "parent 0"), ("homogeneous", "parent 1"),
      ("homogeneous", "vanilla average")]
  assert {r["width"] for r in rows} == {16, 8}
  assert all(0 <= r["one_shot"] <= 1 for r in rows)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"] == rows
  with pytest.raises(ValueError, match="unknown config argument"):
    config_lib.get_config("runlocal,bogus=1")
