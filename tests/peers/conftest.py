"""Skips tests/peers unless the peers (torch, mergekit, fusion_bench) import.

Install them with `pip install -e '.[peers]'` (torch's CPU build first,
see README) and run `python -m pytest tests/peers`. The test modules
import the peers only inside their fixtures, so collection never fails.
"""

import importlib.util
import os

import pytest

MISSING = [m for m in ("torch", "mergekit", "fusion_bench")
           if importlib.util.find_spec(m) is None]
_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
  del config
  if not MISSING:
    return
  skip = pytest.mark.skip(reason=f"peer parity tests need "
                          f"{', '.join(MISSING)} (pip install -e '.[peers]')")
  for item in items:
    if str(item.path).startswith(_HERE + os.sep):
      item.add_marker(skip)
