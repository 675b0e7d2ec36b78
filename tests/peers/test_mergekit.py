"""mtmerge against mergekit itself: the same YAML file, the same checkpoints.

Each case writes one mergekit configuration, runs `mtmerge merge --config`
and mergekit's `run_merge` (what `mergekit-yaml` calls) on tiny
Llama-shaped checkpoints, and compares every tensor. Tolerances:

* `_F32`: both compute in float32 from float32 inputs but order the
  arithmetic differently (mtmerge folds `lambda * w_t / sum(w)` into one
  coefficient per task; mergekit weights, sums, divides, scales), so
  results differ by float32 rounding: a few ulp of the largest magnitude
  (|theta| < 0.2 here; 2e-7 absolute is ~8 ulp at 0.2).
* bfloat16 outputs: the float32 results above rounded to bfloat16 may land
  on adjacent bf16 values: one bf16 ulp (2^-7 relative).
* top-k methods use float32 random data without ties in |tau|; with ties at
  the cutoff mergekit's unstable argsort would pick arbitrarily.
"""

import os

import numpy as np
import pytest

import mergekit_helpers as mh

_F32 = 2e-7


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("peers_mk"))
  bp, mps, b, ms = mh.family(root, T=3)
  colinear = {k: (1.5 * v).astype(np.float32) for k, v in b.items()}
  cp = mh.write(os.path.join(root, "colinear"), colinear)
  b16 = {k: v.astype(mh.BF16) for k, v in b.items()}
  m16 = [{k: v.astype(mh.BF16) for k, v in m.items()} for m in ms]
  b16p = mh.write(os.path.join(root, "base16"), b16)
  m16p = [mh.write(os.path.join(root, f"m16_{t}"), m) for t, m in
          enumerate(m16)]
  return dict(base=bp, models=mps, colinear=cp, base16=b16p, models16=m16p)


def _run_both(doc, tmp_path):
  """(mtmerge's tensors, mergekit's tensors) for one configuration."""
  import yaml
  from mergekit.config import MergeConfiguration
  from mergekit.merge import MergeOptions, run_merge
  from mtmerge import cli
  path = mh.yaml_file(tmp_path / "merge.yml", doc)
  assert cli.main(["merge", "--config", path, "--out",
                   str(tmp_path / "mt"), "--no-progress"]) == 0
  with open(path) as f:
    cfg = MergeConfiguration.model_validate(yaml.safe_load(f))
  run_merge(cfg, str(tmp_path / "mk"),
            options=MergeOptions(copy_tokenizer=False, random_seed=0))
  mt, mk = mh.read(str(tmp_path / "mt")), mh.read(str(tmp_path / "mk"))
  assert sorted(mt) == sorted(mk) == sorted(mh.SHAPES)
  for k in mt:
    assert mt[k].dtype == mk[k].dtype, k
  return mt, mk


def _close(mt, mk, atol=_F32):
  for k in mk:
    np.testing.assert_allclose(mt[k].astype(np.float32),
                               mk[k].astype(np.float32), rtol=0, atol=atol,
                               err_msg=k)


def _models(paths, **params):
  out = []
  for i, p in enumerate(paths):
    out.append({"model": p, "parameters": {
        k: (v[i] if isinstance(v, tuple) else v) for k, v in params.items()}})
  return out


def test_linear(fam, tmp_path):
  doc = dict(merge_method="linear", dtype="float32",
             models=_models([fam["base"]] + fam["models"],
                            weight=(1.0, 2.0, 0.5, 1.5)))
  _close(*_run_both(doc, tmp_path))


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(fam, tmp_path, normalize):
  doc = dict(merge_method="task_arithmetic", base_model=fam["base"],
             dtype="float32",
             models=_models(fam["models"], weight=(0.3, 0.5, -0.2)),
             parameters={"lambda": 0.8, "normalize": normalize})
  _close(*_run_both(doc, tmp_path))


@pytest.mark.parametrize("normalize, rescale", [(True, False),
                                                (False, False), (True, True)])
def test_ties(fam, tmp_path, normalize, rescale):
  # density 0.3: q_proj's 256 entries give 76.8 (mergekit keeps 76).
  # rescale: survivors scaled to the tensor's L1 norm (mergekit_kernels).
  doc = dict(merge_method="ties", base_model=fam["base"], dtype="float32",
             models=_models(fam["models"], weight=(1.0, 0.5, 0.7),
                            density=0.3),
             parameters={"normalize": normalize, "lambda": 0.9,
                         "rescale": rescale})
  # A 77th kept entry (round half up) would differ by |tau| ~ 1e-2 >> _F32.
  _close(*_run_both(doc, tmp_path))


def test_ties_filters_and_gradients(fam, tmp_path):
  """Per-tensor parameters: mtmerge runs tensor by tensor."""
  doc = dict(merge_method="ties", base_model=fam["base"], dtype="float32",
             models=_models(fam["models"], weight=([1.0, 2.0], 0.5, 0.7)),
             parameters={"density": [{"filter": "mlp", "value": 0.5},
                                     {"filter": "self_attn",
                                      "value": [0.2, 0.7]},
                                     {"value": 0.9}]})
  _close(*_run_both(doc, tmp_path))


def test_ties_bf16_inputs_bf16_output(fam, tmp_path):
  doc = dict(merge_method="ties", base_model=fam["base16"], dtype="float32",
             out_dtype="bfloat16",
             models=_models(fam["models16"], weight=1.0, density=0.3))
  mt, mk = _run_both(doc, tmp_path)
  base = mh.read(fam["base16"])
  taus = [{k: v.astype(np.float32) - base[k].astype(np.float32)
           for k, v in mh.read(p).items()} for p in fam["models16"]]
  n_tied = 0
  for k in mk:
    # bf16 task vectors have few distinct magnitudes: entries tied at a
    # task's top-k cutoff are kept by mtmerge (all of them) and by mergekit
    # (an arbitrary subset); everywhere else the outputs agree.
    tied = np.zeros(mk[k].shape, bool)
    for tau in taus:
      a = np.abs(tau[k]).ravel()
      kth = np.sort(a)[::-1][max(1, int(0.3 * a.size)) - 1]
      if np.count_nonzero(a == kth) > 1:
        tied |= np.abs(tau[k]) == kth
    a, b = mt[k].astype(np.float32), mk[k].astype(np.float32)
    np.testing.assert_allclose(a[~tied], b[~tied], rtol=2 ** -7, atol=0,
                               err_msg=k)
    n_tied += np.count_nonzero(tied)
  assert n_tied < 0.05 * sum(v.size for v in mk.values())  # a small minority


def test_bf16_inputs_float32_compute_and_output(fam, tmp_path):
  """dtype float32 without out_dtype: both write float32, rounded once."""
  doc = dict(merge_method="task_arithmetic", base_model=fam["base16"],
             dtype="float32",
             models=_models(fam["models16"], weight=(0.3, 0.5, -0.2)))
  mt, mk = _run_both(doc, tmp_path)
  assert all(v.dtype == np.float32 for v in mt.values())
  _close(mt, mk)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs(fam, tmp_path, method):
  doc = dict(merge_method=method, base_model=fam["base"], dtype="float32",
             models=_models(fam["models"], weight=(1.0, 0.5, 0.7),
                            density=0.3, gamma=0.05))
  _close(*_run_both(doc, tmp_path))


def test_model_stock(fam, tmp_path):
  doc = dict(merge_method="model_stock", base_model=fam["base"],
             dtype="float32", models=[{"model": p} for p in fam["models"]])
  # Model Stock's t = N cos / (1 + (N - 1) cos) amplifies the cosine's
  # float32 rounding (summed in a different order): ~1e-6 relative.
  _close(*_run_both(doc, tmp_path), atol=1e-6)


@pytest.mark.parametrize("other, t", [("models", 0.3), ("models", [0, 1]),
                                      ("colinear", 0.4)])
def test_slerp(fam, tmp_path, other, t):
  """Spherical; a per-layer gradient of t; the colinear (lerp) fallback."""
  p = fam[other][0] if other == "models" else fam[other]
  doc = dict(merge_method="slerp", base_model=fam["base"], dtype="float32",
             models=[{"model": fam["base"]}, {"model": p}],
             parameters={"t": t})
  _close(*_run_both(doc, tmp_path), atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear",
                                    "dare_ties", "della"])
def test_random_masks_same_statistics(fam, tmp_path, method):
  """Random masks: the same statistics, never the same bits.

  One model of weight 1: both outputs are base + an L1-rescaled random
  subset of tau, so per tensor the L1 norm of (out - base) is |tau|_1 in
  both, and the kept fraction is near the density in both.
  """
  params = dict(weight=1.0, density=0.4)
  if method.startswith("della"):
    params["epsilon"] = 0.2
  doc = dict(merge_method=method, base_model=fam["base"], dtype="float32",
             models=_models(fam["models"][:1], **params))
  mt, mk = _run_both(doc, tmp_path)
  b = mh.read(fam["base"])
  m = mh.read(fam["models"][0])
  kept = {"mt": [], "mk": []}
  for k in b:
    tau = np.abs(m[k] - b[k]).sum(dtype=np.float64)
    for who, out in (("mt", mt), ("mk", mk)):
      d = out[k] - b[k]
      np.testing.assert_allclose(np.abs(d).sum(dtype=np.float64), tau,
                                 rtol=1e-4, err_msg=f"{who} {k}")
      kept[who].append(np.count_nonzero(d) / d.size)
  n = sum(v.size for v in b.values())
  for who in kept:  # 5 sigma of a binomial over all entries
    frac = np.average(kept[who], weights=[v.size for v in b.values()])
    assert abs(frac - 0.4) < 5 * np.sqrt(0.24 / n), (who, frac)
  assert not all(np.array_equal(mt[k], mk[k]) for k in b)


@pytest.mark.parametrize("method, params, yaml_params", [
    ("ties", ["density=0.3"], {"density": 0.3}),
    ("task_arithmetic", ["scaling_factor=1.0"], {}),
    ("breadcrumbs", ["scope='per_tensor'", "scaling_factor=1.0",
                     "count='floor'", "threshold=0.3", "gamma=0.05"],
     {"density": 0.3, "gamma": 0.05}),
])
def test_method_names_on_the_command_line(fam, tmp_path, method, params,
                                          yaml_params):
  """README's mergekit-name table: `--method NAME --param ...` == mergekit."""
  from mtmerge import cli
  args = ["merge", "--method", method, "--base", fam["base"], "--models",
          *fam["models"], "--out", str(tmp_path / "cli"), "--no-progress"]
  for p in params:
    args += ["--param", p]
  assert cli.main(args) == 0
  doc = dict(merge_method=method, base_model=fam["base"], dtype="float32",
             models=_models(fam["models"], weight=1.0, **yaml_params))
  _, mk = _run_both(doc, tmp_path)
  _close(mh.read(str(tmp_path / "cli")), mk)
