"""A tiny learned merge run the same way on 1 process or on N processes.

AdaMerging-style (Yang et al., 2024, "AdaMerging: Adaptive Model Merging for
Multi-Task Learning"): task-wise coefficients `lam` of 3 task vectors are
learned by `mtmerge.train.fit` (Adam) on the prediction entropy of the
merged linear model over unlabeled batches. Params are sharded over an
`fsdp` axis, task vectors over the task axis, batches over `data`; every
host feeds only its slice of each batch and the trainer assembles the
global array with `jax.make_array_from_process_local_data`.

`tests/test_distributed.py` imports `learned_merge` to run it in the pytest
process (8 devices) and spawns this file as a script, once per process:

  python tests/multiprocess_worker.py --process_id I --num_processes 2 \
      --port PORT --local_devices 4 --out result_I.json [--via_env]

With `--merge JOBS.json` it instead runs streamed merges
(`mtmerge.streaming.merge_files` over the global mesh): every process reads
only its rows and writes its part of each output, as
`tests/test_streaming_mesh.py` checks against one process.
"""

import argparse
import json
import os
import re
import sys

MESH = [("data", -1), ("fsdp", 2), ("task", 1)]
RULES = [("w", (None, "fsdp")), (".*", None)]
D_IN, D_OUT, TASKS, BATCH, STEPS = 16, 8, 3, 16, 4


def problem():
  """Base params, stacked task vectors and the STEPS global batches."""
  import numpy as np
  rng = np.random.default_rng(0)
  f32 = np.float32
  base = {"w": (rng.standard_normal((D_IN, D_OUT)) * 0.5).astype(f32),
          "b": np.zeros(D_OUT, f32)}
  tvs = {"w": (rng.standard_normal((TASKS, D_IN, D_OUT)) * 0.5).astype(f32),
         "b": (rng.standard_normal((TASKS, D_OUT)) * 0.3).astype(f32)}
  data = rng.standard_normal((STEPS, BATCH, D_IN)).astype(f32)
  return base, tvs, data


def learned_merge(mesh):
  """Runs STEPS steps of `mtmerge.train.fit`; returns (coefficients, losses)."""
  import numpy as np
  from mtmerge import distributed, sharding, train
  from mtmerge.learned import common

  base, tvs, data = problem()
  local_rows = sharding.check_batch_divides(BATCH, mesh, "data")
  rows = distributed.host_local_slice(BATCH)
  assert rows.stop - rows.start == local_rows, (rows, local_rows)
  # The block fine-tuning's per-host Batcher reads (finetune.finetune_task).
  index, count = sharding.data_shard(BATCH, mesh, "data")
  assert (index * local_rows, count * local_rows) == (rows.start, BATCH)

  def loss_fn(lam, k, x, rng):
    del rng
    merged = common.weighted_merge(k["base"], k["tvs"], lam)
    return common.entropy(x @ merged["w"] + merged["b"]), {}

  objective = train.Objective(np.full((TASKS,), 0.3, np.float32), loss_fn,
                              {"base": base, "tvs": tvs})
  cfg = train.TrainConfig.from_dict(dict(
      steps=STEPS, lr=0.05, mesh=MESH, data_axes=("data",)))
  # Every host feeds only its rows of each global batch.
  res = train.fit(objective, lambda step: data[step][rows], cfg, mesh=mesh,
                  const_shardings=common.const_shardings(
                      mesh, objective.consts, RULES), progress=False)
  return np.asarray(res.params), [r["loss"] for r in res.log]


def streamed_merges(jobs_file):
  """Runs each job `{method, base, models, out, max_memory, hparams}`."""
  from mtmerge import streaming
  with open(jobs_file) as f:
    jobs = json.load(f)
  done = []
  for job in jobs:
    info = streaming.merge_files(
        job["method"], job["base"], job["models"], job["out"],
        max_memory=job["max_memory"], progress=False, mesh="data:-1",
        **job["hparams"])
    done.append({"out": info["out"], "devices": info["devices"],
                 "processes": info["processes"], "passes": info["passes"]})
  return done


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--local_devices", type=int, default=4)
  parser.add_argument("--out", required=True)
  parser.add_argument("--via_env", action="store_true",
                      help="pass the coordinator in MTMERGE_* variables")
  parser.add_argument("--merge", default=None,
                      help="JSON list of streamed merge jobs to run instead")
  args = parser.parse_args()
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = (
      f"{flags} --xla_force_host_platform_device_count={args.local_devices}"
  ).strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  from mtmerge import distributed, sharding  # after XLA_FLAGS
  if args.via_env:
    os.environ.update(MTMERGE_COORDINATOR=f"localhost:{args.port}",
                      MTMERGE_NUM_PROCESSES=str(args.num_processes),
                      MTMERGE_PROCESS_ID=str(args.process_id),
                      MTMERGE_INIT_TIMEOUT="30")
    assert distributed.maybe_initialize()
  else:
    assert distributed.maybe_initialize(
        f"localhost:{args.port}", args.num_processes, args.process_id,
        initialization_timeout=30)
  assert distributed.maybe_initialize()  # idempotent
  import jax
  assert distributed.process_count() == args.num_processes
  assert distributed.is_main() == (args.process_id == 0)
  assert jax.local_device_count() == args.local_devices
  if args.merge:
    merged = streamed_merges(args.merge)
    if distributed.is_main():
      with open(args.out, "w") as f:
        json.dump(merged, f)
    return
  mesh = sharding.make_mesh(MESH)
  lam, losses = learned_merge(mesh)
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"lam": lam.tolist(), "losses": losses,
               "process_index": distributed.process_index(),
               "device_ids": [int(d.id) for d in mesh.devices.flat],
               "device_processes": [int(d.process_index)
                                    for d in mesh.devices.flat]}, f)
  os.replace(tmp, args.out)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
