"""Atomic output: a file or directory appears whole or not at all.

`atomic_write(dest, write, is_dir)` runs `write(tmp)` on a hidden temp
sibling of `dest` and renames (or, for a directory that exists, swaps) it
into place; a killed run leaves only a temp sibling, removed by the next
write to the same destination. A full disk is one `CheckpointError` line.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import uuid

from mtmerge.safetensors_layout import CheckpointError
from mtmerge.safetensors_layout import first_line

def disk_bytes(path: str) -> int:
  """Size of a file, or of all files under a directory."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, n))
             for d, _, names in os.walk(path) for n in names)


def _sibling(dest: str, tag: str) -> str:
  head, name = os.path.split(dest)
  return os.path.join(head, f".{name}.{tag}-{os.getpid()}-"
                      f"{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # EPERM: alive, another user's
    return True
  return True


def remove_stale_temps(dest: str) -> None:
  """Removes temp siblings of `dest` left by killed runs (dead pids only)."""
  head, name = os.path.split(dest)
  pat = re.compile(rf"^\.{re.escape(name)}\.tmp-(\d+)-[0-9a-f]{{8}}$")
  try:
    names = os.listdir(head)
  except OSError:
    return
  for n in names:
    m = pat.match(n)
    if m and int(m.group(1)) != os.getpid() and not _pid_alive(
        int(m.group(1))):
      _remove(os.path.join(head, n))


def _remove(path: str) -> None:
  """Best-effort removal of a temp file or directory; never raises."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    try:
      os.remove(path)
    except OSError:
      pass


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE).

  Returns:
    False where the call is unavailable (other systems, old kernels or
    file systems), and nothing was changed.
  """
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
        rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), b)


def free_bytes(path: str) -> int:
  """Free bytes on the file system holding `path` (its nearest parent)."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def _write_error(dest: str, e: OSError) -> CheckpointError:
  if e.errno == errno.ENOSPC:
    return CheckpointError(
        f"no space left on device writing {dest} ({free_bytes(dest) >> 20} "
        "MiB free there); nothing was written")
  return CheckpointError(f"cannot write {dest} ({first_line(e)})")


def atomic_write(dest: str, write, is_dir: bool) -> str:
  """Runs `write(tmp)` on a temp sibling of `dest`, then swaps it in.

  A run killed at any point leaves `dest` as it was (absent, or the old
  output); the hidden temp sibling it may leave is removed by the next
  write to the same destination. Replacing a directory swaps it atomically
  where the OS can (renameat2), else renames the old one aside first.
  """
  dest = os.path.abspath(os.fspath(dest))
  parent = os.path.dirname(dest)
  if not os.path.isdir(parent):
    raise CheckpointError(f"output directory {parent} does not exist")
  if not is_dir and os.path.isdir(dest):
    raise CheckpointError(f"output {dest} is a directory but the base is a "
                          "single .safetensors file")
  remove_stale_temps(dest)
  tmp = _sibling(dest, "tmp")
  try:
    if is_dir:
      os.mkdir(tmp)
    write(tmp)
    if os.path.lexists(dest) and (is_dir or os.path.isdir(dest)):
      if _exchange(tmp, dest):
        _remove(tmp)  # now the old output
        return dest
      old = _sibling(dest, "old")
      os.rename(dest, old)
      try:
        os.replace(tmp, dest)
      except BaseException:
        os.rename(old, dest)
        raise
      _remove(old)
    else:
      os.replace(tmp, dest)
  except BaseException as e:
    _remove(tmp)
    if isinstance(e, OSError):
      raise _write_error(dest, e) from None
    raise
  return dest
