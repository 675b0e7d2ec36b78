"""Runs a config's job as a user does: `python -m mtmerge.main` in a fresh
process on ONE CPU device.

A job's programs compile for the devices its mesh spans; in the test
process (8 fake devices) the same job costs ~40% more CPU (flat_sam
runlocal: 47 vs 33 CPU-s). Sharded training and merging are checked
against one device in their own tests (test_finetune, test_train,
test_methods, test_sharding, ...).
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(config: str, workdir, cache, timeout: int = 900):
  """Runs `python -m mtmerge.main --config <config> --workdir <workdir>`.

  Args:
    config: e.g. `configs/default.py:runlocal`.
    workdir: the job's output directory.
    cache: `MTMERGE_CACHE` of the child (data sets, compile cache).
    timeout: seconds.

  Returns:
    `(stdout, results.json contents)`; fails the test with the output's
    tail if the job exits non-zero.
  """
  env = dict(os.environ, MTMERGE_CACHE=str(cache), PYTHONPATH=REPO,
             JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count"))
  cmd = [sys.executable, "-m", "mtmerge.main", "--config", config,
         "--workdir", str(workdir)]
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=timeout)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  with open(os.path.join(str(workdir), "results.json"), encoding="utf-8") as f:
    return p.stdout, json.load(f)
