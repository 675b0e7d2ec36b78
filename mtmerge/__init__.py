"""mtmerge: accelerator-native multi-task model merging in JAX.

Everything is a pytree with the structure of the model's params; task
vectors are ONE pytree with a leading task axis `[T, ...]`; merge methods
are pure jittable functions built from composable transforms.
"""

__version__ = "0.1.0"

from mtmerge import runtime as _runtime

# XLA:CPU's reduce fusion slows task-axis sums ~30x; turn it off while no JAX
# backend exists yet (see mtmerge/runtime.py; MTMERGE_XLA_DEFAULTS=0 opts out).
_runtime.configure_xla()
