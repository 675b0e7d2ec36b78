"""launch/sweep.py expansion and launch/aot_check.py on 8 fake devices."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from mtmerge import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(
      f"launch_{name}", os.path.join(ROOT, "launch", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


sweep = _load("sweep")
aot_check = _load("aot_check")

CONFIG = """
import ml_collections

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.job = "demo"
  c.lr = 0.1
  c.method_name = "ties_merging"
  c.method = ml_collections.ConfigDict(dict(k=0.2))
  c.variant = arg or ""
  {extra}
  return c
"""


def _write(tmp_path, extra="", hyper=""):
  path = tmp_path / "cfg.py"
  path.write_text(textwrap.dedent(CONFIG).replace("{extra}", extra) + hyper)
  return str(path)


def test_sweep_get_hyper(tmp_path):
  path = _write(tmp_path, hyper=textwrap.dedent("""
      def get_hyper(h):
        return h.chainit([
            h.product([h.sweep('config.lr', [0.01, 0.1]),
                       h.sweep('config.method.k', [0.1, 0.3])]),
            h.zipit([h.fixed('method_name', 'dare'),
                     h.sweep('config.lr', [1.0])]),
        ])
      """))
  cmds = sweep.commands(f"{path}:small", "/runs", python="py")
  assert len(cmds) == 5
  assert cmds[0] == ["py", "-m", "mtmerge.main", "--config", f"{path}:small",
                     "--workdir", "/runs/000_lr=0.01_k=0.1",
                     "--config.lr=0.01", "--config.method.k=0.1"]
  assert [c[6] for c in cmds] == [
      "/runs/000_lr=0.01_k=0.1", "/runs/001_lr=0.01_k=0.3",
      "/runs/002_lr=0.1_k=0.1", "/runs/003_lr=0.1_k=0.3",
      "/runs/004_method_name=dare_lr=1.0"]
  assert cmds[4][7:] == ["--config.method_name=dare", "--config.lr=1.0"]


def test_sweep_config_field_and_errors(tmp_path, capsys):
  path = _write(tmp_path, extra="c.sweep = dict(lr=[1, 2], method=dict("
                "k=[0.5]), method_name=['a b'])")
  assert sweep.main([path, "--workdir", "w", "--dry-run", "--python", "py",
                     "--", "--flag"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines == [
      f"py -m mtmerge.main --config {path} --workdir "
      f"w/000_lr=1_k=0.5_method_name=a-b --config.lr=1 "
      f"--config.method.k=0.5 '--config.method_name=a b' --flag",
      f"py -m mtmerge.main --config {path} --workdir "
      f"w/001_lr=2_k=0.5_method_name=a-b --config.lr=2 "
      f"--config.method.k=0.5 '--config.method_name=a b' --flag"]
  bad = _write(tmp_path, extra="c.sweep = dict(method=dict(kk=[1]))")
  with pytest.raises(ValueError, match=r"sweep key 'method.kk' is not in .*"
                     r"method has no field 'kk' \(it has: k\)"):
    sweep.commands(bad, "w")
  assert sweep.main([bad, "--workdir", "w", "--dry-run"]) == 2
  assert "sweep key 'method.kk'" in capsys.readouterr().err
  # No sweep at all: one run with no overrides.
  assert sweep.commands(_write(tmp_path), "w", python="py") == [
      ["py", "-m", "mtmerge.main", "--config", str(tmp_path / "cfg.py"),
       "--workdir", "w/000"]]


def test_sweep_commands_parse_back_with_config_flags(tmp_path):
  """The overrides are accepted by the real absl config flag parser."""
  from absl import flags
  from ml_collections import config_flags
  path = _write(tmp_path, extra="c.sweep = dict(lr=[0.5], method=dict("
                "k=[3]), method_name=['ties_merging(k=0.2)'])")
  (cmd,) = sweep.commands(path, "w", python="py")
  argv = ["prog"] + cmd[3:5] + cmd[7:]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                  sys_argv=argv)
  fv(argv)
  assert fv.config.lr == 0.5 and fv.config.method.k == 3
  assert fv.config.method_name == "ties_merging(k=0.2)"


def test_aot_check_merge_on_8_devices():
  mesh = sharding.make_mesh([("task", 2), ("fsdp", 4)])
  config = ml_collections.ConfigDict(dict(aot=dict(
      method="task_arithmetic(scaling_factor=0.5)", num_params="0", width=64,
      layers=2, vocab=128, num_tasks=4, dtype="float32", task_axis="task")))
  fn, args = aot_check.merge_step(config, mesh)
  base, tvs, _ = args
  def per_device(tree):
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * 4
               for x in jax.tree.leaves(tree))
  # Every matrix is split 4 ways over fsdp, T=4 tasks 2 ways over 'task'.
  assert per_device(base) < sum(int(np.prod(x.shape)) * 4
                                for x in jax.tree.leaves(base)) / 3
  res = aot_check.check(config, mesh)
  assert res["num_devices"] == 8 and res["mesh"] == {"task": 2, "fsdp": 4}
  # XLA:CPU counts the output tuple's table of 8-byte buffer pointers.
  assert res["output_size_in_bytes"] == per_device(base) + 8 * len(
      jax.tree.leaves(base))
  # Arguments: base and tvs shards plus the float32 scaling_factor.
  assert res["argument_size_in_bytes"] == per_device(base) + per_device(
      tvs) + 4
  assert res["temp_size_in_bytes"] > 0
  assert res["peak_estimate_bytes"] >= res["argument_size_in_bytes"]



def test_aot_check_tall_masks_stay_sharded():
  # Columns split 8 ways in 12-bit pieces (96 / 8): packing a row needs the
  # row on one device, so the bits move to row shards; before, the packed
  # masks (and the bool masks) were gathered on every device.
  mesh = sharding.make_mesh([("fsdp", 8)])
  config = ml_collections.ConfigDict(dict(aot=dict(
      method="tall_mask", num_params="0", width=96, layers=1, vocab=64,
      num_tasks=4, dtype="float32", task_axis="")))
  res = aot_check.check(config, mesh)
  fn, (base, tvs, _) = aot_check.merge_step(config, mesh)
  out = jax.eval_shape(fn, base, tvs, {"tall_mask_lambda": 0.6})
  whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(out))
  assert res["output_size_in_bytes"] < 1.5 * whole / 8, (res, whole)

def test_aot_check_adamerging_step_on_8_devices():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("task", 2)])
  config = ml_collections.ConfigDict(dict(aot=dict(
      num_params="0", width=64, layers=2, vocab=128, num_tasks=4,
      dtype="float32", task_axis="task", batch=8, seq_len=16, classes=3)))
  step, (state, consts, batch) = aot_check.adamerging_step(config, mesh)
  # Task vectors split over fsdp and task; every task's batch over data
  # and fsdp; coefficients (one [T] per leaf) replicated.
  kernel = consts["tvs"]["layer_0"]["mlp"]["in"]["kernel"]
  assert kernel.sharding.shard_shape(kernel.shape) == (2, 64, 128)
  tokens = batch["task0"]["tokens"]
  assert tokens.sharding.shard_shape(tokens.shape) == (2, 16)
  assert state["params"]["layer_1"]["attn"]["qkv"]["bias"].shape == (4,)
  res = aot_check.check(config, mesh, "adamerging")
  assert res["num_devices"] == 8
  # The donated state aliases its output.
  assert res["alias_size_in_bytes"] > 0
  assert res["peak_estimate_bytes"] >= res["argument_size_in_bytes"]


def test_aot_check_helpers():
  assert aot_check.parse_count("1.5B") == 1_500_000_000
  assert aot_check.parse_count("125M") == 125_000_000
  shapes = aot_check.transformer_shapes(aot_check.width_for(
      110_000_000, 12, 30522), 12, 30522)
  n = sum(int(np.prod(s)) for s in shapes.values())
  assert abs(n - 110e6) / 110e6 < 0.05, n  # BERT-base-sized
  from mtmerge import testing
  assert aot_check.resolve_step("mtmerge.testing:shard") is testing.shard
  with pytest.raises(ValueError, match="unknown step 'train'"):
    aot_check.resolve_step("train")


def test_aot_check_cli_reexecs_with_fake_devices():
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "MTMERGE_AOT_REEXEC")}
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "aot_check.py"),
       "--num_devices", "4", "--mesh", "fsdp:-1", "--width", "64",
       "--layers", "1", "--vocab", "64", "--num_tasks", "2"],
      env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "on 4 devices, mesh {'fsdp': 4}" in out.stdout
  assert "output_size_in_bytes" in out.stdout


def test_aot_check_indivisible_batch_is_one_line(capsys):
  rc = aot_check.main(["--num_devices", "8", "--step", "adamerging",
                       "--mesh", "fsdp:-1", "--width", "64", "--layers", "1",
                       "--vocab", "64", "--num_tasks", "2", "--batch", "12"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "\n" not in err, err
  assert err == ("aot_check: error: global batch size 12 is not a positive "
                 "multiple of the 8 batch shards of data axes (fsdp=8); use "
                 "a multiple of 8")


def test_aot_memory_table_and_previous_rows(tmp_path):
  """benchmarks/aot_memory.py: one aot_check process per method and
  setting, a table of peak / arguments, and `--previous` rows kept."""
  script = os.path.join(ROOT, "benchmarks", "aot_memory.py")
  common = ["--num_params", "2M", "--num_devices", "8", "--num_tasks", "2",
            "--settings", "accelerator-like"]
  first = str(tmp_path / "first")
  subprocess.run([sys.executable, script, *common, "--methods",
                  "task_arithmetic,weight_averaging", "--out", first],
                 check=True, capture_output=True, timeout=600)
  second = str(tmp_path / "second")
  subprocess.run([sys.executable, script, *common, "--methods",
                  "weight_averaging", "--previous", first + ".json",
                  "--out", second], check=True, capture_output=True,
                 timeout=600)
  import json
  with open(second + ".json") as f:
    res = json.load(f)
  assert [r["spec"] for r in res["results"]] == ["task_arithmetic",
                                                 "weight_averaging"]
  for r in res["results"]:
    cell = r["accelerator-like"]
    assert 0 < cell["argument_size_in_gib"] <= cell["peak_estimate_gib"]
  with open(second + ".txt") as f:
    text = f.read()
  assert "| task arithmetic | " in text and "x) |" in text
  bad = subprocess.run([sys.executable, script, *common[:2], "--methods",
                        "task_arithmetic", "--previous", first + ".json"],
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "was run with" in bad.stderr
