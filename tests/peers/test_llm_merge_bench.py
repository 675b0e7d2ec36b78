"""benchmarks/llm_merge_bench.py --small with mergekit-yaml beside mtmerge.

Both tools merge the same generated Llama-shaped checkpoints; the script's
own agreement check must find task arithmetic within float32 rounding and
every TIES difference at a top-k cutoff tie (mtmerge keeps all tied
entries, mergekit's argsort an arbitrary subset).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "llm_merge_bench.py")


def test_small_run_agrees_with_mergekit(tmp_path):
  out = tmp_path / "bench.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--small", "--tasks", "2", "--methods",
       "ta,ties", "--workdir", str(tmp_path / "work"), "--peers-python",
       sys.executable, "--json", str(out)],
      env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  assert {(r["method"], r["tool"]) for r in rows} == {
      (m, t) for m in ("ta", "ties") for t in ("mtmerge", "mergekit")}
  ag = {r["method"]: r["agreement"] for r in rows}
  assert ag["ta"]["frac_beyond_1_ulp"] < 1e-4, ag["ta"]
  assert ag["ta"]["max_abs_diff"] < 1e-3, ag["ta"]
  assert ag["ties"]["beyond_1_ulp_not_at_topk_cutoff"] == 0, ag["ties"]
  assert ag["ties"]["at_topk_cutoff"] > 0, ag["ties"]
