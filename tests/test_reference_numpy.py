"""Sanity tests of the NumPy reference (tests/reference_numpy.py) itself, on
tiny examples computed by hand."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_numpy as ref  # noqa: E402


def _a(*values):
  return np.array(values, dtype=np.float64)


def _close(actual, expected, **kw):
  np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12, **kw)


def _models(base, taus):
  """Fine-tuned dicts from a base dict and a list of task-vector dicts."""
  return [{k: base[k] + tau[k] for k in base} for tau in taus]


# ---------------------------------------------------------------- basic


def test_weight_averaging():
  base = {"w": _a(0.0, 0.0)}
  fts = [{"w": _a(1.0, 2.0)}, {"w": _a(3.0, 4.0)}]
  _close(ref.weight_averaging(base, fts)["w"], [2.0, 3.0])


def test_task_arithmetic():
  base = {"w": _a(1, 1, 1, 1)}
  fts = _models(base, [{"w": _a(1, -2, 3, 0)}, {"w": _a(2, 1, -1, 0)}])
  out = ref.task_arithmetic(base, fts, scaling_factor=0.5)
  _close(out["w"], [2.5, 0.5, 2.0, 1.0])


# ---------------------------------------------------------------- TIES


def _ties_example():
  base = {"w": np.zeros((1, 4))}
  taus = [
      {"w": np.array([[0.5, -2.0, 1.0, 0.1]])},
      {"w": np.array([[-1.0, 1.5, 0.2, 0.3]])},
      {"w": np.array([[-3.0, -0.1, 0.4, 0.05]])},
  ]
  return base, _models(base, taus)


@pytest.mark.parametrize("merge_func, expected", [
    # threshold 0.5 of 4 entries -> keep 2 per task:
    #   [0,-2,1,0], [-1,1.5,0,0], [-3,0,0.4,0]; sum [-4,-0.5,1.4,0]
    #   elected [-1,-1,+1, majority(sign(-3.1)) = -1]
    ("sum", [-4.0, -2.0, 1.4, 0.0]),
    ("mean", [-2.0, -2.0, 0.7, 0.0]),
    ("max", [-3.0, -2.0, 1.0, 0.0]),
])
def test_ties_by_hand(merge_func, expected):
  base, fts = _ties_example()
  out = ref.ties_merging(base, fts, scaling_factor=1.0, threshold=0.5,
                         merge_func=merge_func)
  _close(out["w"], [expected])
  out2 = ref.ties_merging(base, fts, scaling_factor=0.5, threshold=0.5,
                          merge_func=merge_func)
  _close(out2["w"], [0.5 * np.array(expected)])


def test_ties_global_vs_per_tensor():
  base = {"a": np.zeros(2), "b": np.zeros(2)}
  fts = _models(base, [{"a": _a(10, 9), "b": _a(1, 2)}])
  glob = ref.ties_merging(base, fts, 1.0, 0.5, "sum", scope="global")
  _close(glob["a"], [10, 9])
  _close(glob["b"], [0, 0])
  per = ref.ties_merging(base, fts, 1.0, 0.5, "sum", scope="per_tensor")
  _close(per["a"], [10, 0])
  _close(per["b"], [0, 2])


@pytest.mark.parametrize("taus, expected", [
    # sum [0, 5] -> zero sign goes to the majority +1 -> only task 1 agrees
    ([_a(1, 3), _a(-1, 2)], [1.0, 5.0]),
    # sum [0, -5] -> majority -1 -> only task 2 agrees
    ([_a(1, -3), _a(-1, -2)], [-1.0, -5.0]),
])
def test_ties_zero_sign_goes_to_majority(taus, expected):
  base = {"w": np.zeros(2)}
  fts = _models(base, [{"w": t} for t in taus])
  out = ref.ties_merging(base, fts, 1.0, threshold=1.0, merge_func="sum")
  _close(out["w"], expected)


def test_ties_threshold_rounding_and_ties_kept():
  base = {"w": np.zeros(5)}
  fts = _models(base, [{"w": _a(5, 4, 3, 2, 1)}])
  # 0.3 * 5 = 1.5 -> round half up -> 2
  _close(ref.ties_merging(base, fts, 1.0, 0.3)["w"], [5, 4, 0, 0, 0])
  # 0.1 * 5 = 0.5 -> 1 ; 0.05 * 5 = 0.25 -> 0 -> clipped to 1
  _close(ref.ties_merging(base, fts, 1.0, 0.1)["w"], [5, 0, 0, 0, 0])
  _close(ref.ties_merging(base, fts, 1.0, 0.05)["w"], [5, 0, 0, 0, 0])
  # ties at the cut are all kept (k = 1 but three entries have |tau| = 1)
  base4 = {"w": np.zeros(4)}
  fts4 = _models(base4, [{"w": _a(1, -1, 1, 0.5)}])
  _close(ref.ties_merging(base4, fts4, 1.0, 0.25)["w"], [1, -1, 1, 0])


def test_ties_without_conflict_equals_task_arithmetic():
  rng = np.random.default_rng(0)
  base = {"w": rng.normal(size=(3, 4))}
  tau = np.abs(rng.normal(size=(3, 4)))
  fts = _models(base, [{"w": tau}, {"w": 2 * tau}])
  _close(ref.ties_merging(base, fts, 0.3, threshold=1.0)["w"],
         ref.task_arithmetic(base, fts, 0.3)["w"])


# ---------------------------------------------------------------- DARE


def test_dare_from_masks_sum():
  base = {"w": _a(1, 1)}
  fts = _models(base, [{"w": _a(1, 2)}, {"w": _a(3, -4)}])
  masks = [{"w": np.array([True, False])}, {"w": np.array([False, True])}]
  out = ref.dare_from_masks(base, fts, masks, drop_rate=0.5,
                            scaling_factor=0.5)
  # [2, 0] + [0, -8] = [2, -8]; * 0.5 = [1, -4]
  _close(out["w"], [2.0, -3.0])


def test_dare_from_masks_ties():
  base = {"w": _a(0, 0)}
  fts = _models(base, [{"w": _a(1, 2)}, {"w": _a(3, -4)}])
  masks = [{"w": np.array([True, True])}, {"w": np.array([True, True])}]
  # rescaled: [2, 4], [6, -8]; plain sum [8, -4]
  out_sum = ref.dare_from_masks(base, fts, masks, 0.5, 1.0, then="sum")
  _close(out_sum["w"], [8.0, -4.0])
  # TIES (keep all): elected [+, -] -> [2 + 6, -8]
  out_ties = ref.dare_from_masks(base, fts, masks, 0.5, 1.0, then="ties")
  _close(out_ties["w"], [8.0, -8.0])
  out_mean = ref.dare_from_masks(base, fts, masks, 0.5, 1.0, then="ties",
                                 merge_func="mean")
  _close(out_mean["w"], [4.0, -8.0])


# ---------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_row_scope():
  base = {"w": np.zeros((2, 5))}
  tau = np.array([[1.0, -5.0, 3.0, 0.5, 2.0],
                  [-4.0, 0.1, 0.2, 6.0, -1.0]])
  fts = _models(base, [{"w": tau}])
  # per row: remove round(0.2*5)=1 largest, keep round(0.4*5)=2 next
  out = ref.breadcrumbs(base, fts, density=0.4, top_remove=0.2,
                        scaling_factor=1.0, scope="row")
  _close(out["w"], [[0, 0, 3, 0, 2], [-4, 0, 0, 0, -1]])


def test_breadcrumbs_tensor_scope():
  base = {"w": np.zeros((2, 5))}
  tau = np.array([[1.0, -5.0, 3.0, 0.5, 2.0],
                  [-4.0, 0.1, 0.2, 6.0, -1.0]])
  fts = _models(base, [{"w": tau}])
  # whole tensor: remove 1 (the 6), keep 3 (-5, -4, 3)
  out = ref.breadcrumbs(base, fts, density=0.3, top_remove=0.1,
                        scaling_factor=2.0, scope="tensor")
  _close(out["w"], 2.0 * np.array([[0, -5, 3, 0, 0], [-4, 0, 0, 0, 0]]))


def test_breadcrumbs_sums_tasks_and_handles_scalars():
  base = {"v": _a(0, 0, 0, 0), "s": np.array(1.0)}
  fts = _models(base, [{"v": _a(4, 3, 2, 1), "s": np.array(2.0)},
                       {"v": _a(1, 2, 3, 4), "s": np.array(-1.0)}])
  out = ref.breadcrumbs(base, fts, density=0.5, top_remove=0.25,
                        scaling_factor=1.0)
  # task 1 keeps [_, 3, 2, _], task 2 keeps [_, 2, 3, _]
  _close(out["v"], [0, 5, 5, 0])
  # scalar: n = 1, round(0.5) = 1 kept, round(0.25) = 0 removed
  _close(out["s"], 1.0 + 2.0 - 1.0)


# ---------------------------------------------------------------- TALL / consensus


def _tall_example():
  base = {"w": _a(1, 1, 1)}
  fts = _models(base, [{"w": _a(1, 0.1, -2)}, {"w": _a(0.5, 1, 2)}])
  return base, fts


def test_tall_masks_by_hand():
  base, fts = _tall_example()
  # tau_MTL = [1.5, 1.1, 0]
  m = ref.tall_masks(base, fts, 0.4)
  np.testing.assert_array_equal(m[0]["w"], [True, False, True])
  np.testing.assert_array_equal(m[1]["w"], [True, True, True])
  m2 = ref.tall_masks(base, fts, [0.4, 0.6])
  np.testing.assert_array_equal(m2[1]["w"], [False, True, True])


def test_tall_mask_reconstruct():
  base, fts = _tall_example()
  _close(ref.tall_mask_reconstruct(base, fts, 0, 0.4)["w"], [2.5, 1.0, 1.0])
  _close(ref.tall_mask_reconstruct(base, fts, 1, 0.4)["w"], [2.5, 2.1, 1.0])


def test_consensus_task_arithmetic_counts():
  base, fts = _tall_example()
  # counts [2, 1, 2]
  out = ref.consensus(base, fts, k=2, tall_mask_lambda=0.4,
                      scaling_factor=0.5)
  _close(out["w"], [1.75, 1.0, 1.0])
  out1 = ref.consensus(base, fts, k=1, tall_mask_lambda=0.4,
                       scaling_factor=1.0)
  _close(out1["w"], [2.5, 2.1, 1.0])
  out3 = ref.consensus(base, fts, k=3, tall_mask_lambda=0.4)
  _close(out3["w"], [1.0, 1.0, 1.0])


def test_consensus_ties_base():
  base, fts = _tall_example()
  # TIES keep-all sum: [1.5, 1.1, 0 -> majority + -> 2]; tau_base [1.5,1.1,2]
  # masks vs tau_base: m1 [T, F, T], m2 [T, T, T] -> counts [2, 1, 2]
  out = ref.consensus(base, fts, k=2, tall_mask_lambda=0.4,
                      scaling_factor=1.0, base_method="ties",
                      ties_threshold=1.0, ties_merge_func="sum")
  _close(out["w"], [2.5, 1.0, 3.0])


# ---------------------------------------------------------------- PCB


def test_pcb_single_task_is_magnitude_topk():
  base = {"a": _a(1, 1), "b": _a(0, 0)}
  fts = _models(base, [{"a": _a(3, -1), "b": _a(2, 0.5)}])
  out = ref.pcb_merging(base, fts, ratio=0.5, scaling_factor=0.5)
  _close(out["a"], [2.5, 1.0])
  _close(out["b"], [1.0, 0.0])


def test_pcb_two_tasks_by_hand():
  base = {"w": _a(0, 0)}
  x1, x2 = _a(1, 2), _a(2, -1)
  fts = _models(base, [{"w": x1}, {"w": x2}])
  e = np.e
  # Norm(x1*x1)=[0,1] -> intra1 = softmax([0,2]); inter1 = [1, 1]
  beta1 = np.array([1.0, e**2]) / (1 + e**2)
  # intra2 = softmax([2,0]); inter2 = 2 * softmax([1, 0])
  beta2 = (np.array([e**2, 1.0]) / (1 + e**2) *
           2 * np.array([e, 1.0]) / (1 + e))
  expected = (beta1 * x1 + beta2 * x2) / (beta1 + beta2)
  out = ref.pcb_merging(base, fts, ratio=1.0, scaling_factor=1.0)
  np.testing.assert_allclose(out["w"], expected, rtol=1e-12)
  # keep 1 per task: task 1 keeps entry 1, task 2 keeps entry 0
  out_half = ref.pcb_merging(base, fts, ratio=0.5, scaling_factor=1.0)
  _close(out_half["w"], [2.0, 2.0])


def test_pcb_l2_norm_option_differs():
  rng = np.random.default_rng(1)
  base = {"w": np.zeros(6)}
  fts = _models(base, [{"w": rng.normal(size=6)} for _ in range(3)])
  a = ref.pcb_merging(base, fts, ratio=1.0, norm="minmax")["w"]
  b = ref.pcb_merging(base, fts, ratio=1.0, norm="l2")["w"]
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  assert not np.allclose(a, b)


def test_pcb_official_by_hand():
  base = {"w": _a(0, 0, 0, 0)}
  fts = _models(base, [{"w": _a(3, -1, 2, 0.5)}])
  # |x| clamped to [s[0], s[int(4*0.9999-1)] = s[2]] = [0.5, 2] -> 3 -> 2.
  # scores: [e*tanh 9, e^(1/9) tanh 1, e tanh 4, tanh 0.25]; ratio 0.5 clamps
  # below at the 3rd smallest (e tanh 4) -> only entry 0 survives, scale 1.
  out = ref.pcb_merging_official(base, fts, ratio=0.5, scaling_factor=1.5)
  _close(out["w"], [3.0, 0.0, 0.0, 0.0])


# ---------------------------------------------------------------- EMR


def test_emr_by_hand():
  base = {"w": _a(0, 0, 0, 0)}
  fts = _models(base, [{"w": _a(1, -2, 0.5, 0)}, {"w": _a(-3, 1, 0.25, 0)}])
  tau_uni, masks, rescalers = ref.emr_merging(base, fts)
  # sum [-2, -1, 0.75, 0] -> sign [-, -, +, - (zero counts as -1)]
  _close(tau_uni["w"], [-3, -2, 0.5, 0])
  np.testing.assert_array_equal(masks[0]["w"], [False, True, True, False])
  np.testing.assert_array_equal(masks[1]["w"], [True, False, True, False])
  _close(rescalers, [3.5 / 2.5, 4.25 / 3.5])
  _close(ref.emr_reconstruct(base, fts, 0)["w"], [0, -2.8, 0.7, 0])
  _close(ref.emr_reconstruct(base, fts, 1)["w"],
         4.25 / 3.5 * np.array([-3, 0, 0.5, 0]))


def test_emr_rescaler_sums_means_over_leaves():
  base = {"w": np.zeros(4), "s": np.array(0.0)}
  fts = _models(base, [{"w": _a(1, -2, 0.5, 0), "s": np.array(2.0)},
                       {"w": _a(-3, 1, 0.25, 0), "s": np.array(1.0)}])
  tau_uni, masks, rescalers = ref.emr_merging(base, fts)
  _close(tau_uni["s"], 2.0)
  assert masks[0]["s"].shape == () and bool(masks[1]["s"])
  _close(rescalers, [(3.5 / 4 + 2) / (2.5 / 4 + 2),
                     (4.25 / 4 + 1) / (3.5 / 4 + 2)])


# ---------------------------------------------------------------- TSV


def test_tsv_single_task_full_rank_returns_task_vector():
  rng = np.random.default_rng(2)
  base = {"w": rng.normal(size=(3, 3)), "r": rng.normal(size=(4, 2)),
          "b": rng.normal(size=3)}
  tau = {k: rng.normal(size=v.shape) for k, v in base.items()}
  fts = _models(base, [tau])
  out = ref.tsv_merging(base, fts, alpha=0.7)
  for k in base:
    np.testing.assert_allclose(out[k], base[k] + 0.7 * tau[k], atol=1e-12)


def test_tsv_orthogonal_tasks_sum():
  base = {"w": np.zeros((4, 4))}
  t1 = np.diag([3.0, 2.0, 0.0, 0.0])
  t2 = np.diag([0.0, 0.0, 5.0, 1.0])
  fts = _models(base, [{"w": t1}, {"w": t2}])
  np.testing.assert_allclose(ref.tsv_merging(base, fts)["w"], t1 + t2,
                             atol=1e-12)


def test_tsv_polar_orthogonalization_by_hand():
  # Two rank-1 symmetric task vectors with directions 60 degrees apart:
  # tau_1 = 1 * e1 e1^T, tau_2 = 2 * a a^T, a = (cos 60, sin 60). k = 1.
  # The polar factor of [e1, a] is the rotation that spreads them
  # symmetrically to 90 degrees: directions -15 and 75 degrees.
  th = np.deg2rad(60.0)
  a = np.array([np.cos(th), np.sin(th)])
  base = {"w": np.zeros((2, 2)), "b": np.zeros(2)}
  fts = _models(base, [{"w": np.outer([1.0, 0.0], [1.0, 0.0]), "b": _a(1, 2)},
                       {"w": 2 * np.outer(a, a), "b": _a(3, 0)}])
  r1 = np.array([np.cos(np.deg2rad(-15)), np.sin(np.deg2rad(-15))])
  r2 = np.array([np.cos(np.deg2rad(75)), np.sin(np.deg2rad(75))])
  out = ref.tsv_merging(base, fts, alpha=1.0)
  np.testing.assert_allclose(out["w"], np.outer(r1, r1) + 2 * np.outer(r2, r2),
                             atol=1e-12)
  _close(out["b"], [2.0, 1.0])  # non-2-D leaves: mean of task vectors


# ---------------------------------------------------------------- mergekit utils


def test_magnitude_prune():
  base = {"w": np.zeros(4), "s": np.array(1.0)}
  fts = _models(base, [{"w": _a(1, -4, 2, 3), "s": np.array(0.5)},
                       {"w": _a(5, 1, 0, -2), "s": np.array(-1.0)}])
  out = ref.magnitude_prune(base, fts, density=0.5, scaling_factor=1.0)
  _close(out["w"], [5, -4, 0, 1])
  _close(out["s"], 1.0 + 0.5 - 1.0)


def test_slerp_endpoints_and_midpoint():
  base = {"w": np.zeros(2)}
  fts = [{"w": _a(2.0, 0.0)}, {"w": _a(0.0, 1.0)}]
  _close(ref.slerp(base, fts, t=0.0)["w"], [2.0, 0.0])
  _close(ref.slerp(base, fts, t=1.0)["w"], [0.0, 1.0])
  # theta = pi/2: s0 = s1 = sin(pi/4), applied to the unnormalized tensors
  h = np.sin(np.pi / 4)
  _close(ref.slerp(base, fts, t=0.5)["w"], [2 * h, h])


def test_slerp_colinear_falls_back_to_lerp():
  base = {"w": np.zeros(2)}
  fts = [{"w": _a(1.0, 2.0)}, {"w": _a(2.0, 4.0)}]
  _close(ref.slerp(base, fts, t=0.25)["w"], [1.25, 2.5])


def test_model_stock():
  base = {"w": _a(1.0, 1.0)}
  # identical task vectors: cos = 1 -> t = 1 -> mean of the fine-tuned models
  fts = _models(base, [{"w": _a(1, 2)}, {"w": _a(2, 4)}, {"w": _a(3, 6)}])
  _close(ref.model_stock(base, fts)["w"], [3.0, 5.0])
  # orthogonal: cos = 0 -> t = 0 -> base
  fts_o = _models(base, [{"w": _a(1, 0)}, {"w": _a(0, 3)}])
  _close(ref.model_stock(base, fts_o)["w"], [1.0, 1.0])
  # 60 degrees, N = 2: cos = 0.5 -> t = 1 / 1.5 = 2/3
  d2 = np.array([0.5, np.sqrt(3) / 2])
  fts_60 = _models(base, [{"w": _a(1, 0)}, {"w": d2}])
  expected = 1.0 + (2 / 3) * (np.array([1.0, 0.0]) + d2) / 2
  np.testing.assert_allclose(ref.model_stock(base, fts_60)["w"], expected,
                             rtol=1e-12)


def test_model_stock_filter_wise():
  base = {"w": np.zeros((2, 2))}
  # row 0 identical directions (t = 1), row 1 orthogonal (t = 0)
  fts = _models(base, [{"w": np.array([[1.0, 1.0], [1.0, 0.0]])},
                       {"w": np.array([[3.0, 3.0], [0.0, 2.0]])}])
  out = ref.model_stock(base, fts, filter_wise=True)
  _close(out["w"], [[2.0, 2.0], [0.0, 0.0]])
  # flattened (default): cos = (3+3)/(sqrt(3)*sqrt(22))
  c = 6 / (np.sqrt(3) * np.sqrt(22))
  t = 2 * c / (1 + c)
  np.testing.assert_allclose(ref.model_stock(base, fts)["w"],
                             t * np.array([[2.0, 2.0], [0.5, 1.0]]),
                             rtol=1e-12)


# ---------------------------------------------------------------- DELLA


def test_della_keep_probabilities():
  p = ref.della_keep_probabilities(np.abs(_a(0.1, -0.4, 0.3)), 0.3, 0.1)
  _close(p, [0.6, 0.8, 0.7])
  _close(ref.della_keep_probabilities(_a(5.0), 0.3, 0.07), [0.63])


def test_della_from_uniforms_by_hand():
  base = {"w": np.zeros(3)}
  fts = _models(base, [{"w": _a(0.1, -0.4, 0.3)}, {"w": _a(0.2, 0.4, -0.1)}])
  uniforms = [{"w": _a(0.5, 0.9, 0.1)}, {"w": _a(0.0, 0.5, 0.99)}]
  # task 1: p [0.6, 0.8, 0.7] -> keep [T, F, T] -> [1/6, 0, 3/7]
  # task 2: p [0.7, 0.8, 0.6] -> keep [T, T, F] -> [2/7, 0.5, 0]
  out = ref.della_from_uniforms(base, fts, uniforms, drop_rate=0.3,
                                epsilon=0.1, scaling_factor=2.0)
  _close(out["w"], 2.0 * np.array([(1 / 6 + 2 / 7) / 2, 0.5, 3 / 7]))


def test_della_rows_are_independent():
  base = {"w": np.zeros((2, 2))}
  fts = _models(base, [{"w": np.array([[1.0, 2.0], [-4.0, 3.0]])}])
  # each row: smaller |.| rank 0 (p = 0.6), larger rank 1 (p = 0.8);
  # row 1: |-4| is the larger -> p 0.8 > 0.7 kept; 3 has p 0.6 <= 0.7 dropped
  uniforms = [{"w": np.array([[0.1, 0.1], [0.7, 0.7]])}]
  out = ref.della_from_uniforms(base, fts, uniforms, 0.3, 0.1, 1.0)
  _close(out["w"], [[1 / 0.6, 2 / 0.8], [-4 / 0.8, 0.0]])


# ---------------------------------------------------------------- shapes


def test_every_method_handles_scalars_vectors_and_tensors():
  rng = np.random.default_rng(3)
  base = {"s": np.array(0.3), "v": rng.normal(size=5),
          "m": rng.normal(size=(4, 3)), "t": rng.normal(size=(2, 3, 4))}
  fts = [{k: v + rng.normal(size=np.shape(v)) for k, v in base.items()}
         for _ in range(3)]
  masks = ref.dare_random_masks(base, 3, 0.5, seed=0)
  results = [
      ref.weight_averaging(base, fts),
      ref.task_arithmetic(base, fts),
      ref.ties_merging(base, fts),
      ref.ties_merging(base, fts, scope="per_tensor", merge_func="mean"),
      ref.ties_merging(base, fts, merge_func="max"),
      ref.dare_from_masks(base, fts, masks, 0.5, 0.3),
      ref.dare_from_masks(base, fts, masks, 0.5, 0.3, then="ties",
                          ties_threshold=0.5),
      ref.breadcrumbs(base, fts),
      ref.breadcrumbs(base, fts, scope="tensor"),
      ref.tall_mask_reconstruct(base, fts, 1, [0.2, 0.4, 0.6]),
      ref.consensus(base, fts),
      ref.consensus(base, fts, base_method="ties"),
      ref.pcb_merging(base, fts),
      ref.pcb_merging_official(base, fts),
      ref.emr_reconstruct(base, fts, 2),
      ref.tsv_merging(base, fts),
      ref.magnitude_prune(base, fts, 0.3),
      ref.slerp(base, fts[:2], 0.3),
      ref.model_stock(base, fts),
      ref.model_stock(base, fts, filter_wise=True),
      ref.della(base, fts, seed=1),
  ]
  for out in results:
    assert set(out) == set(base)
    for k in base:
      assert np.shape(out[k]) == np.shape(base[k]), k
      assert np.asarray(out[k]).dtype == np.float64
      assert np.all(np.isfinite(out[k]))
