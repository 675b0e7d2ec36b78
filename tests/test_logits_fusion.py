"""Dynamic Logits Fusion (mtmerge.fusion.logits_*): the fusion rule and the
paper's objective against NumPy written from its equations, the default
(paper's) search against a NumPy transcription of its pseudo-code, the
joint search against brute force, per-step generation against a
step-by-step reference, 8 devices == 1, bad inputs, the config (runlocal).
Cost: shapes shared so that few programs compile (solver [16, 8] with
T = 2, one generation program for solved and fixed weights, a one-layer
NumPy-initialized tiny LM; the job on two 2-class word tasks).
"""

import functools
import itertools
import json
import os

import jax
import numpy as np
import pytest

from configs import logits_fusion as lf_config
from mtmerge.fusion import logits_bench
from mtmerge.fusion import logits_fusion as lf
from mtmerge.fusion import logits_generate as lg

P = jax.sharding.PartitionSpec


def _np_logsoftmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(p, q):
  lp, lq = _np_logsoftmax(p), _np_logsoftmax(q)
  return (np.exp(lp) * (lp - lq)).sum(-1)


def _np_objective(w, strong, experts, base):
  """The paper's loss for one example, in float64, loops over experts:
  sum_t (KL(P~||P) - KL(Q_t||Q))^2 + (KL(P||P~) - KL(Q||Q_t))^2, P the
  strong model, Q the untuned small one, Q_t expert t, P~ the fusion."""
  strong = np.asarray(strong, np.float64)
  base = np.asarray(base, np.float64)
  fused = strong.copy()
  for t in range(len(w)):
    fused += w[t] * (np.asarray(experts[t], np.float64) - base)
  total = 0.0
  for t in range(len(w)):
    total += (_np_kl(fused, strong) - _np_kl(experts[t], base)) ** 2
    total += (_np_kl(strong, fused) - _np_kl(base, experts[t])) ** 2
  return total


def _np_objective_grid(pts, strong, experts, base):
  """`_np_objective` at many weight vectors `pts [K, T]` at once."""
  pts = np.asarray(pts, np.float64)
  strong = np.asarray(strong, np.float64)
  delta = np.asarray(experts, np.float64) - base
  fused = strong + pts @ delta                                # [K, V]
  fwd, rev = _np_kl(fused, strong[None]), _np_kl(strong[None], fused)
  out = np.zeros(len(pts))
  for t in range(len(experts)):
    out += (fwd - _np_kl(experts[t], base)) ** 2
    out += (rev - _np_kl(base, experts[t])) ** 2
  return out


def _np_paper_search(strong, experts, base):
  """The paper's pseudo-code, one example: alpha in [0, 2] by 0.1 for one
  expert at a time (the others 0); keep a candidate only if strictly
  better. Returns (weights [T], loss)."""
  best_w, best = None, np.inf
  for t in range(len(experts)):
    for a in np.arange(21) / 10.0:
      w = np.zeros(len(experts))
      w[t] = a
      loss = _np_objective(w, strong, experts, base)
      if loss < best:
        best_w, best = w, loss
  return best_w, best


def _problem(seed, n, t, v, spread=1.0):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(n, v)).astype(np.float32)
  strong = (base + rng.normal(size=(n, v)) * spread).astype(np.float32)
  experts = (base[None] + rng.normal(size=(t, n, v)) * 1.5).astype(np.float32)
  return strong, experts, base


def test_fuse_and_objective_match_numpy():
  strong, experts, base = _problem(0, 6, 3, 7)
  w = np.random.default_rng(1).uniform(0, 2, size=(6, 3)).astype(np.float32)
  want = strong + np.einsum("nt,tnv->nv", w, experts - base[None])
  np.testing.assert_allclose(lf.fuse(strong, experts, base, w), want,
                             rtol=1e-5, atol=1e-5)
  # One weight per expert broadcasts over examples.
  want1 = strong + np.einsum("t,tnv->nv", w[0], experts - base[None])
  np.testing.assert_allclose(lf.fuse(strong, experts, base, w[0]), want1,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lf.kl(strong, base), _np_kl(strong, base),
                             rtol=1e-4, atol=1e-6)
  objective = jax.jit(lf.objective)  # one compile, not one per eager op
  for i in range(6):
    got = objective(w[i], strong[i], experts[:, i], base[i])
    want = _np_objective(w[i], strong[i], experts[:, i], base[i])
    assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert _np_objective_grid(w[i][None], strong[i], experts[:, i],
                              base[i])[0] == pytest.approx(want, rel=1e-9)
    # Classes padded at logit -1e4 (the job's shared solver shape) leave
    # the objective unchanged.
    pad = lambda x: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 3)],
                           constant_values=-1e4)
    assert float(objective(w[i], pad(strong[i]), pad(experts[:, i]),
                           pad(base[i]))) == pytest.approx(float(got),
                                                           rel=1e-5)


@pytest.mark.parametrize("t", [1, 2])
def test_paper_search_matches_numpy_pseudocode(t):
  # The default solver is the paper's search: it reaches the NumPy
  # pseudo-code's best loss, and its weights are that candidate wherever
  # the runner-up is not a near-tie (float32 vs float64 may swap those).
  # [16, 8]: the shapes of the generation tests (one compiled solver).
  n, v = 16, 8
  strong, experts, base = _problem(2 + t, n, t, v)
  w = np.asarray(lf.solve_weights(strong, experts, base))
  assert w.shape == (n, t)
  grid = np.arange(21) / 10.0
  for i in range(n):
    args = (strong[i], experts[:, i], base[i])
    ref_w, ref = _np_paper_search(*args)
    assert (w[i] > 0).sum() <= 1  # one expert applied at a time
    assert np.abs(grid[:, None] - w[i][None]).min(0).max() < 1e-6
    got = _np_objective(w[i], *args)
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-6), (i, w[i], ref_w)
    if got > ref * (1 + 1e-6) + 1e-9 or not np.allclose(w[i], ref_w):
      cands = [_np_objective(np.eye(t)[k] * a, *args)
               for k in range(t) for a in grid]
      second = sorted(set(np.round(cands, 12)))[1]
      assert second - ref < 1e-4 * max(ref, 1e-6), (i, w[i], ref_w)


def test_joint_search_matches_brute_force_grid():
  # search="joint" (ours): the whole box, to within 0.1% of an exhaustive
  # search on a grid 5x finer than the solver's, and never worse than the
  # paper's one-expert-at-a-time search.
  n, t, v = 16, 2, 8
  strong, experts, base = _problem(4, n, t, v)
  w = np.asarray(lf.solve_weights(strong, experts, base, search="joint"))
  assert w.shape == (n, t) and (w >= 0).all() and (w <= 2).all()
  fine = np.linspace(0, 2, 101)
  pts = np.array(list(itertools.product(fine, repeat=t)))
  for i in range(n):
    args = (strong[i], experts[:, i], base[i])
    brute = _np_objective_grid(pts, *args).min()
    got = _np_objective(w[i], *args)
    assert got <= brute + 1e-5 + 1e-3 * brute, (i, w[i], got, brute)
    assert got <= _np_paper_search(*args)[1] + 1e-6


def test_solver_single_expert_finds_the_unique_minimum():
  # One expert, one class direction, large and small models equal: full
  # transfer (w = 1) makes both terms 0, the unique minimum. The paper's
  # grid holds 1.0 exactly. The joint search gets the same problem as two
  # identical experts (the shapes of the joint test above: no new
  # compile), whose minimum is the line w_1 + w_2 = 1 at loss 0.
  # (Rows tiled and classes padded at -1e4, which leaves the objective
  # unchanged.)
  pad = lambda x: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 5)],
                         constant_values=-1e4)
  strong = pad(np.zeros((16, 3), np.float32))
  base = pad(np.zeros((16, 3), np.float32))
  experts = pad(np.tile(np.array([[[2.0, 0.0, 0.0]]], np.float32),
                        (1, 16, 1)))
  fine = np.linspace(0, 2, 20001)
  vals = _np_objective_grid(fine[:, None], strong[0, :3], experts[:, 0, :3],
                            base[0, :3])
  assert fine[int(np.argmin(vals))] == pytest.approx(1.0, abs=1e-4)
  w = np.asarray(lf.solve_weights(strong, experts, base))[:, 0]
  np.testing.assert_array_equal(w, np.ones(16, np.float32))
  twice = np.concatenate([experts, experts])
  wj = np.asarray(lf.solve_weights(strong, twice, base, search="joint"))
  assert np.ptp(wj, axis=0).max() == 0.0  # the same problem, same answer
  assert wj[0].sum() == pytest.approx(1.0, abs=2e-4)
  assert _np_objective(wj[0], strong[0], twice[:, 0], base[0]) < 1e-7


def test_solver_many_experts_beats_coarse_grid():
  # Joint search, T=4 exceeds max_grid: coordinate sweeps + refinement must
  # still reach (or beat) the best point of the exhaustive 0.25-step grid.
  strong, experts, base = _problem(7, 6, 4, 6)
  w = np.asarray(lf.solve_weights(strong, experts, base, search="joint"))
  coarse = np.array(list(itertools.product(np.linspace(0, 2, 9), repeat=4)))
  for i in range(6):
    args = (strong[i], experts[:, i], base[i])
    brute = _np_objective_grid(coarse, *args).min()
    assert _np_objective(w[i], *args) <= brute + 1e-5 + 1e-3 * brute


def test_solver_jit_no_recompile_and_sharded_equals_unsharded(mesh8):
  strong, experts, base = _problem(11, 16, 2, 8)  # shapes as above
  w1 = lf.solve_weights(strong, experts, base)
  n0 = lf.solve._cache_size()  # pylint: disable=protected-access
  s8 = jax.device_put(strong, jax.sharding.NamedSharding(mesh8, P("x")))
  e8 = jax.device_put(experts,
                      jax.sharding.NamedSharding(mesh8, P(None, "x")))
  b8 = jax.device_put(base, jax.sharding.NamedSharding(mesh8, P("x")))
  w8 = lf.solve_weights(s8, e8, b8)
  assert len(w8.sharding.device_set) == 8
  # Per-device programs round differently; where the objective is flat
  # that moves the weights, so compare the objective they reach.
  for i in range(16):
    args = (strong[i], experts[:, i], base[i])
    assert _np_objective(np.asarray(w8)[i], *args) == pytest.approx(
        _np_objective(np.asarray(w1)[i], *args), rel=1e-3, abs=1e-5)
  lf.solve_weights(strong + 1.0, experts, base)  # same shapes: cached
  assert lf.solve._cache_size() <= n0 + 1  # pylint: disable=protected-access


def test_bad_inputs_one_clear_error():
  strong, experts, base = _problem(0, 4, 2, 5)
  with pytest.raises(lf.FusionError, match="no experts"):
    lf.solve_weights(strong, [], base)
  with pytest.raises(lf.FusionError, match="no experts"):
    lf.solve_weights(strong, experts[:0], base)
  with pytest.raises(lf.FusionError, match=r"expert 'word' has 4 classes"):
    lf.solve_weights(strong, [experts[0], experts[1, :, :4]], base,
                     names=["sent", "word"])
  with pytest.raises(lf.FusionError, match="untuned small model"):
    lf.solve_weights(strong, experts, base[:, :3])
  with pytest.raises(lf.FusionError,
                     match=r"expert 'b' has classes \('x', 'y'\) but the "
                           r"strong model has \('x', 'y', 'z'\)"):
    lf.check_class_sets(("x", "y", "z"), {"a": ("x", "y", "z"),
                                          "b": ("x", "y")})
  with pytest.raises(lf.FusionError, match="no experts"):
    lf.check_class_sets(("x",), {})
  with pytest.raises(ValueError, match="search must be 'paper' or 'joint'"):
    lf.solve_weights(strong, experts, base, search="grid")


# ---------------------------------------------------------------- generation


_PROMPT = np.random.default_rng(0).integers(0, 8, size=(16, 3)).astype(
    np.int32)


@functools.cache
def _lms(vocab=8, t=2, small_vocab=None):
  """A strong tiny LM (one layer, width 16), an untuned small one (width
  8) and t experts (the small one perturbed); NumPy-drawn, built once."""
  strong = lg.init_tiny_lm(0, vocab, dim=16, layers=1, scale=3.0)
  base = lg.init_tiny_lm(1, small_vocab or vocab, dim=8, scale=3.0)
  rng = np.random.default_rng(2)
  experts = [jax.tree.map(lambda x: x + 0.5 * rng.normal(
      size=x.shape).astype(np.float32), base) for _ in range(t)]
  return strong, base, experts


def _np_norm(x):
  x = x - x.mean(-1, keepdims=True)
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)


def _np_tiny_lm(params, ids):
  """`tiny_lm` in NumPy: next-token logits `[B, V]` after the prefix."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  ids = np.asarray(ids)
  length = ids.shape[1]
  h = p["embed"][ids] + p["pos"][:length]
  heads = p["attn_heads"].shape[0]
  for blk in p["blocks"]:
    q, k, v = np.split(_np_norm(h) @ blk["qkv"], 3, axis=-1)
    q, k, v = (x.reshape(x.shape[:2] + (heads, -1)) for x in (q, k, v))
    att = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    att = np.where(np.tril(np.ones((length, length), bool)), att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    h = h + np.einsum("bhqk,bkhd->bqhd", att, v).reshape(h.shape) @ blk["out"]
    u = _np_norm(h) @ blk["up"]
    gelu = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
    h = h + gelu @ blk["down"]
  return (_np_norm(h) @ p["unembed"])[:, -1].astype(np.float32)


def _reference_generate(strong, base, experts, prompt, steps, weights=None):
  """Step by step: a growing prefix, each model run in NumPy on its own,
  the fused logits in NumPy, the solver called per step."""
  seq = np.asarray(prompt)
  ws = []
  for _ in range(steps):
    zl, zs = _np_tiny_lm(strong, seq), _np_tiny_lm(base, seq)
    ze = np.stack([_np_tiny_lm(e, seq) for e in experts])
    if weights is None:
      w = np.asarray(lf.solve_weights(zl, ze, zs))
    else:
      w = np.broadcast_to(np.asarray(weights, np.float32),
                          (seq.shape[0], len(experts)))
    fused = zl + np.einsum("bt,tbv->bv", w, ze - zs[None])
    seq = np.concatenate([seq, fused.argmax(-1)[:, None]], axis=1)
    ws.append(w)
  return seq, np.stack(ws, axis=1)


def _assert_same_objective(strong, base, experts, out, ref_w):
  """Weights of `out` reach the reference weights' objective at every step
  (to 0.01%: XLA rounds the fused program differently, which can swap
  near-tied grid candidates)."""
  seq = np.asarray(out.tokens)
  steps = ref_w.shape[1]
  p = seq.shape[1] - steps
  for k in range(steps):
    prefix = seq[:, :p + k]
    zl, zs = _np_tiny_lm(strong, prefix), _np_tiny_lm(base, prefix)
    ze = np.stack([_np_tiny_lm(e, prefix) for e in experts])
    for b in range(seq.shape[0]):
      args = (zl[b], ze[:, b], zs[b])
      assert _np_objective(np.asarray(out.weights)[b, k], *args) == (
          pytest.approx(_np_objective(ref_w[b, k], *args), rel=1e-4,
                        abs=1e-6)), (b, k)


def test_generation_equals_step_by_step_reference():
  strong, base, experts = _lms()
  prompt = _PROMPT
  out = lg.generate(lg.tiny_lm, strong, lg.tiny_lm, base, experts, prompt, 5)
  ref_tokens, ref_w = _reference_generate(strong, base, experts, prompt, 5)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref_tokens)
  _assert_same_objective(strong, base, experts, out, ref_w)
  assert out.weights.shape == (16, 5, 2)
  assert np.ptp(np.asarray(out.weights)) > 0.1  # weights do vary by step
  # Fixed weight 1 (proxy-tuning style) against the same reference.
  fixed = lg.generate(lg.tiny_lm, strong, lg.tiny_lm, base, experts, prompt,
                      5, weights=1.0)
  ref_fixed, _ = _reference_generate(strong, base, experts, prompt, 5, 1.0)
  assert (ref_fixed != ref_tokens).any()  # the solver changes the output
  np.testing.assert_array_equal(np.asarray(fixed.tokens), ref_fixed)


def test_generation_sharded_equals_unsharded(mesh8):
  strong, base, experts = _lms()
  prompt = _PROMPT  # the shapes of the test above: its program is reused
  one = lg.generate(lg.tiny_lm, strong, lg.tiny_lm, base, experts, prompt, 5)
  p8 = jax.device_put(prompt, jax.sharding.NamedSharding(mesh8, P("x")))
  eight = lg.generate(lg.tiny_lm, strong, lg.tiny_lm, base, experts, p8, 5)
  assert len(eight.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(eight.tokens),
                                np.asarray(one.tokens))
  _assert_same_objective(strong, base, experts, eight,
                         np.asarray(one.weights))


def test_generation_bad_inputs():
  strong, base, experts = _lms()
  prompt = np.zeros((2, 3), np.int32)
  with pytest.raises(lf.FusionError, match="no experts"):
    lg.generate(lg.tiny_lm, strong, lg.tiny_lm, base, [], prompt, 2)
  _, base9, experts9 = _lms(small_vocab=9)
  with pytest.raises(lf.FusionError,
                     match=r"expert 'code' has a vocabulary of 9 tokens but "
                           r"the strong model has 8"):
    lg.generate(lg.tiny_lm, strong, lg.tiny_lm, base,
                [experts[0], experts9[0]], prompt, 2, names=["math", "code"])
  with pytest.raises(lf.FusionError, match="untuned small model has a "
                     "vocabulary of 9"):
    lg.generate(lg.tiny_lm, strong, lg.tiny_lm, base9, experts, prompt, 2)


# ------------------------------------------------------------------- the job


_LOADED, _HEADS = {}, {}


@pytest.fixture
def cached_models(monkeypatch):
  """Both job tests load the two encoders and build their heads once."""
  from mtmerge import encoders  # pylint: disable=g-import-not-at-top
  from mtmerge import heads as heads_lib  # pylint: disable=g-import-not-at-top
  load, build = encoders.load, heads_lib.build

  def cached_load(name, num_layers=None):
    if (name, num_layers) not in _LOADED:
      _LOADED[name, num_layers] = load(name, num_layers=num_layers)
    return _LOADED[name, num_layers]

  def cached_build(encoder, task, config, workdir):
    key = (id(encoder), getattr(task, "name", task))
    if key not in _HEADS:
      _HEADS[key] = build(encoder, task, config, workdir)
    return _HEADS[key]
  monkeypatch.setattr(encoders, "load", cached_load)
  monkeypatch.setattr(heads_lib, "build", cached_build)
  return heads_lib


def test_config_runlocal_end_to_end(tmp_path, monkeypatch, cached_models):
  del cached_models
  config = lf_config.get_config("runlocal")
  config.fixed_weight = 0.0  # w = 0 must give back the strong model
  out = logits_bench.run(config, str(tmp_path / "run"))
  rows = {r["method"]: r for r in out["rows"]}
  tasks = config.tasks
  assert list(rows) == (
      ["strong zero-shot", "small zero-shot (1 layers)"] +
      [f"expert {t} alone" for t in tasks] +
      ["own expert alone", "single-task fusion (solver)",
       "single-task fusion (w=0)", "multi-task fusion (solver)",
       "multi-task fusion (w=0 each)"])
  for t in tasks:
    for r in rows.values():
      assert 0.0 <= r[t] <= 100.0
    assert rows["single-task fusion (w=0)"][t] == rows["strong zero-shot"][t]
    assert rows["multi-task fusion (w=0 each)"][t] == (
        rows["strong zero-shot"][t])
    assert rows["own expert alone"][t] == rows[f"expert {t} alone"][t]
  assert 0.0 <= rows["single-task fusion (solver)"]["own_w"] <= 2.0
  with open(tmp_path / "run" / "results.json") as f:
    assert json.load(f)["rows"] == out["rows"]
  assert os.path.exists(tmp_path / "run" / "table.txt")


def test_job_refuses_experts_with_other_classes(tmp_path, monkeypatch,
                                                cached_models):
  heads_lib = cached_models
  real, seen = heads_lib.build, []

  def build(encoder, task, config, workdir):
    head = real(encoder, task, config, workdir)
    seen.append(id(encoder)) if id(encoder) not in seen else None
    if id(encoder) != seen[0]:  # the small model's heads: one extra class
      head = {"kernel": np.pad(head["kernel"], ((0, 0), (0, 1))),
              "bias": np.pad(head["bias"], (0, 1))}
    return head
  monkeypatch.setattr(heads_lib, "build", build)
  config = lf_config.get_config("runlocal")
  with pytest.raises(logits_bench.ConfigError,
                     match=r"task 'word_valence': expert 'word_valence "
                           r"expert' has classes \(.*'<unnamed 2>'\) but the "
                           r"strong model"):
    logits_bench.run(config, str(tmp_path / "run"))
