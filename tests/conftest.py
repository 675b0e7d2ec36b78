"""Test setup: 8 fake CPU devices so every sharding path runs on CPU.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import os

# Compile time, not run time, dominates the suite (thousands of small
# programs): LLVM at -O1 without its expensive passes halves the compile
# time of the merge programs (e.g. 56 -> 30 CPU-s for the TIES/DARE/DELLA
# sharding tests) and leaves XLA's own HLO optimizations as they are.
# XLA:CPU compiles without fast-math, so LLVM may not reorder float
# arithmetic at any level; the suite passes with and without these flags.
# A flag the caller set wins, except the device count (always 8).
COMPILE_FLAGS = ("--xla_backend_optimization_level=1",
                 "--xla_llvm_disable_expensive_passes=true")
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_flags] + [f for f in COMPILE_FLAGS if f.split("=")[0] not in _flags]
    + ["--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402
import tempfile  # noqa: E402

from mtmerge import runtime  # noqa: E402

runtime.configure_xla()  # the merge kernels' setting, as in the CLI
runtime.hoist_constants()  # as mtmerge.main and the CLI
import jax  # noqa: E402
import pytest  # noqa: E402

# One persistent compilation cache for the whole session, empty at its
# start and shared by the xdist workers (they inherit the variable from the
# process that loads this file first): tests in different files build many
# of the same programs (one in nine compilations of a run is a repeat).
# Set MTMERGE_TEST_COMPILE_CACHE to a directory to keep it, or to 0 for none.
_OWN_CACHE = "MTMERGE_TEST_COMPILE_CACHE" not in os.environ
if _OWN_CACHE:
  os.environ["MTMERGE_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(
      prefix="mtmerge-test-xla-")
_OWNER_PID = os.getpid()
if os.environ["MTMERGE_TEST_COMPILE_CACHE"] != "0":
  runtime.enable_compile_cache(os.environ["MTMERGE_TEST_COMPILE_CACHE"])


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE and os.getpid() == _OWNER_PID:
    shutil.rmtree(os.environ["MTMERGE_TEST_COMPILE_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def mesh8():
  """A 1-D mesh over the 8 fake devices, axis 'x' (explicit sharding off)."""
  assert jax.device_count() == 8, jax.devices()
  return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
