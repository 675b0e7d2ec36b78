"""What the command line checks before it reads any tensor data.

* The output's form comes from the name given: `NAME.safetensors` is one
  file, any other name a directory (a file base written as a directory holds
  `model.safetensors`; a sharded base written as a file holds every tensor
  in one file, without the base directory's other files). A name that could
  mean either (`x.safetensors/`, or another weight suffix such as `.bin`) is
  refused, and so is a name whose existing path is of the other form.
* An existing output is replaced only with `--force`; an output that is, is
  inside, or contains an input (or the working directory) never is.
* Non-floating tensors (position ids) are copied from the base, so a model
  whose integer tensor has another dtype is refused instead of silently
  ignored; floating dtypes may differ (task vectors are float32).
* The file system must have room for the output (estimated from the base).

Every check raises `checkpoint_io.CheckpointError` with one line.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

from mtmerge import atomic_files
from mtmerge import checkpoint_io as cio

_FILE_SUFFIX = ".safetensors"
_OTHER_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                   ".json", ".npz", ".safetensor")
_SINGLE = "model.safetensors"


def output_form(out: str, compressed: bool = False) -> str:
  """'file' or 'dir', from the name given for `--out`.

  Raises:
    CheckpointError: an ambiguous name, or one that contradicts the kind of
      an existing path or of the method's output.
  """
  text = os.fspath(out)
  slash = text.endswith(("/", os.sep))
  name = os.path.basename(text.rstrip("/" + os.sep)).lower()
  hint = (f"give NAME{_FILE_SUFFIX} for one file or a name without a suffix "
          "for a directory")
  if name.endswith(_FILE_SUFFIX) and slash:
    raise cio.CheckpointError(f"ambiguous --out {text}: a {_FILE_SUFFIX} name "
                              f"with a trailing '/'; {hint}")
  if name.endswith(_OTHER_SUFFIXES):
    raise cio.CheckpointError(f"ambiguous --out {text}: only {_FILE_SUFFIX} "
                              f"files are written; {hint}")
  form = "file" if name.endswith(_FILE_SUFFIX) else "dir"
  if compressed and form == "file":
    raise cio.CheckpointError(
        f"--out {text} ends in {_FILE_SUFFIX} but a compressed method writes a "
        "directory (tau, bit-packed masks, compressed.json)")
  if form == "file" and os.path.isdir(text):
    raise cio.CheckpointError(f"--out {text} is an existing directory but a "
                              f"{_FILE_SUFFIX} name is written as one file")
  if form == "dir" and os.path.lexists(text) and not os.path.isdir(text):
    raise cio.CheckpointError(f"--out {text} is an existing file but a name "
                              f"without {_FILE_SUFFIX} is written as a "
                              "directory")
  return form


def _inside(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_destination(out: str, inputs: Mapping[str, str],
                      force: bool) -> None:
  """Refuses an output that would overwrite an input or an existing output.

  Args:
    out: `--out` as given.
    inputs: label (e.g. 'the base', 'model 1') -> input path.
    force: replace an existing output.
  """
  real = os.path.realpath(out)
  for label, path in inputs.items():
    p = os.path.realpath(path)
    if real == p:
      raise cio.CheckpointError(f"--out {out} is {label} ({path})")
    if _inside(real, p):
      raise cio.CheckpointError(f"--out {out} is inside {label} ({path})")
    if _inside(p, real):
      raise cio.CheckpointError(f"--out {out} contains {label} ({path}); "
                                "replacing it would delete that input")
  if _inside(os.path.realpath(os.getcwd()), real):
    raise cio.CheckpointError(f"--out {out} is or holds the working "
                              "directory")
  if os.path.lexists(out) and not force:
    raise cio.CheckpointError(f"--out {out} exists; pass --force to replace "
                              "it")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise cio.CheckpointError(f"output directory {parent} does not exist")


def _is_float(name: str) -> bool:
  dt = cio.np_dtype(name)
  return dt.kind in "fc" or dt.name.startswith(("bfloat", "float8"))


def check_dtypes(base: cio.Layout, models: Sequence[cio.Layout]) -> None:
  """A non-floating tensor must have the base's dtype in every model."""
  for i, m in enumerate(models):
    for k, want in base.dtypes.items():
      got = m.dtypes.get(k)
      if got is None or got == want or (_is_float(got) and _is_float(want)):
        continue  # a missing tensor is reported by the loader
      raise cio.CheckpointError(
          f"tensor {k!r} is {got} in model {i} ({m.source}) but {want} in the "
          f"base ({base.source}); non-floating tensors are copied from the "
          "base, so their dtypes must match")


def check_space(out: str, nbytes: int) -> None:
  """Refuses to start when the output's file system has less than `nbytes`."""
  free = atomic_files.free_bytes(os.path.dirname(os.path.abspath(out)))
  if nbytes > free:
    raise cio.CheckpointError(
        f"not enough space for --out {out}: it needs about "
        f"{-(-nbytes // 2**20)} MiB, {free // 2**20} MiB free there")


def output_layout(layout: cio.Layout, out: str, form: str) -> cio.Layout:
  """The base's layout, converted to the output form `form` if needed."""
  if (form == "file") == (layout.kind == "file"):
    return layout
  first = layout.file_metadata.get(layout.files[0], {}) if layout.files else {}
  name = os.path.basename(os.path.abspath(out)) if form == "file" else _SINGLE
  return dataclasses.replace(
      layout, kind=form, weight_map={k: name for k in layout.weight_map},
      index_name=None, index_metadata={}, file_metadata={name: dict(first)})


def compressed_bytes(layout: cio.Layout, num_tasks: int) -> int:
  """About what a compressed output takes: one vector plus T bit masks."""
  floats = [k for k, d in layout.dtypes.items() if _is_float(d)]
  n = sum(int(_numel(layout.shapes[k])) for k in floats)
  return layout.nbytes + num_tasks * (n // 8 + 8 * len(floats))


def _numel(shape) -> int:
  out = 1
  for d in shape:
    out *= int(d)
  return out
