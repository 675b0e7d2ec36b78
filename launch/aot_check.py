#!/usr/bin/env python3
r"""Compiles a sharded step for N devices ahead of time; prints its memory.

Run it before spending pod time: it lowers and compiles the step on N fake
CPU devices (re-executing itself with the matching XLA_FLAGS when needed),
over abstract `jax.ShapeDtypeStruct` arguments, so no parameter is ever
allocated, and prints the per-device sizes from
`compiled.memory_analysis()` (MaxText's AOT check is the model).

  python launch/aot_check.py --num_devices 64 --mesh data:1,fsdp:-1,task:1 \
      --method "ties_merging(threshold=0.2)" --num_params 1B --num_tasks 8

Steps are hooks `aot_step(config, mesh) -> (jitted_fn, abstract_args)`:
`--step merge` (built in: `mtmerge.methods` over a synthetic transformer of
`--num_params` or `--width`/`--layers`), `--step adamerging` (built in: the
`mtmerge.train` step of layer-wise AdaMerging over the same model, with
`--batch` inputs of `--seq_len` tokens per task) or
`--step package.module:function`, which reads whatever it needs from
`--config`:

  python launch/aot_check.py --num_devices 64 --step adamerging \
      --mesh data:8,fsdp:-1 --num_params 100M --num_tasks 8 --batch 64

Measured here (XLA:CPU analysis): `--step adamerging --num_params 7B
--num_tasks 8 --dtype bfloat16 --batch 64` on 64 devices (mesh fsdp:64)
needs 7.9 GiB per device (measured with XLA:CPU's default scheduler; 1.8
GiB arguments: task vectors and theta_0 sharded over fsdp); a batch the
data axes do not divide stops with one line naming both sizes.

Merges of a 7B-parameter model x 8 tasks in bf16 on 64 devices (mesh
fsdp:64, `--num_params 7B --num_tasks 8 --dtype bfloat16`; 1.84 GiB of
arguments per device, 1.64 GiB for TALL masks and EMR, which do not read
the base), peak per device (arguments + outputs + temporaries), XLA:CPU
analysis. "now" is this script's default compilation (the memory
scheduler, `_SCHEDULER_FLAG`, and library fusions for dots only,
`_LIBRARY_FLAG`); "XLA:CPU defaults" adds `--concurrency_scheduler
--cpu_library_fusions`. `benchmarks/aot_memory.py` measures every row
(`benchmarks/results/aot_memory_7B_8tasks_64dev.txt`); the README's table
has the history.

  method                     first         XLA:CPU defaults    now
  task_arithmetic            2.05 GiB      2.05 GiB            2.05 GiB
  ties_merging per_tensor    125.2 GiB     4.47 GiB            2.15 GiB
  ties_merging global        refused       4.73 GiB            2.15 GiB
  dare(drop_rate=0.9)        8.77 GiB      2.05 GiB            2.05 GiB
  dare_ties                  3.72 GiB      6.35 GiB            3.56 GiB (1.93x)
  tall_mask                  36.7 GiB      4.28 GiB            2.16 GiB
  consensus                  2.15 GiB      2.15 GiB            2.05 GiB
  tall_mask, TIES base       3.57 GiB      6.58 GiB            2.16 GiB
  emr_merging                173.0 GiB     8.46 GiB            2.86 GiB
  breadcrumbs                2.65 GiB      3.30 GiB            2.57 GiB
  model_stock                15.1 GiB      3.67 GiB            2.25 GiB
  della                      41.2 GiB      7.57 GiB            3.64 GiB (1.98x)
  pcb_merging (paper)        584.8 GiB     25.5 GiB            2.86 GiB
  pcb_merging (official)     refused       10.6 GiB            2.17 GiB
  tsv_merging                11.0 GiB      3.20 GiB            2.79 GiB

Why they gathered: the top-k search's strided sample flattened each
(sharded) leaf, which XLA does with an all-gather of the whole stacked
float32 task vectors; the searches stacked float32 copies of every leaf
and the global one concatenated them; XLA hoisted `abs(convert(leaf))`
out of the search loop as a float32 copy; the bracket's max |x| pass
copied every leaf. `mtmerge.selection` now samples by a gather of the
sampled entries and, under a mesh (`jax.set_mesh`), counts each leaf in
place, keeps the leaves loop-variant, bounds the bracket by the largest
float instead of a max pass, and counts the global top-k in (hi, lo) pairs,
exact to 2**48 entries per task. The kept entries are unchanged
(tests/test_methods.py, test_ties_compile.py, test_sharding.py). DARE never
gathered: XLA:CPU's rolled threefry loop materialized the random counters
(see `_tpu_threefry_lowering`). TALL masks and EMR bit-packed each
flattened leaf (a gather of the bool masks): the in-memory masks are now
packed row by row (`task_vectors.pack_mask(rows=True)`), each device
packing its own rows (bits of a row split over devices in pieces that are
not whole bytes move to row shards first), and EMR's per-task means reduce
in place instead of over a flattened leaf. TIES' two passes read the
task vectors through different integer views (`combine._fold`), so XLA no
longer shares every leaf's per-task slices across the model-wide vote sum
(3.49 -> 2.40 GiB); DARE-TIES recomputes its survivors in each pass from
bool masks; Model Stock's Gram matrix no longer needs float32 copies of
the leaves; DELLA sorts whole rows on their devices and inverts the sort
by a second sort (a scatter was replicated). Passes that wait on a
model-wide statistic read the leaves through `sharding.pass_view`, so XLA
cannot share per-leaf work across it: DELLA redoes MagPrune in its merge
pass instead of keeping a pruned copy; PCB recomputes its balancing
scores in every pass (`selection.topk_thresholds(values=...)`), and its
official variant counts its order statistics leaf by leaf in 64-bit pairs
(`selection.kth_largest`); TSV
factorizes through Gram matrices leaf after leaf instead of gathering
each matrix for LAPACK's SVD.

Caveat: the numbers are XLA:CPU's buffer assignment for the same sharded
program. They track per-device argument/output sizes exactly and temporaries
roughly; for exact TPU numbers compile against a TPU topology
(`jax.experimental.topologies`, needs libtpu) with the same hook.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import re
import sys
from typing import Any

_COUNT_FLAG = "--xla_force_host_platform_device_count"
# XLA:CPU's default scheduler orders a program for thread concurrency, not
# memory: it runs, e.g., every leaf's resharding collective before any of
# their consumers and keeps all their buffers live (TALL masks: 2.3 GiB of
# temporaries per device at 7B x 8 on 64 devices, 0.2 GiB with the memory
# scheduler; TIES 2.3-2.5 GiB -> 1.4 GiB). TPU's and GPU's schedulers
# bound memory, so `main` compiles with XLA:CPU's memory-minimizing
# scheduler unless `--concurrency_scheduler` is given.
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_SCHEDULER_NAME = _SCHEDULER_FLAG.split("=")[0]
# XLA:CPU hands reductions and elementwise kernels to YNNPACK ("library
# fusions"), whose kernels take their operands as buffers: a producer that
# XLA would fuse into the reduction (PCB's [T, T, ...] pairwise softmax
# terms, the statistics it broadcasts to a leaf's shape) is materialized
# per leaf, and shared buffers then stay live across passes (PCB paper:
# 15.9 GiB per device at 7B x 8 on 64 devices with them, 2.9 GiB without).
# TPU and GPU fuse producers into reductions, so `main` keeps YNNPACK for
# dots only unless `--cpu_library_fusions` is given. The fusion type that
# matters is the reduce one, which `mtmerge.runtime.configure_xla` turns
# off for every merge the CLI runs: with its value
# (`-LIBRARY_FUSION_TYPE_REDUCE`) and the memory scheduler, PCB paper,
# TIES and EMR measure 2.86, 2.15 and 2.86 GiB, as with this flag.
_LIBRARY_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot"
_LIBRARY_NAME = _LIBRARY_FLAG.split("=")[0]


def _ensure_devices(n: int, argv: list[str], memory_scheduler: bool = True,
                    library_fusions: bool = False) -> None:
  """Re-execs this script with N fake CPU devices unless already set up.

  With `memory_scheduler`, also with XLA:CPU's memory scheduler, and
  without `library_fusions` with YNNPACK for dots only (each unless
  `XLA_FLAGS` names that option already, or JAX is already imported: a
  caller such as a test that set its own devices).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  fresh = "jax" not in sys.modules
  extra = [f for f, want, name in (
      (_SCHEDULER_FLAG, memory_scheduler, _SCHEDULER_NAME),
      (_LIBRARY_FLAG, not library_fusions, _LIBRARY_NAME))
           if want and fresh and name not in flags]
  if f"{_COUNT_FLAG}={n}" in flags.split() and os.environ.get(
      "JAX_PLATFORMS") == "cpu" and not extra:
    return
  if os.environ.get("MTMERGE_AOT_REEXEC"):
    raise RuntimeError(f"re-exec did not give {n} CPU devices (XLA_FLAGS="
                       f"{flags!r})")
  flags = re.sub(rf"{_COUNT_FLAG}=\d+", "", flags).strip()
  flags = f"{flags} {_COUNT_FLAG}={n}".strip()
  flags = " ".join([flags] + extra)
  os.environ["XLA_FLAGS"] = flags
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["MTMERGE_AOT_REEXEC"] = "1"
  sys.stdout.flush()
  os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + argv)


def parse_count(text: str | int) -> int:
  """`'125M'`, `'1.5B'`, `'3e6'` or an int -> int."""
  if isinstance(text, int):
    return text
  m = re.fullmatch(r"\s*([\d.]+(?:e\d+)?)\s*([KMBT]?)\s*", str(text), re.I)
  if not m:
    raise ValueError(f"cannot parse a parameter count from {text!r}")
  mult = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2).upper()]
  return int(float(m.group(1)) * mult)


def transformer_shapes(width: int, layers: int, vocab: int
                       ) -> dict[str, tuple[int, ...]]:
  """Param shapes of a plain pre-LN transformer encoder (BERT/ViT-like)."""
  d = width
  block = {"attn/qkv/kernel": (d, 3 * d), "attn/qkv/bias": (3 * d,),
           "attn/out/kernel": (d, d), "attn/out/bias": (d,),
           "mlp/in/kernel": (d, 4 * d), "mlp/in/bias": (4 * d,),
           "mlp/out/kernel": (4 * d, d), "mlp/out/bias": (d,),
           "ln1/scale": (d,), "ln2/scale": (d,)}
  shapes = {"embed/table": (vocab, d)}
  for i in range(layers):
    shapes.update({f"layer_{i}/{k}": s for k, s in block.items()})
  return shapes


def width_for(num_params: int, layers: int, vocab: int) -> int:
  """The width (multiple of 64) giving about `num_params` parameters."""
  # 12 L d^2 + V d = N, ignoring the O(L d) vectors.
  d = (-vocab + math.sqrt(vocab ** 2 + 48 * layers * num_params)) / (
      24 * layers)
  return max(64, int(round(d / 64)) * 64)


# Default FSDP-style rules for the synthetic model: shard the larger dim of
# each matrix over 'fsdp', keep vectors replicated.
DEFAULT_RULES = [(r"embed/table", (None, "fsdp")),
                 (r".*/(qkv|in)/kernel", (None, "fsdp")),
                 (r".*/kernel", ("fsdp", None)),
                 (r".*", None)]


def _abstract_model(config):
  """`(width, dtype, rules, base, tvs)`: the synthetic model, abstract.

  Base params and stacked task vectors are `jax.ShapeDtypeStruct`s (no
  memory) of `transformer_shapes` for `config.aot`.
  """
  import jax
  import numpy as np
  from mtmerge import tree as tree_lib
  a = config.aot
  width = a.width or width_for(parse_count(a.num_params), a.layers, a.vocab)
  shapes = transformer_shapes(width, a.layers, a.vocab)
  dtype = np.dtype(a.dtype)
  rules = [tuple(r) for r in (config.get("param_rules") or DEFAULT_RULES)]
  base = tree_lib.from_flat_dict(
      {k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes.items()})
  tvs = tree_lib.from_flat_dict(
      {k: jax.ShapeDtypeStruct((a.num_tasks,) + s, dtype)
       for k, s in shapes.items()})
  return width, dtype, rules, base, tvs


def merge_step(config, mesh):
  """AOT hook for `methods` merges over abstract sharded params.

  Reads `config.aot`: method, num_tasks, dtype, width/layers/vocab or
  num_params, task_axis, and optional `config.param_rules`.
  """
  import jax
  from mtmerge import methods, sharding
  a = config.aot
  width, dtype, rules, base, tvs = _abstract_model(config)
  base_sh = sharding.shardings_from_rules(base, rules, mesh)
  tvs_sh = sharding.task_vector_sharding(tvs, mesh, rules,
                                         task_axis=a.task_axis or None)
  with_sh = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  base = jax.tree.map(with_sh, base, base_sh)
  tvs = jax.tree.map(with_sh, tvs, tvs_sh)
  name, hparams = methods.parse(a.method)
  spec = methods.get(name)
  full = spec.check(hparams, a.num_tasks)
  static = {k: v for k, v in full.items() if k in spec.static}
  traced = {k: v for k, v in full.items() if k not in spec.static}

  def step(base, tvs, traced):
    return spec.fn(base, tvs, **static, **traced)

  fn = jax.jit(step, out_shardings=None if spec.compressed else base_sh)
  return fn, (base, tvs, traced)


def _synthetic_features(layers: int, data_axes: tuple[str, ...] = (),
                         remat: bool = True, param_shardings=None,
                         scan: bool = True):
  """A pre-LN transformer forward over `transformer_shapes` params.

  Activations are constrained to the batch sharding (`data_axes`), as a
  pod model annotates them (MaxText's logical activation rules): without
  it XLA propagates the vocabulary-sharded embedding's layout and keeps
  whole-batch activations on every device (measured: 55 GiB of 57 at 7B x
  8 tasks on 64 devices). `remat` recomputes each block's attention and
  MLP halves in the backward pass, so only their inputs are saved and
  their gathered weights live for that half only; `scan` runs the blocks as
  one loop body, so XLA gathers one block's weights at a time (unrolled,
  XLA:CPU schedules every all-gather up front).
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  spec = P(tuple(data_axes)) if data_axes else None
  constrain = ((lambda x: jax.lax.with_sharding_constraint(x, spec))
               if spec is not None else (lambda x: x))

  def ln(x):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True)
                                    + 1e-6)

  def dense(blk, x, name):
    return x @ blk[name[0]][name[1]]["kernel"] + blk[name[0]][name[1]]["bias"]

  def attention(blk, h):
    q, k, v = jnp.split(dense(blk, ln(h) * blk["ln1"]["scale"],
                              ("attn", "qkv")), 3, axis=-1)
    att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / jnp.sqrt(h.shape[-1]),
                         axis=-1)
    return constrain(h + dense(blk, att @ v, ("attn", "out")))

  def mlp(blk, h):
    x = jax.nn.gelu(dense(blk, ln(h) * blk["ln2"]["scale"], ("mlp", "in")))
    return constrain(h + dense(blk, x, ("mlp", "out")))

  if remat:  # two halves: each gathers only its own weights when recomputed
    attention, mlp = jax.checkpoint(attention), jax.checkpoint(mlp)
  block = lambda blk, h: mlp(blk, attention(blk, h))

  def features(p, inputs):
    if param_shardings is not None:  # the merged params stay sharded
      p = jax.lax.with_sharding_constraint(p, param_shardings)
    h = constrain(p["embed"]["table"][inputs["tokens"]])
    if not scan:
      for i in range(layers):
        h = block(p[f"layer_{i}"], h)
    else:  # one loop body: XLA gathers one block's weights at a time
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                             *[p[f"layer_{i}"] for i in range(layers)])
      h, _ = jax.lax.scan(lambda h, blk: (block(blk, h), None), h, stacked)
    pooled = h.mean(1)
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return features


def adamerging_step(config, mesh):
  """AOT hook for the learned-merge trainer: one layer-wise AdaMerging step.

  The full `mtmerge.train` step (entropy of every task's merged model,
  backward, Adam, clamp) over the synthetic transformer of `merge_step`,
  with `config.aot.batch` inputs of `seq_len` tokens per task sharded over
  the mesh's data axes. Reads `config.aot` like `merge_step` plus `batch`,
  `seq_len`, `classes` and `data_axes`.
  """
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mtmerge import sharding, train
  from mtmerge.learned import adamerging, common
  from mtmerge.learned import problem as problem_lib
  a = config.aot
  width, dtype, rules, base, tvs = _abstract_model(config)
  tasks = tuple(f"task{i}" for i in range(a.num_tasks))
  classes = a.get("classes", 10)
  heads = {t: {"kernel": jax.ShapeDtypeStruct((width, classes), dtype),
               "bias": jax.ShapeDtypeStruct((classes,), dtype)}
           for t in tasks}
  data_axes = tuple(a.get("data_axes", None) or
                    [x for x in ("data", "fsdp") if x in mesh.shape])
  batch_size = a.get("batch", 16)
  sharding.check_batch_divides(batch_size, mesh, data_axes)
  problem = problem_lib.MergeProblem(
      tasks, base, tvs, _synthetic_features(
          a.layers, data_axes, a.get("remat", True),
          sharding.shardings_from_rules(base, rules, mesh)),
      heads, data=None)
  coeffs = adamerging.init_coeffs(base, a.num_tasks, "layer")
  objective = adamerging.entropy_objective(problem, tvs, coeffs, (0.0, 1.0))
  tx = train.make_optimizer(train.TrainConfig(steps=500, lr=1e-3))
  repl = NamedSharding(mesh, P())
  p_sh = jax.tree.map(lambda _: repl, coeffs)
  state_sh = train.state_shardings(train.abstract(coeffs, p_sh), tx, mesh)
  state = train.abstract(
      {"params": coeffs, "opt": jax.eval_shape(tx.init, coeffs),
       "step": np.zeros((), np.int32)}, state_sh)
  c_sh = common.const_shardings(mesh, objective.consts, rules)
  consts = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sh), objective.consts, c_sh)
  b_sh = sharding.batch_sharding(mesh, data_axes)
  batch = {t: {"tokens": jax.ShapeDtypeStruct(
      (batch_size, a.get("seq_len", 128)), np.int32, sharding=b_sh)}
           for t in tasks}
  step = train.build_step(objective, tx, 0, state_sh, mesh)
  return step, (state, consts, batch)


STEPS = {"merge": merge_step, "adamerging": adamerging_step}


def resolve_step(name: str):
  """A built-in step name or `module:function`."""
  if name in STEPS:
    return STEPS[name]
  if ":" not in name:
    raise ValueError(f"unknown step {name!r}; use one of {sorted(STEPS)} or "
                     "package.module:function")
  module, fn = name.split(":", 1)
  return getattr(importlib.import_module(module), fn)


def load_config(spec: str | None):
  import ml_collections
  if not spec:
    return ml_collections.ConfigDict()
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("_aot_config", path)
  if mod_spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _tpu_threefry_lowering() -> None:
  """Compiles threefry2x32 for CPU as TPU does: unrolled, not a rolled loop.

  XLA:CPU's default lowering of `jax.random`'s threefry is a while loop
  over the rounds whose state holds two uint32 arrays of the draw's full
  shape, so every DARE mask costs 8-16 bytes per entry there (the 8.8 GiB
  per device DARE measured before); TPU and GPU use the unrolled form,
  which fuses into its consumer. Same bits either way; this only makes the
  CPU estimate describe the accelerator program. Registered by `main`
  (a process that only compiles), not by `check`, which tests import.
  """
  from jax._src.interpreters import mlir
  from jax._src.random import threefry2x32
  mlir.register_lowering(threefry2x32.threefry2x32_p,
                         threefry2x32._threefry2x32_lowering_rule,
                         platform="cpu")


def check(config, mesh, step: str = "merge") -> dict[str, Any]:
  """Lowers and compiles `step` on `mesh`; returns per-device byte counts.

  XLA:CPU's scheduler and library fusions are the ones the process's
  `XLA_FLAGS` chose (`main` picks the memory-minimizing scheduler,
  `_SCHEDULER_FLAG`, and dots-only library fusions, `_LIBRARY_FLAG`);
  `scheduler` and `library_fusions` in the result say which.
  """
  import jax
  fn, args = resolve_step(step)(config, mesh)
  with jax.set_mesh(mesh):
    compiled = fn.lower(*args).compile()
  mem = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  out = {f: int(getattr(mem, f, 0) or 0) for f in fields} if mem else {}
  if out:
    out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] +
                                  out["output_size_in_bytes"] -
                                  out["alias_size_in_bytes"] +
                                  out["temp_size_in_bytes"])
  # Whole (unsharded) size of the array arguments, for scale.
  out["global_argument_bytes"] = sum(
      math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(args)
      if hasattr(x, "shape") and hasattr(x, "dtype"))
  flags = os.environ.get("XLA_FLAGS", "").split()
  out["scheduler"] = ("memory" if _SCHEDULER_FLAG in flags
                      else "concurrency")
  out["library_fusions"] = ("dots only" if _LIBRARY_FLAG in flags
                            else "default")
  out["num_devices"] = mesh.size
  out["mesh"] = dict(mesh.shape)
  return out


def _gib(n: int) -> str:
  return f"{n / 2 ** 30:.3f} GiB".rjust(14)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--num_devices", type=int, required=True)
  p.add_argument("--mesh", default=None,
                 help="e.g. data:1,fsdp:-1,task:1 (default: config.mesh or "
                 "fsdp:-1)")
  p.add_argument("--config", default=None, help="configs/X.py[:arg]")
  p.add_argument("--step", default="merge")
  p.add_argument("--method", default="task_arithmetic")
  p.add_argument("--num_params", default="100M")
  p.add_argument("--width", type=int, default=0)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--num_tasks", type=int, default=8)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--task_axis", default="task")
  p.add_argument("--batch", type=int, default=16,
                 help="adamerging step: global inputs per task")
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--concurrency_scheduler", action="store_true",
                 help="compile with XLA:CPU's default (concurrency-"
                 "optimized) scheduler instead of its memory scheduler")
  p.add_argument("--cpu_library_fusions", action="store_true",
                 help="keep XLA:CPU's default YNNPACK library fusions "
                 "(reductions and elementwise kernels too, not just dots)")
  args = p.parse_args(argv)
  _ensure_devices(args.num_devices, argv, not args.concurrency_scheduler,
                  args.cpu_library_fusions)

  import jax  # after XLA_FLAGS are final
  import ml_collections
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  from mtmerge import sharding
  _tpu_threefry_lowering()  # this process only compiles: no side effects
  config = load_config(args.config)
  with config.unlocked():
    config.aot = ml_collections.ConfigDict(dict(
        method=args.method, num_params=args.num_params, width=args.width,
        layers=args.layers, vocab=args.vocab, num_tasks=args.num_tasks,
        dtype=args.dtype, task_axis=args.task_axis, batch=args.batch,
        seq_len=args.seq_len, classes=args.classes))
  mesh_spec = args.mesh or config.get("mesh") or [("fsdp", -1)]
  try:
    mesh = sharding.make_mesh(mesh_spec, jax.devices()[:args.num_devices])
    if args.task_axis not in mesh.shape:
      config.aot.task_axis = ""  # no such mesh axis: keep T unsharded
    res = check(config, mesh, args.step)
  except ValueError as e:  # bad sizes or specs: one line, no traceback
    print(f"aot_check: error: {e}", file=sys.stderr)
    return 2
  total = _gib(res["global_argument_bytes"]).strip()
  print(f"step {args.step} on {res['num_devices']} devices, mesh "
        f"{res['mesh']}, XLA:CPU {res['scheduler']} scheduler, library "
        f"fusions {res['library_fusions']}; arguments "
        f"{total} in all; per device:")
  for k, v in res.items():
    if k.endswith("bytes") and not k.startswith("global"):
      print(f"  {k:32s} {_gib(v)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
