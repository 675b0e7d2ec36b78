"""Process settings of `mtmerge.runtime`: large closed-over arrays reach XLA
as arguments, not as constants embedded in the program."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import runtime

_PROBE = """
import sys
{setup}
import jax, jax.numpy as jnp, numpy as np
table = jnp.asarray(np.arange(4096 * 64, dtype=np.float32).reshape(4096, 64))
text = jax.jit(lambda i: jnp.take(table, i, axis=0).sum()).lower(
    np.zeros(3, np.int32)).as_text()
print(len(text) < 100_000, {result})
"""


def _lowered_size(table):
  return len(jax.jit(lambda i: jnp.take(table, i, axis=0).sum()).lower(
      np.zeros(3, np.int32)).as_text())


def test_suite_hoists_closed_over_arrays():
  # conftest calls hoist_constants before jax is imported, as main does.
  table = jnp.asarray(np.random.default_rng(0).standard_normal((4096, 64)),
                      jnp.float32)  # 1 MiB: embedded, ~2 MB of hex
  assert _lowered_size(table) < 100_000


def _probe(setup, result="None"):
  env = dict(os.environ)
  env.pop("JAX_USE_SIMPLIFIED_JAXPR_CONSTANTS", None)
  env.pop("MTMERGE_HOIST_CONSTANTS", None)
  out = subprocess.run([sys.executable, "-c", _PROBE.format(
      setup=setup, result=result)], env=env, capture_output=True, text=True,
      timeout=120, check=True)
  return out.stdout.split()


def test_main_entry_point_hoists():
  assert _probe("import mtmerge.main") == ["True", "None"]


def test_late_call_reports_no_effect():
  # JAX reads the setting into its lowering defaults at import: a call after
  # `import jax` cannot hoist and says so instead of half-applying it.
  assert _probe("import jax\nfrom mtmerge import runtime",
                "runtime.hoist_constants()") == ["False", "False"]
  assert runtime.hoist_constants()  # this process: conftest called it first
