"""Streamed TALL masks, EMR, PCB, DELLA and TSV against the in-memory path.

The reference is `task_vectors.from_checkpoints` + `methods.merge` (each
method is tested against NumPy references in test_methods). The budget
splits `emb` (and for the plain merges `layer.q` and `conv`) into row
blocks.
"""

import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mtmerge import checkpoint_io
from mtmerge import cli
from mtmerge import compressed_io
from mtmerge import methods
from mtmerge import streaming
from mtmerge import task_vectors

BF16 = np.dtype(ml_dtypes.bfloat16)
# Few distinct shapes (each compiles every kernel): emb is split into 8-row
# blocks, conv (3-D: DELLA rows of the last axis) and layer.q are whole.
SHAPES = {"emb": (40, 16), "layer.q": (8, 16), "conv": (4, 2, 16),
          "layer.norm": (16,)}
# executor.bytes_per_entry: 64 per entry for T=3 float32, 48 for bf16.
BUDGET = {"f32": 8 * 16 * 64, "bf16": 8 * 16 * 48}
BIG = 1 << 30  # every tensor in one block


def _models(dtype, T=3, seed=0):
  rng = np.random.default_rng(seed)
  base = {k: np.asarray(rng.normal(size=s), np.float32)
          for k, s in SHAPES.items()}
  out = [{k: np.asarray(v + 0.01 * (1 + t + i) * rng.normal(size=v.shape),
                        dtype) for i, (k, v) in enumerate(base.items())}
         for t in range(T)]
  base = {k: np.asarray(v, dtype) for k, v in base.items()}
  for m in [base] + out:
    m["ids"] = np.arange(5, dtype=np.int64)
  return base, out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  d = tmp_path_factory.mktemp("streaming_methods")
  out = {}
  for tag, dt in (("f32", np.float32), ("bf16", BF16)):
    base, ms = _models(dt, seed=len(tag))
    bp = str(d / f"base_{tag}.safetensors")
    save_file(base, bp)
    mps = []
    for t, m in enumerate(ms):
      mps.append(str(d / f"m{t}_{tag}.safetensors"))
      save_file(m, mps[-1])
    out[tag] = (bp, mps)
  return out


def _in_memory(method, bp, mps, hp):
  base, tvs, _ = task_vectors.from_checkpoints(bp, mps, progress=False,
                                                 as_jax=True)
  return methods.merge(method, {k: base[k] for k in tvs}, tvs, **hp)


def _streamed(method, bp, mps, out, hp, budget):
  info = streaming.merge_files(method, bp, mps, out, max_memory=budget,
                               progress=False, mesh=False, **hp)
  return checkpoint_io.load(out)[0], info


EXACT = [("della", dict(drop_rate=0.4, epsilon=0.1, seed=3,
                        scaling_factor=0.8)),
         ("tsv_merging", dict(alpha=0.7))]


@pytest.mark.parametrize("method,hp", EXACT,
                         ids=[f"{m}-{i}" for i, (m, _) in enumerate(EXACT)])
def test_bit_identical(ckpts, tmp_path, method, hp):
  """DELLA (same PRNG stream, exact vote total) and TSV: bit for bit."""
  bp, mps = ckpts["f32"]
  ref = _in_memory(method, bp, mps, hp)
  got, info = _streamed(method, bp, mps, str(tmp_path / "o.safetensors"), hp,
                        BUDGET["f32"])
  if method == "della":
    assert info["blocks"] >= len(SHAPES) + 4  # emb: several blocks
    assert info["peak_block_bytes"] <= BUDGET["f32"]
  else:  # TSV: the whole of emb [40, 16] in one block, past the budget
    assert info["peak_block_bytes"] >= 2 * 4 * 4 * 40 * 16 > BUDGET["f32"]
  for k in ref:
    np.testing.assert_array_equal(got[k], np.asarray(ref[k]), err_msg=k)
  np.testing.assert_array_equal(got["ids"], np.arange(5))


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_pcb(ckpts, tmp_path, variant):
  """PCB: equal within float32 rounding, not bit for bit.

  Row blocks change the order of the paper variant's softmax sums; even
  with every tensor in one block (tried while writing this), XLA fuses the
  per-block kernels differently from the whole-model program (a few
  entries 1 ulp apart). The official variant's order statistics (the
  clip bounds, the signed score quantile) are exact selections; its
  scores' exp and tanh fuse differently in the same way.
  """
  bp, mps = ckpts["f32"]
  hp = dict(ratio=0.3, variant=variant)
  ref = {k: np.asarray(v) for k, v in _in_memory("pcb_merging", bp, mps,
                                                 hp).items()}
  split, info = _streamed("pcb_merging", bp, mps, str(tmp_path / "s"), hp,
                          BUDGET["f32"])
  assert info["passes"][:3] == (
      ["PCB min/max", "PCB softmax sums", "top-k buckets"]
      if variant == "paper" else
      ["|tau| top-k buckets", "|tau| top-k exact", "PCB score signs"])
  assert info["peak_block_bytes"] <= BUDGET["f32"]  # inputs and outputs
  for k in ref:
    np.testing.assert_allclose(split[k], ref[k], rtol=1e-6, atol=1e-6,
                               err_msg=k)


def test_bf16_dtype_and_layout(ckpts, tmp_path):
  """bf16 in, bf16 out, the base's names; equal to in memory bit for bit."""
  bp, mps = ckpts["bf16"]
  for method, hp in (("tsv_merging", {}),):
    ref = _in_memory(method, bp, mps, hp)
    out = str(tmp_path / f"{method}.safetensors")
    got, _ = _streamed(method, bp, mps, out, hp, BUDGET["bf16"])
    assert sorted(got) == sorted(load_file(bp))
    for k in ref:
      assert got[k].dtype == BF16, k
      np.testing.assert_array_equal(got[k].view(np.uint16),
                                    np.asarray(ref[k]).view(np.uint16))


COMPRESSED = [  # (method, hparams, inputs, budgets)
    ("tall_mask", dict(tall_mask_lambda=[0.4, 0.6, 0.5]), "f32", ("s", "w")),
    ("tall_mask", {}, "bf16", ("s",)),
    ("tall_mask", dict(base_method="ties", threshold=0.3, merge_func="mean"),
     "f32", ("s",)),
    ("emr_merging", {}, "f32", ("s",)),
    ("emr_merging", {}, "bf16", ("s",))]


@pytest.mark.parametrize("method,hp,tag,budgets", COMPRESSED,
                         ids=[f"{c[0]}-{i}" for i, c in
                              enumerate(COMPRESSED)])
def test_compressed(ckpts, tmp_path, method, hp, tag, budgets):
  """The compressed directory equals the in-memory `save_compressed` one.

  tau and the packed masks bit for bit; EMR's rescalers within float32
  rounding (row-block sums; even with every leaf in one block, the per-leaf
  means of the block kernels and of the whole-model program can differ in
  the last bit: seen while writing this test).
  """
  bp, mps = ckpts[tag]
  c = _in_memory(method, bp, mps, hp)
  mem = str(tmp_path / "mem")
  compressed_io.save(c, checkpoint_io.read_layout(bp), mem,
                                method, methods.get(method).check(hp, 3))
  ref, ref_meta = compressed_io.load(mem)
  for budget in [{"s": BUDGET[tag], "w": BIG}[b] for b in budgets]:
    out = str(tmp_path / f"s{budget}")
    info = streaming.merge_files(method, bp, mps, out, max_memory=budget,
                                 progress=False, **hp)
    got, meta = compressed_io.load(out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(mem))
    assert {**meta, "rescalers": 0} == {**ref_meta, "rescalers": 0}
    for k in ref.tau:
      assert got.tau[k].dtype == ref.tau[k].dtype
      np.testing.assert_array_equal(got.tau[k], ref.tau[k], err_msg=k)
      np.testing.assert_array_equal(got.masks[k], ref.masks[k], err_msg=k)
    np.testing.assert_allclose(got.rescalers, ref.rescalers, rtol=1e-6)
    if budget != BIG:
      assert info["blocks"] >= len(SHAPES) + 4
      assert info["peak_block_bytes"] <= budget


def test_cli_streams_compressed_and_bad_input(ckpts, tmp_path, capsys):
  """`mtmerge merge` streams TALL masks; a NaN input gives one error line."""
  bp, mps = ckpts["f32"]
  out = str(tmp_path / "tall")
  code = cli.main(["merge", "--method", "tall_mask", "--base", bp,
                   "--models", *mps, "--out", out, "--max-memory", "8K",
                   "--no-progress"])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  assert "streamed" in captured.out and "note:" not in captured.out
  rec = str(tmp_path / "task1.safetensors")
  assert cli.main(["reconstruct", "--in", out, "--base", bp, "--task", "1",
                   "--out", rec]) == 0
  c = _in_memory("tall_mask", bp, mps, {})
  base = checkpoint_io.load(bp)[0]
  want = methods.reconstruct({k: base[k] for k in c.tau}, c, 1)
  got = load_file(rec)
  for k in want:
    np.testing.assert_array_equal(got[k], np.asarray(want[k]), err_msg=k)
  capsys.readouterr()
  bad = load_file(mps[1])
  bad["conv"][0, 1, 3] = np.nan  # the first block read: nothing compiles
  save_file(bad, str(tmp_path / "nan.safetensors"))
  for method in ("emr_merging", "della"):
    code = cli.main(["merge", "--method", method, "--base", bp, "--models",
                     mps[0], str(tmp_path / "nan.safetensors"), "--out",
                     str(tmp_path / f"bad_{method}"), "--max-memory", "8K",
                     "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2, method
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "NaN or Inf" in lines[0], (method, lines)
    assert "note:" not in captured.out, method
    assert not os.path.exists(tmp_path / f"bad_{method}")
  with pytest.raises(ValueError, match="epsilon must be in"):
    streaming.merge_files("della", bp, mps, str(tmp_path / "d"),
                          drop_rate=0.1, epsilon=0.2, progress=False)
