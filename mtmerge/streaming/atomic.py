"""An atomic output written by several JAX processes at once.

`atomic_files.atomic_write` runs `write(tmp)` on a hidden temp sibling
of the destination, then renames it into place. With several processes
(`jax.distributed`), process 0 owns that sequence: it picks the temp name
and tells the others (`broadcast_one_to_all`), creates and preallocates
the files (`writer.Output(create=True)`), and after a barrier every process
writes its own rows with `pwrite`; a second barrier waits for all of them
to sync, then process 0 renames, and a last barrier lets every process
return only once the output exists. The destination must be on a
filesystem every process sees (the same machine, NFS, a cluster FS).

Limitation: a process that fails stops taking part in the barriers, so
the others wait until JAX's distributed runtime times out (or the launcher
stops the job); the temp sibling is removed by the next write to the same
destination (`atomic_files.remove_stale_temps`).
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np

from mtmerge import atomic_files

_NAME_BYTES = 4096


def barrier(name: str) -> None:
  """Blocks until every process reaches the barrier `name`."""
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(name)


def _share(text: str) -> str:
  """Process 0's `text`, on every process."""
  from jax.experimental import multihost_utils
  raw = text.encode()
  if len(raw) > _NAME_BYTES:
    raise ValueError(f"path too long to share between processes: {text}")
  buf = np.zeros(_NAME_BYTES, np.uint8)
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  got = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
  return got.tobytes().rstrip(b"\0").decode()


def write(dest: str, write_fn: Callable[[str], None], is_dir: bool) -> str:
  """`write_fn(tmp)` on every process; process 0 makes `dest` appear whole.

  `write_fn` must pass `barrier('mtmerge-output-created')` once process 0
  has created the files (process 0 after `writer.Output(create=True)`, the
  others before opening them) and return once its own part is synced.

  Returns:
    The absolute destination path.
  """
  dest = os.path.abspath(os.fspath(dest))
  if jax.process_index() == 0:
    def first(tmp):
      _share(tmp)
      write_fn(tmp)
      barrier("mtmerge-output-written")
    try:
      out = atomic_files.atomic_write(dest, first, is_dir=is_dir)
    finally:
      barrier("mtmerge-output-renamed")
    return out
  tmp = _share("")
  try:
    write_fn(tmp)
    barrier("mtmerge-output-written")
  finally:
    barrier("mtmerge-output-renamed")
  return dest
