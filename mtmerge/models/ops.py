"""Small numerical pieces the models share: exact GELU, token-matrix dense."""

import jax
import numpy as np


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x) (Hendrycks & Gimpel, 2016), written with erf.

  This is Hugging Face's `gelu` formula (BERT, ViT). `jax.nn.gelu(
  approximate=False)` computes the same function through erfc, which
  XLA:CPU evaluates more slowly: erf made the layer-wise AdaMerging step of
  `benchmarks/learned_bench.py` (MiniLM) about 7% faster. In float32 the
  erf form loses relative precision in the far negative tail, where GELU
  is nearly 0: the two differ by under 2e-6 absolute (tests/test_bert.py).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2),
                                                      x.dtype)))


def dense(layer, x: jax.Array) -> jax.Array:
  """`layer(x)` for an `nnx.Linear`, with `x [..., in]` as one `[rows, in]`.

  The same numbers as calling the layer on `x`; the flattening makes every
  dot 2D, so the kernel gradient of a `[B, L, in]` input is one plain
  `[in, rows] x [rows, out]` matmul instead of a contraction over two
  dims, which XLA:CPU runs through transposed copies. Measured on the
  layer-wise AdaMerging step of `benchmarks/learned_bench.py` (MiniLM, 2048
  tokens): about 10% faster.
  """
  y = layer(x.reshape(-1, x.shape[-1]))
  return y.reshape(x.shape[:-1] + (y.shape[-1],))
