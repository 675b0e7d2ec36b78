"""Result charts (PNG, written atomically; matplotlib's Agg backend)."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

from mtmerge import results


def bar_chart(rows: Sequence[dict[str, Any]], tasks: Sequence[str],
              path: str, title: str = "",
              learned: Sequence[str] = ()) -> str:
  """Each method's accuracy minus the individual models' (what matters).

  Horizontal bars: average test accuracy minus the `individual` row's
  average, in points (0 = as good as one fine-tuned model per task);
  dots: the same per task. The zero-shot (or linear-probe) row is a dashed
  reference line, individual the solid line at 0. Training-free and
  learned methods are grouped and colored apart.

  Args:
    rows: benchmark rows with `method`, `avg` and one column per task;
      the first is the pretrained reference, the second `individual`.
    tasks: the task columns.
    path: the PNG to write.
    title: chart title.
    learned: labels of the learned rows (the second group).

  Returns:
    `path`.
  """
  # A bare Figure (no pyplot): no global backend switch, so a notebook that
  # calls this keeps its inline plots.
  from matplotlib import figure as figure_lib
  ref, indiv, methods = rows[0], rows[1], list(rows[2:])
  learned = set(learned)
  methods = ([r for r in methods if r["method"] not in learned] +
             [r for r in methods if r["method"] in learned])
  fig = figure_lib.Figure(figsize=(8.0, 0.32 * len(methods) + 1.8))
  ax = fig.subplots()
  y = list(range(len(methods)))[::-1]
  diff = [r["avg"] - indiv["avg"] for r in methods]
  colors = ["#dd8452" if r["method"] in learned else "#4c72b0"
            for r in methods]
  ax.barh(y, diff, color=colors, alpha=0.85, height=0.7)
  markers = "os^Dv<>p*h"
  for j, t in enumerate(tasks):
    ax.scatter([r.get(t, float("nan")) - indiv.get(t, 0.0) for r in methods],
               y, s=10, marker=markers[j % len(markers)], color="0.25",
               alpha=0.6, zorder=3, label=t)
  zs = ref["avg"] - indiv["avg"]
  ax.axvline(0.0, color="black", lw=1.0,
             label=f"individual ({indiv['avg']:.1f})")
  ax.axvline(zs, color="#c44e52", ls="--", lw=1.2,
             label=f"{ref['method']} ({ref['avg']:.1f})")
  ax.set_yticks(y)
  ax.set_yticklabels([r["method"] for r in methods], fontsize=8)
  for tick, c in zip(ax.get_yticklabels(), colors):
    tick.set_color(c)
  ax.set_xlabel("test accuracy minus individual fine-tuned (points); "
                "blue: training-free, orange: learned", fontsize=8)
  ax.set_ylim(-0.8, len(methods) + 0.6)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  ax.grid(axis="x", alpha=0.3)
  fig.tight_layout()
  return save_png(fig, path)


def save_png(fig, path: str, dpi: int = 120) -> str:
  """Writes a matplotlib figure to `path` atomically (a temporary file in
  the same directory, then a rename); returns `path`."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".png")
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=dpi)
    os.chmod(tmp, results.umask_mode())  # mkstemp's file is 0600
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
