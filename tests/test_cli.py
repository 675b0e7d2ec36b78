"""Tests for the `mtmerge` command line (in-process, plus one subprocess)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mtmerge import atomic_files
from mtmerge import checkpoint_io as cio
from mtmerge import cli
from mtmerge import methods
from mtmerge import task_vectors

from ckpt_helpers import BF16, SHARD, make_model, write_ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_set(d, dtype=np.float32, sharded=False, n=3):
  """Base + n fine-tuned checkpoints under d; returns (base, [models])."""
  base = make_model(0, dtype)
  ext = "" if sharded else ".safetensors"
  bp = write_ckpt(d / f"base{ext}", base, sharded)
  return bp, [write_ckpt(d / f"ft{i}{ext}", make_model(i + 1, dtype, base),
                         sharded) for i in range(n)]


def run(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def expected(name, bp, mps, **hp):
  base, tvs, _ = task_vectors.from_checkpoints(bp, mps, progress=False)
  return base, tvs, methods.merge(name, base, tvs, **hp)


def assert_same(path, want):
  got, _ = cio.load(path)
  assert set(got) == set(want)
  for k, x in want.items():
    assert got[k].dtype == np.asarray(x).dtype
    np.testing.assert_array_equal(got[k], np.asarray(x))


def test_help_lists_every_method(capsys):
  for argv in (["--help"], ["merge", "--help"]):
    code, out, _ = run(capsys, *argv)
    assert code == 0
    for name in methods.names():
      assert f"  {name}" in out
      assert methods.get(name).summary[:30] in out.replace("\n      ", " ")
    assert "tall_mask [compressed" in out and "threshold=0.2" in out


@pytest.mark.parametrize("name,params", [
    ("task_arithmetic", {"scaling_factor": 0.4}),
    ("ties_merging", {"threshold": 0.3, "merge_func": "mean"}),
])
@pytest.mark.parametrize("dtype,sharded", [(np.float32, False), (BF16, True)])
def test_merge_matches_in_process(tmp_path, capsys, name, params, dtype,
                                  sharded):
  bp, mps = make_set(tmp_path, dtype, sharded)
  out = tmp_path / ("out" if sharded else "out.safetensors")
  code, stdout, err = run(capsys, "merge", "--method", name, "--base", bp,
                          "--models", *mps, "--out", out, "--no-progress",
                          *sum((["--param", f"{k}={v}"]
                                for k, v in params.items()), []))
  assert code == 0, err
  assert name in stdout and str(out) in stdout
  _, _, want = expected(name, bp, mps, **params)
  assert_same(out, want)
  if sharded:
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "model.safetensors.index.json", *set(SHARD.values())])


def test_module_entry_point(tmp_path):
  bp, mps = make_set(tmp_path)
  out = tmp_path / "out.safetensors"
  proc = subprocess.run(
      [sys.executable, "-m", "mtmerge", "merge", "--method", "task_arithmetic",
       "--base", bp, "--models", *mps, "--out", str(out),
       "--param", "scaling_factor=[0.2,0.3,0.5]"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == 0, proc.stderr
  assert "task_arithmetic" in proc.stdout and proc.stderr == ""
  _, _, want = expected("task_arithmetic", bp, mps,
                        scaling_factor=[0.2, 0.3, 0.5])
  assert_same(out, want)


@pytest.mark.parametrize("name,params", [
    ("tall_mask", ["tall_mask_lambda=[0.2,0.4,0.6]"]), ("emr_merging", [])])
@pytest.mark.parametrize("dtype,sharded", [(np.float32, False), (BF16, True)])
def test_compressed_and_reconstruct(tmp_path, capsys, name, params, dtype,
                                    sharded):
  bp, mps = make_set(tmp_path, dtype, sharded)
  cdir = tmp_path / "compressed"
  code, stdout, err = run(capsys, "merge", "--method", name, "--base", bp,
                          "--models", *mps, "--out", cdir,
                          *sum((["--param", p] for p in params), []))
  assert code == 0, err
  assert "full checkpoints" in stdout
  assert sorted(os.listdir(cdir)) == ["compressed.json", "masks.safetensors",
                                      "tau.safetensors"]
  out = tmp_path / ("rec" if sharded else "rec.safetensors")
  code, stdout, err = run(capsys, "reconstruct", "--in", cdir, "--base", bp,
                          "--task", 1, "--out", out)
  assert code == 0, err
  hp = {"tall_mask_lambda": [0.2, 0.4, 0.6]} if params else {}
  base, _, c = expected(name, bp, mps, **hp)
  # On disk tau has the base's dtypes; reconstruct from that same tau.
  c = c._replace(tau=jax.tree.map(lambda x, b: x.astype(b.dtype), c.tau, base))
  assert_same(out, methods.reconstruct(base, c, 1))


def _assert_clean_failure(tmp_path, code, err, *needles):
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("mtmerge: error: "), err
  for n in needles:
    assert str(n) in lines[0], (n, lines[0])
  assert "Traceback" not in err
  leftover = [n for n in os.listdir(tmp_path)
              if n.startswith((".", "out", "rec"))]
  assert leftover == [], leftover


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
  bp, mps = make_set(tmp_path)
  out = tmp_path / "out.safetensors"

  def merge(*extra, models=mps, method="ties_merging", base=bp):
    return run(capsys, "merge", "--method", method, "--base", base,
               "--models", *models, "--out", out, *extra)

  missing = {k: v for k, v in make_model(9).items() if k != "head.b"}
  mp = write_ckpt(tmp_path / "missing.safetensors", missing)
  _assert_clean_failure(tmp_path, *merge(models=[mps[0], mp])[::2],
                        "model 1", mp, "'head.b'")
  shaped = {**make_model(9), "head.w": np.zeros((4, 8), np.float32)}
  sp = write_ckpt(tmp_path / "shaped.safetensors", shaped)
  _assert_clean_failure(tmp_path, *merge(models=[sp, mps[0]])[::2],
                        sp, "'head.w'", "(4, 8)", "(8, 4)")
  _assert_clean_failure(tmp_path, *merge("--param", "threshold=1.5")[::2],
                        "threshold", "(0, 1]")
  _assert_clean_failure(tmp_path, *merge(method="nope")[::2],
                        "unknown method 'nope'")
  # Parameters are validated before any checkpoint is opened.
  _assert_clean_failure(tmp_path, *merge("--param", "foo=1",
                                         base=tmp_path / "absent")[::2],
                        "unknown parameter 'foo'")
  _assert_clean_failure(tmp_path, *merge("--param", "threshold")[::2],
                        "key=value")
  for bad_value in (np.nan, np.inf):
    bad = make_model(7)
    bad["encoder.w"][2, 3] = bad_value
    np_ = write_ckpt(tmp_path / "bad.safetensors", bad)
    _assert_clean_failure(tmp_path, *merge(models=[mps[0], np_])[::2],
                          "NaN or Inf", np_, "'encoder.w'")
    # A method without a streamed form fails the same way (its "merging in
    # memory" note goes to stdout, not into the one error line).
    _assert_clean_failure(tmp_path, *merge("--param", "variant='official'",
                                           models=[mps[0], np_],
                                           method="pcb_merging")[::2],
                          "NaN or Inf", np_, "'encoder.w'")
  _assert_clean_failure(tmp_path, *merge(models=mps[:1])[::2],
                        "at least 2")
  corrupt = tmp_path / "corrupt.safetensors"
  corrupt.write_bytes(open(mps[1], "rb").read()[:-64])
  _assert_clean_failure(tmp_path, *merge(models=[mps[0], corrupt])[::2],
                        corrupt)
  _assert_clean_failure(tmp_path, *merge(
      models=[mps[0], tmp_path / "gone.safetensors"])[::2],
      "gone.safetensors", "does not exist")
  _assert_clean_failure(tmp_path, *run(capsys, "merge", "--method", "x")[::2],
                        "--base")
  _assert_clean_failure(tmp_path, *run(
      capsys, "merge", "--method", "dare", "--base", bp, "--models", *mps,
      "--out", tmp_path / "no" / "out")[::2], tmp_path / "no", "not exist")
  # reconstruct: task out of range, not a compressed directory.
  code, _, err = run(capsys, "merge", "--method", "emr_merging", "--base", bp,
                     "--models", *mps, "--out", tmp_path / "c")
  assert code == 0, err
  for task in (3, -1):
    _assert_clean_failure(tmp_path, *run(
        capsys, "reconstruct", "--in", tmp_path / "c", "--base", bp,
        "--task", task, "--out", tmp_path / "rec.safetensors")[::2],
        f"--task {task} out of range", "(0..2)")
  _assert_clean_failure(tmp_path, *run(
      capsys, "reconstruct", "--in", bp, "--base", bp, "--task", 0,
      "--out", tmp_path / "rec.safetensors")[::2], "not a directory")


def test_failed_run_does_not_clobber_existing_output(tmp_path, capsys):
  bp, mps = make_set(tmp_path, sharded=True)
  out = tmp_path / "out"
  code, _, err = run(capsys, "merge", "--method", "task_arithmetic", "--base",
                     bp, "--models", *mps, "--out", out)
  assert code == 0, err
  before = {n: (out / n).read_bytes() for n in os.listdir(out)}
  bad = make_model(5)
  bad["head.b"][0] = np.nan
  np_ = write_ckpt(tmp_path / "nanmodel", bad, sharded=True)
  code, _, err = run(capsys, "merge", "--method", "task_arithmetic", "--base",
                     bp, "--models", mps[0], np_, "--out", out, "--force")
  assert code == 2 and "'head.b'" in err
  assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
  # A successful run replaces it.
  code, _, err = run(capsys, "merge", "--method", "weight_averaging",
                     "--base", bp, "--models", *mps, "--out", out, "--force")
  assert code == 0, err
  _, _, want = expected("weight_averaging", bp, mps)
  assert_same(out, want)


def test_parse_params():
  assert cli.parse_params(["merge_func=mean", "threshold=0.2",
                           "tall_mask_lambda=[0.2,0.4]", "scope=row",
                           "weights=None"]) == {
      "merge_func": "mean", "threshold": 0.2, "tall_mask_lambda": [0.2, 0.4],
      "scope": "row", "weights": None}
  with pytest.raises(ValueError, match="given twice"):
    cli.parse_params(["a=1", "a=2"])


def test_integer_buffers_are_kept_from_base(tmp_path):
  """Position ids (int64) are copied from the base, never merged."""
  from safetensors.numpy import load_file, save_file
  rng = np.random.default_rng(0)
  ids = np.arange(7, dtype=np.int64)[None]
  paths = []
  for i in range(3):
    p = str(tmp_path / f"m{i}.safetensors")
    save_file({"w": rng.standard_normal((4, 3)).astype(np.float32),
               "position_ids": ids + (0 if i == 0 else 100)}, p)
    paths.append(p)
  out = str(tmp_path / "out.safetensors")
  assert cli.main(["merge", "--method", "ties_merging", "--base", paths[0],
                   "--models", *paths[1:], "--out", out, "--no-progress"]) == 0
  got = load_file(out)
  np.testing.assert_array_equal(got["position_ids"], ids)
  assert got["position_ids"].dtype == np.int64
  comp = str(tmp_path / "tall")
  assert cli.main(["merge", "--method", "tall_mask", "--base", paths[0],
                   "--models", *paths[1:], "--out", comp, "--no-progress"]) == 0
  rec = str(tmp_path / "rec.safetensors")
  assert cli.main(["reconstruct", "--in", comp, "--base", paths[0], "--task",
                   "1", "--out", rec]) == 0
  np.testing.assert_array_equal(load_file(rec)["position_ids"], ids)


def _minilm_shapes(layers=1, vocab=512, d=384):
  """all-MiniLM-L6-v2's tensor names and shapes (fewer layers, small vocab)."""
  sh = {"embeddings.word_embeddings.weight": (vocab, d),
        "embeddings.position_embeddings.weight": (512, d),
        "embeddings.token_type_embeddings.weight": (2, d),
        "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,),
        "pooler.dense.weight": (d, d), "pooler.dense.bias": (d,)}
  for i in range(layers):
    p = f"encoder.layer.{i}."
    for n in ("attention.self.query", "attention.self.key",
              "attention.self.value", "attention.output.dense"):
      sh[f"{p}{n}.weight"], sh[f"{p}{n}.bias"] = (d, d), (d,)
    sh[p + "intermediate.dense.weight"] = (4 * d, d)
    sh[p + "intermediate.dense.bias"] = (4 * d,)
    sh[p + "output.dense.weight"] = (d, 4 * d)
    sh[p + "output.dense.bias"] = (d,)
    for n in ("attention.output.LayerNorm", "output.LayerNorm"):
      sh[f"{p}{n}.weight"], sh[f"{p}{n}.bias"] = (d,), (d,)
  return sh


def test_tsv_merging_minilm_sized_finishes(tmp_path):
  """TSV on MiniLM's shapes hung in XLA:CPU (jaxlib's batched LAPACK SVDs
  block the intra-op pool's threads on each other); now it must finish, and
  agree with the float64 NumPy reference."""
  import reference_numpy as ref
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  base = {k: (0.05 * rng.standard_normal(s)).astype(np.float32)
          for k, s in _minilm_shapes().items()}
  save_file(base, str(tmp_path / "base.safetensors"))
  fts = []
  for i in range(3):
    fts.append({k: x + (0.001 * rng.standard_normal(x.shape)).astype(
        np.float32) for k, x in base.items()})
    save_file(fts[-1], str(tmp_path / f"ft{i}.safetensors"))
  out = tmp_path / "out.safetensors"
  proc = subprocess.run(
      [sys.executable, "-m", "mtmerge", "merge", "--method", "tsv_merging",
       "--base", "base.safetensors", "--models", "ft0.safetensors",
       "ft1.safetensors", "ft2.safetensors", "--out", str(out),
       "--param", "alpha=0.8"],
      cwd=tmp_path, capture_output=True, text=True, timeout=150,
      env={**os.environ, "PYTHONPATH": REPO, "MTMERGE_COMPILE_CACHE": "0"})
  assert proc.returncode == 0, proc.stderr
  got, _ = cio.load(out)
  names = ["encoder.layer.0.intermediate.dense.weight",
           "encoder.layer.0.output.dense.weight", "pooler.dense.weight",
           "embeddings.token_type_embeddings.weight", "pooler.dense.bias"]
  import threadpoolctl  # NumPy's threaded SVDs crawl on a busy 2-core host
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    want = ref.tsv_merging({k: base[k] for k in names},
                           [{k: ft[k] for k in names} for ft in fts], alpha=0.8)
  for k in names:
    np.testing.assert_allclose(got[k], want[k], atol=2e-6, err_msg=k)


# --- item: safety and predictable output ------------------------------------

def _one_line_2(code, err, *needles):
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("mtmerge: error: "), err
  for n in needles:
    assert str(n) in lines[0], (n, lines[0])


def _snapshot(d):
  return {os.path.relpath(os.path.join(r, n), d): open(
      os.path.join(r, n), "rb").read() for r, _, ns in os.walk(d) for n in ns}


def test_out_never_overwrites_an_input(tmp_path, capsys):
  (tmp_path / "f").mkdir()
  (tmp_path / "s").mkdir()
  bp, mps = make_set(tmp_path / "f", n=2)
  sb, sms = make_set(tmp_path / "s", sharded=True, n=2)
  before = _snapshot(tmp_path)

  def merge(base, models, out, *extra):
    return run(capsys, "merge", "--method", "task_arithmetic", "--base", base,
               "--models", *models, "--out", out, "--force", *extra)[::2]

  _one_line_2(*merge(bp, mps, bp), "is the base", bp)
  _one_line_2(*merge(bp, mps, mps[1]), "is model 1", mps[1])
  _one_line_2(*merge(sb, sms, os.path.join(sb, "merged")),
              "is inside the base", sb)
  _one_line_2(*merge(sb, sms, os.path.join(sms[0], "x.safetensors")),
              "is inside model 0")
  _one_line_2(*merge(bp, mps, tmp_path / "f"), "contains the base",
              "would delete that input")
  _one_line_2(*merge(bp, mps, "."), "working directory")
  _one_line_2(*run(capsys, "reconstruct", "--in", sb, "--base", bp, "--task",
                   0, "--out", bp, "--force")[::2], "is the base")
  assert _snapshot(tmp_path) == before


def test_output_form_follows_the_name(tmp_path, capsys):
  bp, mps = make_set(tmp_path)
  (tmp_path / "s").mkdir()
  sb, sms = make_set(tmp_path / "s", sharded=True, n=2)

  def merge(base, models, out, method="task_arithmetic"):
    return run(capsys, "merge", "--method", method, "--base", base,
               "--models", *models, "--out", out)

  # A file base written as a directory, a sharded base as one file.
  code, _, err = merge(bp, mps, tmp_path / "dirout")
  assert code == 0, err
  assert sorted(os.listdir(tmp_path / "dirout")) == ["model.safetensors"]
  _, _, want = expected("task_arithmetic", bp, mps)
  assert_same(tmp_path / "dirout", want)
  code, _, err = merge(sb, sms, tmp_path / "one.safetensors")
  assert code == 0, err
  assert os.path.isfile(tmp_path / "one.safetensors")
  _, _, want = expected("task_arithmetic", sb, sms)
  assert_same(tmp_path / "one.safetensors", want)
  # Names that could mean either, or contradict what is there.
  _one_line_2(*merge(bp, mps, str(tmp_path / "x.safetensors") + "/")[::2],
              "ambiguous", "trailing '/'")
  _one_line_2(*merge(bp, mps, tmp_path / "x.bin")[::2], "ambiguous",
              "only .safetensors")
  (tmp_path / "d.safetensors").mkdir()
  _one_line_2(*merge(bp, mps, tmp_path / "d.safetensors")[::2],
              "existing directory")
  (tmp_path / "plain").write_text("x")
  _one_line_2(*merge(bp, mps, tmp_path / "plain")[::2], "existing file")
  _one_line_2(*merge(bp, mps, tmp_path / "t.safetensors", "tall_mask")[::2],
              "compressed method writes a directory")
  # An existing output is replaced only with --force.
  _one_line_2(*merge(bp, mps, tmp_path / "dirout")[::2], "exists",
              "--force")
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_integer_tensor_dtype_must_match_base(tmp_path, capsys):
  from safetensors.numpy import save_file
  w = np.ones((4, 3), np.float32)
  ids = np.arange(5)[None]
  save_file({"w": w, "ids": ids.astype(np.int64)},
            str(tmp_path / "b.safetensors"))
  save_file({"w": w + 1, "ids": ids.astype(np.int64)},
            str(tmp_path / "m0.safetensors"))
  save_file({"w": (w - 1).astype(BF16), "ids": ids.astype(np.int32)},
            str(tmp_path / "m1.safetensors"))
  code, _, err = run(capsys, "merge", "--method", "task_arithmetic", "--base",
                     tmp_path / "b.safetensors", "--models",
                     tmp_path / "m0.safetensors", tmp_path / "m1.safetensors",
                     "--out", tmp_path / "out.safetensors")
  _one_line_2(code, err, "'ids'", "int32", "model 1", "int64")
  assert not os.path.exists(tmp_path / "out.safetensors")


def test_outputs_get_umask_permissions(tmp_path, capsys):
  from mtmerge import results
  bp, mps = make_set(tmp_path, sharded=True, n=2)
  old = os.umask(0o027)
  try:
    code, _, err = run(capsys, "merge", "--method", "task_arithmetic",
                       "--base", bp, "--models", *mps, "--out",
                       tmp_path / "out")
    assert code == 0, err
    results.write_json(str(tmp_path / "r.json"), {"a": 1})
    results.write_csv(str(tmp_path / "r.csv"), [{"a": 1}])
  finally:
    os.umask(old)
  assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o750
  for n in os.listdir(tmp_path / "out"):
    assert os.stat(tmp_path / "out" / n).st_mode & 0o777 == 0o640, n
  for n in ("r.json", "r.csv"):
    assert os.stat(tmp_path / n).st_mode & 0o777 == 0o640, n


def test_mergekit_names_and_suggestions(tmp_path, capsys):
  bp, mps = make_set(tmp_path)
  out = tmp_path / "out.safetensors"

  def merge(method, *params):
    return run(capsys, "merge", "--method", method, "--base", bp, "--models",
               *mps, "--out", out, "--force",
               *sum((["--param", p] for p in params), []))

  code, stdout, err = merge("ties", "density=0.5")
  assert code == 0, err
  assert "ties_merging (mergekit's 'ties')" in stdout
  _, _, want = expected("ties_merging", bp, mps, scope="per_tensor",
                        merge_func="mean", zero_sign="positive",
                        scaling_factor=1.0, threshold=0.5)
  assert_same(out, want)
  code, _, err = merge("linear")
  assert code == 0, err
  assert_same(out, expected("weight_averaging", bp, mps)[2])
  _one_line_2(*merge("ties_merge")[::2], "unknown method 'ties_merge'",
              "did you mean 'ties_merging'?")
  _one_line_2(*merge("dare_linear")[::2], "no exact counterpart",
              "nearest is 'dare'")
  code, stdout, _ = run(capsys, "merge", "--help")
  assert "ties = ties_merging(scope='per_tensor'" in stdout
  assert "linear = weight_averaging" in stdout


def _failing_write(monkeypatch, exc):
  """Makes every atomic output write its temp fully, then raise `exc` (the
  in-memory and streamed writers both go through `_atomic_write`)."""
  real = atomic_files.atomic_write

  def wrapped(dest, write, is_dir):
    def write_then_fail(tmp):
      write(tmp)
      raise exc
    return real(dest, write_then_fail, is_dir)
  monkeypatch.setattr(atomic_files, "atomic_write", wrapped)


def test_full_disk_is_reported_in_one_line(tmp_path, capsys, monkeypatch):
  import errno
  bp, mps = make_set(tmp_path, n=2)
  out = tmp_path / "out.safetensors"
  argv = ["merge", "--method", "task_arithmetic", "--base", bp, "--models",
          *mps, "--out", out]
  monkeypatch.setattr(atomic_files, "free_bytes", lambda path: 100)
  _one_line_2(*run(capsys, *argv)[::2], "not enough space", "0 MiB free")
  monkeypatch.undo()
  _failing_write(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
  _one_line_2(*run(capsys, *argv)[::2], "no space left on device writing",
              out, "nothing was written")
  assert [n for n in os.listdir(tmp_path) if n.startswith((".", "out"))] == []


def test_interrupted_run_leaves_no_output(tmp_path, capsys, monkeypatch):
  bp, mps = make_set(tmp_path, sharded=True, n=2)
  _failing_write(monkeypatch, KeyboardInterrupt())
  code, _, err = run(capsys, "merge", "--method", "task_arithmetic", "--base",
                     bp, "--models", *mps, "--out", tmp_path / "out")
  assert code == 130 and "interrupted" in err
  assert [n for n in os.listdir(tmp_path) if n.startswith((".", "out"))] == []


_KILLABLE = """
import sys, time
from mtmerge import atomic_files, cli
real = atomic_files.atomic_write
def slow(dest, write, is_dir):
  def write_and_wait(tmp):
    write(tmp)
    print("WRITTEN", flush=True)  # the temp is there, not yet renamed
    time.sleep(60)
  return real(dest, write_and_wait, is_dir)
atomic_files.atomic_write = slow
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killed_run_leaves_no_partial_output(tmp_path, capsys, sig):
  import signal
  bp, mps = make_set(tmp_path, sharded=True, n=2)
  out = tmp_path / "out"
  proc = subprocess.Popen(
      [sys.executable, "-c", _KILLABLE, "merge", "--method",
       "task_arithmetic", "--base", bp, "--models", *mps, "--out", str(out),
       "--no-progress"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "PYTHONPATH": REPO, "MTMERGE_COMPILE_CACHE": "0"})
  try:
    assert proc.stdout.readline().strip() == "WRITTEN"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert not os.path.exists(out)
  temps = [n for n in os.listdir(tmp_path) if n.startswith(".")]
  if sig == "SIGTERM":
    assert proc.returncode == 143 and err.strip().splitlines()[-1:] == [
        "mtmerge: error: terminated; no output was written"], err
    assert temps == []
  else:  # no handler runs; the next write there removes the dead run's temp
    assert temps and all(n.startswith(".out.tmp-") for n in temps)
    code, _, err = run(capsys, "merge", "--method", "task_arithmetic",
                       "--base", bp, "--models", *mps, "--out", out)
    assert code == 0, err
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
