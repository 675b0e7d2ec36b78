"""Streamed merges (mtmerge.streaming) against the in-memory path.

The reference is `task_vectors.from_checkpoints` + `methods.merge` (itself
tested against NumPy references in test_methods). Budgets are tiny so the
larger tensors are split into row blocks.
"""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mtmerge import checkpoint_io
from mtmerge import methods
from mtmerge import streaming
from mtmerge import task_vectors
from mtmerge.streaming import writer

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = {"emb": (40, 16), "layer.q": (8, 16), "layer.mlp": (24, 16),
          "layer.norm": (16,), "scale": ()}
SHARDS = {"emb": "model-00001-of-00002.safetensors",
          "scale": "model-00001-of-00002.safetensors",
          "ids": "model-00001-of-00002.safetensors"}
# Bytes: blocks of 8 rows (one compiled shape for every 2-D block); emb and
# layer.mlp are split, layer.q is whole. streaming.executor.bytes_per_entry:
# 64 per entry for T=3 float32 inputs, 48 for bf16.
BUDGET = {"f32": 8 * 16 * 64, "bf16": 8 * 16 * 48}


def _models(dtype, T=3, seed=0):
  rng = np.random.default_rng(seed)
  base = {k: np.asarray(rng.normal(size=s), np.float32)
          for k, s in SHAPES.items()}
  out = []
  for t in range(T):
    # Per-tensor scales differ so global and per-tensor top-k differ.
    out.append({k: np.asarray(v + 0.01 * (1 + t + i) * rng.normal(
        size=v.shape), dtype) for i, (k, v) in enumerate(base.items())})
  base = {k: np.asarray(v, dtype) for k, v in base.items()}
  for m in [base] + out:
    m["ids"] = np.arange(5, dtype=np.int64)
  return base, out


def _write_sharded(path, tensors):
  os.makedirs(path)
  files = {}
  for k, v in tensors.items():
    files.setdefault(SHARDS.get(k, "model-00002-of-00002.safetensors"),
                     {})[k] = v
  for f, part in files.items():
    save_file(part, os.path.join(path, f), metadata={"format": "pt"})
  wm = {k: SHARDS.get(k, "model-00002-of-00002.safetensors") for k in tensors}
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "llama"}, f)
  return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """float32 single files, and bf16 (sharded HF base, mixed-layout models)."""
  d = tmp_path_factory.mktemp("streaming")
  out = {}
  base, ms = _models(np.float32)
  bp = str(d / "base.safetensors")
  save_file(base, bp)
  mps = []
  for t, m in enumerate(ms):
    mps.append(str(d / f"m{t}.safetensors"))
    save_file(m, mps[-1])
  out["f32"] = (bp, mps)
  base, ms = _models(BF16, seed=1)
  bp = _write_sharded(str(d / "base_bf16"), base)
  mps = [_write_sharded(str(d / "m0_bf16"), ms[0])]
  for t, m in enumerate(ms[1:], 1):
    mps.append(str(d / f"m{t}_bf16.safetensors"))
    save_file(m, mps[-1])
  out["bf16"] = (bp, mps)
  return out


def _in_memory(method, bp, mps, hp):
  base, tvs, _ = task_vectors.from_checkpoints(bp, mps, progress=False,
                                                 as_jax=True)
  merged = methods.merge(method, {k: base[k] for k in tvs}, tvs, **hp)
  return {k: np.asarray(v) for k, v in merged.items()}


def _streamed(method, bp, mps, out, hp, budget=BUDGET["f32"], mesh=False):
  # One device; test_streaming_mesh.py runs these on the 8 fake devices.
  info = streaming.merge_files(method, bp, mps, out, max_memory=budget,
                               progress=False, mesh=mesh, **hp)
  loaded, _ = checkpoint_io.load(out)
  return loaded, info


CASES = [
    ("task_arithmetic", dict(scaling_factor=[0.3, 0.5, 0.2])),
    ("weight_averaging", {}),
    ("ties_merging", dict(threshold=0.2)),
    ("ties_merging", dict(threshold=0.3, scope="per_tensor",
                          merge_func="mean")),
    ("ties_merging", dict(threshold=0.3, scope="per_tensor",
                          zero_sign="positive", merge_func="mean",
                          weights=[1.0, 0.5, 2.0], scaling_factor=1.0)),
    ("ties_merging", dict(threshold=0.25, sign_method="count",
                          merge_func="max", zero_sign="positive")),
    ("dare", dict(drop_rate=0.4, seed=3)),
    ("dare_ties", dict(drop_rate=0.3, seed=1, threshold=0.5)),
    ("breadcrumbs", dict(scope="per_tensor")),
    ("breadcrumbs", {}),
    ("magnitude_prune", dict(threshold=0.3)),
    ("consensus", {}),
    ("consensus", dict(base_method="ties", threshold=0.3, merge_func="mean",
                       tall_mask_lambda=[0.4, 0.6, 0.5])),
]


@pytest.mark.parametrize("method,hp", CASES,
                         ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_streamed_equals_in_memory_float32(ckpts, tmp_path, method, hp):
  bp, mps = ckpts["f32"]
  ref = _in_memory(method, bp, mps, hp)
  got, info = _streamed(method, bp, mps, str(tmp_path / "o.safetensors"), hp)
  assert info["blocks"] > len(SHAPES)  # some tensors were row-blocked
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  np.testing.assert_array_equal(got["ids"], np.arange(5))


@pytest.mark.parametrize("method,hp", [
    ("task_arithmetic", {}), ("ties_merging", dict(scope="per_tensor"))])
def test_streamed_bf16_sharded_layout(ckpts, tmp_path, method, hp):
  bp, mps = ckpts["bf16"]
  ref = _in_memory(method, bp, mps, hp)
  out = str(tmp_path / "merged")
  got, _ = _streamed(method, bp, mps, out, hp, BUDGET["bf16"])
  for k in ref:
    assert got[k].dtype == BF16, k
    np.testing.assert_array_equal(got[k].view(np.uint16),
                                  ref[k].view(np.uint16), err_msg=k)
  assert sorted(os.listdir(out)) == sorted(os.listdir(bp))
  lay = checkpoint_io.read_layout(out)
  assert lay.weight_map == checkpoint_io.read_layout(bp).weight_map
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    assert json.load(f)["metadata"]["total_size"] == lay.nbytes


def test_memory_is_bounded_by_the_block(ckpts, tmp_path):
  """The executor's block buffers stay within the budget, not the model."""
  bp, mps = ckpts["f32"]
  sizes = {}
  for budget in (BUDGET["f32"], 10 ** 9):
    _, info = _streamed("ties_merging", bp, mps, str(tmp_path / f"{budget}"),
                        {}, budget=budget)
    sizes[budget] = info["peak_block_bytes"]
  assert sizes[BUDGET["f32"]] <= BUDGET["f32"]
  model_bytes = 4 * (len(mps) + 1) * sum(int(np.prod(s)) for s in
                                         SHAPES.values())
  assert sizes[10 ** 9] >= 4 * 40 * 16 * (len(mps) + 1)  # whole tensors
  assert sizes[BUDGET["f32"]] < model_bytes / 4


def test_output_is_atomic(ckpts, tmp_path, monkeypatch):
  bp, mps = ckpts["bf16"]
  out = tmp_path / "merged"
  out.mkdir()
  (out / "old.txt").write_text("previous output")
  calls = []
  real = writer.ShardWriter.write_at

  def failing(self, name, first, x):
    calls.append(name)
    if len(calls) == 4:
      raise OSError("No space left on device")
    return real(self, name, first, x)
  monkeypatch.setattr(writer.ShardWriter, "write_at", failing)
  with pytest.raises(checkpoint_io.CheckpointError, match="No space left"):
    streaming.merge_files("task_arithmetic", bp, mps, str(out),
                          max_memory=BUDGET["bf16"], progress=False)
  assert sorted(os.listdir(tmp_path)) == ["merged"]  # no temp left behind
  assert sorted(os.listdir(out)) == ["old.txt"]


def test_refusals_and_bad_input(ckpts, tmp_path):
  bp, mps = ckpts["f32"]
  out = str(tmp_path / "o.safetensors")
  with pytest.raises(ValueError, match="threshold must be in"):
    streaming.merge_files("ties_merging", bp, mps, out, threshold=1.5,
                          progress=False)
  bad = load_file(mps[1])
  bad["layer.mlp"][3, 2] = np.nan
  save_file(bad, str(tmp_path / "nan.safetensors"))
  with pytest.raises(checkpoint_io.CheckpointError,
                     match=r"model 1 .*nan.safetensors.* 'layer.mlp'"):
    streaming.merge_files("task_arithmetic", bp,
                          [mps[0], str(tmp_path / "nan.safetensors")], out,
                          max_memory=BUDGET["f32"], progress=False)
  assert not os.path.exists(out)


@pytest.mark.parametrize("method,hp,T", [("model_stock", {}, 3),
                                         ("slerp", dict(t=0.3), 2)])
def test_per_tensor_cosines(ckpts, tmp_path, method, hp, T):
  """Row-blocked tensors sum their cosine partials: float32 rounding only."""
  bp, mps = ckpts["f32"]
  ref = _in_memory(method, bp, mps[:T], hp)
  got, _ = _streamed(method, bp, mps[:T], str(tmp_path / "o.safetensors"), hp,
                     budget=8 * 16 * (16 * T + 16))  # blocks of 8 rows
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-6,
                               err_msg=k)
  one = streaming.merge_files(method, bp, mps[:T], str(tmp_path / "w"),
                              max_memory=10 ** 9, progress=False, mesh=False,
                              **hp)
  assert one["passes"] == ["merge"]  # every tensor whole: no statistics
  whole, _ = checkpoint_io.load(str(tmp_path / "w"))
  for k in ref:
    np.testing.assert_array_equal(whole[k], ref[k], err_msg=k)


def test_cli_streams_and_matches_in_memory(ckpts, tmp_path, capsys):
  from mtmerge import cli
  bp, mps = ckpts["bf16"]
  common = ["merge", "--method", "ties", "--base", bp, "--models", *mps,
            "--param", "density=0.3", "--no-progress"]
  assert cli.main(common + ["--out", str(tmp_path / "s.safetensors"),
                            "--max-memory", "6K"]) == 0
  assert "streamed in 3 passes" in capsys.readouterr().out  # 2 top-k
  assert cli.main(common + ["--out", str(tmp_path / "m.safetensors"),
                            "--in-memory"]) == 0
  a, _ = checkpoint_io.load(str(tmp_path / "s.safetensors"))
  b, _ = checkpoint_io.load(str(tmp_path / "m.safetensors"))
  for k in b:
    np.testing.assert_array_equal(a[k].reshape(-1).view(np.uint8),
                                  b[k].reshape(-1).view(np.uint8), err_msg=k)
  assert cli.main(common + ["--out", str(tmp_path / "x"), "--max-memory",
                            "lots"]) == 2
  assert "--max-memory expects a size" in capsys.readouterr().err


def test_exact_kth_largest_and_radix_select():
  """The host selections against a full sort (ties, zeros, tiny values)."""
  from mtmerge.streaming import stats
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 300, 700)).astype(np.float32)
  x[0] = np.round(x[0] * 8) / 8  # heavy ties, many zeros
  x[1, :5] = 2.0 ** -120  # below selection's "zero" floor
  n = x[0].size
  ks = [1, n // 5, n // 2 + 1, n - 1]
  sel = stats.RadixSelect(2, {"g": ks})
  for part in np.array_split(x, 3, axis=1):  # three row blocks
    sel.add_hi("g", part)
  sel.finish_hi()
  for part in np.array_split(x, 3, axis=1):
    sel.add_lo("g", part)
  radix = sel.finish()["g"]
  whole = stats.kth_largest(x, ks)
  for t in range(2):
    srt = np.sort(np.abs(x[t]).reshape(-1))[::-1]
    want = [srt[k - 1] if srt[k - 1] >= 2.0 ** -100 else 0.0 for k in ks]
    np.testing.assert_array_equal(radix[t], want)
    np.testing.assert_array_equal(whole[t], want)
