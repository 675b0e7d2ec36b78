"""Streamed merges on a device mesh and over several processes.

8 fake CPU devices (conftest) against one device, and 2 local JAX
processes (2 devices each, `multiprocess_worker.py --merge`) against one
process: output files compared byte for byte. Shapes include a tensor whose
rows the mesh does not divide (a sharded body plus a replicated tail) and an
odd 1-D tensor (replicated).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from mtmerge import checkpoint_io
from mtmerge import cli
from mtmerge import compressed_io
from mtmerge import streaming
from mtmerge.streaming import placement
from mtmerge.streaming import reader
from mtmerge.streaming import recipes
from mtmerge.streaming import stats

import test_distributed as td

SHAPES = {"emb": (36, 8), "q": (16, 8), "norm": (8,), "odd": (5,),
          "scale": ()}
BUDGET = 8 * 8 * 64  # ~8-row blocks at T=3 float32 (64 bytes per entry)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("mesh")
  rng = np.random.default_rng(0)
  base = {k: np.asarray(rng.normal(size=s), np.float32)
          for k, s in SHAPES.items()}
  paths = [str(d / "base.safetensors")]
  save_file(base, paths[0])
  for t in range(3):
    m = {k: np.asarray(v + 0.02 * (t + i + 1) * rng.normal(size=v.shape),
                       np.float32) for i, (k, v) in enumerate(base.items())}
    paths.append(str(d / f"m{t}.safetensors"))
    save_file(m, paths[-1])
  return paths[0], paths[1:]


def _bytes(path):
  with open(path, "rb") as f:
    return f.read()


def _merge(files, out, method, hp, mesh, T=3):
  bp, mps = files
  return streaming.merge_files(method, bp, mps[:T], out, max_memory=BUDGET,
                               progress=False, mesh=mesh, **hp)


# The recipe paths: block-local, global and per-tensor radix top-k with the
# vote pass, DARE's counter-based draw, Consensus on TIES.
# (test_streaming's cases run every recipe on one device against the
# in-memory methods; Breadcrumbs, magnitude pruning and DARE-TIES share
# these paths.)
EXACT = [
    ("task_arithmetic", dict(scaling_factor=[0.3, 0.5, 0.2])),
    ("ties_merging", dict(threshold=0.2)),
    ("ties_merging", dict(threshold=0.3, scope="per_tensor",
                          merge_func="mean", weights=[1.0, 0.5, 2.0])),
    ("dare", dict(drop_rate=0.4, seed=3)),
    ("consensus", dict(base_method="ties", threshold=0.3)),
]


@pytest.mark.parametrize("method,hp", EXACT,
                         ids=[f"{m}-{i}" for i, (m, _) in enumerate(EXACT)])
def test_eight_devices_equal_one_bit_for_bit(files, tmp_path, method, hp):
  one = _merge(files, str(tmp_path / "1.safetensors"), method, hp, False)
  eight = _merge(files, str(tmp_path / "8.safetensors"), method, hp, None)
  assert (one["devices"], eight["devices"]) == (1, 8)
  assert one["passes"][-1] == eight["passes"][-1] == "merge"
  assert _bytes(one["out"]) == _bytes(eight["out"])


@pytest.mark.parametrize("method,hp,T", [("model_stock", {}, 3),
                                         ("slerp", dict(t=0.3), 2)])
def test_per_tensor_cosines_within_float32_rounding(files, tmp_path, method,
                                                    hp, T):
  """Their per-tensor sums are split over devices: the order changes."""
  one = _merge(files, str(tmp_path / "1"), method, hp, False, T)
  eight = _merge(files, str(tmp_path / "8"), method, hp, "data:4,x:2", T)
  a, _ = checkpoint_io.load(one["out"])
  b, _ = checkpoint_io.load(eight["out"])
  for k in SHAPES:
    np.testing.assert_allclose(b[k], a[k], rtol=2e-6, atol=1e-6, err_msg=k)


def test_pcb_official_on_a_mesh(files, tmp_path):
  """PCB's official variant on 8 devices: its selections (clip bounds, the
  signed score quantile) are exact; its scores' exp and tanh compile per
  shard, so to float32 rounding."""
  hp = dict(ratio=0.3, variant="official")
  one = _merge(files, str(tmp_path / "1.safetensors"), "pcb_merging", hp,
               False)
  eight = _merge(files, str(tmp_path / "8.safetensors"), "pcb_merging", hp,
                 None)
  assert (one["devices"], eight["devices"]) == (1, 8)
  a, _ = checkpoint_io.load(one["out"])
  b, _ = checkpoint_io.load(eight["out"])
  for k in SHAPES:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-6, err_msg=k)


COMPRESSED = [("tall_mask", dict(tall_mask_lambda=[0.4, 0.6, 0.5])),
              ("tall_mask", dict(base_method="ties", threshold=0.3)),
              ("emr_merging", {})]


def _two_device_mesh():
  return jax.make_mesh((2,), ("data",), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,))


def _same_compressed(a_dir, b_dir):
  """tau and packed masks byte for byte; EMR's rescalers (model-wide means
  whose sums a mesh splits) to float32 rounding; the rest of the json."""
  for name in ("tau.safetensors", "masks.safetensors"):
    assert _bytes(os.path.join(a_dir, name)) == _bytes(
        os.path.join(b_dir, name)), name
  a, meta_a = compressed_io.load(a_dir)
  b, meta_b = compressed_io.load(b_dir)
  np.testing.assert_allclose(b.rescalers, a.rescalers, rtol=1e-6)
  assert {**meta_a, "rescalers": 0} == {**meta_b, "rescalers": 0}


@pytest.mark.parametrize("method,hp", COMPRESSED)
@pytest.mark.parametrize("devices", [8, 2])
def test_compressed_on_a_mesh_equals_one_device(files, tmp_path, method, hp,
                                                devices):
  """TALL masks and EMR on a mesh. Shards hold a multiple of 8 rows (so
  each packs into whole bytes): on 8 devices these tensors are too short
  and stay replicated; on 2, `emb` and `q` are split."""
  mesh = None if devices == 8 else _two_device_mesh()
  one = _merge(files, str(tmp_path / "1"), method, hp, False)
  many = _merge(files, str(tmp_path / "n"), method, hp, mesh)
  assert (one["devices"], many["devices"]) == (1, devices)
  _same_compressed(one["out"], many["out"])


def test_packed_mask_shards_are_whole_bytes(files):
  """The compressed recipe's placement splits only blocks whose per-device
  rows are a multiple of 8."""
  bp, mps = files
  place = placement.make(_two_device_mesh(), shard_rows=8)
  inputs = reader.Inputs(bp, mps)
  blocks = reader.plan(inputs, 67, BUDGET, row_multiple=8 * place.size)
  inputs.close()
  split = {(b.name, b.r0, b.r1) for b in blocks if place.sharded(b)}
  assert split == {("emb", 0, 16), ("emb", 16, 32), ("q", 0, 16)}, blocks


def test_blocks_are_sharded_not_gathered(files):
  """Inputs and outputs of a block kernel hold 1/8 of the rows per device."""
  bp, mps = files
  place = placement.make("data:-1")
  inputs = reader.Inputs(bp, mps)
  blocks = reader.plan(inputs, 64, BUDGET, row_multiple=place.size)
  emb = [(b.r0, b.r1) for b in blocks if b.name == "emb"]
  assert emb == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 36)]  # tail
  rec = recipes.for_method("task_arithmetic", dict(scaling_factor=0.3), 3,
                           place)
  for blk in blocks:
    b, ms = inputs.read(blk)
    gb, gms = place.put(blk, b, ms)
    y = rec.apply(blk, gb, gms, out_sharding=place.shardings(blk)[0])
    split = place.sharded(blk)
    assert split == (blk.name in ("emb", "q", "norm") and blk.r1 - blk.r0
                     != 4), blk
    rows = b.shape[0] if b.ndim else 1
    for arr in (gb, y):
      assert arr.sharding.is_fully_replicated == (not split)
      assert {s.data.shape[0] if arr.ndim else 1
              for s in arr.addressable_shards} == {
                  rows // 8 if split else rows}
    if gms.ndim > 1:  # [T, rows, ...]: the rows are split, not the tasks
      assert {s.data.shape[:2] for s in gms.addressable_shards} == {
          (3, rows // 8 if split else rows)}
  inputs.close()


def test_bad_mesh_is_one_line(files, tmp_path, capsys):
  with pytest.raises(ValueError, match="need a multiple of 3 devices"):
    _merge(files, str(tmp_path / "o"), "task_arithmetic", {}, "data:3")
  bp, mps = files
  args = ["merge", "--method", "task_arithmetic", "--base", bp, "--models",
          *mps, "--out", str(tmp_path / "o.safetensors"), "--no-progress"]
  assert cli.main(args + ["--mesh", "data:3"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "multiple of 3 devices" in err[0], err
  assert cli.main(args + ["--mesh", "data:x"]) == 2
  assert "is not an integer" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o.safetensors")
  assert cli.main(args + ["--mesh", "data:2,fsdp:-1"]) == 0
  assert os.path.exists(tmp_path / "o.safetensors")


def test_radix_counts_past_two_to_the_32():
  """Global top-k histograms are int64: ranks beyond uint32 are exact."""
  sel = stats.RadixSelect(1, {"g": [3 * 2 ** 32]})
  one = np.float32(1.0).view(np.uint32) >> 16
  half = np.float32(0.5).view(np.uint32) >> 16
  sel.hi["g"][0, one] = 2 ** 32          # 2**32 entries equal to 1.0
  sel.hi["g"][0, half] = 2 ** 33         # 2**33 entries equal to 0.5
  sel.finish_hi()
  sel.lo["g"][(0, int(half))][0] = 2 ** 33
  assert sel.finish()["g"][0, 0] == np.float32(0.5)


def _run_procs(tmp_path, jobs, n=2, local=2):
  port = td._free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", MTMERGE_COMPILE_CACHE="0",
             PYTHONPATH=os.pathsep.join([td.ROOT] + [
                 p for p in [os.environ.get("PYTHONPATH")] if p]))
  for k in ("MTMERGE_COORDINATOR", "MTMERGE_NUM_PROCESSES",
            "MTMERGE_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
    env.pop(k, None)
  jobs_file = tmp_path / "jobs.json"
  jobs_file.write_text(json.dumps(jobs))
  procs, logs = [], []
  try:
    for i in range(n):
      logs.append(open(tmp_path / f"w{i}.log", "w"))
      procs.append(subprocess.Popen(
          [sys.executable, td.WORKER, "--process_id", str(i),
           "--num_processes", str(n), "--port", str(port),
           "--local_devices", str(local), "--merge", str(jobs_file),
           "--out", str(tmp_path / "done.json")],
          env=env, cwd=td.ROOT, stdout=logs[-1], stderr=subprocess.STDOUT,
          start_new_session=True))
    td.wait_all(procs)
  finally:
    td.stop_all(procs, logs)
  for i, p in enumerate(procs):
    if p.returncode != 0:
      tail = (tmp_path / f"w{i}.log").read_text()[-3000:]
      pytest.fail(f"merge worker {i} exited with {p.returncode}:\n{tail}")
  return json.loads((tmp_path / "done.json").read_text())


def test_two_processes_write_the_same_bytes_as_one(files, tmp_path):
  """Merged checkpoints and compressed directories (TALL masks, EMR)."""
  bp, mps = files
  cases = [EXACT[1], EXACT[2]] + COMPRESSED
  jobs = [dict(method=m, base=bp, models=mps, max_memory=BUDGET, hparams=hp,
               out=str(tmp_path / (f"mp{i}.safetensors" if i < 2 else
                                   f"mp{i}")))
          for i, (m, hp) in enumerate(cases)]
  done = _run_procs(tmp_path, jobs)
  assert [d["processes"] for d in done] == [2] * len(cases)
  assert [d["devices"] for d in done] == [4] * len(cases)
  for i, (job, d) in enumerate(zip(jobs, done)):
    ref = _merge(files, str(tmp_path / f"ref{i}"), job["method"],
                 job["hparams"], False)
    if i >= 2:
      _same_compressed(ref["out"], d["out"])
      continue
    assert _bytes(d["out"]) == _bytes(ref["out"]), job["method"]
    assert oct(os.stat(d["out"]).st_mode & 0o777) == oct(
        os.stat(ref["out"]).st_mode & 0o777)
  left = [n for n in os.listdir(tmp_path) if n.startswith(".")]
  assert not left, left  # no temp siblings


def test_top_k_under_a_mesh_keeps_the_same_entries(mesh8):
  """`selection` under `jax.set_mesh` (per-leaf groups, 64-bit-safe global
  counts, no flattening gathers) keeps exactly the unsharded entries."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mtmerge import selection
  rng = np.random.default_rng(1)
  tvs = {"a": rng.normal(size=(3, 64, 40)).astype(np.float32),
         "b": (np.round(rng.normal(size=(3, 16)) * 4) / 4).astype(
             np.float32),
         "c": (rng.normal(size=(3, 8, 8, 24)) * 0.1).astype(np.float32)}
  specs = {"a": P(None, "x"), "b": P(), "c": P(None, None, None, "x")}
  sharded = {k: jax.device_put(v, NamedSharding(mesh8, specs[k]))
             for k, v in tvs.items()}
  for scope in ("global", "per_tensor"):
    fn = jax.jit(lambda t, s=scope: selection.topk_thresholds(t, 0.2, s))
    ref = fn(tvs)
    with jax.set_mesh(mesh8):
      got = jax.jit(lambda t, s=scope: selection.topk_thresholds(
          t, 0.2, s))(sharded)
    for k, x in tvs.items():
      np.testing.assert_array_equal(np.abs(x) >= np.asarray(got[k]),
                                    np.abs(x) >= np.asarray(ref[k]),
                                    err_msg=f"{scope} {k}")
  assert int(np.sum(np.abs(tvs["a"]) >= np.asarray(ref["a"]))) > 0


def test_in_memory_masks_under_a_mesh_equal_unsharded(mesh8):
  """TALL masks and EMR in memory under `jax.set_mesh`: rows packed where
  they lie (columns split in 5-bit pieces move to row shards first), the
  same masks and tau as unsharded; EMR's rescalers to float32 rounding."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mtmerge import methods
  rng = np.random.default_rng(2)
  tvs = {"a": rng.normal(size=(3, 16, 40)).astype(np.float32),
         "b": rng.normal(size=(3, 24)).astype(np.float32)}
  specs = {"a": P(None, None, "x"), "b": P(None, "x")}
  sharded = {k: jax.device_put(v, NamedSharding(mesh8, specs[k]))
             for k, v in tvs.items()}
  base = {k: np.zeros(v.shape[1:], np.float32) for k, v in tvs.items()}
  for name in ("tall_mask", "emr_merging"):
    fn = jax.jit(lambda b, t, n=name: methods.get(n).fn(b, t))
    ref = fn(base, tvs)
    with jax.set_mesh(mesh8):
      got = fn(base, sharded)
    assert got.masks["a"].shape == (3, 16, 5)  # rows layout
    assert not got.masks["a"].sharding.is_fully_replicated
    for k in tvs:
      np.testing.assert_array_equal(got.masks[k], ref.masks[k], err_msg=k)
      np.testing.assert_array_equal(got.tau[k], ref.tau[k], err_msg=k)
    np.testing.assert_allclose(got.rescalers, ref.rescalers, rtol=1e-6)


def test_in_memory_ties_under_a_mesh_equal_unsharded(mesh8):
  """TIES in memory under `jax.set_mesh` (the search counts each leaf where
  it lies, `combine.ties_apply`'s passes): bit for bit the unsharded
  merge."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mtmerge import methods
  rng = np.random.default_rng(3)
  tvs = {"a": rng.normal(size=(3, 16, 40)).astype(np.float32),
         "b": rng.normal(size=(3, 24)).astype(np.float32)}
  specs = {"a": P(None, "x"), "b": P(None, "x")}
  sharded = {k: jax.device_put(v, NamedSharding(mesh8, specs[k]))
             for k, v in tvs.items()}
  base = {k: rng.normal(size=v.shape[1:]).astype(np.float32)
          for k, v in tvs.items()}
  cases = [("ties_merging", dict(threshold=0.3))]
  for name, hp in cases:
    fn = jax.jit(lambda b, t, n=name, h=tuple(hp.items()): methods.get(
        n).fn(b, t, **dict(h)))
    ref = fn(base, tvs)
    with jax.set_mesh(mesh8):
      got = fn(base, sharded)
    jax.tree.map(lambda g, r: np.testing.assert_array_equal(
        np.asarray(g), np.asarray(r), err_msg=name), got, ref)
