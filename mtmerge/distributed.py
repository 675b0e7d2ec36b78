"""Multi-host setup: initialize only when needed, per-host data, global arrays.

Every mtmerge entry point calls `maybe_initialize()` first. On one CPU
process (a laptop, a test, Colab) it does nothing and returns False; on a TPU
pod worker, under SLURM or Open MPI, or when told the coordinator explicitly,
it calls `jax.distributed.initialize` so all hosts see one global device set.

Detection reuses JAX's own cluster auto-detection (`jax._src.clusters`: GCE
and GKE TPU VMs, SLURM, Open MPI, Kubernetes; mpi4py is opt-in there and here)
instead of re-deriving environment variables, plus mtmerge's explicit
variables `MTMERGE_COORDINATOR`, `MTMERGE_NUM_PROCESSES`, `MTMERGE_PROCESS_ID`
(and JAX's `JAX_COORDINATOR_ADDRESS`) for clusters JAX does not know.

Data follows the multi-controller model of JAX's distributed data loading
guide: each host reads its own slice of the data (`host_local_slice`) and
`global_batch` stitches the per-host arrays into one global `jax.Array` with
`jax.make_array_from_process_local_data`. Only the main process logs and
writes (`is_main`).

Hazard (measured, see DATA.md): with several devices per process, leaving a
loop of collective steps in flight can deadlock; training loops block on each
step's result.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import numpy as np

Tree = Any

ENV_COORDINATOR = "MTMERGE_COORDINATOR"
ENV_NUM_PROCESSES = "MTMERGE_NUM_PROCESSES"
ENV_PROCESS_ID = "MTMERGE_PROCESS_ID"
ENV_TIMEOUT = "MTMERGE_INIT_TIMEOUT"


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an "
                     "integer") from None


def detect_cluster() -> str | None:
  """Name of the cluster environment JAX would auto-detect, or None.

  Uses the same list and order as `jax.distributed.initialize()` (opt-in
  methods such as mpi4py excluded). A JAX version without that private
  module counts as no cluster: explicit settings still work.
  """
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    # pylint: disable-next=protected-access
    types = list(clusters.ClusterEnv._cluster_types)
  except (ImportError, AttributeError):
    return None
  for env in types:
    if getattr(env, "opt_in_only_method", False):
      continue
    try:
      if env.is_env_present():
        return env.__name__
    except Exception as e:  # pylint: disable=broad-except
      # A probe failing (e.g. an unreachable metadata server) means that
      # environment is not usable, not that the program should stop.
      logging.debug("cluster probe %s failed: %r", env.__name__, e)
  return None


def _backend_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def maybe_initialize(coordinator_address: str | None = None,
                     num_processes: int | None = None,
                     process_id: int | None = None, *, force: bool = False,
                     initialization_timeout: int | None = None,
                     local_device_ids: Sequence[int] | None = None) -> bool:
  """Calls `jax.distributed.initialize` when a multi-process run is detected.

  Multi-process means any of: an explicit argument, one of the environment
  variables `MTMERGE_COORDINATOR` / `MTMERGE_NUM_PROCESSES` /
  `MTMERGE_PROCESS_ID` / `JAX_COORDINATOR_ADDRESS`, a cluster JAX
  auto-detects (`detect_cluster()`), or `force=True`. Arguments win over
  environment variables; whatever is still unset is left to JAX's
  auto-detection. `num_processes=1` (unless forced) is a single process
  and a no-op.

  Args:
    coordinator_address: `host:port` of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: this process's index in `[0, num_processes)`.
    force: initialize even if nothing was detected (JAX then raises if it
      cannot work out the missing values).
    initialization_timeout: seconds to wait for all processes to connect
      (default `$MTMERGE_INIT_TIMEOUT`, else 300).
    local_device_ids: restricts this process to these local devices.

  Returns:
    True if the distributed runtime is initialized (now or earlier), False
    for a plain single process.

  Raises:
    RuntimeError: initialization is needed but a JAX backend was already
      created (any `jax.devices()` or computation runs first).
    ValueError: inconsistent explicit settings.
  """
  if jax.distributed.is_initialized():
    return True  # idempotent: a second call (e.g. main, then a job) is fine
  coordinator_address = (coordinator_address or
                         os.environ.get(ENV_COORDINATOR) or None)
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  if initialization_timeout is None:
    initialization_timeout = _env_int(ENV_TIMEOUT) or 300
  jax_coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  explicit = (coordinator_address is not None or num_processes is not None
              or process_id is not None or jax_coordinator is not None)
  complete = ((coordinator_address or jax_coordinator) is not None and
              num_processes is not None and process_id is not None)
  # Probe the cluster only when something is still unknown: on a TPU VM the
  # probe asks the metadata server.
  cluster = None if complete else detect_cluster()
  if not (force or cluster or explicit):
    return False
  if num_processes == 1 and not force:
    return False  # one process needs no coordinator
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if (num_processes is not None and process_id is not None and
      not 0 <= process_id < num_processes):
    raise ValueError(f"process_id {process_id} is outside [0, "
                     f"{num_processes}) (set {ENV_PROCESS_ID} per process)")
  if not (complete or cluster or force):
    missing = [name for name, v in (
        (ENV_COORDINATOR, coordinator_address or jax_coordinator),
        (ENV_NUM_PROCESSES, num_processes), (ENV_PROCESS_ID, process_id))
               if v is None]
    raise ValueError(
        "multi-process run requested but no cluster was detected and "
        f"{', '.join(missing)} (or the matching maybe_initialize "
        "arguments) are unset; give all three of coordinator address, "
        "number of processes and process id")
  if _backend_started():
    raise RuntimeError(
        "mtmerge.distributed.maybe_initialize() must run before JAX creates "
        "its backend, but a backend already exists (something called "
        "jax.devices(), created an array or ran a computation first); call "
        "it at the very start of the program")
  logging.info("initializing jax.distributed (cluster=%s, coordinator=%s, "
               "num_processes=%s, process_id=%s)", cluster,
               coordinator_address, num_processes, process_id)
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, local_device_ids=local_device_ids,
      initialization_timeout=initialization_timeout)
  return True


def process_index() -> int:
  """This process's index (0 on a single process)."""
  return jax.process_index()


def process_count() -> int:
  """Number of processes (hosts) in the run."""
  return jax.process_count()


def is_main() -> bool:
  """True on the process that logs and writes files (process 0)."""
  return jax.process_index() == 0


def host_local_slice(n: int, *, drop_remainder: bool = True,
                     index: int | None = None, count: int | None = None
                     ) -> slice:
  """The contiguous part of `range(n)` this host reads.

  Args:
    n: number of items (examples, files, shards) to split across hosts.
    drop_remainder: True gives every host `n // count` items (the last
      `n % count` are dropped) so all hosts run the same number of steps, as
      lock-step training needs. False splits all `n` items with sizes
      differing by at most one (evaluation, where per-host results are
      summed).
    index, count: override `process_index()` / `process_count()`.

  Returns:
    A `slice` into `range(n)`.
  """
  index = process_index() if index is None else index
  count = process_count() if count is None else count
  if n < 0 or not 0 <= index < count:
    raise ValueError(f"bad split: n={n}, index={index}, count={count}")
  if drop_remainder:
    size = n // count
    if size == 0:
      raise ValueError(f"{n} items cannot be split over {count} hosts "
                       "without leaving some host empty")
    return slice(index * size, (index + 1) * size)
  base, extra = divmod(n, count)
  start = index * base + min(index, extra)
  return slice(start, start + base + (index < extra))


def global_batch(local_arrays: Tree, mesh: jax.sharding.Mesh,
                 spec: jax.sharding.PartitionSpec | Sequence[Any]) -> Tree:
  """Builds global arrays from this host's part of a batch.

  Args:
    local_arrays: pytree of host-local numpy arrays; their leading dim is the
      rows this host holds (`global batch * addressable fraction`).
    mesh: the global mesh.
    spec: PartitionSpec of every leaf (or a tuple turned into one), usually
      `P(('data',))` or `sharding.batch_sharding(mesh).spec`.

  Returns:
    The same pytree of global `jax.Array`s sharded as `spec` over `mesh`.
  """
  from mtmerge import tree as tree_lib  # pylint: disable=g-import-not-at-top
  if not isinstance(spec, jax.sharding.PartitionSpec):
    spec = jax.sharding.PartitionSpec(*spec)
  sharding = jax.sharding.NamedSharding(mesh, spec)

  def one(path, x):
    try:
      return jax.make_array_from_process_local_data(sharding, x)
    except (ValueError, TypeError) as e:
      raise ValueError(
          f"cannot build a global array for batch leaf {path or '<root>'!r} "
          f"of local shape {getattr(x, 'shape', None)} with spec {spec} on "
          f"mesh {dict(mesh.shape)} from process {process_index()} of "
          f"{process_count()}: {e}") from None

  return tree_lib.map_with_path(one, local_arrays)


def put_global(tree: Tree, shardings: Tree) -> Tree:
  """Global arrays from a full host-local copy present on every process.

  For small trees every host holds whole (coefficients, a tiny model, values
  read from a file all hosts share): each process fills only the shards its
  devices own, so nothing crosses hosts. Large models should be restored
  from a checkpoint into sharded targets instead.

  Args:
    tree: pytree of numpy arrays (identical on every process).
    shardings: matching pytree of `Sharding`s (or one for all leaves).

  Returns:
    Pytree of global `jax.Array`s.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  return jax.tree.map(one, tree, shardings)
