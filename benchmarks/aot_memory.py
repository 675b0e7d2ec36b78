#!/usr/bin/env python3
"""Per-device memory of every registry merge on a large mesh, compiled AOT.

Runs `launch/aot_check.py` once per method (each in its own process: the
XLA flags differ) for a 7B-parameter model x 8 tasks in bf16 on 64 fake
CPU devices (mesh fsdp:64), under two XLA:CPU settings:

* `accelerator-like` (aot_check's default): the memory-minimizing
  scheduler and YNNPACK library fusions for dots only, closest to how
  TPU/GPU compilers schedule and fuse;
* `XLA:CPU default`: the concurrency scheduler and every library fusion
  (reductions and elementwise kernels too), what a CPU mesh runs.

Prints a table of peaks per device and peak / arguments, and writes it as
text and JSON:

  python benchmarks/aot_memory.py --out benchmarks/results/aot_memory_7B_8tasks_64dev
  python benchmarks/aot_memory.py --num_params 50M --num_devices 8 \
      --methods task_arithmetic,pcb_merging     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from mtmerge import results as results_lib  # noqa: E402

# (row label, method spec) in the README's order.
METHODS = [
    ("task arithmetic", "task_arithmetic"),
    ("TIES per-tensor", "ties_merging(scope='per_tensor')"),
    ("TIES global", "ties_merging"),
    ("DARE (p=0.9)", "dare(drop_rate=0.9)"),
    ("DARE-TIES", "dare_ties"),
    ("TALL masks", "tall_mask"),
    ("TALL masks on TIES", "tall_mask(base_method='ties')"),
    ("Consensus (TA)", "consensus"),
    ("Consensus on TIES", "consensus(base_method='ties')"),
    ("EMR-Merging", "emr_merging"),
    ("Breadcrumbs", "breadcrumbs"),
    ("magnitude pruning", "magnitude_prune"),
    ("weight averaging", "weight_averaging"),
    ("Model Stock", "model_stock"),
    ("DELLA", "della"),
    ("PCB (paper)", "pcb_merging"),
    ("PCB (official)", "pcb_merging(variant='official')"),
    ("TSV-Merge", "tsv_merging"),
]

SETTINGS = {"accelerator-like": [],
            "XLA:CPU default": ["--concurrency_scheduler",
                                "--cpu_library_fusions"]}

_FIELD = re.compile(r"^\s+(\w+_bytes)\s+([\d.]+) GiB$")


def run_one(spec: str, extra: list[str], a) -> dict:
  """One aot_check run: its per-device GiB fields, or the refusal line."""
  cmd = [sys.executable, os.path.join(ROOT, "launch", "aot_check.py"),
         "--num_devices", str(a.num_devices), "--method", spec,
         "--num_params", a.num_params, "--num_tasks", str(a.num_tasks),
         "--dtype", a.dtype] + extra
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "MTMERGE_AOT_REEXEC", "JAX_PLATFORMS")}
  t0 = time.time()
  p = subprocess.run(cmd, capture_output=True, text=True, env=env,
                     timeout=a.timeout)
  out = {"seconds": round(time.time() - t0, 1)}
  for line in p.stdout.splitlines():
    m = _FIELD.match(line)
    if m:
      out[m.group(1).replace("_bytes", "_gib")] = float(m.group(2))
  if p.returncode != 0 or "peak_estimate_gib" not in out:
    err = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    out["refused"] = err[:300]
  return out


def _cell(r: dict) -> str:
  if "refused" in r:
    return "refused"
  ratio = r["peak_estimate_gib"] / r["argument_size_in_gib"]
  return f"{r['peak_estimate_gib']:.2f} GiB ({ratio:.2f}x)"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--num_params", default="7B")
  p.add_argument("--num_tasks", type=int, default=8)
  p.add_argument("--num_devices", type=int, default=64)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--methods", default="",
                 help="comma-separated method specs (default: every row)")
  p.add_argument("--settings", default=",".join(SETTINGS))
  p.add_argument("--timeout", type=int, default=1800)
  p.add_argument("--out", default="",
                 help="write OUT.txt and OUT.json (atomically)")
  p.add_argument("--previous", default="",
                 help="a results JSON of this script: its rows, with the "
                 "rows run now replacing theirs (same config and settings)")
  a = p.parse_args(argv)
  rows = METHODS
  if a.methods:
    want = a.methods.split(",")
    rows = [r for r in METHODS if r[1] in want] + [
        (s, s) for s in want if s not in {r[1] for r in METHODS}]
  settings = [s for s in a.settings.split(",") if s]
  for s in settings:
    if s not in SETTINGS:
      p.error(f"unknown setting {s!r}; expected one of {list(SETTINGS)}")
  meta = {k: getattr(a, k) for k in ("num_params", "num_tasks",
                                     "num_devices", "dtype")}
  if a.previous:  # checked before anything runs
    with open(a.previous) as f:
      prev = json.load(f)
    if prev["config"] != meta or list(prev["settings"]) != settings:
      p.error(f"{a.previous} was run with {prev['config']} and settings "
              f"{list(prev['settings'])}, not {meta} and {settings}")
  results = []
  for label, spec in rows:
    row = {"method": label, "spec": spec}
    for s in settings:
      row[s] = run_one(spec, SETTINGS[s], a)
      print(f"{label:22s} {s:17s} {_cell(row[s])}", file=sys.stderr,
            flush=True)
    results.append(row)
  if a.previous:
    now = {r["spec"]: r for r in results}
    results = [now.pop(r["spec"], r) for r in prev["results"]] + list(
        now.values())
  head = (f"aot_check: {a.num_params} parameters x {a.num_tasks} tasks, "
          f"{a.dtype}, {a.num_devices} devices (fsdp); peak per device "
          f"(arguments + outputs + temporaries) and its ratio to the "
          f"per-device arguments")
  lines = [head, "", "| method | " + " | ".join(settings) + " |",
           "|---|" + "---|" * len(settings)]
  for row in results:
    lines.append(f"| {row['method']} | " + " | ".join(
        _cell(row[s]) for s in settings) + " |")
  refusals = [(row["method"], s, row[s]["refused"]) for row in results
              for s in settings if "refused" in row[s]]
  if refusals:
    lines.append("")
    lines += [f"{m} ({s}): {why}" for m, s, why in refusals]
  text = "\n".join(lines) + "\n"
  print(text)
  if a.out:
    results_lib.atomic_write_text(a.out + ".txt", text)
    results_lib.write_json(a.out + ".json", {
        "config": meta, "settings": {s: SETTINGS[s] for s in settings},
        "results": results})
  return 0


if __name__ == "__main__":
  sys.exit(main())
