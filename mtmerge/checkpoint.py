"""Training checkpoints through orbax: save, resume, and config fingerprints.

One `Run` directory holds an orbax `CheckpointManager` (step checkpoints,
each written to a temp dir and renamed, so a crash never leaves a
half-written one visible), a `config.json` fingerprint written atomically
when the run starts, and a `final` checkpoint whose presence marks the run
finished. Opening a directory whose fingerprint differs from the caller's
config is an error naming the differing keys: a checkpoint from another
config is never silently resumed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mtmerge import results


class ConfigMismatchError(ValueError):
  """A run directory was created by a different config."""


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
      out += _diff(a[k], b[k], f"{prefix}{k}.")
    elif a.get(k, "<absent>") != b.get(k, "<absent>"):
      out.append(f"{prefix}{k}: {a.get(k, '<absent>')!r} -> "
                 f"{b.get(k, '<absent>')!r}")
  return out


def _abstract(tree: Any) -> Any:
  """Shape/dtype placeholders of `tree`, the restore target orbax needs.

  Leaves that are `jax.Array`s keep their sharding, so a sharded train
  state is restored straight into its shards on every host; leaves that are
  `jax.ShapeDtypeStruct`s are used as given.
  """
  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x  # already abstract (e.g. `train.abstract_state`)
    sh = x.sharding if isinstance(x, jax.Array) else None
    dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
    return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sh)
  return jax.tree.map(one, tree)


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, sort_keys=True, default=str))


class Run:
  """Checkpoints of one training run in `directory`.

  Args:
    directory: the run's directory (created).
    fingerprint: JSON-able description of everything that determines the
      result (config values, model and data names).
    max_to_keep: step checkpoints kept (the newest ones).
  """

  def __init__(self, directory: str, fingerprint: dict, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    self.fingerprint = _jsonable(fingerprint)
    path = os.path.join(self.directory, "config.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        old = json.load(f)
      if old != self.fingerprint:
        raise ConfigMismatchError(
            f"{self.directory} holds a run of a different config ("
            + "; ".join(_diff(old, self.fingerprint)[:6]) +
            "); use another workdir or delete it")
    else:
      results.write_json(path, self.fingerprint)
    self.manager = ocp.CheckpointManager(
        os.path.join(self.directory, "steps"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  @property
  def final_path(self) -> str:
    return os.path.join(self.directory, "final")

  def done(self) -> bool:
    """True once `finish` has written the final checkpoint."""
    return os.path.isdir(self.final_path)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Saves `state` (any pytree of arrays) at `step`, blocking."""
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, like: Any) -> Any:
    """Restores step `step` into the structure (and dtypes) of `like`."""
    return self.manager.restore(
        step, args=ocp.args.StandardRestore(_abstract(like)))

  def finish(self, params: Any) -> None:
    """Writes the final params (atomically: orbax renames a temp dir)."""
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(self.final_path, params, force=True)

  def load_final(self, like: Any) -> Any:
    """The final params, restored into the structure of `like`."""
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(self.final_path, _abstract(like))

  def close(self) -> None:
    self.manager.close()
