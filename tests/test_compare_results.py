"""benchmarks/compare_results.py: two runs agree to the printed digit."""

import importlib.util
import json
import os

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                     "compare_results.py")
_spec = importlib.util.spec_from_file_location("compare_results", _PATH)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def _results(**over):
  row = {"method": "task_arithmetic", "sentiment": 66.41, "avg": 64.69,
         "val": 63.41, "s": 78.7, "hparams": "scaling_factor=0.5",
         "grid": [{"scaling_factor": 0.3, "val": 60.0}]}
  row.update(over)
  return {"rows": [{"method": "zero-shot", "avg": 52.66}, row]}


def test_identical_runs_agree_whatever_the_wall_time():
  assert compare.differences(_results(), _results(s=12.0, grid=[])) == []


def test_a_changed_digit_a_hparam_or_a_missing_row_is_reported():
  assert compare.differences(_results(), _results(avg=64.7)) == [
      "task_arithmetic: avg 64.69 vs 64.7"]
  assert compare.differences(
      _results(), _results(hparams="scaling_factor=0.7")) == [
          "task_arithmetic: hparams scaling_factor=0.5 vs scaling_factor=0.7"]
  b = _results()
  b["rows"].pop(0)
  assert compare.differences(_results(), b) == [
      "row 'zero-shot' only in the first run"]


def test_main_exit_codes(tmp_path, capsys):
  a, b = tmp_path / "a.json", tmp_path / "b.json"
  a.write_text(json.dumps(_results()))
  b.write_text(json.dumps(_results(sentiment=66.0)))
  assert compare.main([str(a), str(a)]) == 0
  assert compare.main([str(a), str(b)]) == 1
  assert "sentiment 66.41 vs 66.0" in capsys.readouterr().out
  assert compare.main([str(a), str(tmp_path / "missing.json")]) == 2
  assert "missing.json" in capsys.readouterr().err
