r"""Do two benchmark runs agree to the printed digit?

Compares the rows of two `results.json` files written by the default job
(`mtmerge.benchmark`): every accuracy cell (each task, `avg`, `norm`,
`val`, `storage`) and the picked hyperparameters, as printed (two
decimals). Wall-time columns are ignored.

  python benchmarks/compare_results.py RUN_A/results.json RUN_B/results.json

Prints one line per differing cell and a summary; exits 1 if any cell or
row differs, 2 if a file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys

IGNORED = ("s", "grid")


def _load(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SystemExit(f"compare_results: cannot read {path}: {e}") from None
  if not isinstance(out, dict) or "rows" not in out:
    raise SystemExit(f"compare_results: {path} has no 'rows' (not a "
                     "benchmark results.json)")
  return out


def differences(a: dict, b: dict) -> list[str]:
  """Human-readable differences between the rows of two results dicts."""
  rows_a = {r["method"]: r for r in a["rows"]}
  rows_b = {r["method"]: r for r in b["rows"]}
  out = [f"row {m!r} only in the first run" for m in rows_a if m not in rows_b]
  out += [f"row {m!r} only in the second run" for m in rows_b
          if m not in rows_a]
  for m, ra in rows_a.items():
    rb = rows_b.get(m)
    if rb is None:
      continue
    for k in sorted(set(ra) | set(rb)):
      if k in IGNORED or k == "method":
        continue
      va, vb = ra.get(k), rb.get(k)
      if isinstance(va, float) or isinstance(vb, float):
        same = (va is not None and vb is not None and
                f"{float(va):.2f}" == f"{float(vb):.2f}")
      else:
        same = va == vb
      if not same:
        out.append(f"{m}: {k} {va} vs {vb}")
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("first")
  p.add_argument("second")
  args = p.parse_args(argv)
  try:
    a, b = _load(args.first), _load(args.second)
  except SystemExit as e:
    print(e, file=sys.stderr)
    return 2
  diffs = differences(a, b)
  for d in diffs:
    print(d)
  cells = sum(len([k for k in r if k not in IGNORED and k != "method"])
              for r in a["rows"])
  print(f"{len(a['rows'])} rows, {cells} cells compared: "
        f"{len(diffs)} differ")
  return 1 if diffs else 0


if __name__ == "__main__":
  sys.exit(main())
