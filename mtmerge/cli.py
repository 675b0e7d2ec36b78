r"""Command line: `mtmerge merge ...` and `mtmerge reconstruct ...`.

    mtmerge merge --method ties_merging --base base/ --models a/ b/ c/ \
        --out merged/ --param threshold=0.2 --param merge_func=mean
    mtmerge merge --method tall_mask --base b.safetensors \
        --models x.safetensors y.safetensors --out tall/   # compressed form
    mtmerge reconstruct --in tall/ --base b.safetensors --task 1 --out y1.safetensors
    mtmerge merge --config merge.yml --out merged/   # mergekit's YAML format

Expected failures (bad paths, corrupt or mismatched checkpoints, bad
parameters, NaN/Inf, an unsafe or ambiguous --out, a full disk) exit with
status 2 and one `mtmerge: error: ...` line on stderr. Outputs are written to
a temp sibling and renamed into place, so a failed, interrupted (exit 130) or
terminated (SIGTERM, exit 143) run leaves no partial output. The output's
form and the other checks made before any tensor is read are in
`mtmerge.cli_output`. mergekit's method names are accepted where mtmerge has
the same semantics (`MERGEKIT`). `mtmerge.methods` (and JAX) are imported
only when needed.
"""

from __future__ import annotations

import argparse
import ast
import signal
import sys
import textwrap
import time
from typing import Any, Sequence

from mtmerge import checkpoint_io
from mtmerge import cli_output
from mtmerge import compressed_io
from mtmerge import method_names

_PROG = "mtmerge"

class _Exit(Exception):
  """Raised instead of argparse's sys.exit, carrying the status."""

  def __init__(self, status: int):
    super().__init__(status)
    self.status = status


class _Parser(argparse.ArgumentParser):
  """One-line errors, no sys.exit, and a method list built only for --help."""

  def error(self, message):
    _fail(f"{message} (see '{self.prog} --help')")
    raise _Exit(2)

  def exit(self, status=0, message=None):
    if message:
      sys.stderr.write(message)
    raise _Exit(status)

  def format_help(self):
    if self.epilog is None:
      self.epilog = methods_help()
    return super().format_help()


def _fail(message: str) -> None:
  line = " ".join(str(message).split())
  print(f"{_PROG}: error: {line}", file=sys.stderr)


def methods_help() -> str:
  """Every registered method: summary, parameters with defaults."""
  from mtmerge import methods  # local: imports JAX
  lines = ["methods (--method NAME, parameters as --param key=value):"]
  for name in methods.names():
    spec = methods.get(name)
    tag = " [compressed: one model per task]" if spec.compressed else ""
    params = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items())
    lines.append(f"  {name}{tag}")
    lines += textwrap.wrap(spec.summary, 78, initial_indent=" " * 6,
                           subsequent_indent=" " * 6)
    lines += textwrap.wrap(f"params: {params or '(none)'}", 78,
                           initial_indent=" " * 6, subsequent_indent=" " * 14)
  lines += method_names.help_lines()
  return "\n".join(lines)


def parse_params(items: Sequence[str]) -> dict[str, Any]:
  """`["k=v", ...]` -> dict; values are Python literals, else strings."""
  out: dict[str, Any] = {}
  for item in items:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
      raise ValueError(f"--param expects key=value, got {item!r}")
    if key in out:
      raise ValueError(f"parameter {key!r} given twice")
    try:
      out[key] = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError,
            RecursionError):
      out[key] = text.strip()
  return out


def _parser() -> _Parser:
  fmt = argparse.RawDescriptionHelpFormatter
  p = _Parser(prog=_PROG, formatter_class=fmt,
              description="Multi-task model merging of safetensors "
                          "checkpoints (JAX).")
  sub = p.add_subparsers(dest="command", metavar="COMMAND",
                         parser_class=_Parser)
  sub.required = True
  m = sub.add_parser(
      "merge", formatter_class=fmt,
      help="merge fine-tuned checkpoints into one (or a compressed form)",
      description=textwrap.fill(
          "Merge T fine-tuned checkpoints of one base model. The output "
          "keeps the base's layout (single file or sharded directory) and "
          "dtypes; compressed methods write a directory of tau, bit-packed "
          "masks and compressed.json (see `mtmerge reconstruct`).", 78))
  m.add_argument("--method", metavar="NAME")
  m.add_argument("--base", metavar="PATH", help="pretrained checkpoint")
  m.add_argument("--models", nargs="+", metavar="PATH",
                 help="fine-tuned checkpoints (task order = this order)")
  m.add_argument("--config", metavar="YAML",
                 help="a mergekit configuration (merge_method, base_model, "
                 "models, parameters, dtype, out_dtype) instead of --method, "
                 "--base, --models and --param")
  m.add_argument("--out", metavar="PATH",
                 help="NAME.safetensors: one file; any other name: a "
                 "directory (the base's shards, or model.safetensors)")
  m.add_argument("--force", action="store_true",
                 help="replace an existing --out")
  m.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                 help="method hyperparameter; repeatable (Python literal, "
                 "else a string): threshold=0.2 merge_func=mean "
                 "tall_mask_lambda=[0.2,0.4]")
  m.add_argument("--no-progress", action="store_true",
                 help="no progress bar on stderr")
  m.add_argument("--max-memory", default="2G", metavar="SIZE",
                 help="streamed merges: memory budget of one block of rows "
                 "(e.g. 4G, 512M); tensors larger than that are read in row "
                 "blocks (default 2G)")
  m.add_argument("--mesh", default=None, metavar="SPEC",
                 help="streamed merges: the device mesh each block's rows "
                 "are split over, e.g. data:-1 (default: all devices when "
                 "there are several; 'none': one device)")
  m.add_argument("--in-memory", action="store_true",
                 help="load every task vector instead of streaming blocks "
                 "(methods without a streamed form always do)")
  r = sub.add_parser(
      "reconstruct", formatter_class=fmt, epilog="",
      help="rebuild task I's model from a compressed merge",
      description=textwrap.fill(
          "Rebuild task I's model (theta_0 + rescale_I * m_I * tau) from "
          "the output of a compressed method, in the base's layout.", 78))
  r.add_argument("--in", dest="inp", required=True, metavar="PATH",
                 help="directory written by `mtmerge merge` (compressed)")
  r.add_argument("--base", required=True, metavar="PATH")
  r.add_argument("--task", required=True, type=int, metavar="I",
                 help="task index, 0-based, in --models order")
  r.add_argument("--out", required=True, metavar="PATH",
                 help="NAME.safetensors: one file; else a directory")
  r.add_argument("--force", action="store_true",
                 help="replace an existing --out")
  return p


def _size(n: float) -> str:
  if n < 1024:
    return f"{n:.0f} B"
  for unit in ("KB", "MB", "GB", "TB"):
    n /= 1024
    if n < 1024 or unit == "TB":
      return f"{n:.1f} {unit}"


def _preflight(out: str, inputs: dict[str, str], force: bool,
               compressed: bool = False) -> str:
  """Output checks that need no tensor data; returns the output's form."""
  form = cli_output.output_form(out, compressed)
  cli_output.check_destination(out, inputs, force)
  return form


def _merge_config(args) -> None:
  """`--config merge.yml`: mergekit's configuration format."""
  from mtmerge import mergekit_merge
  from mtmerge import streaming
  given = [f for f, v in (("--method", args.method), ("--base", args.base),
                          ("--models", args.models), ("--param", args.param))
           if v]
  if given:
    raise ValueError(f"--config replaces --method, --base, --models and "
                     f"--param; drop {given[0]}")
  t0 = time.time()
  info = mergekit_merge.merge(
      args.config, args.out, args.force, not args.no_progress,
      streaming.parse_size(args.max_memory), args.in_memory, mesh=args.mesh)
  if info["mtmerge"] == "per tensor" and args.mesh not in (None, "none"):
    print("note: --mesh applies to streamed merges; this one ran tensor by "
          "tensor in host NumPy", flush=True)
  how = info["mtmerge"] + "".join(f", {k}={v!r}"
                                   for k, v in info["hparams"].items())
  print(f"merged {info['models']} models with mergekit's {info['method']} "
        f"({how})")
  print(f"wrote {args.out} ({_size(info['bytes'])}) in "
        f"{time.time() - t0:.1f} s")


def _merge(args) -> None:
  from mtmerge import runtime
  runtime.hoist_constants()  # first: read when jax is imported
  from mtmerge import methods
  runtime.enable_compile_cache()  # a rerun on the same shapes skips compile
  need = (("--out", args.out),) if args.config else (
      ("--method", args.method), ("--base", args.base),
      ("--models", args.models), ("--out", args.out))
  missing = [f for f, v in need if not v]
  if missing:
    raise ValueError(f"the following arguments are required: "
                     f"{', '.join(missing)} (see 'mtmerge merge --help')")
  if args.config:
    _merge_config(args)
    return
  t0 = time.time()
  name, hparams = method_names.resolve(args.method,
                                       parse_params(args.param))
  spec = methods.get(name)
  full = spec.check(hparams, len(args.models))  # before any heavy loading
  inputs = {"the base": args.base, **{f"model {i}": p
                                      for i, p in enumerate(args.models)}}
  form = _preflight(args.out, inputs, args.force, spec.compressed)
  layout = checkpoint_io.read_layout(args.base)
  cli_output.check_dtypes(layout, [checkpoint_io.read_layout(p)
                                   for p in args.models])
  cli_output.check_space(args.out, cli_output.compressed_bytes(
      layout, len(args.models)) if spec.compressed else layout.nbytes)
  from mtmerge import streaming
  if not args.in_memory and streaming.streams(name, full):
    info = streaming.merge_files(
        name, args.base, args.models, args.out, progress=not args.no_progress,
        max_memory=streaming.parse_size(args.max_memory), mesh=args.mesh,
        layout=None if spec.compressed else cli_output.output_layout(
            layout, args.out, form), **hparams)
    what = f"{form}, {_size(info['bytes'])}" if not spec.compressed else (
        f"compressed, {_size(info['bytes'])} = {100 * info['ratio']:.1f}% of "
        f"{len(args.models)} full checkpoints ({_size(info['full_bytes'])})")
    _report(args, name, full, t0, f"{what}, streamed in "
            f"{len(info['passes'])} passes of {info['blocks']} blocks")
    return
  if not (spec.compressed or args.in_memory):
    # stdout, like the report: stderr keeps the one-line error contract.
    print(f"note: {name} has no streamed form for these parameters; merging "
          "in memory", flush=True)
  from mtmerge import task_vectors
  base, tvs, layout = task_vectors.from_checkpoints(
      args.base, args.models, progress=not args.no_progress, as_jax=True)
  floats = {k: base[k] for k in tvs}
  out = methods.merge(name, floats, tvs, **hparams)
  del tvs
  kept = {k: v for k, v in base.items() if k not in floats}  # int buffers
  if spec.compressed:
    info = compressed_io.save(out, layout, args.out, name, full)
    what = (f"compressed, {_size(info['bytes'])} = {100 * info['ratio']:.1f}%"
            f" of {len(args.models)} full checkpoints "
            f"({_size(info['full_bytes'])})")
  else:
    out = {**out, **kept}
    olayout = cli_output.output_layout(layout, args.out, form)
    what = f"{olayout.kind}, {_size(checkpoint_io.save(out, args.out, olayout))}"
  _report(args, name, full, t0, what)


def _report(args, name: str, full: dict[str, Any], t0: float,
            what: str) -> None:
  params = ", ".join(f"{k}={v!r}" for k, v in full.items())
  alias = f" (mergekit's {args.method!r})" if name != args.method else ""
  print(f"merged T={len(args.models)} models with {name}{alias}"
        + (f" ({params})" if params else ""))
  print(f"wrote {args.out} ({what}) in {time.time() - t0:.1f} s")


def _reconstruct(args) -> None:
  t0 = time.time()
  form = _preflight(args.out, {"--in": args.inp, "the base": args.base},
                    args.force)
  compressed, meta = compressed_io.load(args.inp)
  T = compressed.num_tasks
  if not 0 <= args.task < T:
    raise ValueError(f"--task {args.task} out of range: {args.inp} holds {T} "
                     f"tasks (0..{T - 1})")
  base, layout = checkpoint_io.load(args.base)
  cli_output.check_space(args.out, layout.nbytes)
  from mtmerge import methods
  floats = {k: v for k, v in base.items() if k in compressed.tau}
  model = {**base, **methods.reconstruct(floats, compressed, args.task)}
  olayout = cli_output.output_layout(layout, args.out, form)
  size = _size(checkpoint_io.save(model, args.out, olayout))
  print(f"reconstructed task {args.task} of {T} ({meta.get('method')})")
  print(f"wrote {args.out} ({olayout.kind}, {size}) in "
        f"{time.time() - t0:.1f} s")


class _Terminated(BaseException):
  """SIGTERM, raised in the main thread so temp outputs are removed."""


def _on_sigterm(signum, frame):
  del signum, frame
  raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI.

  Args:
    argv: arguments without the program name; default `sys.argv[1:]`.

  Returns:
    The exit status: 0 on success, 2 on bad input.
  """
  from mtmerge import runtime
  runtime.configure_xla()  # before JAX starts: faster task-axis reductions
  try:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
  except ValueError:  # not the main thread: leave signals alone
    previous = None
  try:
    args = _parser().parse_args(argv)
    {"merge": _merge, "reconstruct": _reconstruct}[args.command](args)
  except _Exit as e:
    return e.status
  except KeyError as e:
    _fail(e.args[0] if e.args else e)
    return 2
  except (ValueError, OSError) as e:  # CheckpointError is a ValueError
    _fail(e)
    return 2
  except KeyboardInterrupt:
    _fail("interrupted; no output was written")
    return 130
  except _Terminated:
    _fail("terminated; no output was written")
    return 143
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  return 0
