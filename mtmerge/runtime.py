"""Process-level XLA/JAX settings that mtmerge's merges depend on for speed.

Three settings. `mtmerge merge` (the CLI) applies all, `mtmerge.main` the
compile cache and constant hoisting; notebooks merging large models call
`configure_xla()` before their first JAX computation:

* XLA:CPU's YNN "reduce" library fusion (on by default in jaxlib 0.10) makes
  a sum over a leading axis of a large array about 30x slower than plain
  adds and expands broadcast constants into full-size temporaries (measured
  in benchmarks/README.md: TIES over 8 x 88M params took 13.1 GiB of XLA
  temporaries with it, 5.5 GiB without). `configure_xla` turns that one
  fusion type off. It only touches CPU code generation and only takes
  effect if no JAX backend has been created yet, because XLA reads
  `XLA_FLAGS` once, when the first backend starts. A flag the user already
  set is never overridden; set `MTMERGE_XLA_DEFAULTS=0` to leave `XLA_FLAGS`
  alone entirely.
* `enable_compile_cache` turns on JAX's persistent compilation cache so a
  second `mtmerge merge` on the same shapes skips XLA compilation (15 s of
  the 88M-parameter TIES merge on a 2-core CPU).

* `hoist_constants` makes JAX pass large closed-over arrays (a frozen
  embedding table a forward closes over, say) to the compiled program as
  arguments instead of embedding them in it. The learned methods' steps
  and evaluations close over the encoder's frozen params; embedded, each
  of their programs carried the 47 MB MiniLM embedding table, which XLA
  then copied into the executable and the compile cache wrote. Hoisted,
  the default job's Twin-Merging and Fisher rows took 77 s and 39 s
  instead of 94 s and 46 s (same results; the two rows' compile cache
  3.2 MB). It must run before jax is imported: `mtmerge.main`, the CLI and
  the tests call it first.

The YNN flag is not applied to training: the same fusion makes BERT's backward
pass ~1.5x faster (1.23 s vs 1.88 s per MiniLM gradient, batch 32 x 32), so
fine-tuning and learned merging keep XLA's default.
"""

from __future__ import annotations

import os
import sys

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_VALUE = "-LIBRARY_FUSION_TYPE_REDUCE"


def _backend_started() -> bool:
  """True if a JAX backend exists already (XLA_FLAGS were read then)."""
  xb = sys.modules.get("jax._src.xla_bridge")
  return bool(xb is not None and getattr(xb, "_backends", None))


def configure_xla() -> bool:
  """Adds mtmerge's XLA:CPU default flag to `XLA_FLAGS` when still possible.

  Returns:
    True if the flag is in effect for backends created from now on (added
    now or already present), False if it was left out: opted out, the user
    set the flag to something else, or a backend had already started.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if YNN_FLAG in flags:
    return f"{YNN_FLAG}={YNN_VALUE}" in flags
  if os.environ.get("MTMERGE_XLA_DEFAULTS", "1") == "0" or _backend_started():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}={YNN_VALUE}".strip()
  return True


def default_cache_dir() -> str:
  """`$MTMERGE_CACHE/xla`, else `~/.cache/mtmerge/xla`."""
  root = os.environ.get("MTMERGE_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mtmerge")
  return os.path.join(root, "xla")


HOIST_MIN_BYTES = 64 << 10


def hoist_constants() -> bool:
  """Passes closed-over arrays of at least 64 KiB (`HOIST_MIN_BYTES`) to
  compiled programs as arguments (JAX's `jax_use_simplified_jaxpr_constants`
  with `jax_embedded_constants_max_bytes`; see the module docstring for
  what it saves). Smaller ones stay constants XLA can fold: hoisting every
  array over JAX's default 32 bytes cost the test suite's ~5000 small
  programs about 7% more compile time.

  Call it before anything imports jax: JAX 0.10 reads the setting into its
  lowering defaults (`mlir.LoweringParameters.hoist_constants_as_args`)
  when jax is imported, so turning it on later only changes the traced
  programs, and XLA still gets the arrays as embedded constants. Called
  first, it sets `JAX_USE_SIMPLIFIED_JAXPR_CONSTANTS` (unless the caller
  set it) for the import to read.

  Returns:
    True if large constants are hoisted; False if this JAX has no such
    setting (JAX calls it transitional), jax was imported first, or
    `MTMERGE_HOIST_CONSTANTS=0`.
  """
  if os.environ.get("MTMERGE_HOIST_CONSTANTS", "1") == "0":
    return False
  if "jax" not in sys.modules:
    os.environ.setdefault("JAX_USE_SIMPLIFIED_JAXPR_CONSTANTS", "true")
  import jax  # local: keep `import mtmerge.runtime` cheap
  try:
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    hoists = getattr(mlir.LoweringParameters(), "hoist_constants_as_args")
  except (ImportError, AttributeError):
    return False
  if hoists:
    jax.config.update("jax_use_simplified_jaxpr_constants", True)
    jax.config.update("jax_embedded_constants_max_bytes", HOIST_MIN_BYTES - 1)
  return bool(hoists)


def enable_compile_cache(path: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache (unless already set).

  Args:
    path: cache directory; default `default_cache_dir()`. Set
      `MTMERGE_COMPILE_CACHE=0` to disable.

  Returns:
    The cache directory in use, or None when disabled.
  """
  if os.environ.get("MTMERGE_COMPILE_CACHE", "1") == "0":
    return None
  import jax  # local: keep `import mtmerge.runtime` cheap
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = path or default_cache_dir()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None  # read-only home: run without a cache rather than fail
  jax.config.update("jax_compilation_cache_dir", path)
  # Cache every program: orchestrated merges (TIES) run ~20 small per-shape
  # kernels of ~0.1 s compile each, which together are most of a repeat
  # merge's compile time (2.5 s -> 0.02 s measured at 88M x 8).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path
