"""Test setup: 8 fake CPU devices so every sharding path runs on CPU.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from mtmerge import runtime  # noqa: E402

runtime.configure_xla()  # the merge kernels' setting, as in the CLI
runtime.hoist_constants()  # as mtmerge.main and the CLI
import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mesh8():
  """A 1-D mesh over the 8 fake devices, axis 'x' (explicit sharding off)."""
  assert jax.device_count() == 8, jax.devices()
  return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
