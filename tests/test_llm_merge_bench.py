"""benchmarks/llm_merge_bench.py on small Llama-shaped checkpoints.

The checkpoint generator writes the Hugging Face sharded layout the streamed
merge reads, and the mtmerge child's task arithmetic equals a NumPy merge of
the generated files (tests/peers/test_llm_merge_bench.py adds mergekit).
"""

import importlib.util
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "llm_merge_bench.py")
_spec = importlib.util.spec_from_file_location("llm_merge_bench", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = dict(vocab=64, hidden=32, intermediate=48, layers=2, kv=16)
BF16 = np.dtype(ml_dtypes.bfloat16)


def load_dir(path):
  """Every tensor of a sharded checkpoint directory, as float32."""
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    files = sorted(set(json.load(f)["weight_map"].values()))
  out = {}
  for name in files:
    for k, v in load_file(os.path.join(path, name)).items():
      assert v.dtype == BF16, (name, k, v.dtype)
      out[k] = v.astype(np.float32)
  return out


def test_generated_checkpoints_are_sharded_llama_layouts(tmp_path):
  base = str(tmp_path / "base")
  model = str(tmp_path / "m0")
  bench.write_model(base, TINY, 0, shard_bytes=8192)
  bench.write_model(model, TINY, 1, base_dir=base, shard_bytes=8192)
  layout = dict(bench.llama_layout(**TINY))
  with open(os.path.join(model, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert set(index["weight_map"]) == set(layout)
  assert len(set(index["weight_map"].values())) > 2  # several shards
  assert index["metadata"]["total_size"] == sum(
      2 * int(np.prod(s)) for s in layout.values())
  b, m = load_dir(base), load_dir(model)
  for name, shape in layout.items():
    assert b[name].shape == m[name].shape == tuple(shape), name
    tau = m[name] - b[name]
    # A small per-tensor task vector, far below the weights (on the norm
    # weights, ~1.0, it is mostly under bf16's resolution).
    assert np.abs(tau).mean() < 0.5 * np.abs(b[name]).mean(), name
    if len(shape) == 2:
      assert np.count_nonzero(tau) > 0.9 * tau.size, name
  with open(os.path.join(model, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["model_type"] == "llama"
  assert cfg["num_key_value_heads"] * TINY["hidden"] // 32 == TINY["kv"]


def test_mtmerge_child_task_arithmetic_equals_numpy(tmp_path):
  work = tmp_path / "work"
  out = tmp_path / "bench.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--small", "--tasks", "2", "--methods", "ta",
       "--tools", "mtmerge", "--workdir", str(work), "--keep-outputs",
       "--json", str(out), "--out", str(tmp_path / "bench.txt")],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (row,) = json.loads(out.read_text())["rows"]
  assert row["tool"] == "mtmerge" and row["T"] == 2
  assert row["returncode"] == 0 and row["peak_anon"] > 0
  assert row["plain_read_s"] > 0
  assert "$WORKDIR" not in (tmp_path / "bench.txt").read_text()
  base = load_dir(str(work / "base"))
  models = [load_dir(str(work / f"m{t}")) for t in range(2)]
  got = load_dir(str(work / "out_mtmerge_ta_2"))
  assert set(got) == set(base)
  for k, b in base.items():
    want = b + np.float32(0.3) * sum(m[k] - b for m in models)
    want = want.astype(BF16).astype(np.float32)
    # float32 sums in another order: at most 1 bf16 ulp apart, or float32
    # rounding of the summands where they cancel to (nearly) zero.
    tol = np.abs(want) * 2.0 ** -7 + 2.0 ** -22 * (
        np.abs(b) + sum(np.abs(m[k] - b) for m in models))
    assert np.all(np.abs(got[k] - want) <= tol), k
