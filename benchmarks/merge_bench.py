#!/usr/bin/env python
"""mtmerge vs FusionBench vs mergekit: wall time, peak memory, agreement.

Builds a synthetic CLIP ViT-B/32-like base model and T "fine-tuned" models
(float32 `.safetensors`), then runs every (method, tool) measurement in its own
subprocess so that peak RSS is per tool:

  * TIES, global top-k (the paper / FusionBench): mtmerge vs FusionBench
    (`ties_merging_utils`: flatten, `ties_merging(..., merge_func='sum')`,
    `theta_0 + 0.3 * tau`).
  * TIES, per-tensor top-k with mergekit semantics (disjoint mean, zero sign
    positive, weights 1, lambda 1): mtmerge vs mergekit `ties`
    (`merge_state_dicts`).
  * Task arithmetic (lambda 0.3): mtmerge vs FusionBench vs mergekit.

Each child reports load+merge wall time (after imports), merge-only time and
peak RSS (`ru_maxrss`, read right after the merge, before the result is
saved); mtmerge children also report the XLA compile time inside the first
merge (`compile s`: JAX's backend-compile events; 0 when every program came
from the persistent cache) and a second ("warm", already compiled) call.
Results are saved to the work dir and compared tensor by tensor.

    python benchmarks/merge_bench.py --params 2e6 --tasks 4      # smoke, <1 min
    python benchmarks/merge_bench.py --tasks 8 --params 88e6 \
        --json benchmarks/results/merge_bench_88M_8tasks.json

mtmerge children run with this interpreter (mtmerge importable: installed,
or found via PYTHONPATH, which is set to the repository root); peer children
run with `--peers-python` (a venv with torch, fusion-bench and mergekit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024 ** 3
STAMP_VERSION = 2
TV_SCALE = 1e-3  # typical |theta_t - theta_0| of the synthetic models

# name -> (tool, method label)
MEASUREMENTS = {
    "mtmerge_ties_global": ("mtmerge", "TIES global"),
    "mtmerge_streamed_ties_global": ("mtmerge CLI", "TIES global"),
    "fusionbench_ties_global": ("FusionBench", "TIES global"),
    "mtmerge_ties_per_tensor": ("mtmerge", "TIES per-tensor"),
    "mergekit_ties_per_tensor": ("mergekit", "TIES per-tensor"),
    "mtmerge_task_arithmetic": ("mtmerge", "task arithmetic"),
    "mtmerge_streamed_task_arithmetic": ("mtmerge CLI", "task arithmetic"),
    "fusionbench_task_arithmetic": ("FusionBench", "task arithmetic"),
    "mergekit_task_arithmetic": ("mergekit", "task arithmetic"),
}
METHOD_ORDER = ["TIES global", "TIES per-tensor", "task arithmetic"]


# ---------------------------------------------------------------------------
# Synthetic checkpoints.


def clip_vit_layout(width: int, layers: int = 12, patch: int = 32,
                    tokens: int = 50) -> list[tuple[str, tuple[int, ...]]]:
  """open_clip ViT-B/32 visual tower names and shapes at a given width."""
  d, out = width, max(8, (2 * width) // 3)
  spec = [("visual.class_embedding", (d,)),
          ("visual.positional_embedding", (tokens, d)),
          ("visual.conv1.weight", (d, 3, patch, patch)),
          ("visual.ln_pre.weight", (d,)), ("visual.ln_pre.bias", (d,))]
  for i in range(layers):
    p = f"visual.transformer.resblocks.{i}."
    spec += [(p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
             (p + "attn.in_proj_weight", (3 * d, d)),
             (p + "attn.in_proj_bias", (3 * d,)),
             (p + "attn.out_proj.weight", (d, d)),
             (p + "attn.out_proj.bias", (d,)),
             (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
             (p + "mlp.c_fc.weight", (4 * d, d)), (p + "mlp.c_fc.bias", (4 * d,)),
             (p + "mlp.c_proj.weight", (d, 4 * d)),
             (p + "mlp.c_proj.bias", (d,))]
  spec += [("visual.ln_post.weight", (d,)), ("visual.ln_post.bias", (d,)),
           ("visual.proj", (d, out))]
  return spec


def _numel(shape) -> int:
  n = 1
  for s in shape:
    n *= s
  return n


def layout_for(params: float) -> list[tuple[str, tuple[int, ...]]]:
  """The ViT-B/32-like layout whose size is closest to `params` (width % 8)."""
  best = None
  for w in range(8, 8192, 8):
    n = sum(_numel(s) for _, s in clip_vit_layout(w))
    if best is None or abs(n - params) < abs(best[1] - params):
      best = (w, n)
    if n > params:
      break
  return clip_vit_layout(best[0])


def _base_tensor(rng, name, shape):
  import numpy as np
  if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or (
      "ln_p" in name and name.endswith(".weight")):
    return (1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32))
  if name.endswith("bias"):
    return 0.01 * rng.standard_normal(shape, dtype=np.float32)
  return 0.02 * rng.standard_normal(shape, dtype=np.float32)


def build_checkpoints(workdir: str, params: float, tasks: int, seed: int
                      ) -> tuple[str, list[str], dict]:
  """Writes base.safetensors and model_{t}.safetensors unless stamped."""
  import numpy as np
  from safetensors.numpy import save_file
  layout = layout_for(params)
  n = sum(_numel(s) for _, s in layout)
  cfg = {"version": STAMP_VERSION, "params": n, "tasks": tasks, "seed": seed,
         "width": layout[0][1][0], "tensors": len(layout),
         "tv_scale": TV_SCALE}
  os.makedirs(workdir, exist_ok=True)
  base_path = os.path.join(workdir, "base.safetensors")
  model_paths = [os.path.join(workdir, f"model_{t}.safetensors")
                 for t in range(tasks)]
  stamp = os.path.join(workdir, "checkpoints.json")
  if os.path.exists(stamp) and all(map(os.path.exists,
                                       [base_path] + model_paths)):
    with open(stamp) as f:
      if json.load(f) == cfg:
        print(f"reusing checkpoints in {workdir} ({n / 1e6:.1f}M params x "
              f"{tasks} tasks)", flush=True)
        return base_path, model_paths, cfg
  if os.path.exists(stamp):
    os.remove(stamp)
  t0 = time.perf_counter()
  rng = np.random.default_rng([seed, 0])
  base = {name: _base_tensor(rng, name, shape) for name, shape in layout}
  save_file(base, base_path)
  for t, path in enumerate(model_paths):
    rng = np.random.default_rng([seed, t + 1])
    model = {}
    for name, shape in layout:
      # Per-tensor scale varies (log-normal), so global and per-tensor top-k
      # select different entries, as with real fine-tuning.
      s = np.float32(TV_SCALE * np.exp(0.5 * rng.standard_normal()))
      delta = rng.standard_normal(shape, dtype=np.float32)
      delta *= s
      delta += base[name]
      model[name] = delta
    save_file(model, path)
    del model
  with open(stamp, "w") as f:
    json.dump(cfg, f)
  print(f"wrote {tasks + 1} checkpoints of {n / 1e6:.1f}M params to {workdir} "
        f"in {time.perf_counter() - t0:.1f}s", flush=True)
  return base_path, model_paths, cfg


# ---------------------------------------------------------------------------
# Children: one measurement each, printing `RESULT {json}`.


def _maxrss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux KiB


def _load_mtmerge(base_path, model_paths):
  """(base, tvs, loader name): as mtmerge's CLI loads (tensors moved to the
  device one at a time)."""
  from mtmerge import task_vectors
  kw = {"as_jax": True, "progress": False}
  base, tvs, _ = task_vectors.from_checkpoints(base_path, model_paths, **kw)
  return base, tvs, f"mtmerge.task_vectors.from_checkpoints({kw})"


def child_mtmerge(name, base_path, model_paths, threshold, out_path):
  import jax
  import numpy as np
  from mtmerge import methods
  from mtmerge import runtime
  runtime.configure_xla()  # as `mtmerge merge` does
  cache_dir = os.environ.get("MTMERGE_BENCH_CACHE")
  if cache_dir:  # as the CLI does: JAX's persistent compile cache
    runtime.enable_compile_cache(cache_dir)
    min_s = os.environ.get("MTMERGE_BENCH_CACHE_MIN_S")
    if min_s:
      jax.config.update("jax_persistent_cache_min_compile_time_secs",
                        float(min_s))
  cache_files0 = len(os.listdir(cache_dir)) if cache_dir else 0
  # JAX's backend-compile event also covers persistent-cache hits; its
  # retrieval event tells them apart.
  compiles, hits = [], []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: (
          compiles.append(secs)
          if event == "/jax/core/compile/backend_compile_duration" else
          hits.append(secs)
          if event == "/jax/compilation_cache/cache_retrieval_time_sec"
          else None))
  T = len(model_paths)
  kind = name.replace("_streamed", "")
  if kind == "mtmerge_ties_global":
    method, hp = "ties_merging", dict(threshold=threshold, merge_func="sum",
                                      scaling_factor=0.3, scope="global")
  elif kind == "mtmerge_ties_per_tensor":
    method, hp = "ties_merging", dict(
        threshold=threshold, merge_func="mean", zero_sign="positive",
        scope="per_tensor", scaling_factor=1.0, weights=[1.0] * T)
  else:
    method, hp = "task_arithmetic", dict(scaling_factor=0.3)
  rss0 = _maxrss_bytes()
  if "_streamed_" in name:
    return dict(_streamed(method, hp, base_path, model_paths, out_path,
                          compiles, hits),
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                compile_cache=cache_dir or "off",
                compile_cache_entries_before=cache_files0,
                rss_after_imports=rss0,
                devices=[str(d) for d in jax.devices()],
                jax_version=jax.__version__)
  t0 = time.perf_counter()
  base, tvs, how = _load_mtmerge(base_path, model_paths)
  jax.block_until_ready((base, tvs))
  t1 = time.perf_counter()
  n0, h0 = len(compiles), len(hits)
  out = jax.block_until_ready(methods.merge(method, base, tvs, **hp))
  t2 = time.perf_counter()
  first, first_hits = compiles[n0:], hits[h0:]
  rss_merge = _maxrss_bytes()
  out2 = jax.block_until_ready(methods.merge(method, base, tvs, **hp))
  t3 = time.perf_counter()
  del out2
  rss_warm = _maxrss_bytes()
  from safetensors.numpy import save_file
  save_file({k: np.asarray(v) for k, v in out.items()}, out_path)
  return dict(load_s=t1 - t0, merge_s=t2 - t1, wall_s=t2 - t0, warm_s=t3 - t2,
              compile_s=sum(first) - sum(first_hits),
              compiled_programs=len(first) - len(first_hits),
              cache_hits=len(first_hits), cache_retrieval_s=sum(first_hits),
              warm_compiled_programs=(len(compiles) - n0 - len(first)
                                      - (len(hits) - h0 - len(first_hits))),
              peak_rss=rss_merge, peak_rss_incl_warm=rss_warm,
              xla_flags=os.environ.get("XLA_FLAGS", ""),
              compile_cache=cache_dir or "off",
              compile_cache_entries_before=cache_files0,
              rss_after_imports=rss0, loader=how,
              devices=[str(d) for d in jax.devices()],
              jax_version=jax.__version__)


def _streamed(method, hp, base_path, model_paths, out_path, compiles, hits):
  """What `mtmerge merge` runs by default: `streaming.merge_files` from the
  files to the output file (reading, merging and writing; no load phase).
  `warm` repeats it into a second file (compiled programs reused)."""
  from mtmerge import streaming
  t0 = time.perf_counter()
  streaming.merge_files(method, base_path, model_paths, out_path,
                        progress=False, **hp)
  t1 = time.perf_counter()
  first, first_hits = list(compiles), list(hits)
  rss = _maxrss_bytes()
  warm_out = out_path + ".warm.safetensors"
  streaming.merge_files(method, base_path, model_paths, warm_out,
                        progress=False, **hp)
  t2 = time.perf_counter()
  os.remove(warm_out)
  return dict(load_s=0.0, merge_s=t1 - t0, wall_s=t1 - t0, warm_s=t2 - t1,
              compile_s=sum(first) - sum(first_hits),
              compiled_programs=len(first) - len(first_hits),
              cache_hits=len(first_hits), cache_retrieval_s=sum(first_hits),
              peak_rss=rss, peak_rss_incl_warm=_maxrss_bytes(),
              loader="streaming.merge_files (reads, merges and writes)")


def _torch_load(base_path, model_paths):
  from safetensors.torch import load_file
  return load_file(base_path), [load_file(p) for p in model_paths]


def _torch_save(state_dict, out_path):
  from safetensors.torch import save_file
  save_file({k: v.detach().clone().contiguous() for k, v in state_dict.items()},
            out_path)


def child_fusionbench(name, base_path, model_paths, threshold, out_path):
  import contextlib
  import io
  import torch
  from fusion_bench.method.ties_merging.ties_merging_utils import (
      state_dict_to_vector, ties_merging, vector_to_state_dict)
  from fusion_bench.utils.state_dict_arithmetic import (
      state_dict_add, state_dict_mul, state_dict_sub)
  import fusion_bench
  rss0 = _maxrss_bytes()
  with torch.no_grad():
    t0 = time.perf_counter()
    ptm_check, ft_checks = _torch_load(base_path, model_paths)
    t1 = time.perf_counter()
    if name == "fusionbench_ties_global":
      # TiesMergingAlgorithm.run, "merging models" section, verbatim.
      remove_keys = []
      flat_ft = torch.vstack(
          [state_dict_to_vector(check, remove_keys) for check in ft_checks])
      flat_ptm = state_dict_to_vector(ptm_check, remove_keys)
      tv_flat_checks = flat_ft - flat_ptm
      with contextlib.redirect_stdout(io.StringIO()):  # its debug prints
        merged_tv = ties_merging(tv_flat_checks, reset_thresh=threshold,
                                 merge_func="sum")
      merged_check = flat_ptm + 0.3 * merged_tv
      state_dict = vector_to_state_dict(merged_check, ptm_check,
                                        remove_keys=remove_keys)
    else:
      # task_arithmetic_merge's state-dict loop, verbatim.
      task_vector = None
      for model in ft_checks:
        if task_vector is None:
          task_vector = state_dict_sub(model, ptm_check)
        else:
          task_vector = state_dict_add(task_vector,
                                       state_dict_sub(model, ptm_check))
      task_vector = state_dict_mul(task_vector, 0.3)
      state_dict = state_dict_add(ptm_check, task_vector)
    t2 = time.perf_counter()
  rss_merge = _maxrss_bytes()
  _torch_save(state_dict, out_path)
  return dict(load_s=t1 - t0, merge_s=t2 - t1, wall_s=t2 - t0, warm_s=None,
              peak_rss=rss_merge, rss_after_imports=rss0,
              torch_version=torch.__version__,
              torch_threads=torch.get_num_threads(),
              fusion_bench_version=getattr(fusion_bench, "__version__", "?"))


def child_mergekit(name, base_path, model_paths, threshold, out_path):
  import importlib.metadata
  import torch
  from mergekit.merge_methods import merge_state_dicts
  rss0 = _maxrss_bytes()
  with torch.no_grad():
    t0 = time.perf_counter()
    base, models = _torch_load(base_path, model_paths)
    t1 = time.perf_counter()
    sds = {"base": base, **{f"m{t}": m for t, m in enumerate(models)}}
    if name == "mergekit_ties_per_tensor":
      merged = merge_state_dicts(
          sds, "ties", base="base",
          parameters={"density": threshold, "weight": 1.0, "normalize": True,
                      "lambda": 1.0})
    else:
      merged = merge_state_dicts(sds, "task_arithmetic", base="base",
                                 parameters={"weight": 0.3})
    t2 = time.perf_counter()
  rss_merge = _maxrss_bytes()
  _torch_save(merged, out_path)
  return dict(load_s=t1 - t0, merge_s=t2 - t1, wall_s=t2 - t0, warm_s=None,
              peak_rss=rss_merge, rss_after_imports=rss0,
              torch_version=torch.__version__,
              torch_threads=torch.get_num_threads(),
              mergekit_version=importlib.metadata.version("mergekit"))


def run_child(args):
  with open(os.path.join(args.workdir, "checkpoints.json")) as f:
    cfg = json.load(f)
  base_path = os.path.join(args.workdir, "base.safetensors")
  model_paths = [os.path.join(args.workdir, f"model_{t}.safetensors")
                 for t in range(cfg["tasks"])]
  out_path = os.path.join(args.workdir, f"out_{args.child}.safetensors")
  fn = {"mtmerge": child_mtmerge, "fusionbench": child_fusionbench,
        "mergekit": child_mergekit}[args.child.split("_")[0]]
  res = fn(args.child, base_path, model_paths, args.threshold, out_path)
  res.update(name=args.child, out=out_path, python=sys.executable)
  print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------
# Parent: run children, compare outputs, print the table.


def _busy_cpu_s() -> float:
  """CPU seconds all processes on the host have used (from /proc/stat)."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return float("nan")
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _mem_available_gib() -> float:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) / 2 ** 20
  except OSError:
    pass
  return float("nan")


def wait_quiet(max_s: float, busy_cores: float = 0.15, window_s: float = 3.0,
               windows: int = 3) -> float:
  """Waits (up to max_s) until the host is idle for `windows` windows.

  On a shared machine other jobs distort both timings and peak memory (and
  can get a child OOM-killed); returns the seconds waited.
  """
  t0 = time.perf_counter()
  quiet = 0
  while time.perf_counter() - t0 < max_s and quiet < windows:
    b0 = _busy_cpu_s()
    time.sleep(window_s)
    quiet = quiet + 1 if (_busy_cpu_s() - b0) / window_s < busy_cores else 0
  return time.perf_counter() - t0


def _children_cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def spawn(name, python, args, env_extra=None):
  cmd = [python, os.path.abspath(__file__), "--child", name,
         "--workdir", args.workdir, "--threshold", str(args.threshold)]
  env = dict(os.environ)
  # JAX's real device count: drop any forced host-device count.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  if env_extra:
    env.update(env_extra)
  flags += env.pop("MTMERGE_BENCH_XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(flags)
  waited = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else 0.0
  mem_free = _mem_available_gib()
  load = os.getloadavg()
  print(f"-- {name} ({python}; waited {waited:.0f}s for an idle host, "
        f"{mem_free:.1f} GiB available, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f})", flush=True)
  t0 = time.perf_counter()
  busy0, own0 = _busy_cpu_s(), _children_cpu_s()
  proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None,
                        text=True)
  busy1, own1 = _busy_cpu_s(), _children_cpu_s()
  result = None
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      result = json.loads(line[len("RESULT "):])
    elif line.strip():
      print("   " + line, flush=True)
  if proc.returncode != 0 or result is None:
    why = f"exit {proc.returncode}" + (
        ", killed: out of memory?" if proc.returncode == -9 else "")
    print(f"   FAILED ({why})", flush=True)
    return dict(name=name, error=why)
  result["process_s"] = time.perf_counter() - t0
  result["mem_available_gib_at_start"] = mem_free
  result["loadavg_at_start"] = list(load)
  result["waited_for_idle_s"] = waited
  # CPU time used by OTHER processes while this child ran: > a few seconds
  # means the timings were taken on a shared, busy machine.
  result["child_cpu_s"] = own1 - own0
  result["other_cpu_s"] = max(0.0, (busy1 - busy0) - (own1 - own0))
  print(f"   load+merge {result['wall_s']:.2f}s (load {result['load_s']:.2f}s, "
        f"merge {result['merge_s']:.2f}s"
        + (f" incl. XLA compile {result['compile_s']:.2f}s of "
           f"{result['compiled_programs']} programs"
           if "compile_s" in result else "")
        + (f", warm {result['warm_s']:.2f}s" if result.get("warm_s") else "")
        + f"), peak RSS {result['peak_rss'] / GiB:.2f} GiB; other processes "
        f"used {result['other_cpu_s']:.1f} CPU-s meanwhile", flush=True)
  return result


def compare(path_a, path_b, atol, rtol=1e-6):
  """Entries differing by more than atol + rtol*|b|, max diffs, tensor count."""
  import numpy as np
  from safetensors import safe_open
  n = n_diff = 0
  max_diff = max_noise = 0.0
  with safe_open(path_a, framework="np") as fa, safe_open(
      path_b, framework="np") as fb:
    keys = sorted(fa.keys())
    if keys != sorted(fb.keys()):
      raise ValueError(f"{path_a} and {path_b} have different tensor names")
    for k in keys:
      a = fa.get_tensor(k).astype(np.float64)
      b = fb.get_tensor(k).astype(np.float64)
      if a.shape != b.shape:
        raise ValueError(f"{k}: shape {a.shape} vs {b.shape}")
      d = np.abs(a - b)
      bad = d > atol + rtol * np.abs(b)
      n += d.size
      n_diff += int(bad.sum())
      if d.size:
        max_diff = max(max_diff, float(d.max()))
        ok = d[~bad]
        if ok.size:
          max_noise = max(max_noise, float(ok.max()))
  return dict(n=n, n_diff=n_diff, frac_diff=n_diff / max(n, 1),
              max_abs_diff=max_diff, max_abs_diff_agreeing=max_noise)


def k_rounding_bound(layout_shapes, tasks, threshold):
  """Entries that may differ from mergekit's floor(k) vs mtmerge round-half-up."""
  import math
  total = 0
  for shape in layout_shapes:
    n = _numel(shape)
    k_mk = max(1, int(threshold * n))
    k_mt = int(min(max(math.floor(threshold * n + 0.5), 1), n))
    total += tasks * abs(k_mt - k_mk)
  return total


def agreement(results, args, cfg):
  ok = {r["name"]: r for r in results if "error" not in r}
  requested = {r["name"] for r in results}
  atol = 1e-3 * TV_SCALE  # 1e-3 of a task-vector entry: pure float noise
  layout = layout_for(cfg["params"])
  T = cfg["tasks"]
  checks = []

  def pair(a, b, label, criterion):
    if a not in ok or b not in ok:
      if {a, b} <= requested:
        checks.append(dict(pair=label, status="SKIP",
                           reason="missing result"))
      return
    c = compare(ok[a]["out"], ok[b]["out"], atol)
    status, note = criterion(c)
    c.update(pair=label, status=status, note=note)
    checks.append(c)

  # FusionBench keeps k+1 entries per task (kthvalue at d - int(d*K)) where
  # mtmerge keeps k = round(K*d): up to T entries (one per task) differ.
  pair("mtmerge_ties_global", "fusionbench_ties_global",
       "TIES global: mtmerge vs FusionBench",
       lambda c: ("PASS" if c["frac_diff"] < 1e-5 else "FAIL",
                  f"frac differing < 1e-5 (FusionBench keeps k+1 per task: "
                  f"<= {T} expected, plus sign votes within float rounding "
                  f"of 0)"))
  pair("mtmerge_streamed_ties_global", "fusionbench_ties_global",
       "TIES global: mtmerge CLI (streamed) vs FusionBench",
       lambda c: ("PASS" if c["frac_diff"] < 1e-5 else "FAIL",
                  "as the in-memory merge"))
  for m in ("ties_global", "task_arithmetic"):
    pair(f"mtmerge_{m}", f"mtmerge_streamed_{m}",
         f"{m}: mtmerge in memory vs streamed",
         lambda c: ("PASS" if c["n_diff"] == 0 else "FAIL",
                    f"all entries within {atol:g} + 1e-6*|x|"))
  bound = k_rounding_bound([s for _, s in layout], T, args.threshold)
  slack = int(1e-6 * cfg["params"]) + T
  pair("mtmerge_ties_per_tensor", "mergekit_ties_per_tensor",
       "TIES per-tensor: mtmerge vs mergekit",
       lambda c: ("PASS" if c["n_diff"] <= bound + slack else "FAIL",
                  f"n_diff <= {bound} (mergekit floor(k) vs mtmerge "
                  f"round-half-up k, one entry per task and tensor) + "
                  f"{slack} (ties)"))
  for peer in ("fusionbench", "mergekit"):
    pair("mtmerge_task_arithmetic", f"{peer}_task_arithmetic",
         f"task arithmetic: mtmerge vs {MEASUREMENTS[peer + '_task_arithmetic'][0]}",
         lambda c: ("PASS" if c["n_diff"] == 0 else "FAIL",
                    f"all entries within {atol:g} + 1e-6*|x|"))
  return checks


def mtmerge_revision() -> str:
  """`git describe`-like commit of the mtmerge checkout (+dirty if modified)."""
  try:
    head = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short",
                           "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain",
                            "mtmerge"], capture_output=True, text=True,
                           check=True).stdout.strip()
    return head + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def table(results, checks, cfg, args):
  ok = {r["name"]: r for r in results if "error" not in r}
  requested = {r["name"] for r in results}
  errors = {r["name"]: r["error"] for r in results if "error" in r}
  lines = []
  lines.append(
      f"merge_bench: {cfg['params'] / 1e6:.1f}M params x {cfg['tasks']} tasks "
      f"(ViT-B/32-like, width {cfg['width']}, {cfg['tensors']} tensors, "
      f"float32), TIES keeps {args.threshold:g}")
  lines.append(f"host: {os.cpu_count()} cores; times exclude Python/library "
               "imports; wall = load+merge (mtmerge: incl. compile); "
               "warm = 2nd mtmerge call (merge only);")
  lines.append("compile s = XLA compile inside mtmerge's first merge "
               "(programs compiled, programs from the persistent cache);")
  lines.append("other CPU-s = CPU time used by other processes on the host "
               "during that child (noise indicator)")
  mt_flags = sorted({r.get("xla_flags", "") for n, r in ok.items()
                     if n.startswith("mtmerge")})
  lines.append(f"mtmerge {args.revision}; mtmerge children's XLA_FLAGS: "
               f"{' | '.join(mt_flags) or '(none)'}")
  cache = {n: r.get("compile_cache_entries_before") for n, r in ok.items()
           if n.startswith("mtmerge")}
  lines.append(f"mtmerge compile cache: {args.compile_cache} (entries found "
               f"at start per child: {cache}"
               + (f"; min compile time to cache {args.cache_min_compile_s} s"
                  if args.cache_min_compile_s is not None else "") + ")")
  loads = {n: round(r["loadavg_at_start"][0], 2) for n, r in ok.items()
           if "loadavg_at_start" in r}
  lines.append(f"1-min load average at each child's start: {loads}")
  hdr = (f"{'method':<17}{'tool':<13}{'wall s':>8}{'load s':>8}{'merge s':>9}"
         f"{'warm s':>8}{'compile s':>12}{'RSS GiB':>9}{'peer/mt wall':>14}"
         f"{'peer/mt merge':>15}"
         f"{'mt/peer RSS':>13}{'other CPU-s':>13}")
  lines.append(hdr)
  lines.append("-" * len(hdr))
  ratios = {}
  for method in METHOD_ORDER:
    names = [n for n, (_, m) in MEASUREMENTS.items() if m == method]
    mt = ok.get(names[0])
    for n in names:
      tool = MEASUREMENTS[n][0]
      r = ok.get(n)
      if r is None:
        if n in requested:
          lines.append(f"{method:<17}{tool:<13}  FAILED "
                       f"({errors.get(n, 'no result')})")
        continue
      rw = rm = rr = None
      if mt is not None and not n.startswith("mtmerge"):
        rw = r["wall_s"] / mt["wall_s"]
        rm = r["merge_s"] / mt["merge_s"]
        rr = mt["peak_rss"] / r["peak_rss"]
        ratios[n] = dict(peer_over_mtmerge_wall=rw,
                         peer_over_mtmerge_merge=rm,
                         mtmerge_over_peer_rss=rr)
      comp = (None if r.get("compile_s") is None else
              f"{r['compile_s']:.2f} ({r['compiled_programs']},"
              f"{r.get('cache_hits', 0)})")
      lines.append(
          f"{method:<17}{tool:<13}{r['wall_s']:>8.2f}{r['load_s']:>8.2f}"
          f"{r['merge_s']:>9.2f}{_fmt(r.get('warm_s'), '8.2f'):>8}"
          f"{comp or '-':>12}"
          f"{r['peak_rss'] / GiB:>9.2f}{_fmt(rw, '14.2f'):>14}"
          f"{_fmt(rm, '15.2f'):>15}{_fmt(rr, '13.2f'):>13}"
          f"{_fmt(r.get('other_cpu_s'), '13.1f'):>13}")
  lines.append("")
  lines.append("agreement:")
  for c in checks:
    if c["status"] == "SKIP":
      lines.append(f"  SKIP {c['pair']}: {c['reason']}")
      continue
    lines.append(
        f"  {c['status']} {c['pair']}: {c['n_diff']} of {c['n']} entries differ "
        f"({c['frac_diff']:.2e}); max |diff| {c['max_abs_diff']:.2e}, "
        f"agreeing entries {c['max_abs_diff_agreeing']:.2e}  [{c['note']}]")

  # Issue goal: mtmerge TIES >= 2x faster than the faster peer, RSS <= 0.5x FB.
  goal = {}
  mt = ok.get("mtmerge_ties_global")
  peers = [ok[n] for n in ("fusionbench_ties_global",
                           "mergekit_ties_per_tensor") if n in ok]
  fb = ok.get("fusionbench_ties_global")
  if mt and peers and fb:
    fastest = min(peers, key=lambda r: r["wall_s"])
    goal = dict(
        fastest_peer=fastest["name"],
        speedup_wall=fastest["wall_s"] / mt["wall_s"],
        speedup_warm_merge=fastest["merge_s"] / mt["warm_s"],
        rss_ratio_vs_fusionbench=mt["peak_rss"] / fb["peak_rss"])
    goal["speed_met"] = goal["speedup_wall"] >= 2.0
    goal["memory_met"] = goal["rss_ratio_vs_fusionbench"] <= 0.5
    lines.append("")
    lines.append(
        f"goal (mtmerge TIES global vs fastest peer TIES, "
        f"{MEASUREMENTS[fastest['name']][0]}): speedup {goal['speedup_wall']:.2f}x "
        f"load+merge incl. compile (warm merge vs peer merge: "
        f"{goal['speedup_warm_merge']:.2f}x) -> "
        f"{'MET' if goal['speed_met'] else 'NOT MET'} (>= 2x); peak RSS "
        f"{goal['rss_ratio_vs_fusionbench']:.2f}x FusionBench -> "
        f"{'MET' if goal['memory_met'] else 'NOT MET'} (<= 0.5x; the goal "
        f"is stated for 8 tasks x 88M params)")
  ms = ok.get("mtmerge_streamed_ties_global")
  if ms and peers and fb:
    fastest = min(peers, key=lambda r: r["wall_s"])
    goal.update(
        streamed_speedup_wall=fastest["wall_s"] / ms["wall_s"],
        streamed_rss_ratio_vs_fusionbench=ms["peak_rss"] / fb["peak_rss"])
    lines.append(
        f"mtmerge CLI (streamed from files, output written): speedup "
        f"{goal['streamed_speedup_wall']:.2f}x vs "
        f"{MEASUREMENTS[fastest['name']][0]}'s load+merge, peak RSS "
        f"{goal['streamed_rss_ratio_vs_fusionbench']:.2f}x FusionBench")
  return "\n".join(lines), ratios, goal


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tasks", type=int, default=8)
  p.add_argument("--params", type=float, default=88e6,
                 help="approximate parameters per model (e.g. 2e6 for a smoke "
                      "run)")
  p.add_argument("--threshold", type=float, default=0.2,
                 help="TIES kept fraction (FusionBench reset_thresh / 100, "
                      "mergekit density)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default=None,
                 help="where checkpoints and merged outputs go (default: "
                      "$TMPDIR/mtmerge_merge_bench/<params>_<tasks>)")
  p.add_argument("--peers-python",
                 default=os.environ.get("MTMERGE_PEERS_PYTHON"),
                 help="interpreter with torch, fusion-bench, mergekit "
                      "(default: $MTMERGE_PEERS_PYTHON if set, else this "
                      "one)")
  p.add_argument("--only", default=None,
                 help="comma-separated subset of: " + ",".join(MEASUREMENTS))
  p.add_argument("--mtmerge-xla-flags", default=None,
                 help="extra XLA_FLAGS for the mtmerge children only, e.g. "
                      "'--xla_cpu_experimental_ynn_fusion_type="
                      "-LIBRARY_FUSION_TYPE_REDUCE'")
  p.add_argument("--compile-cache", choices=("warm", "cold", "off"),
                 default="warm",
                 help="mtmerge children use JAX's persistent compile cache in "
                      "WORKDIR/xla_cache like the CLI: 'warm' runs each mtmerge "
                      "child once untimed first (a repeat merge), 'cold' "
                      "empties it before each child (first-ever merge), 'off' "
                      "disables it")
  p.add_argument("--cache-min-compile-s", type=float, default=None,
                 help="mtmerge children: override JAX's "
                      "jax_persistent_cache_min_compile_time_secs (the CLI's "
                      "mtmerge.runtime sets 0.5 s: faster-compiling programs "
                      "are not cached)")
  p.add_argument("--wait-quiet", type=float, default=0.0,
                 help="before each child wait up to this many seconds for "
                      "the host to be idle (shared machines)")
  p.add_argument("--json", default=None, help="write all numbers here")
  p.add_argument("--out", default=None, help="also write the table here")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.workdir is None:
    args.workdir = os.path.join(
        tempfile.gettempdir(), "mtmerge_merge_bench",
        f"p{args.params:.3g}_t{args.tasks}_s{args.seed}")
  if args.child:
    run_child(args)
    return 0

  peers_python = args.peers_python or sys.executable
  args.revision = mtmerge_revision()
  base_path, model_paths, cfg = build_checkpoints(
      args.workdir, args.params, args.tasks, args.seed)
  # Same page-cache state for every child: read all inputs once.
  for path in [base_path] + model_paths:
    with open(path, "rb") as f:
      while f.read(1 << 24):
        pass

  names = list(MEASUREMENTS) if not args.only else args.only.split(",")
  mt_env = {"PYTHONPATH": os.pathsep.join(
      [REPO_ROOT] + [x for x in os.environ.get("PYTHONPATH", "").split(
          os.pathsep) if x])}
  if args.mtmerge_xla_flags:
    mt_env["MTMERGE_BENCH_XLA_FLAGS"] = args.mtmerge_xla_flags
  cache_dir = os.path.join(args.workdir, "xla_cache")
  if args.compile_cache != "off":
    mt_env["MTMERGE_BENCH_CACHE"] = cache_dir
    if args.cache_min_compile_s is not None:
      mt_env["MTMERGE_BENCH_CACHE_MIN_S"] = str(args.cache_min_compile_s)
  results = []
  for name in names:
    if name not in MEASUREMENTS:
      raise SystemExit(f"unknown measurement {name!r}")
    if name.startswith("mtmerge"):
      if args.compile_cache == "cold":
        shutil.rmtree(cache_dir, ignore_errors=True)
      elif args.compile_cache == "warm":
        # A repeat merge: an untimed first run fills the compile cache.
        print(f"-- {name}: priming the compile cache (untimed)", flush=True)
        spawn(name, sys.executable, args, mt_env)
      results.append(spawn(name, sys.executable, args, mt_env))
    else:
      results.append(spawn(name, peers_python, args))
  checks = agreement(results, args, cfg)
  text, ratios, goal = table(results, checks, cfg, args)
  print("\n" + text, flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text + "\n")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    text = json.dumps(dict(config=cfg, threshold=args.threshold,
                           mtmerge_revision=args.revision,
                           mtmerge_xla_flags=args.mtmerge_xla_flags,
                           compile_cache=args.compile_cache,
                           cpu_count=os.cpu_count(), results=results,
                           agreement=checks, ratios=ratios, goal=goal),
                      indent=1)
    # No machine paths in committed results.
    for path, name in ((args.workdir, "$WORKDIR"),
                       (peers_python, "$PEERS_PYTHON"),
                       (sys.executable, "python")):
      text = text.replace(path, name)
    with open(args.json, "w") as f:
      f.write(text + "\n")
  failed = [r["name"] for r in results if "error" in r] + [
      c["pair"] for c in checks if c["status"] == "FAIL"]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
