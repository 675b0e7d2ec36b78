"""ScaLearn (mtmerge.transfer): the scaled combination against numpy, the
gradient of omega, transfer-parameter counts, 8 devices == 1, bad input,
and the config's runlocal job."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtmerge import encoders
from mtmerge import sharding
from mtmerge import train
from mtmerge.models import bert
from mtmerge.models import hub
from mtmerge.transfer import adapters
from mtmerge.transfer import scalearn

L, H, R, VOCAB, CLASSES = 2, 16, 4, 64, 8


@pytest.fixture(scope="module")
def enc():
  cfg = bert.BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=L,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16)
  model = bert.Bert(cfg, rngs=nnx.Rngs(0))
  model.eval()
  static, params = hub.split_params(model)
  return encoders.Encoder("tiny-bert", "text", static,
                          encoders.canonical(params), None, H, None)


def _adapter(seed, std=0.3):
  return adapters.init(jax.random.key(seed), L, H, reduction_factor=H / R,
                       std=std)


def _batch(seed, n=8, length=6):
  rng = np.random.default_rng(seed)
  mask = np.ones((n, length), np.int32)
  mask[::3, -2:] = 0
  return {"input_ids": rng.integers(0, VOCAB, (n, length)).astype(np.int32),
          "attention_mask": mask,
          "label": rng.integers(0, CLASSES, n).astype(np.int32)}


def _head(seed):
  rng = np.random.default_rng(seed)
  return {"kernel": (3 * rng.standard_normal((H, CLASSES))).astype(np.float32),
          "bias": np.zeros(CLASSES, np.float32)}


def _np_adapter(block, x):
  d = np.maximum(x @ block["down"]["kernel"] + block["down"]["bias"], 0)
  return d @ block["up"]["kernel"] + block["up"]["bias"]


@pytest.mark.parametrize("variant", sorted(scalearn.VARIANTS))
def test_scaled_combination_matches_numpy(variant):
  n = 3
  srcs = [jax.tree.map(np.asarray, _adapter(s)) for s in range(n)]
  omega = np.asarray(scalearn.init(jax.random.key(9), variant, n, L, H,
                                   init_std=0.5))
  x = np.random.default_rng(0).standard_normal((2, 5, H)).astype(np.float32)
  fn = scalearn.hook(adapters.stack(srcs), jnp.asarray(omega))
  # The evaluation form: omega broadcast to [L, n, H] is the same model.
  full = scalearn.hook(adapters.stack(srcs),
                       scalearn.expand(jnp.asarray(omega), L, H))
  for i in range(L):
    # u_l = sum_i omega_l^i (.) u_l^i; shared variants use one omega.
    w = omega[i if omega.shape[0] == L else 0]
    want = sum(w[j] * _np_adapter(srcs[j]["layers"][str(i)], x)
               for j in range(n))
    np.testing.assert_allclose(np.asarray(fn(i, jnp.asarray(x))), want,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(full(i, jnp.asarray(x))), want,
                               rtol=1e-5, atol=1e-5)


def test_adapter_placement_in_the_encoder(enc):
  batch = {k: v for k, v in _batch(0).items() if k != "label"}
  feats = jax.jit(lambda s, w: adapters.features(
      enc, enc.params, batch, None if s is None else scalearn.hook(s, w)))
  one = jax.jit(lambda a: adapters.features(enc, enc.params, batch,
                                            adapters.single(a)))
  plain = feats(None, None)
  zero = jax.tree.map(jnp.zeros_like, _adapter(0))
  np.testing.assert_allclose(one(zero), plain, atol=1e-6)
  # One source at omega = 1 (uniform) is that adapter alone; omega = 0
  # switches every adapter off.
  a = _adapter(1)
  alone = one(a)
  src = adapters.stack([a])
  ones = jnp.ones((L, 1, 1))
  np.testing.assert_allclose(feats(src, ones), alone, atol=1e-6)
  np.testing.assert_allclose(feats(src, 0 * ones), plain, atol=1e-6)
  assert float(jnp.max(jnp.abs(alone - plain))) > 1e-3  # the adapter acts


def test_gradient_analytic_and_finite_differences(enc):
  # combine is linear in omega: d/d omega[j, m] sum(c * combine) =
  # sum over positions of c[..., m] U[j, ..., m] (summed over m if scalar).
  rng = np.random.default_rng(1)
  u = rng.standard_normal((3, 2, 4, H)).astype(np.float32)
  c = rng.standard_normal((2, 4, H)).astype(np.float32)
  for m in (H, 1):
    w = rng.standard_normal((3, m)).astype(np.float32)
    g = jax.jit(jax.grad(lambda w: jnp.sum(c * scalearn.combine(w, u))))(w)
    want = np.einsum("bsh,jbsh->jh", c, u)
    want = want if m == H else want.sum(-1, keepdims=True)
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)
  # End to end through the encoder: jax.grad of the stage-2 loss vs
  # central differences (no dropout, so the loss is deterministic).
  srcs = {"a": _adapter(1), "b": _adapter(2)}
  obj = scalearn.objective(enc, "scalearn_uniform", "t", srcs, _head(0),
                           jax.random.key(0), dropout_rate=0.0)
  batch, rng_key = _batch(2), jax.random.key(0)
  # One compiled program serves the gradient and the loss values.
  f = jax.jit(jax.value_and_grad(
      lambda p: obj.loss(p, obj.consts, batch, rng_key)[0]))
  g = f(obj.init)[1]["omega"]
  eps = 1e-2
  for idx in [(0, 0, 0), (1, 1, 0), (0, 1, 0)]:
    hi = jax.tree.map(lambda x: x.at[idx].add(eps), obj.init)
    lo = jax.tree.map(lambda x: x.at[idx].add(-eps), obj.init)
    fd = (float(f(hi)[0]) - float(f(lo)[0])) / (2 * eps)
    assert abs(fd - float(g[idx])) <= 2e-3 + 2e-2 * abs(fd), (idx, fd, g[idx])
  assert float(jnp.max(jnp.abs(g))) > 1e-3  # the check is not vacuous


def test_transfer_parameter_counts():
  n, layers, h = 7, 12, 768  # 7 sources, RoBERTa-base
  want = {"scalearn": layers * n * h, "scalearn_uniform": layers * n,
          "scalearn++": n * h, "scalearn_uniform++": n,
          "scalearn-shared": n * h, "scalearn_uniform-shared": n}
  for v, count in want.items():
    assert scalearn.num_transfer_params(v, n, layers, h) == count
    shape = jax.eval_shape(lambda v=v: scalearn.init(
        jax.random.key(0), v, n, layers, h)).shape
    assert int(np.prod(shape)) == count
  omega = scalearn.init(jax.random.key(0), "scalearn++", n, layers, h)
  np.testing.assert_allclose(float(jnp.mean(omega)), 2.0 / n, atol=1e-4)
  assert 5e-4 < float(jnp.std(omega)) < 2e-3  # N(2/n, 1e-3), the code's init
  # The abstract: ScaLearn's transfer parameters are ~0.35% of
  # AdapterFusion's (3 H x H projections + biases per layer), n = 8 GLUE
  # adapters on RoBERTa-base; ScaLearnUniform++ has just n = 8.
  fusion = layers * 3 * (h * h + h)
  assert round(100 * scalearn.num_transfer_params(
      "scalearn", 8, layers, h) / fusion, 2) == 0.35
  assert scalearn.num_transfer_params("scalearn_uniform++", 8, layers, h) == 8
  assert adapters.num_params(layers, h, 48) == layers * (2 * h * 48 + 48 + h)


def _fit(enc, mesh):
  srcs = {"a": _adapter(1), "b": _adapter(2), "c": _adapter(3)}
  obj = scalearn.objective(enc, "scalearn", "t", srcs, _head(0),
                           jax.random.key(0))  # dropout 0.3 on omega
  cfg = train.TrainConfig(steps=3, lr=5e-2, log_every=1)
  return train.fit(obj, lambda s: _batch(10 + s), cfg, mesh=mesh,
                   progress=False)


def test_eight_devices_equal_one(enc):
  one = _fit(enc, sharding.make_mesh([("data", -1)],
                                     devices=jax.devices()[:1]))
  eight = _fit(enc, sharding.make_mesh([("data", -1)]))
  assert jax.device_count() == 8
  np.testing.assert_allclose(eight.params["omega"], one.params["omega"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([r["loss"] for r in eight.log],
                             [r["loss"] for r in one.log], rtol=1e-5)
  init = scalearn.init(jax.random.key(0), "scalearn", 3, L, H)
  assert float(jnp.max(jnp.abs(one.params["omega"] - init))) > 1e-2  # moved


def test_bad_input_one_clear_error(enc):
  with pytest.raises(ValueError, match="target task 'party' has no source "
                     "adapters"):
    scalearn.objective(enc, "scalearn", "party", {}, _head(0),
                       jax.random.key(0))
  bad = _adapter(2)
  bad["layers"]["1"]["up"]["kernel"] = jnp.zeros((R, H + 1))
  with pytest.raises(ValueError, match=r"source adapter 'debate_role': "
                     r"layers/1/up/kernel has shape \(4, 17\), need \(4, 16\)"):
    scalearn.check_sources("party", {"sentiment": _adapter(1),
                                     "debate_role": bad}, L, H)
  short = {"layers": {"0": _adapter(1)["layers"]["0"]}}
  with pytest.raises(ValueError, match="source adapter 'x': needs blocks for "
                     "layers 0..1"):
    scalearn.check_sources("party", {"x": short}, L, H)
  with pytest.raises(ValueError, match=r"unknown ScaLearn variant 'scalearn\+'"):
    scalearn.get("scalearn+")


def test_config_runlocal(tmp_path):
  from configs import scalearn as config_lib  # pylint: disable=g-import-not-at-top
  from mtmerge.transfer import bench  # pylint: disable=g-import-not-at-top
  config = config_lib.get_config("runlocal")
  out = bench.run(config, str(tmp_path))
  rows = {r["method"]: r for r in out["rows"]}
  assert (tmp_path / "results.json").exists()
  assert (tmp_path / "results.txt").exists()
  for v in config.scalearn.variants:
    r = rows[f"{v} (loto)"]  # one source adapter per target
    assert r["transfer_params"] == scalearn.num_transfer_params(v, 1, 1, 384)
    assert 0 <= r["avg"] <= 100
  assert rows["own adapter (stage 1)"]["transfer_params"] == adapters.num_params(
      1, 384, 24)
  assert "full fine-tuning" not in rows  # finetune.steps = 0 in runlocal
  assert rows["frozen encoder (zero-shot heads)"]["transfer_params"] == 0


def test_job_refuses_bad_config_before_work(tmp_path):
  from configs import scalearn as config_lib  # pylint: disable=g-import-not-at-top
  from mtmerge import main  # pylint: disable=g-import-not-at-top
  from mtmerge.transfer import bench  # pylint: disable=g-import-not-at-top
  assert main.JOBS["scalearn"] == "mtmerge.transfer.bench"
  config = config_lib.get_config("runlocal")
  config.tasks = ["sentiment"]
  with pytest.raises(bench.ConfigError, match="at least 2 tasks"):
    bench.run(config, str(tmp_path))
  config = config_lib.get_config("runlocal")
  config.scalearn.variants = ["scalearn", "scalearn+++"]
  with pytest.raises(bench.ConfigError, match="unknown ScaLearn variant "
                     r"'scalearn\+\+\+'"):
    bench.run(config, str(tmp_path))
