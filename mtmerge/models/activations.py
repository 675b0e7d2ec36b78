"""Activation functions shared by the models."""

import jax
import numpy as np


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x) (Hendrycks & Gimpel, 2016), written with erf.

  This is Hugging Face's `gelu` formula (BERT, ViT). `jax.nn.gelu(
  approximate=False)` computes the same function through erfc, which
  XLA:CPU evaluates more slowly: erf made the layer-wise AdaMerging step of
  `benchmarks/learned_bench.py` (MiniLM) about 7% faster. The two forms
  differ only where x < -5, where GELU is below 1e-6 in magnitude.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2),
                                                      x.dtype)))
