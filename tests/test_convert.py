"""The generic name/shape converter engine."""

import numpy as np
import pytest

from mtmerge.models import convert

RULES = [
    convert.Rule(r"enc\.(\d+)\.w", r"enc/\1/kernel", convert.linear_kernel),
    convert.Rule(r"enc\.(\d+)\.b", r"enc/\1/bias"),
]


def _src():
  w = np.arange(6, dtype=np.float32).reshape(2, 3)
  return {"enc.0.w": w, "enc.0.b": np.zeros(2, np.float32),
          "position_ids": np.arange(4)}


def test_maps_transposes_and_ignores():
  out = convert.convert(_src(), RULES, {"enc/0/kernel": (3, 2),
                                        "enc/0/bias": (2,)},
                        ignore=[r"position_ids"])
  np.testing.assert_array_equal(out["enc/0/kernel"], _src()["enc.0.w"].T)
  assert set(out) == {"enc/0/kernel", "enc/0/bias"}


def test_reports_every_problem_by_name():
  src = _src()
  src["enc.0.w"] = np.zeros((3, 3), np.float32)  # wrong shape
  with pytest.raises(convert.ConversionError) as e:
    convert.convert(src, RULES, {"enc/0/kernel": (3, 2), "enc/0/bias": (2,),
                                 "enc/1/bias": (2,)}, what="ckpt.safetensors")
  msg = str(e.value)
  assert "ckpt.safetensors" in msg
  assert "unmapped key(s): position_ids" in msg
  assert "missing: enc/1/bias" in msg
  assert "enc.0.w -> enc/0/kernel: (3, 3) vs model (3, 2)" in msg


def test_conv_kernel_layout():
  w = np.random.default_rng(0).normal(size=(4, 3, 2, 2))
  k = convert.conv_kernel(w)
  assert k.shape == (2, 2, 3, 4) and k[1, 0, 2, 3] == w[3, 2, 1, 0]
