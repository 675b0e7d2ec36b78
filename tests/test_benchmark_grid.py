"""The benchmark's one-merge scaling grid equals merging at each lambda
(up to float32 rounding; its picked point is the row's test model)."""

import jax
import numpy as np
import pytest

from mtmerge import benchmark
from mtmerge import methods

_FIXED = {"ties_merging": {"threshold": 0.3}, "dare": {"drop_rate": 0.5},
          "dare_ties": {"drop_rate": 0.5}, "magnitude_prune": {"threshold": 0.3},
          "consensus": {"k": 2}, "pcb_merging": {"ratio": 0.3}}


def _problem():
  rng = np.random.default_rng(0)
  base = {"a": {"kernel": rng.normal(size=(16, 12)).astype(np.float32)},
          "b": rng.normal(size=(12,)).astype(np.float32)}
  tvs = jax.tree.map(lambda x: (0.1 * rng.normal(size=(3,) + x.shape)
                                ).astype(np.float32), base)
  return base, tvs


@pytest.mark.parametrize("name", sorted(benchmark.LINEAR_IN_SCALE))
def test_grid_points_equal_the_method_at_each_lambda(name):
  base, tvs = _problem()
  fixed = _FIXED.get(name, {})
  scale = benchmark.LINEAR_IN_SCALE[name]
  grid = {scale: [0.4, 1.3]}
  got = list(benchmark._grid_models(name, base, tvs, fixed, grid))
  assert [hp for hp, _ in got] == [{scale: 0.4}, {scale: 1.3}]
  for hp, out in got:
    want = methods.merge(name, base, tvs, **fixed, **hp)
    # The picked point is the row's test model: methods.merge at that
    # lambda up to float32 rounding (a few ulp; the fused merge may round
    # lambda * D + theta_0 in another order).
    for g, w in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  # the shortcut differs from a merge that is not linear in lambda
  assert not np.allclose(jax.tree.leaves(got[0][1])[0],
                         jax.tree.leaves(got[1][1])[0])


def test_other_grids_merge_once_per_point():
  base, tvs = _problem()
  assert benchmark._linear_grid("tsv_merging", {"alpha": [0.5, 1.0]})
  assert not benchmark._linear_grid("tsv_merging",
                                    {"scaling_factor": [0.5, 1.0]})
  assert not benchmark._linear_grid("model_stock", {"alpha": [0.5, 1.0]})
  assert not benchmark._linear_grid("task_arithmetic",
                                    {"scaling_factor": [0.3]})
  got = list(benchmark._grid_models("model_stock", base, tvs, {}, {}))
  want = methods.merge("model_stock", base, tvs)
  assert [hp for hp, _ in got] == [{}]
  for g, w in zip(jax.tree.leaves(got[0][1]), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)
