#!/usr/bin/env python
"""LLM-scale merges: mtmerge's streamed merge vs `mergekit-yaml`, side by side.

Generates Llama-shaped checkpoints (TinyLlama-1.1B shapes by default: vocab
32000, hidden 2048, intermediate 5632, 22 layers, 4 KV heads, untied
lm_head; bf16; Hugging Face sharded layout with ~1 GB shards plus
`model.safetensors.index.json` and a llama `config.json`), tensor by tensor,
into a work dir (never into the repository). Then, per (method, T), it runs

  * mtmerge: `streaming.merge_files` (the engine behind `mtmerge merge`)
    with `--max-memory`, float32 compute, bf16 output;
  * mergekit: `mergekit-yaml CONFIG OUT --no-copy-tokenizer` with
    `dtype: float32`, `out_dtype: bfloat16`,

each in its own process, sampling the process's RSS and anonymous RSS
(`/proc/PID/status`: RssAnon is the process's own memory; RssFile is
memory-mapped file pages the kernel can reclaim) every 50 ms, and compares
the outputs: entries more than 1 bf16 ulp apart. Methods: task arithmetic
(mergekit `task_arithmetic`, weight 0.3 = mtmerge `scaling_factor=0.3`) and
TIES (mergekit `ties`, density 0.2, weight 1, normalize, lambda 1 = mtmerge
`ties_merging(scope='per_tensor', merge_func='mean', zero_sign='positive',
weights=[1]*T, scaling_factor=1)`); mtmerge's global TIES is timed too (no
mergekit counterpart). It also times one plain read of the input files.

    python benchmarks/llm_merge_bench.py --tasks 2,4 --methods ta,ties \
        --workdir /big/disk/llm_bench --json benchmarks/results/llm.json

Peers run with `--peers-python` or `$MTMERGE_PEERS_PYTHON` (a venv with
mergekit; `mergekit-yaml` is looked up next to that interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024 ** 3
SHAPE = dict(vocab=32000, hidden=2048, intermediate=5632, layers=22, kv=256)


def llama_layout(vocab, hidden, intermediate, layers, kv):
  """HF Llama tensor names and shapes, in file order."""
  spec = [("model.embed_tokens.weight", (vocab, hidden))]
  for i in range(layers):
    p = f"model.layers.{i}."
    spec += [(p + "self_attn.q_proj.weight", (hidden, hidden)),
             (p + "self_attn.k_proj.weight", (kv, hidden)),
             (p + "self_attn.v_proj.weight", (kv, hidden)),
             (p + "self_attn.o_proj.weight", (hidden, hidden)),
             (p + "mlp.gate_proj.weight", (intermediate, hidden)),
             (p + "mlp.up_proj.weight", (intermediate, hidden)),
             (p + "mlp.down_proj.weight", (hidden, intermediate)),
             (p + "input_layernorm.weight", (hidden,)),
             (p + "post_attention_layernorm.weight", (hidden,))]
  spec += [("model.norm.weight", (hidden,)),
           ("lm_head.weight", (vocab, hidden))]
  return spec


def _numel(shape):
  n = 1
  for s in shape:
    n *= s
  return n


def write_model(path, shape_cfg, seed, base_dir=None, shard_bytes=1 << 30):
  """One bf16 sharded checkpoint, tensor by tensor (~1 tensor in memory).

  The base is N(0, 0.02) (norm weights 1 + N(0, 0.05)); a model is the
  base plus a per-tensor log-normal scale (~1e-3) times N(0, 1).
  """
  import ml_dtypes
  import numpy as np
  from mtmerge.streaming import writer
  bf16 = np.dtype(ml_dtypes.bfloat16)
  layout = llama_layout(**shape_cfg)
  shards, cur, size = [], [], 0
  for name, shape in layout:
    nb = 2 * _numel(shape)
    if cur and size + nb > shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append((name, shape))
    size += nb
  shards.append(cur)
  n = len(shards)
  os.makedirs(path, exist_ok=True)
  files, weight_map = [], {}
  base = None
  if base_dir is not None:
    from safetensors import safe_open
  rng = np.random.default_rng(seed)
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    files.append(fname)
    shapes = dict(shard)
    w = writer.ShardWriter(os.path.join(path, fname), [k for k, _ in shard],
                           shapes, {k: bf16 for k in shapes},
                           {"format": "pt"})
    if base_dir is not None:
      base = safe_open(os.path.join(base_dir, fname), "np")
    for name, shape in shard:
      weight_map[name] = fname
      if base is None:
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= 0.05 if len(shape) == 1 else 0.02
        if len(shape) == 1:
          x += 1.0
      else:
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= np.float32(1e-3 * np.exp(0.5 * rng.standard_normal()))
        x += base.get_tensor(name).astype(np.float32)
      w.write_at(name, 0, x.astype(bf16))
      del x
    w.close()
  total = sum(2 * _numel(s) for _, s in layout)
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              f, indent=2)
  c = shape_cfg
  cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"],
             hidden_size=c["hidden"], intermediate_size=c["intermediate"],
             num_hidden_layers=c["layers"], num_attention_heads=32,
             num_key_value_heads=c["kv"] * 32 // c["hidden"],
             vocab_size=c["vocab"], torch_dtype="bfloat16",
             tie_word_embeddings=False, rms_norm_eps=1e-5,
             max_position_embeddings=2048)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)


def build(workdir, tasks, seed, shape_cfg):
  """base/ and m0/..m{T-1}/ under workdir, reused when the stamp matches."""
  stamp = dict(shape=shape_cfg, seed=seed, version=1)
  paths = [os.path.join(workdir, "base")] + [
      os.path.join(workdir, f"m{t}") for t in range(tasks)]
  for i, p in enumerate(paths):
    sp = os.path.join(p, "bench_stamp.json")
    if os.path.exists(sp):
      with open(sp) as f:
        if json.load(f) == dict(stamp, index=i):
          continue
    t0 = time.perf_counter()
    write_model(p, shape_cfg, seed * 1000 + i, None if i == 0 else paths[0])
    with open(sp, "w") as f:
      json.dump(dict(stamp, index=i), f)
    print(f"wrote {p} in {time.perf_counter() - t0:.0f} s", flush=True)
  return paths[0], paths[1:]


# ---------------------------------------------------------------------------
# Measured children.


def _status(pid):
  out = {}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
          out[k] = int(v.split()[0]) * 1024
  except OSError:
    pass
  return out


def measured(cmd, env=None):
  """Runs `cmd`; returns wall time, peak RSS / anonymous RSS, status."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  peak = dict(rss=0, anon=0)
  done = threading.Event()

  def sample():
    while not done.is_set():
      s = _status(proc.pid)
      peak["rss"] = max(peak["rss"], s.get("VmHWM", 0), s.get("VmRSS", 0))
      peak["anon"] = max(peak["anon"], s.get("RssAnon", 0))
      time.sleep(0.05)
  th = threading.Thread(target=sample, daemon=True)
  th.start()
  out, _ = proc.communicate()
  done.set()
  th.join()
  wall = time.perf_counter() - t0
  return dict(wall_s=wall, peak_rss=peak["rss"], peak_anon=peak["anon"],
              returncode=proc.returncode, tail=out[-2000:])


def mtmerge_cmd(method, base, models, out, max_memory):
  T = len(models)
  if method == "ta":
    name, hp = "task_arithmetic", dict(scaling_factor=0.3)
  elif method == "ties":
    name, hp = "ties_merging", dict(
        threshold=0.2, scope="per_tensor", merge_func="mean",
        zero_sign="positive", weights=[1.0] * T, scaling_factor=1.0)
  else:
    name, hp = "ties_merging", dict(threshold=0.2, scope="global",
                                    merge_func="sum", scaling_factor=0.3)
  code = ("import json,sys; from mtmerge import runtime; "
          "runtime.configure_xla(); from mtmerge import streaming; "
          "a=json.loads(sys.argv[1]); "
          "i=streaming.merge_files(a['name'], a['base'], a['models'], "
          "a['out'], max_memory=a['mm'], progress=False, **a['hp']); "
          "print('INFO', json.dumps(i))")
  arg = json.dumps(dict(name=name, base=base, models=models, out=out,
                        mm=max_memory, hp=hp))
  return [sys.executable, "-c", code, arg]


def mergekit_cmd(peers_python, method, base, models, out, workdir):
  T = len(models)
  if method == "ta":
    cfg = dict(merge_method="task_arithmetic", base_model=base,
               models=[dict(model=m, parameters=dict(weight=0.3))
                       for m in models])
  else:
    cfg = dict(merge_method="ties", base_model=base,
               models=[dict(model=m, parameters=dict(density=0.2, weight=1.0))
                       for m in models],
               parameters=dict(normalize=True, **{"lambda": 1.0}))
  cfg.update(dtype="float32", out_dtype="bfloat16")
  path = os.path.join(workdir, f"mergekit_{method}_{T}.yml")
  with open(path, "w") as f:
    json.dump(cfg, f, indent=1)  # JSON is valid YAML
  exe = os.path.join(os.path.dirname(peers_python), "mergekit-yaml")
  return [exe, path, out, "--no-copy-tokenizer"]


def _cutoff_ambiguous(base, models, k, density):
  """Entries whose TIES trim may differ between mtmerge and mergekit.

  Per task t, mergekit keeps `int(density * n)` entries of largest |tau_t|
  (argsort: which of the entries tied at the cutoff is arbitrary), mtmerge
  every entry at or above its `round(density * n)`-th largest. Entries with
  |tau_t| between the two cutoff values (inclusive) of any task can differ.
  """
  import numpy as np
  b = np.asarray(base, np.float32)
  amb = np.zeros(b.shape, bool)
  n = b.size
  k_mk = max(1, int(density * n))
  k_mt = int(min(max(np.floor(density * n + 0.5), 1), n))
  for m in models:
    a = np.abs(np.asarray(m, np.float32) - b)
    flat = a.reshape(-1)
    p = np.partition(flat, sorted({n - k_mk, n - k_mt}))
    lo, hi = sorted((p[n - k_mk], p[n - k_mt]))
    amb |= (a >= lo) & (a <= hi)
  return amb


def compare(path_a, path_b, inputs=None, density=None):
  """Entries of two bf16 checkpoints more than 1 bf16 ulp apart.

  With `inputs` (base, models) and a TIES `density`, also counts the
  differing entries NOT explained by the top-k cutoff (`_cutoff_ambiguous`).
  """
  import numpy as np
  from mtmerge import safetensors_layout as st_layout
  la, lb = st_layout.read_layout(path_a), st_layout.read_layout(path_b)
  if sorted(la.weight_map) != sorted(lb.weight_map):
    return dict(error="different tensor names")
  n = n_ulp = n_far = n_unexplained = n_amb = 0
  max_diff = 0.0
  views, lays = {}, {}
  for k in sorted(la.weight_map):
    xs = []
    for lay in (la, lb):
      f = lay.path_of(lay.weight_map[k])
      if f not in views:
        views[f] = st_layout.mmap_file(f)
      xs.append(np.asarray(views[f][k]))
    a, b = xs
    if a.dtype != b.dtype or a.shape != b.shape:
      return dict(error=f"{k}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
    amb = None
    if inputs is not None:
      ins = []
      for p in inputs:
        lay = lays.setdefault(p, st_layout.read_layout(p))
        f = lay.path_of(lay.weight_map[k])
        if f not in views:
          views[f] = st_layout.mmap_file(f)
        ins.append(views[f][k])
      amb = _cutoff_ambiguous(ins[0], ins[1:], k, density)
    ia = a.view(np.int16).astype(np.int32)
    ib = b.view(np.int16).astype(np.int32)
    oa = np.where(ia < 0, -(ia & 0x7fff), ia)  # bf16 order as integers
    ob = np.where(ib < 0, -(ib & 0x7fff), ib)
    d = np.abs(oa - ob)
    n += d.size
    n_ulp += int((d > 1).sum())
    if amb is not None:
      n_unexplained += int(((d > 1) & ~amb).sum())
      n_amb += int(amb.sum())
    n_far += int((d > 16).sum())
    max_diff = max(max_diff, float(np.abs(a.astype(np.float32)
                                          - b.astype(np.float32)).max()))
  out = dict(n=n, beyond_1_ulp=n_ulp, beyond_16_ulp=n_far,
             frac_beyond_1_ulp=n_ulp / max(n, 1), max_abs_diff=max_diff)
  if inputs is not None:
    out.update(beyond_1_ulp_not_at_topk_cutoff=n_unexplained,
               at_topk_cutoff=n_amb)
  return out


def plain_read_s(paths):
  """Seconds to read every weight file once (page cache as it is)."""
  t0 = time.perf_counter()
  for p in paths:
    for name in sorted(os.listdir(p)):
      if name.endswith(".safetensors"):
        with open(os.path.join(p, name), "rb") as f:
          while f.read(1 << 24):
            pass
  return time.perf_counter() - t0


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tasks", default="2,4",
                 help="comma-separated numbers of models, e.g. 2,4,8")
  p.add_argument("--methods", default="ta,ties",
                 help="comma-separated: ta, ties (per-tensor, vs mergekit), "
                      "ties_global (mtmerge only)")
  p.add_argument("--tools", default="mtmerge,mergekit")
  p.add_argument("--workdir", default=None,
                 help="checkpoints and outputs (default: "
                      "$TMPDIR/mtmerge_llm_bench); needs (T + 3) x 2.2 GB")
  p.add_argument("--max-memory", type=float, default=1 << 30,
                 help="mtmerge's block budget in bytes")
  p.add_argument("--small", action="store_true",
                 help="a 4-layer, hidden-256 model (smoke test)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--peers-python",
                 default=os.environ.get("MTMERGE_PEERS_PYTHON"),
                 help="interpreter of a venv with mergekit (default "
                      "$MTMERGE_PEERS_PYTHON)")
  p.add_argument("--keep-outputs", action="store_true")
  p.add_argument("--json", default=None)
  p.add_argument("--out", default=None, help="also write the table here")
  args = p.parse_args(argv)
  shape_cfg = dict(SHAPE)
  if args.small:
    shape_cfg.update(vocab=4000, hidden=256, intermediate=704, layers=4,
                     kv=64)
  workdir = args.workdir or os.path.join(tempfile.gettempdir(),
                                         "mtmerge_llm_bench")
  os.makedirs(workdir, exist_ok=True)
  tasks = [int(t) for t in args.tasks.split(",")]
  tools = args.tools.split(",")
  if "mergekit" in tools and not args.peers_python:
    raise SystemExit("mergekit needs --peers-python or $MTMERGE_PEERS_PYTHON")
  base, models = build(workdir, max(tasks), args.seed, shape_cfg)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [REPO_ROOT] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep)
                     if x])
  rows = []
  for T in tasks:
    ins = [base] + models[:T]
    read_s = plain_read_s(ins)
    for method in args.methods.split(","):
      outs = {}
      for tool in tools:
        if tool == "mergekit" and method == "ties_global":
          continue
        out = os.path.join(workdir, f"out_{tool}_{method}_{T}")
        subprocess.run(["rm", "-rf", out], check=True)
        if tool == "mtmerge":
          cmd = mtmerge_cmd(method, base, models[:T], out,
                            int(args.max_memory))
        else:
          cmd = mergekit_cmd(args.peers_python, method, base, models[:T],
                             out, workdir)
        load = os.getloadavg()
        print(f"-- {tool} {method} T={T} (load {load[0]:.2f})", flush=True)
        r = measured(cmd, env)
        r.update(tool=tool, method=method, T=T, loadavg_at_start=list(load),
                 loadavg_at_end=list(os.getloadavg()),
                 plain_read_s=read_s)
        if r["returncode"] != 0:
          print(r["tail"], flush=True)
        else:
          outs[tool] = out
        print(f"   wall {r['wall_s']:.1f} s, peak RSS "
              f"{r['peak_rss'] / GiB:.2f} GiB, anon {r['peak_anon'] / GiB:.2f}"
              f" GiB, rc {r['returncode']}", flush=True)
        rows.append(r)
      if len(outs) == 2:
        c = compare(outs["mtmerge"], outs["mergekit"],
                    ins if method == "ties" else None, 0.2)
        print(f"   agreement: {c}", flush=True)
        for r in rows[-2:]:
          r["agreement"] = c
      if not args.keep_outputs:
        for out in outs.values():
          subprocess.run(["rm", "-rf", out], check=True)
      save(rows, shape_cfg, args, workdir)  # after every pair: partial runs
  print("\n" + table(rows, shape_cfg, args), flush=True)
  return 0 if all(r["returncode"] == 0 for r in rows) else 1


def save(rows, shape_cfg, args, workdir):
  """Writes the table (`--out`) and the numbers (`--json`) so far."""
  if args.out:
    with open(args.out, "w") as f:
      f.write(table(rows, shape_cfg, args) + "\n")
  if args.json:
    text = json.dumps(dict(shape=shape_cfg, max_memory=args.max_memory,
                           cpu_count=os.cpu_count(), rows=rows), indent=1)
    with open(args.json, "w") as f:  # no machine paths in results
      f.write(text.replace(workdir, "$WORKDIR").replace(
          sys.executable, "python") + "\n")


def table(rows, shape_cfg, args):
  n = sum(_numel(s) for _, s in llama_layout(**shape_cfg))
  lines = [f"llm_merge_bench: Llama-shaped {n / 1e9:.2f}B params, bf16, "
           f"sharded; mtmerge max_memory {args.max_memory / GiB:.2f} GiB; "
           f"{os.cpu_count()} cores",
           "anon = peak anonymous RSS (own memory); RSS includes "
           "reclaimable file pages; read s = one plain read of the inputs",
           f"{'method':<12}{'T':>3} {'tool':<9}{'wall s':>8}{'RSS GiB':>9}"
           f"{'anon GiB':>9}{'mk/mt wall':>11}{'wall/read':>10}"
           f"{'load avg':>9}  agreement (entries > 1 bf16 ulp apart)"]
  by = {(r["method"], r["T"], r["tool"]): r for r in rows}
  for r in rows:
    mt = by.get((r["method"], r["T"], "mtmerge"))
    mk = by.get((r["method"], r["T"], "mergekit"))
    ratio = (f"{mk['wall_s'] / mt['wall_s']:.2f}" if r is mt and mk
             and mk["returncode"] == 0 and mt["returncode"] == 0 else "-")
    ag = r.get("agreement")
    ag_s = ("-" if not ag else ag.get("error") or
            f"{ag['beyond_1_ulp']} of {ag['n']} ({ag['frac_beyond_1_ulp']:.2e})"
            f", > 16 ulp: {ag['beyond_16_ulp']}"
            + (f", not at the top-k cutoff: "
               f"{ag['beyond_1_ulp_not_at_topk_cutoff']}"
               if "at_topk_cutoff" in ag else ""))
    status = "" if r["returncode"] == 0 else f"  FAILED rc {r['returncode']}"
    lines.append(
        f"{r['method']:<12}{r['T']:>3} {r['tool']:<9}{r['wall_s']:>8.1f}"
        f"{r['peak_rss'] / GiB:>9.2f}{r['peak_anon'] / GiB:>9.2f}"
        f"{ratio:>11}{r['wall_s'] / r['plain_read_s']:>10.2f}"
        f"{r['loadavg_at_start'][0]:>9.2f}  {ag_s}{status}")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
