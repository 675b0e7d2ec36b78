"""`common.task_mix`: the hand-written VJP against autodiff of tensordot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtmerge.learned import common


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_task_mix_value_and_grads(shape, dtype):
  rng = np.random.default_rng(0)
  c = jnp.asarray(rng.standard_normal(3), jnp.float32)
  v = jnp.asarray(rng.standard_normal((3,) + shape), dtype)
  w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  ref = lambda c, v: jnp.sum(w * jnp.tensordot(c, v.astype(jnp.float32), 1))
  ours = lambda c, v: jnp.sum(w * common.task_mix(c, v))
  np.testing.assert_allclose(ours(c, v), ref(c, v), rtol=1e-5)
  # Both cotangents: the coefficients' and the task vectors' (masks and
  # Concrete relaxations differentiate through v).
  (gc, gv), (rc, rv) = jax.grad(ours, (0, 1))(c, v), jax.grad(ref, (0, 1))(
      c, v)
  np.testing.assert_allclose(gc, rc, rtol=1e-5, atol=1e-5)
  assert gv.dtype == v.dtype
  np.testing.assert_allclose(np.float32(gv), np.float32(rv), rtol=1e-2)
  # Under jit with only the coefficients differentiated.
  np.testing.assert_allclose(jax.jit(jax.grad(ours))(c, v), rc, rtol=1e-5,
                             atol=1e-5)


def test_task_mix_in_weighted_merge_matches_loop():
  rng = np.random.default_rng(1)
  base = {"a": jnp.ones((2, 3)), "b": jnp.zeros((4,))}
  tvs = {"a": jnp.asarray(rng.standard_normal((2, 2, 3)), jnp.float32),
         "b": jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)}
  coeffs = {"a": jnp.array([0.3, -1.0]), "b": jnp.array([2.0, 0.5])}
  out = common.weighted_merge(base, tvs, coeffs)
  for k in base:
    want = base[k] + coeffs[k][0] * tvs[k][0] + coeffs[k][1] * tvs[k][1]
    np.testing.assert_allclose(out[k], want, rtol=1e-6)


def test_task_by_task_equals_the_sum_with_padded_heads():
  """One task at a time (scan + accumulated gradient) == the plain sum."""
  rng = np.random.default_rng(0)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  w = {"w": f32(5, 4)}
  heads = {"a": {"kernel": f32(4, 2), "bias": f32(2)},
           "b": {"kernel": f32(4, 3), "bias": f32(3)}}
  batch = {t: {"x": f32(6, 5)} for t in heads}
  loss = lambda p, h, inp: common.entropy(inp["x"] @ p["w"] @ h["kernel"]
                                          + h["bias"])
  ref = lambda p: sum(loss(p, heads[t], batch[t]) for t in heads)
  padded = common.pad_heads(heads)
  assert padded["a"]["kernel"].shape == (4, 3)
  got = lambda p: common.task_by_task(loss, p, padded, batch)[0]
  np.testing.assert_allclose(got(w), ref(w), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(got))(w)["w"],
                             jax.grad(ref)(w)["w"], rtol=1e-5, atol=1e-7)
  per_task = common.task_by_task(loss, w, padded, batch)[1]
  np.testing.assert_allclose(per_task["b"], loss(w, heads["b"], batch["b"]),
                             rtol=1e-6)
