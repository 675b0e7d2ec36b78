"""Result charts (PNG, written atomically; matplotlib's Agg backend)."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence


def bar_chart(rows: Sequence[dict[str, Any]], tasks: Sequence[str],
              path: str, title: str = "") -> str:
  """Average test accuracy per method (bars) with per-task accuracy (dots).

  Args:
    rows: benchmark rows with `method`, `avg` and one column per task.
    tasks: the task columns.
    path: the PNG to write.
    title: chart title.

  Returns:
    `path`.
  """
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  labels = [r["method"] for r in rows]
  fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) + 2), 4.2))
  x = range(len(rows))
  ax.bar(x, [r["avg"] for r in rows], color="#4c72b0", alpha=0.8,
         label="average")
  markers = "os^Dv<>p*h"
  for j, t in enumerate(tasks):
    ax.scatter(x, [r.get(t, float("nan")) for r in rows], s=14,
               marker=markers[j % len(markers)], zorder=3, label=t)
  ax.set_xticks(list(x))
  ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
  ax.set_ylabel("test accuracy (%)")
  lo = min([r["avg"] for r in rows] + [r.get(t, 100) for r in rows
                                       for t in tasks])
  ax.set_ylim(max(0.0, lo - 5), 100)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".png")
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
