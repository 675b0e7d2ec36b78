"""Multi-host setup: a 2-process run on CPU equals one 8-device process.

The two-process test spawns `multiprocess_worker.py` twice (4 fake CPU
devices each, localhost coordinator), and compares their learned merge
coefficients with the same computation on this process's 8 devices. Workers
are bounded by a hard deadline and killed with SIGKILL (JAX traps SIGTERM).
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multiprocess_worker as worker
from mtmerge import distributed, sharding

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 90


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def wait_all(procs) -> None:
  """Waits for every process until one shared deadline of DEADLINE_S."""
  deadline = time.monotonic() + DEADLINE_S
  for p in procs:
    try:
      p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      break


def stop_all(procs, logs) -> None:
  """Kills whatever still runs (a hung worker) and closes the logs."""
  for p in procs:
    _kill(p)
  for log in logs:
    log.close()


def _kill(proc):
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    proc.wait()


def _run_workers(tmp_path, num_processes=2, local_devices=4):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(
                 [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
             MTMERGE_COMPILE_CACHE="0")
  for k in ("MTMERGE_COORDINATOR", "MTMERGE_NUM_PROCESSES",
            "MTMERGE_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
    env.pop(k, None)
  procs, logs = [], []
  try:
    for i in range(num_processes):
      log = open(tmp_path / f"worker{i}.log", "w")  # a file: pipes can fill
      logs.append(log)
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, "--process_id", str(i),
           "--num_processes", str(num_processes), "--port", str(port),
           "--local_devices", str(local_devices),
           "--out", str(tmp_path / f"result{i}.json")]
          # Process 0 gets explicit arguments, the others MTMERGE_* variables.
          + (["--via_env"] if i else []),
          env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
          start_new_session=True))
    wait_all(procs)
  finally:
    stop_all(procs, logs)
  outputs = [(tmp_path / f"worker{i}.log").read_text()[-3000:]
             for i in range(num_processes)]
  for i, p in enumerate(procs):
    if p.returncode != 0:
      pytest.fail(f"worker {i} exited with {p.returncode} (-9: killed at "
                  f"the {DEADLINE_S} s deadline); log tail:\n{outputs[i]}")
  import json
  return [json.loads((tmp_path / f"result{i}.json").read_text())
          for i in range(num_processes)]


def test_two_processes_match_one_process(tmp_path):
  results = _run_workers(tmp_path)
  mesh = sharding.make_mesh(worker.MESH)
  lam, losses = worker.learned_merge(mesh)
  assert [r["process_index"] for r in results] == [0, 1]
  # Both hosts built the same 8-device global mesh.
  assert results[0]["device_ids"] == results[1]["device_ids"]
  assert len(set(results[0]["device_ids"])) == 8
  # Hosts own contiguous blocks of the data axis (so host_local_slice matches
  # the rows global_batch places on each host's devices).
  assert results[0]["device_processes"] == [0, 0, 0, 0, 1, 1, 1, 1]
  # One process reads every row (the workers assert their half).
  assert sharding.data_shard(worker.BATCH, mesh, "data") == (0, 1)
  # Learning moved the coefficients (so the comparison below is not vacuous).
  assert np.max(np.abs(lam - 0.3)) > 0.05, lam
  assert losses[-1] < losses[0], losses
  for r in results:
    np.testing.assert_allclose(r["lam"], lam, atol=1e-5, rtol=0)
    np.testing.assert_allclose(r["losses"], losses, atol=1e-5, rtol=0)


@pytest.fixture
def clean_env(monkeypatch):
  for k in ("MTMERGE_COORDINATOR", "MTMERGE_NUM_PROCESSES",
            "MTMERGE_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(k, raising=False)
  return monkeypatch


def test_single_process_is_a_noop(clean_env):
  if distributed.detect_cluster():
    pytest.skip(f"running inside a {distributed.detect_cluster()} cluster")
  assert distributed.maybe_initialize() is False
  assert distributed.maybe_initialize(num_processes=1) is False
  assert not jax.distributed.is_initialized()
  assert distributed.process_count() == 1 and distributed.is_main()


def test_incomplete_env_names_missing_variables(clean_env):
  clean_env.setenv("MTMERGE_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="MTMERGE_COORDINATOR.*"
                     "MTMERGE_PROCESS_ID"):
    distributed.maybe_initialize()
  with pytest.raises(ValueError, match="process_id 5 is outside"):
    distributed.maybe_initialize("localhost:1", 2, 5)


def test_too_late_is_a_clear_error(clean_env):
  jax.devices()  # the backend exists in this process
  with pytest.raises(RuntimeError, match="must run before JAX creates"):
    distributed.maybe_initialize("localhost:1", 2, 0)
  assert not jax.distributed.is_initialized()


def test_host_local_slice():
  # drop_remainder: equal sizes, trailing items dropped.
  got = [distributed.host_local_slice(10, index=i, count=3) for i in range(3)]
  assert [(s.start, s.stop) for s in got] == [(0, 3), (3, 6), (6, 9)]
  # Balanced: covers everything, sizes differ by at most one.
  got = [distributed.host_local_slice(10, drop_remainder=False, index=i,
                                      count=3) for i in range(3)]
  assert [(s.start, s.stop) for s in got] == [(0, 4), (4, 7), (7, 10)]
  assert distributed.host_local_slice(16) == slice(0, 16)
  with pytest.raises(ValueError, match="2 items cannot be split over 3"):
    distributed.host_local_slice(2, index=0, count=3)


def test_global_batch_single_process(mesh8):
  x = np.arange(32, dtype=np.float32).reshape(16, 2)
  g = distributed.global_batch({"x": x}, mesh8, ("x",))["x"]
  assert g.shape == (16, 2)
  assert g.sharding.spec == jax.sharding.PartitionSpec("x")
  np.testing.assert_array_equal(np.asarray(g), x)
  with pytest.raises(ValueError, match="batch leaf 'x' of local shape"):
    distributed.global_batch({"x": x[:3]}, mesh8, ("x",))
