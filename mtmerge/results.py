"""Result tables: printed, and written atomically as JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from typing import Any, Sequence

import numpy as np


def accuracy_row(label: str, accs: dict[str, float],
                 indiv: dict[str, float] | None = None, **extra) -> dict:
  """One table row: `method`, each task's accuracy and their mean `avg` in
  percent (2 decimals), `norm` (mean of acc / individual acc, %) when
  `indiv` is given, then `extra` columns in their order."""
  row = {"method": label, **{t: round(100 * a, 2) for t, a in accs.items()}}
  row["avg"] = round(100 * float(np.mean(list(accs.values()))), 2)
  if indiv is not None:
    row["norm"] = round(100 * float(np.mean(
        [accs[t] / max(indiv[t], 1e-9) for t in accs])), 2)
  row.update(extra)
  return row


def umask_mode() -> int:
  """`0o666` less the process umask: the mode `open()` gives a new file.

  `tempfile.mkstemp` creates its files 0600; outputs written through one
  get this mode before they are renamed into place.
  """
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` via a temp file + `os.replace` (never partial)."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.chmod(tmp, umask_mode())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  cols = list(dict.fromkeys(k for r in rows for k in r))
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=cols)
  w.writeheader()
  w.writerows(rows)
  atomic_write_text(path, buf.getvalue())


def format_table(rows: Sequence[dict[str, Any]], floatfmt: str = "{:.4g}") -> str:
  """A plain fixed-width text table of `rows` (dicts sharing keys)."""
  cols = list(dict.fromkeys(k for r in rows for k in r))
  def fmt(v):
    return floatfmt.format(v) if isinstance(v, float) else str(v)
  cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in
            enumerate(cols)]
  line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w)
                                for i, (v, w) in enumerate(zip(vals, widths)))
  return "\n".join([line(cols), line(["-" * w for w in widths])] +
                   [line(r) for r in cells])
