"""The default job runs end to end (runlocal) and writes its results."""

import json
import os

import pytest

from configs import default
from mtmerge import demo


def test_default_config_runlocal(tmp_path):
  config = default.get_config("runlocal")
  rows = demo.run(config, str(tmp_path))
  assert [r["method"].split("(")[0] for r in rows[:-1]] == [
      "task_arithmetic", "ties_merging", "ties_merging"]
  data = json.loads((tmp_path / "results.json").read_text())
  assert data["num_tasks"] == 4 and len(data["rows"]) == len(rows)
  assert os.path.exists(tmp_path / "results.csv")
  ta = rows[0]
  # TA with lambda 0.3 keeps 0.3 of each task vector plus its overlap with
  # the others (a shared component): between 0.3 and 0.3 * T.
  assert 0.3 < ta["retention"] < 1.2
  assert ta["density"] == pytest.approx(1.0, abs=1e-3)  # dense update


def test_config_rejects_unknown_argument():
  with pytest.raises(ValueError, match="unknown config argument"):
    default.get_config("runlocl")
