"""mergekit YAML configurations: parsing, parameter resolution, semantics.

The semantics are checked against NumPy references written here from
mergekit 0.1.5's documented behaviour (top-k count `max(1, int(d * n))`,
a zero sign vote positive, the disjoint mean over agreeing weights, L1
rescaling of DARE/DELLA survivors). tests/peers compares with mergekit
itself.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import mergekit_helpers as mh
from mtmerge import cli
from mtmerge import mergekit_config
from mtmerge import mergekit_kernels
from mtmerge import methods


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
  return mh.family(str(tmp_path_factory.mktemp("mk")), T=3)


def _doc(fam, method="ties", **kw):
  bp, mps, _, _ = fam
  doc = dict(merge_method=method, base_model=bp,
             models=[dict(model=m, parameters=dict(weight=w, density=0.3))
                     for m, w in zip(mps, (1.0, 0.5, 0.7))],
             parameters=dict(normalize=True), dtype="float32")
  doc.update(kw)
  return doc


@pytest.mark.parametrize("change, needle", [
    (dict(merge_method="tie"), "unknown or unsupported merge_method 'tie'; "
     "did you mean 'ties'?"),
    (dict(slices=[]), "unsupported key 'slices'"),
    (dict(parameters=dict(normalize=True, foo=1)), "unsupported parameter "
     "'foo' for ties"),
    (dict(dtype="int8"), "dtype 'int8' is not supported"),
    (dict(parameters=dict(normalize="yes")), "parameters: normalize must be "
     "true or false, got 'yes'"),
    (dict(parameters={"lambda": "big"}), "parameters: lambda must be a "
     "number, got 'big'"),
    (dict(base_model="no/such/dir"), "base_model: model path 'no/such/dir' "
     "does not exist"),
])
def test_config_errors_are_one_line(fam, tmp_path, capsys, change, needle):
  path = mh.yaml_file(tmp_path / "c.yml", _doc(fam, **change))
  assert cli.main(["merge", "--config", path, "--out",
                   str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize("density", [0.0, 1.5, -0.2])
def test_density_outside_unit_interval(fam, tmp_path, capsys, density):
  doc = _doc(fam)
  doc["models"][1]["parameters"]["density"] = density
  path = mh.yaml_file(tmp_path / "c.yml", doc)
  assert cli.main(["merge", "--config", path, "--out",
                   str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "density must be in (0, 1]" in err and err.count("\n") == 1


def test_structure_errors(fam, tmp_path, capsys):
  bp, mps, _, _ = fam
  bad = [
      (dict(merge_method="slerp", base_model=bp, models=[{"model": m}
                                                         for m in mps],
            parameters={"t": 0.5}), "slerp takes 1 model besides the base"),
      (dict(merge_method="linear", base_model=bp, models=[
          {"model": m, "parameters": {"weight": 1}} for m in mps]),
       "linear takes no base_model"),
      (dict(merge_method="task_arithmetic", base_model=bp,
            models=[{"model": mps[0]}]), "no 'weight' for tensor"),
      (dict(merge_method="ties", base_model=bp, models=[
          {"model": mps[0], "parameters": {"weight": 1, "gamma": 0.1}}]),
       "unsupported parameter 'gamma' for model"),
  ]
  for doc, needle in bad:
    path = mh.yaml_file(tmp_path / "c.yml", doc)
    assert cli.main(["merge", "--config", path, "--out",
                     str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
  (tmp_path / "bad.yml").write_text("merge_method: [ties\n")
  assert cli.main(["merge", "--config", str(tmp_path / "bad.yml"), "--out",
                   str(tmp_path / "o")]) == 2
  assert "not valid YAML" in capsys.readouterr().err


def test_filters_gradients_precedence(fam):
  doc = _doc(fam)
  doc["parameters"] = dict(normalize=True, density=[
      {"filter": "mlp", "value": 0.5}, {"value": [0.2, 0.4]}])
  doc["models"][0]["parameters"] = {"weight": [1.0, 3.0]}
  doc["models"][1]["parameters"] = {"weight": 2.0, "density": [
      {"filter": "q_proj", "value": 0.9}, {"filter": "*", "value": 0.1}]}
  cfg = mergekit_config.parse(doc)
  pm, sh = cfg.tensor_params("model.layers.1.mlp.up_proj.weight")
  assert sh == dict(int8_mask=False, normalize=True, rescale=False,
                    **{"lambda": 1.0})
  # Model 0: its own weight gradient at t = 1 (layer 1 of 2), the global
  # density filter 'mlp'; model 1: its own '*' entry.
  assert pm[0] == {"weight": 3.0, "density": 0.5}
  assert pm[1] == {"weight": 2.0, "density": 0.1}
  assert pm[2] == {"weight": 0.7, "density": 0.3}
  pm, _ = cfg.tensor_params("model.layers.0.self_attn.q_proj.weight")
  assert pm[0] == {"weight": 1.0, "density": 0.2}  # t = 0: first values
  assert pm[1]["density"] == 0.9
  pm, _ = cfg.tensor_params("lm_head.weight")  # outside the layers: t = 0
  assert pm[0] == {"weight": 1.0, "density": 0.2}


def _np_ties_floor(base, xs, w, density, normalize=True):
  """mergekit's ties, written independently: stable top-k by |delta|."""
  d = xs.astype(np.float64) - base
  kept = np.zeros_like(d)
  for t in range(len(d)):
    n = d[t].size
    k = max(1, int(density * n))
    idx = np.argsort(-np.abs(d[t]).ravel(), kind="stable")[:k]
    kept[t].ravel()[idx] = d[t].ravel()[idx]
  wb = np.asarray(w).reshape((-1,) + (1,) * (d.ndim - 1))
  wd = kept * wb
  maj = np.where(wd.sum(0) >= 0, 1.0, -1.0)
  agree = np.sign(wd) == maj
  num = (wd * agree).sum(0)
  den = (wb * agree).sum(0)
  den[den == 0] = 1
  return base + (num / den if normalize else num)


def test_ties_floor_count_matches_mergekit_rule():
  # 16 x 16 = 256 entries: 0.3 * 256 = 76.8 -> mergekit keeps 76, round
  # half up 77; the default count keeps one more.
  rng = np.random.default_rng(0)
  base = rng.normal(size=(16, 16)).astype(np.float32)
  xs = (base + 0.1 * rng.normal(size=(3, 16, 16))).astype(np.float32)
  tv = jnp.asarray(xs - base)
  w = [1.0, 0.5, 0.7]
  kw = dict(scope="per_tensor", threshold=0.3, merge_func="mean",
            zero_sign="positive", weights=w, scaling_factor=1.0)
  got = np.asarray(methods.merge("ties_merging", {"a": jnp.asarray(base)},
                                 {"a": tv}, count="floor", **kw)["a"])
  ref = _np_ties_floor(base, xs, w, 0.3)
  np.testing.assert_allclose(got, ref, atol=1e-6)
  rounded = np.asarray(methods.merge("ties_merging", {"a": jnp.asarray(base)},
                                     {"a": tv}, **kw)["a"])
  assert np.abs(rounded - ref).max() > 1e-3  # round keeps a 77th entry
  pm = [{"weight": x, "density": 0.3} for x in w]
  sh = dict(normalize=True, rescale=False, int8_mask=False, **{"lambda": 1.0})
  own = mergekit_kernels.compute("ties", base, xs, pm, sh, "a")
  np.testing.assert_allclose(own, ref, atol=1e-6)


def test_breadcrumbs_floor_counts():
  rng = np.random.default_rng(1)
  base = np.zeros((24, 16), np.float32)
  xs = rng.normal(size=(2, 24, 16)).astype(np.float32)
  pm = [{"weight": 1.0, "density": 0.3, "gamma": 0.05}] * 2
  sh = dict(normalize=False, rescale=False, int8_mask=False,
            **{"lambda": 1.0})
  own = mergekit_kernels.compute("breadcrumbs", base, xs, pm, sh, "a")
  eq = mergekit_kernels.equivalent("breadcrumbs", pm, sh)
  assert eq[0] == "breadcrumbs" and eq[1]["count"] == "floor"
  got = np.asarray(methods.merge(eq[0], {"a": jnp.asarray(base)},
                                 {"a": jnp.asarray(xs)}, **eq[1])["a"])
  np.testing.assert_allclose(got, own, atol=1e-6)
  # 384 entries: int(0.05 * 384) = 19 outliers removed, int(0.3 * 384) =
  # 115 kept per model (independent count from the ranks).
  for t in range(2):
    r = np.argsort(np.argsort(-np.abs(xs[t]).ravel()))
    keep = (r >= 19) & (r < 19 + 115)
    only = mergekit_kernels.compute("breadcrumbs", base, xs[t:t + 1],
                                    pm[:1], sh, "a")
    np.testing.assert_array_equal(only.ravel() != 0, keep)


def test_random_masks_statistics_and_l1_rescale():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(200, 100)).astype(np.float32)
  n = x.size
  for density in (0.1, 0.5, 0.9):
    y = mergekit_kernels.sparsify(x, "random", {"density": density}, True,
                                  mergekit_kernels._rng(0, "a", 0))
    kept = np.count_nonzero(y)
    sd = np.sqrt(n * density * (1 - density))
    assert abs(kept - density * n) < 5 * sd
    np.testing.assert_allclose(np.abs(y).sum(), np.abs(x).sum(), rtol=1e-4)
    ratio = y[y != 0] / x[y != 0]  # one common factor: the L1 ratio
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)
  # DELLA: keep probability linear in the per-row rank, d - eps .. d + eps.
  y = mergekit_kernels.sparsify(x, "della_magprune",
                                {"density": 0.5, "epsilon": 0.3}, False,
                                mergekit_kernels._rng(0, "a", 0))
  ranks = np.argsort(np.argsort(np.abs(x), axis=1), axis=1)
  low, high = (y != 0)[ranks < 20].mean(), (y != 0)[ranks >= 80].mean()
  # Expected 0.2 + 0.6 * mean rank fraction: ~0.257 and ~0.743.
  assert abs(low - 0.257) < 0.04 and abs(high - 0.743) < 0.04


def test_cli_streamed_and_per_tensor_equal_reference(fam, tmp_path, capsys):
  bp, _, b, ms = fam
  path = mh.yaml_file(tmp_path / "c.yml", _doc(fam, out_dtype="bfloat16"))
  assert cli.main(["merge", "--config", path, "--out", str(tmp_path / "s"),
                   "--no-progress"]) == 0
  assert "ties_merging" in capsys.readouterr().out  # one method: streamed
  doc = _doc(fam)
  doc["parameters"]["density"] = [{"filter": "mlp", "value": 0.6}]
  for m in doc["models"]:
    del m["parameters"]["density"]
  path2 = mh.yaml_file(tmp_path / "f.yml", doc)
  assert cli.main(["merge", "--config", path2, "--out", str(tmp_path / "f"),
                   "--no-progress"]) == 0
  assert "(per tensor)" in capsys.readouterr().out
  s, f = mh.read(str(tmp_path / "s")), mh.read(str(tmp_path / "f"))
  assert sorted(s) == sorted(b)
  for k in b:
    xs = np.stack([m[k] for m in ms])
    ref = _np_ties_floor(b[k], xs, [1.0, 0.5, 0.7], 0.3)
    assert s[k].dtype.name == "bfloat16"
    # bf16 output: within half a bf16 ulp (2^-8 relative) of the reference.
    np.testing.assert_allclose(s[k].astype(np.float32), ref, rtol=2 ** -8,
                               atol=1e-30)
    dens = 0.6 if "mlp" in k else 1.0
    ref = _np_ties_floor(b[k], xs, [1.0, 0.5, 0.7], dens)
    np.testing.assert_allclose(f[k], ref, atol=1e-6)
  assert os.path.exists(tmp_path / "f" / "config.json")


@pytest.mark.parametrize("method, sh", [
    ("linear", dict(normalize=True)),
    ("task_arithmetic", dict(normalize=False)),
    ("task_arithmetic", dict(normalize=True)),
])
def test_equivalent_equals_mergekit_kernel(method, sh):
  """The mtmerge mapping and the NumPy kernel compute the same tensor."""
  rng = np.random.default_rng(3)
  base = rng.normal(size=(6, 5)).astype(np.float32)
  xs = (base + 0.1 * rng.normal(size=(3, 6, 5))).astype(np.float32)
  w = [0.3, 0.5, -0.2]
  pm = [{"weight": x, "density": 1.0} for x in w]
  sh = dict(sh, rescale=False, int8_mask=False, **{"lambda": 0.8})
  name, hp = mergekit_kernels.equivalent(method, pm, sh)
  assert name == "task_arithmetic"
  if method == "linear":  # no base: all three models, weights normalized
    ref = np.tensordot(np.asarray(w, np.float32), xs, axes=1) / sum(w)
    b, tv = xs[0], xs[1:] - xs[0]
    own = mergekit_kernels.compute(method, None, xs, pm, sh, "a")
    np.testing.assert_allclose(own, ref, atol=1e-6)
  else:
    d = sum(w) if sh["normalize"] else 1.0
    ref = base + 0.8 * np.tensordot(np.asarray(w), xs - base, axes=1) / d
    b, tv = base, xs - base
    own = mergekit_kernels.compute(method, base, xs, pm, sh, "a")
    np.testing.assert_allclose(own, ref, atol=1e-6)
  got = methods.merge(name, {"a": jnp.asarray(b)}, {"a": jnp.asarray(tv)},
                      **hp)["a"]
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


def test_config_excludes_method_flags(fam, tmp_path, capsys):
  path = mh.yaml_file(tmp_path / "c.yml", _doc(fam))
  assert cli.main(["merge", "--config", path, "--method", "ties", "--out",
                   str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "--config replaces" in err and "--method" in err


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della",
                                    "breadcrumbs_ties", "dare_linear"])
@pytest.mark.parametrize("shape", [(), (7,)])
def test_kernel_small_tensors(method, shape):
  """0-D and 1-D tensors (CLIP's logit_scale, biases) keep their shape."""
  rng = np.random.default_rng(4)
  base = rng.normal(size=shape).astype(np.float32)
  xs = (base + rng.normal(size=(2,) + shape)).astype(np.float32)
  per, shared = mergekit_config.spec(method)
  pm = [dict(per, weight=1.0, density=0.9 if "della" not in method else 0.5)
        for _ in range(2)]
  out = mergekit_kernels.compute(method, base, xs, pm, shared, "t")
  assert out.shape == shape and np.all(np.isfinite(out))


def test_config_honours_mesh(fam, tmp_path, capsys):
  """`--config` streams on the `--mesh` given, like `--method`: the same
  bytes on 8 devices, a 2 x 4 mesh and one device; a bad spec is one line."""
  path = mh.yaml_file(tmp_path / "c.yml", _doc(fam))
  outs = {}
  for spec in (None, "data:2,fsdp:-1", "none"):
    out = str(tmp_path / f"o{len(outs)}.safetensors")
    extra = [] if spec is None else ["--mesh", spec]
    assert cli.main(["merge", "--config", path, "--out", out,
                     "--no-progress", *extra]) == 0
    assert "ties_merging" in capsys.readouterr().out  # streamed
    with open(out, "rb") as f:
      outs[spec] = f.read()
  assert outs[None] == outs["data:2,fsdp:-1"] == outs["none"]
  out = str(tmp_path / "bad.safetensors")
  assert cli.main(["merge", "--config", path, "--out", out, "--no-progress",
                   "--mesh", "data:3"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "multiple of 3 devices" in err[0], err
  assert not os.path.exists(out)
