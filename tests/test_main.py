"""The default benchmark runs end to end (runlocal) and writes its results;
the weight-space demo config still runs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from configs import demo as demo_config
from mtmerge import benchmark
from mtmerge import demo
from mtmerge import encoders
from mtmerge.data import pipeline
from mtmerge.data import prompts
from mtmerge.data import suites

import job_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli_runlocal(tmp_path):
  """README command 1's job, `configs/default.py:runlocal`, as a user runs
  it (`job_helpers.run_main`: a fresh process on one CPU device). Returns
  results.json."""
  stdout, out = job_helpers.run_main("configs/default.py:runlocal",
                                     tmp_path / "run", tmp_path / "cache")
  # Per-stage progress lines, then the table.
  for stage in ("[1/5", "[2/5", "[3/5", "[4/5", "[5/5"):
    assert stage in stdout, stdout[-2000:]
  assert "wall time" in stdout
  return out


def test_default_benchmark_runlocal(tmp_path, monkeypatch):
  config = default.get_config("runlocal")
  out = _cli_runlocal(tmp_path)
  # The checks below read the data sets the job prepared.
  monkeypatch.setenv("MTMERGE_CACHE", str(tmp_path / "cache"))
  methods = [r["method"] for r in out["rows"]]
  # runlocal runs every training-free and learned method of the default.
  assert methods == (["zero-shot", "individual"] +
                     [m.get("label") or m["method"].split("(")[0]
                      for m in default.METHODS] +
                     [m["label"] for m in default.LEARNED])
  for r in out["rows"]:
    for t in config.tasks:
      assert 0.0 <= r[t] <= 100.0
  indiv = out["rows"][1]
  assert indiv["norm"] == pytest.approx(100.0)
  # The zero-shot row, recomputed directly: cosine of each test input's
  # embedding to every class's mean normalized prompt embedding.
  enc = encoders.load(config.model, num_layers=config.num_layers)
  feats = jax.jit(enc.features)
  embed = lambda texts: np.asarray(feats(enc.params, {
      k: v for k, v in enc.tokenizer(texts, max_length=32).items()
      if k in ("input_ids", "attention_mask")}), np.float64)
  for t in config.tasks:
    names, templates = prompts.text_prompts(t)
    classes = []
    for name in names:
      e = embed([tpl.format(name) for tpl in templates])
      m = (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(0)
      classes.append(m / np.linalg.norm(m))
    src = suites.load_split(t, "test")
    n = min(len(src), config.eval.limits.test)
    x = embed([pipeline.as_text(src[i]["text"]) for i in range(n)])
    pred = np.argmax(x @ np.stack(classes).T, axis=1)
    labels = np.asarray([src[i]["label"] for i in range(n)])
    assert out["rows"][0][t] == pytest.approx(100 * np.mean(pred == labels),
                                              abs=0.01), t
  assert out["tasks"] == list(config.tasks)
  png = (tmp_path / "run" / "results.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  assert (tmp_path / "run" / "results.csv").read_text().startswith("method,")
  # Hyperparameters were chosen from the configured grid on validation.
  ta = out["rows"][methods.index("task_arithmetic")]
  assert ta["hparams"] in ("scaling_factor=0.3", "scaling_factor=0.5")
  assert max(g["val"] for g in ta["grid"]) == ta["val"]
  # The learned rows trained (checkpointed, with their logs) and were
  # evaluated.
  logs = list((tmp_path / "run" / "learned").glob(
      "*/adamerging(layer)*/train_log.json"))
  assert len(logs) == 1, logs
  assert [r["step"] for r in json.loads(logs[0].read_text())] == [1, 2]


def test_config_errors_exit_cleanly(tmp_path):
  env = dict(os.environ, MTMERGE_CACHE=str(tmp_path / "cache"),
             PYTHONPATH=REPO)
  bad = tmp_path / "bad_config.py"
  bad.write_text(
      "from configs import default\n"
      "def get_config(arg=None):\n"
      "  c = default.get_config('runlocal')\n"
      "  c.methods = [dict(method='ties_merging(threshold=2.0)')]\n"
      "  return c\n")
  cmd = [sys.executable, "-m", "mtmerge.main", "--config", str(bad),
         "--workdir", str(tmp_path / "w")]
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 2, p.stderr[-2000:]
  assert "threshold" in p.stderr and "Traceback" not in p.stderr
  assert not os.path.exists(tmp_path / "w" / "finetune")  # nothing started


def test_unknown_task_is_a_config_error(tmp_path):
  config = default.get_config("runlocal")
  config.tasks = ["sentiment", "no_such_task"]
  with pytest.raises(benchmark.ConfigError, match="no_such_task"):
    benchmark.run(config, str(tmp_path))


def test_demo_config_runlocal(tmp_path):
  config = demo_config.get_config("runlocal")
  rows = demo.run(config, str(tmp_path))
  assert [r["method"].split("(")[0] for r in rows[:-1]] == [
      "task_arithmetic", "ties_merging", "ties_merging"]
  ta = rows[0]
  assert 0.3 < ta["retention"] < 1.2
  assert ta["density"] == pytest.approx(1.0, abs=1e-3)


def test_config_rejects_unknown_argument():
  with pytest.raises(ValueError, match="unknown config argument"):
    default.get_config("runlocl")
  with pytest.raises(ValueError, match="unknown config argument"):
    demo_config.get_config("runlocl")


def test_notebook_runs_the_same_run_function(tmp_path, monkeypatch):
  """The notebook's code cells (minus installs) execute as written."""
  nb = json.loads(open(os.path.join(REPO, "notebooks",
                                    "quickstart.ipynb")).read())
  code = [c["source"] for c in nb["cells"] if c["cell_type"] == "code"]
  # Execute the last cell (library composition) for real; the benchmark
  # cells are what test_default_benchmark_runlocal runs.
  ns = {}
  exec(code[-1], ns)  # noqa: S102
  assert set(ns["merged"]) == set(ns["base"])


@pytest.mark.parametrize("entry,match", [
    (dict(method="adamerging(gran='task')"), "unknown parameter 'gran'"),
    (dict(method="adamergin"), "unknown learned method 'adamergin'"),
    (dict(method="adamerging", train=dict(stepz=3)),
     "unknown training option"),
    (dict(method="adamerging", train=dict(mesh=[("data", 3)])),
     "need a multiple of 3 devices"),
    (dict(method="adamerging(batch_size=12)"),
     "batch_size=12 does not divide over the 8 data shards"),
])
def test_bad_learned_entries_fail_before_work(tmp_path, entry, match):
  config = default.get_config("runlocal")
  config.learned = [entry]
  with pytest.raises(benchmark.ConfigError, match=match):
    benchmark.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "finetune").exists()
