"""mtmerge: accelerator-native multi-task model merging in JAX.

Everything is a pytree with the structure of the model's params; task
vectors are ONE pytree with a leading task axis `[T, ...]`; merge methods
are pure jittable functions built from composable transforms.
"""

__version__ = "0.1.0"

