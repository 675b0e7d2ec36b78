"""Fisher merging, RegMean and the linear-layer Gram capture.

References are independent of the code under test: Fishers from single-
example `jax.grad` calls looped over examples and classes, merges and Grams
recomputed in NumPy from the papers' equations (Matena & Raffel 2022; Jin et
al. 2023), the exact multi-task least-squares solution from
`np.linalg.lstsq`, and (when torch and fusion_bench are installed)
FusionBench's own merge functions.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtmerge import encoders
from mtmerge import tree as tree_lib
from mtmerge.learned import capture
from mtmerge.learned import fisher
from mtmerge.learned import problem as problem_lib
from mtmerge.learned import regmean
from mtmerge.models import bert
from mtmerge.models import hub

TASKS = ("a", "b", "c")
CLASSES = {"a": 3, "b": 2, "c": 4}
N = 10  # examples per task; batch 4 gives a padded last batch


class Mlp(nnx.Module):

  def __init__(self, sizes, rngs):
    self.layers = nnx.List([nnx.Linear(i, o, rngs=rngs)
                            for i, o in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x) if i == 0 else layer(jnp.tanh(x))
    return x


def _mlp_problem(sizes=(5, 6, 4), seed=0, n=N):
  rng = np.random.default_rng(seed)
  static, params = hub.split_params(Mlp(sizes, nnx.Rngs(seed)))
  base = encoders.canonical(params)
  tvs = jax.tree.map(lambda b: jnp.asarray(
      0.3 * rng.normal(size=(len(TASKS),) + b.shape), jnp.float32), base)
  forward = lambda p, inputs: hub.merge_params(static, p)(inputs["x"])
  heads = {t: {"kernel": rng.normal(size=(sizes[-1], c)).astype(np.float32),
               "bias": rng.normal(size=c).astype(np.float32)}
           for t, c in CLASSES.items()}
  n = n if isinstance(n, dict) else {t: n for t in TASKS}
  splits = {t: {"validation": {
      "x": rng.normal(size=(n[t], sizes[0])).astype(np.float32),
      "label": np.zeros(n[t], np.int64)}} for t in TASKS}
  return problem_lib.from_arrays(TASKS, base, tvs, forward, heads, splits,
                                 capture_model=forward)


def _theta(problem, t):
  """theta_t as flat numpy float64 arrays, computed outside the code."""
  base = tree_lib.to_flat_dict(problem.base)
  tvs = tree_lib.to_flat_dict(problem.tvs)
  return {k: np.asarray(base[k], np.float64) + np.asarray(tvs[k][t])
          for k in base}


def _np_mlp_inputs(theta, x, num_layers):
  """The inputs of every layer of `Mlp` for rows `x` (float64)."""
  ins, h = [], x.astype(np.float64)
  for i in range(num_layers):
    h = h if i == 0 else np.tanh(h)
    ins.append(h)
    h = h @ theta[f"layers/{i}/kernel"] + theta[f"layers/{i}/bias"]
  return ins


# ----------------------------------------------------------------------------
# Fisher merging.


def _reference_fisher(problem, t, num):
  task = problem.tasks[t]
  x = problem.data(task, "validation", 100).source
  head = problem.heads[task]

  @jax.jit
  def logp(p, xi, y):
    logits = encoders.logits(head, problem.features(p, {"x": xi[None]}))[0]
    return jax.nn.log_softmax(logits)[y]
  grad = jax.jit(jax.grad(logp))
  theta = tree_lib.from_flat_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in _theta(problem, t).items()})
  total = jax.tree.map(lambda a: np.zeros(a.shape), theta)
  for i in range(num):
    xi = jnp.asarray(x[i]["x"])
    for y in range(CLASSES[task]):
      p_y = float(jnp.exp(logp(theta, xi, y)))
      g = grad(theta, xi, y)
      total = jax.tree.map(lambda a, gi: a + p_y * np.asarray(gi, float) ** 2,
                           total, g)
  return jax.tree.map(lambda a: a / num, total)


@pytest.fixture(scope="module")
def mlp():
  return _mlp_problem()


@pytest.fixture(scope="module")
def fishers(mlp):
  return [fisher.fisher_diagonal(mlp, t, num_examples=9, batch_size=4,
                                 chunk_size=3) for t in range(len(TASKS))]


def test_fisher_diagonal_matches_per_example_grads(mlp, fishers):
  for t in range(len(TASKS)):
    want = tree_lib.to_flat_dict(_reference_fisher(mlp, t, 9))
    got = tree_lib.to_flat_dict(fishers[t])
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=1e-9,
                                 err_msg=k)
  # Only the first 9 of 10 examples count: 10 gives another Fisher.
  ten = fisher.fisher_diagonal(mlp, 0, num_examples=10, batch_size=4)
  assert not np.allclose(ten["layers"]["0"]["kernel"],
                         fishers[0]["layers"]["0"]["kernel"])


def _np_merge(thetas, fs, scaling, floor, normalize):
  out = {}
  for k in thetas[0]:
    top = bottom = 0.0
    for th, f, l in zip(thetas, fs, scaling):
      allf = np.concatenate([np.ravel(v) for v in f.values()])
      if normalize == "mean":
        w = f[k] / allf.mean() + floor
      elif normalize is False:
        w = f[k] + floor
      else:  # FusionBench: (F + floor) / (||F|| + floor)
        w = (f[k] + floor) / (np.linalg.norm(allf) + floor)
      top, bottom = top + l * w * th[k], bottom + l * w
    out[k] = top / bottom
  return out


def test_fisher_merging_matches_numpy(mlp, fishers):
  scaling = [1.0, 0.5, 2.0]
  fs = [{k: np.asarray(v, float) for k, v in tree_lib.to_flat_dict(f).items()}
        for f in fishers]
  thetas = [_theta(mlp, t) for t in range(len(TASKS))]
  merged = fisher.fisher_merging(mlp, num_examples=9, batch_size=4,
                                 scaling=scaling, floor=1e-3, chunk_size=2)
  assert jax.tree.structure(merged) == jax.tree.structure(mlp.base)
  params = [mlp.task_params(t) for t in range(len(TASKS))]
  for normalize in ("mean", "l2", False):
    want = _np_merge(thetas, fs, scaling, 1e-3, normalize)
    got = tree_lib.to_flat_dict(merged if normalize == "mean" else
                                fisher.merge_with_fishers(
                                    params, fishers, scaling=scaling,
                                    floor=1e-3, normalize=normalize))
    for k in want:
      assert got[k].dtype == jnp.float32
      np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=1e-6,
                                 err_msg=f"{normalize} {k}")
    # Not the plain average: the Fisher weights matter.
    avg = np.mean([th["layers/0/kernel"] for th in thetas], axis=0)
    assert np.abs(got["layers/0/kernel"] - avg).max() > 1e-2


def test_identical_fishers_give_weight_averaging(mlp, fishers):
  thetas = [mlp.task_params(t) for t in range(len(TASKS))]
  same = [fishers[1]] * len(TASKS)
  for scaling in (None, [1.0, 3.0, 0.0]):
    got = tree_lib.to_flat_dict(fisher.merge_with_fishers(
        thetas, same, scaling=scaling))
    l = np.ones(3) if scaling is None else np.asarray(scaling)
    for k, v in got.items():
      want = sum(li * th[k] for li, th in zip(
          l, map(tree_lib.to_flat_dict, thetas))) / l.sum()
      np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-6, err_msg=k)


def test_fisher_argument_errors(mlp, fishers):
  thetas = [mlp.task_params(t) for t in range(3)]
  with pytest.raises(ValueError, match="scaling must be 3"):
    fisher.merge_with_fishers(thetas, fishers, scaling=[1.0, 2.0])
  for bad in ("sum", 0):
    with pytest.raises(ValueError, match="normalize must be"):
      fisher.merge_with_fishers(thetas, fishers, normalize=bad)
  zero = jax.tree.map(jnp.zeros_like, fishers[0])
  with pytest.raises(ValueError, match="zero everywhere"):
    fisher.merge_with_fishers(thetas, [zero] + fishers[1:])


# ----------------------------------------------------------------------------
# Gram capture.


def test_linear_grams_mlp_jit_and_eager(mlp):
  x = np.random.default_rng(3).normal(size=(7, 5)).astype(np.float32)
  w = np.array([1, 1, 0, 1, 1, 1, 0], np.float32)
  params = mlp.task_params(1)
  want = [a[w > 0].T @ a[w > 0]
          for a in _np_mlp_inputs(_theta(mlp, 1), x, 2)]
  fn = lambda p, x, w: capture.linear_grams(mlp.capture_model, p, {"x": x}, w,
                                            with_counts=True)
  for grams, counts in (fn(params, x, w), jax.jit(fn)(params, x, w)):
    assert sorted(grams) == ["layers/0/kernel", "layers/1/kernel"]
    for i in range(2):
      np.testing.assert_allclose(grams[f"layers/{i}/kernel"], want[i],
                                 rtol=1e-5, atol=1e-5)
      assert float(counts[f"layers/{i}/kernel"]) == 5
  assert nnx.Linear.__call__ is capture._ORIGINAL_CALL  # patch removed


def _tiny_bert():
  cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=24,
                        max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
  model = bert.Bert(cfg, rngs=nnx.Rngs(1))
  model.eval()
  return model


def test_linear_grams_bert_excludes_padding():
  model = _tiny_bert()
  static, params = hub.split_params(model)
  params = encoders.canonical(params)
  # Only layer 1 is merged; layer 0 and the embeddings stay frozen, so
  # their kernels must be ignored.
  sel, rest = encoders.split(params, r"layers/1/.*")
  forward = lambda p, b: hub.merge_params(static, encoders.join(
      tree_lib.to_flat_dict(p), rest))(b["input_ids"], b["attention_mask"])
  rng = np.random.default_rng(0)
  lengths = np.array([5, 8, 3])
  mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(1, 50, (3, 8)), 0)
  sub = tree_lib.from_flat_dict(sel)
  step = jax.jit(lambda p, b, w: capture.linear_grams(forward, p, b, w,
                                                      with_counts=True))
  batch = {"input_ids": ids, "attention_mask": mask}
  grams, counts = step(sub, batch, capture.row_weights(batch))
  assert sorted(grams) == sorted(
      f"layers/1/{m}/kernel" for m in ("attention/query", "attention/key",
                                       "attention/value", "attention/out",
                                       "mlp/intermediate", "mlp/output"))
  assert all(float(c) == lengths.sum() for c in counts.values())
  # Hand-computed Grams from the layer inputs of the real tokens, running
  # the model's submodules one by one.
  @jax.jit
  def layer_inputs(ids, mask):
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0,
                     jnp.finfo(jnp.float32).min)
    h0 = model.embeddings(ids, jnp.zeros_like(ids), True)
    h1 = model.layers[0](h0, bias, True)
    layer = model.layers[1]
    h_mid = layer.attention_norm(h1 + layer.attention(h1, bias, True))
    return h1, h_mid, jax.nn.gelu(layer.mlp.intermediate(h_mid),
                                  approximate=False)
  h1, h_mid, inter = layer_inputs(ids, mask)
  real = np.asarray(mask, bool)
  for path, h in (("attention/query", h1), ("attention/value", h1),
                  ("mlp/intermediate", h_mid), ("mlp/output", inter)):
    rows = np.asarray(h, np.float64)[real]
    np.testing.assert_allclose(grams[f"layers/1/{path}/kernel"],
                               rows.T @ rows, rtol=1e-4, atol=1e-4,
                               err_msg=path)
  # More padding changes nothing; counting padded rows would.
  wide = {"input_ids": np.pad(ids, ((0, 0), (0, 8))),
          "attention_mask": np.pad(mask, ((0, 0), (0, 8)))}
  wide_grams = step(sub, wide, capture.row_weights(wide))[0]
  everything = step(sub, wide, np.ones((3, 16), np.float32))[0]
  for k in grams:
    np.testing.assert_allclose(wide_grams[k], grams[k], rtol=1e-4, atol=1e-4)
  assert not np.allclose(everything["layers/1/mlp/output/kernel"],
                         grams["layers/1/mlp/output/kernel"], rtol=1e-2)


def test_linear_grams_errors(mlp):
  params = mlp.task_params(0)
  no_linear = lambda p, b: b["x"] @ p["layers"]["0"]["kernel"]
  with pytest.raises(ValueError, match="no nnx.Linear layer"):
    capture.linear_grams(no_linear, params, {"x": np.ones((2, 5))})
  with pytest.raises(ValueError, match="layers/0/kernel: input rows"):
    capture.linear_grams(mlp.capture_model, params, {"x": np.ones((2, 5))},
                         np.ones(3))


# ----------------------------------------------------------------------------
# RegMean.


def _np_regmean(problem, alpha, num):
  thetas = [_theta(problem, t) for t in range(len(TASKS))]
  out = {k: np.mean([th[k] for th in thetas], axis=0) for k in thetas[0]}
  lhs, rhs = [0.0, 0.0], [0.0, 0.0]
  for t, task in enumerate(TASKS):
    x = np.stack([e["x"] for e in problem.data(task, "validation", 100)
                  .source][:num])
    for i, a in enumerate(_np_mlp_inputs(thetas[t], x, 2)):
      g = a.T @ a / len(a)
      g = alpha * g + (1 - alpha) * np.diag(np.diag(g))
      lhs[i] = lhs[i] + g
      rhs[i] = rhs[i] + g @ thetas[t][f"layers/{i}/kernel"]
  for i in range(2):
    out[f"layers/{i}/kernel"] = np.linalg.solve(lhs[i], rhs[i])
  return out


def test_regmean_matches_numpy(mlp):
  got = tree_lib.to_flat_dict(regmean.regmean(mlp, alpha=0.9, num_examples=9,
                                              batch_size=4))
  want = _np_regmean(mlp, 0.9, 9)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5,
                               err_msg=k)
  avg = np.mean([_theta(mlp, t)["layers/1/kernel"] for t in range(3)], 0)
  assert np.abs(got["layers/1/kernel"] - avg).max() > 1e-2


def test_regmean_alpha1_is_multitask_least_squares():
  counts = {"a": 7, "b": 12, "c": 9}
  prob = _mlp_problem(sizes=(5, 3), seed=4, n=counts)
  got = regmean.regmean(prob, alpha=1.0, num_examples=100, batch_size=4,
                        normalize_grams=False)
  xs, ys = [], []
  for t, task in enumerate(TASKS):
    x = np.stack([e["x"] for e in prob.data(task, "validation", 100).source])
    xs.append(x)
    ys.append(x @ _theta(prob, t)["layers/0/kernel"])
  w, *_ = np.linalg.lstsq(np.concatenate(xs), np.concatenate(ys), rcond=None)
  np.testing.assert_allclose(got["layers"]["0"]["kernel"], w, rtol=1e-4,
                             atol=1e-5)


def test_regmean_dead_input_and_singular_errors(mlp):
  base = tree_lib.from_flat_dict({"k": jnp.ones((3, 2))})
  tvs = tree_lib.from_flat_dict({"k": jnp.arange(12.0).reshape(2, 3, 2)})
  g = np.diag([2.0, 0.0, 1.0])  # input 1 is never active
  got = regmean.merge_with_grams(base, tvs, [{"k": g}, {"k": 3 * g}],
                                 alpha=0.5)["k"]
  w = 1.0 + np.arange(12.0).reshape(2, 3, 2)
  np.testing.assert_allclose(got[1], w[:, 1].mean(0))
  np.testing.assert_allclose(np.asarray(got)[[0, 2]],
                             (w[0] + 3 * w[1])[[0, 2]] / 4,
                             rtol=1e-6)
  rank1 = np.outer([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="system for k is singular"):
    regmean.merge_with_grams(base, tvs, [{"k": rank1}, {"k": rank1}],
                             alpha=1.0)
  # alpha = 1 with fewer rows than inputs: a consistent but singular system.
  few = _mlp_problem(sizes=(5, 3), seed=2, n=1)
  with pytest.raises(ValueError, match="layers/0/kernel is singular"):
    regmean.regmean(few, alpha=1.0)
  regmean.regmean(few, alpha=0.9)  # shrinking makes it well posed
  with pytest.raises(ValueError, match="regmean needs finetune.mode=standard"):
    regmean.regmean(mlp._replace(mode="tangent"))
  with pytest.raises(ValueError, match="regmean needs finetune.mode=standard"):
    regmean.regmean(mlp._replace(capture_model=None))
  with pytest.raises(ValueError, match="no nnx.Linear layer"):
    regmean.regmean(mlp._replace(
        capture_model=lambda p, b: b["x"] @ p["layers"]["0"]["kernel"]))


# ----------------------------------------------------------------------------
# FusionBench parity (optional; the peers venv has torch and fusion_bench).


def test_fusionbench_merge_functions_agree(mlp, fishers):
  torch = pytest.importorskip("torch", reason="parity needs torch")
  fb_fisher = pytest.importorskip(
      "fusion_bench.method.fisher_merging.fisher_merging",
      reason="parity needs fusion_bench")
  fb_regmean = pytest.importorskip("fusion_bench.method.regmean.regmean",
                                   reason="parity needs fusion_bench")
  thetas = [tree_lib.to_flat_dict(mlp.task_params(t)) for t in range(3)]
  fs = [tree_lib.to_flat_dict(f) for f in fishers]
  tt = lambda a: torch.tensor(np.asarray(a, np.float32))
  scaling = [0.2, 0.5, 0.3]
  want = fb_fisher.merging_with_fisher_weights(
      {k: [tt(th[k]) for th in thetas] for k in thetas[0]},
      [{k: tt(v) for k, v in f.items()} for f in fs],
      torch.tensor(scaling), normalize_fisher_weight=True,
      minimal_fisher_weight=1e-6)
  got = fisher.merge_with_fishers(thetas, fs, scaling=scaling,
                                  normalize="l2")
  for k in want:
    np.testing.assert_allclose(got[k], want[k].numpy(), rtol=1e-4, atol=1e-6)
  rng = np.random.default_rng(0)
  grams = []
  for _ in range(3):
    x = rng.normal(size=(20, 5))
    grams.append({"layers/0/kernel": x.T @ x / 20})
  # FusionBench keys torch Linear weights `[out, in]`; ours are `[in, out]`.
  want = fb_regmean.merging_with_regmean_weights(
      {"l.weight": [tt(th["layers/0/kernel"]).T for th in thetas]},
      [{"l": tt(g["layers/0/kernel"])} for g in grams],
      reduce_non_diagonal_ratio=0.7)
  got = regmean.merge_with_grams(mlp.base, mlp.tvs, grams, alpha=0.7)
  np.testing.assert_allclose(got["layers"]["0"]["kernel"],
                             want["l.weight"].numpy().T, rtol=1e-4, atol=1e-5)


def test_linear_grams_flattened_rows_take_batch_weights():
  """Rows flattened batch-major by `models.ops.dense` keep their weights."""
  from mtmerge.models import ops
  layer = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  static, params = hub.split_params(layer)
  x = np.random.default_rng(4).normal(size=(2, 3, 5)).astype(np.float32)
  fwd = lambda p, b: ops.dense(hub.merge_params(static, p), b["x"])
  for w, keep in ((np.array([1.0, 0.0], np.float32), np.array([1, 0])),
                  (np.array([[1, 0, 1], [0, 1, 1]], np.float32),
                   np.array([[1, 0, 1], [0, 1, 1]]))):
    grams = capture.linear_grams(fwd, params, {"x": x}, w)
    rows = (x * np.reshape(keep, keep.shape + (1,) * (3 - keep.ndim))
            ).reshape(-1, 5)
    np.testing.assert_allclose(grams["kernel"], rows.T @ rows, rtol=1e-5,
                               atol=1e-5)
  with pytest.raises(ValueError, match="do not line up"):
    capture.linear_grams(fwd, params, {"x": x}, np.ones(4, np.float32))
