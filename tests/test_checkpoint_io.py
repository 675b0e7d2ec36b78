"""Tests for mtmerge.checkpoint_io: layouts, dtypes, task vectors, atomicity."""

import json
import os

import numpy as np
import pytest

from mtmerge import atomic_files
from mtmerge import checkpoint_io as cio
from mtmerge import compressed_io
from mtmerge import task_vectors

from ckpt_helpers import BF16, SHAPES, SHARD, make_model, write_ckpt  # noqa: E501,F401


def leftovers(d):
  return sorted(n for n in os.listdir(d) if n.startswith("."))


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16])
@pytest.mark.parametrize("sharded", [False, True])
def test_roundtrip_keeps_names_dtypes_layout(tmp_path, dtype, sharded):
  model = make_model(0, dtype)
  src = write_ckpt(tmp_path / ("base" if sharded else "base.safetensors"),
                   model, sharded)
  flat, layout = cio.load(src)
  assert layout.kind == ("sharded" if sharded else "file")
  assert set(flat) == set(SHAPES)
  for k, x in flat.items():
    assert x.dtype == np.dtype(dtype) and x.shape == SHAPES[k]
    np.testing.assert_array_equal(x, model[k])
  assert layout.dtypes == {k: np.dtype(dtype).name for k in SHAPES}
  assert layout.file_metadata[layout.files[0]] == {"format": "pt"}

  out = tmp_path / ("out" if sharded else "out.safetensors")
  # float32 inputs are cast back to the base's dtypes.
  nbytes = cio.save({k: x.astype(np.float32) for k, x in flat.items()}, out,
                    layout)
  assert nbytes == atomic_files.disk_bytes(str(out))
  again, layout2 = cio.load(out)
  assert layout2.kind == layout.kind
  assert layout2.dtypes == layout.dtypes
  if sharded:  # a single file's name is the destination's own
    assert layout2.weight_map == layout.weight_map
  assert (list(layout2.file_metadata.values()) ==
          list(layout.file_metadata.values()))
  for k in SHAPES:
    np.testing.assert_array_equal(again[k], flat[k])
  if sharded:
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "model.safetensors.index.json", *set(SHARD.values())])
    with open(out / "model.safetensors.index.json") as f:
      index = json.load(f)
    assert index["weight_map"] == SHARD
    assert index["metadata"]["total_size"] == layout.nbytes
  assert leftovers(tmp_path) == []


def test_dir_with_single_file(tmp_path):
  d = tmp_path / "m"
  d.mkdir()
  write_ckpt(d / "model.safetensors", make_model(1))
  (d / "config.json").write_text("{}")
  flat, layout = cio.load(d)
  assert layout.kind == "dir" and layout.files == ["model.safetensors"]
  cio.save(flat, tmp_path / "o", layout)
  assert sorted(os.listdir(tmp_path / "o")) == ["config.json",
                                                "model.safetensors"]


def test_save_without_layout_and_dtype_override(tmp_path):
  model = make_model(2)
  out = tmp_path / "x.safetensors"
  cio.save(model, out, dtypes={"head.w": BF16})
  flat, layout = cio.load(out)
  assert layout.dtypes["head.w"] == "bfloat16"
  assert layout.dtypes["head.b"] == "float32"


@pytest.mark.parametrize("sharded_base", [False, True])
def test_load_task_vectors(tmp_path, sharded_base):
  base = make_model(0, BF16)
  models = [make_model(i + 1, BF16, base) for i in range(3)]
  bp = write_ckpt(tmp_path / ("b" if sharded_base else "b.safetensors"), base,
                  sharded_base)
  mps = [write_ckpt(tmp_path / f"m{i}", m, sharded=i == 1)
         if i == 1 else write_ckpt(tmp_path / f"m{i}.safetensors", m)
         for i, m in enumerate(models)]
  base_flat, tvs, layout = task_vectors.from_checkpoints(bp, mps,
                                                         progress=False)
  assert layout.kind == ("sharded" if sharded_base else "file")
  for k, s in SHAPES.items():
    assert base_flat[k].dtype == BF16
    assert tvs[k].shape == (3,) + s and tvs[k].dtype == np.float32
    want = np.stack([m[k].astype(np.float32) - base[k].astype(np.float32)
                     for m in models])
    np.testing.assert_array_equal(tvs[k], want)


def _err(fn, *args):
  with pytest.raises(cio.CheckpointError) as e:
    fn(*args)
  msg = str(e.value)
  assert "\n" not in msg
  return msg


def test_errors_name_file_and_tensor(tmp_path):
  base = make_model(0)
  bp = write_ckpt(tmp_path / "b.safetensors", base)
  good = write_ckpt(tmp_path / "g.safetensors", make_model(1, base=base))
  missing = dict(make_model(2, base=base))
  del missing["head.b"]
  mp = write_ckpt(tmp_path / "miss.safetensors", missing)
  msg = _err(task_vectors.from_checkpoints, bp, [good, mp], False)
  assert "model 1" in msg and mp in msg and "'head.b'" in msg
  shaped = {**make_model(3), "head.w": np.zeros((4, 8), np.float32)}
  sp = write_ckpt(tmp_path / "shape.safetensors", shaped)
  msg = _err(task_vectors.from_checkpoints, bp, [sp, good], False)
  assert "'head.w'" in msg and "(4, 8)" in msg and "(8, 4)" in msg
  assert sp in msg
  extra = {**make_model(4), "extra.w": np.zeros(3, np.float32)}
  ep = write_ckpt(tmp_path / "extra.safetensors", extra)
  assert "'extra.w'" in _err(task_vectors.from_checkpoints, bp, [good, ep],
                              False)
  bad = make_model(5, base=base)
  bad["encoder.b"][3] = np.nan
  np_ = write_ckpt(tmp_path / "nan.safetensors", bad)
  msg = _err(task_vectors.from_checkpoints, bp, [good, np_], False)
  assert "NaN or Inf" in msg and np_ in msg and "'encoder.b'" in msg
  inf_base = {**base, "head.w": np.full((8, 4), np.inf, np.float32)}
  ip = write_ckpt(tmp_path / "infbase.safetensors", inf_base)
  assert "base" in _err(task_vectors.from_checkpoints, ip, [good, good], False)


def test_corrupt_missing_and_foreign_files(tmp_path):
  assert "does not exist" in _err(cio.load, str(tmp_path / "nope"))
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"this is not a safetensors file at all")
  assert str(garbage) in _err(cio.load, str(garbage))
  good = write_ckpt(tmp_path / "g.safetensors", make_model(0))
  trunc = tmp_path / "trunc.safetensors"
  trunc.write_bytes(open(good, "rb").read()[:-100])
  assert str(trunc) in _err(cio.load, str(trunc))
  pt = tmp_path / "pytorch_model.bin"
  pt.write_bytes(b"\x80\x02pickle")
  assert str(pt) in _err(cio.load, str(pt))
  empty = tmp_path / "empty"
  empty.mkdir()
  assert str(empty) in _err(cio.load, str(empty))
  d = write_ckpt(tmp_path / "sh", make_model(0), sharded=True)
  os.remove(os.path.join(d, SHARD["head.w"]))
  msg = _err(cio.load, d)
  assert "missing shard" in msg and SHARD["head.w"] in msg


def test_save_replaces_atomically_and_cleans_up(tmp_path, monkeypatch):
  flat, layout = cio.load(write_ckpt(tmp_path / "b", make_model(0), True))
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("old")
  cio.save(flat, out, layout)
  assert not (out / "old.txt").exists() and (out / "config.json").exists()
  assert leftovers(tmp_path) == []

  calls = []

  def flaky(arrays, fpath, metadata=None):
    calls.append(fpath)
    open(fpath, "wb").write(b"partial")
    if len(calls) == 2:
      raise OSError(28, "No space left on device")

  monkeypatch.setattr(cio, "save_file", flaky)
  with pytest.raises(cio.CheckpointError,
                     match=f"no space left on device writing {out} "):
    cio.save(flat, out, layout)
  assert leftovers(tmp_path) == []

  def full_disk(arrays, fpath, metadata=None):  # safetensors' own error type
    open(fpath, "wb").write(b"partial")
    raise cio.SafetensorError("Error while serializing: I/O error: No space "
                              "left on device (os error 28)")

  monkeypatch.setattr(cio, "save_file", full_disk)
  with pytest.raises(cio.CheckpointError, match="no space left on device"):
    cio.save(flat, out, layout)
  assert leftovers(tmp_path) == []
  monkeypatch.setattr(cio, "save_file", flaky)
  again, _ = cio.load(out)  # the previous output is intact
  np.testing.assert_array_equal(again["head.w"], flat["head.w"])
  single = tmp_path / "s.safetensors"
  single.write_bytes(b"old")
  calls[:] = [None]  # the next write fails
  with pytest.raises(cio.CheckpointError):
    cio.save(flat, single)
  assert single.read_bytes() == b"old" and leftovers(tmp_path) == []
  with pytest.raises(cio.CheckpointError, match="lacks tensor 'head.b'"):
    cio.save({k: v for k, v in flat.items() if k != "head.b"}, out, layout)
  assert "does not exist" in _err(cio.save, flat, str(tmp_path / "a" / "b"))


def test_compressed_roundtrip_and_size(tmp_path):
  from mtmerge import methods
  base = make_model(0, BF16)
  paths = [write_ckpt(tmp_path / f"m{i}.safetensors", make_model(i + 1, BF16,
                                                                 base))
           for i in range(3)]
  bp = write_ckpt(tmp_path / "b.safetensors", base)
  base_flat, tvs, layout = task_vectors.from_checkpoints(bp, paths,
                                                         progress=False)
  c = methods.merge("emr_merging", base_flat, tvs)
  info = compressed_io.save(c, layout, tmp_path / "c", "emr_merging", {})
  assert sorted(os.listdir(tmp_path / "c")) == [
      "compressed.json", "masks.safetensors", "tau.safetensors"]
  assert info["bytes"] == atomic_files.disk_bytes(str(tmp_path / "c"))
  assert info["full_bytes"] == 3 * os.path.getsize(bp)  # tiny: ratio > 1
  assert info["ratio"] == info["bytes"] / info["full_bytes"]
  c2, meta = compressed_io.load(tmp_path / "c")
  assert meta["method"] == "emr_merging" and meta["num_tasks"] == 3
  assert meta["base_dtypes"] == layout.dtypes
  np.testing.assert_allclose(c2.rescalers, np.asarray(c.rescalers))
  for k in SHAPES:
    assert c2.tau[k].dtype == BF16
    np.testing.assert_array_equal(c2.masks[k], np.asarray(c.masks[k]))
  assert "does not exist" in _err(compressed_io.load, str(tmp_path / "zz"))
  os.remove(tmp_path / "c" / "masks.safetensors")
  assert "masks.safetensors" in _err(compressed_io.load, str(tmp_path / "c"))
