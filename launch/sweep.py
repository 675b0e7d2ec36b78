#!/usr/bin/env python3
r"""Expands a config's sweep into one `mtmerge.main` run per point.

  python launch/sweep.py configs/X.py[:ARG] --workdir DIR [--dry-run] \
      [--python PY] [-- EXTRA FLAGS]

The sweep is data in the config module, either big_vision style

  def get_hyper(hyper):
    return hyper.product([hyper.sweep('config.lr', [1e-3, 1e-2]),
                          hyper.sweep('config.method_name', ['ties', 'dare'])])

(`hyper` offers `sweep`, `product`, `chainit`, `zipit`, `fixed`; the
`config.` prefix is optional), or a field `config.sweep = {'lr': [...],
'method': {'k': [...]}}` (nested dicts name nested fields) whose cartesian
product is taken. Each point becomes

  python -m mtmerge.main --config X.py:ARG --workdir DIR/<NNN_key=value...> \
      --config.lr=0.001 --config.method_name=ties [EXTRA FLAGS]

Keys are checked against the config before anything runs: a key the config
does not have is an error naming it. Without `--dry-run` the runs execute
one after another and the sweep stops at the first failing run.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys
import types
from typing import Any


# big_vision-style sweep constructors: a sweep is a list of {key: value}.
def _sweep(name: str, values) -> list[dict[str, Any]]:
  return [{name: v} for v in values]


def _product(sweeps) -> list[dict[str, Any]]:
  return [dict(kv for d in combo for kv in d.items())
          for combo in itertools.product(*sweeps)]


def _chainit(sweeps) -> list[dict[str, Any]]:
  return [d for s in sweeps for d in s]


def _zipit(sweeps) -> list[dict[str, Any]]:
  sweeps = list(sweeps)
  if len({len(s) for s in sweeps}) > 1:
    raise ValueError(f"zipit needs sweeps of equal length, got "
                     f"{[len(s) for s in sweeps]}")
  return [dict(kv for d in combo for kv in d.items()) for combo in zip(*sweeps)]


def _fixed(name: str, value, length: int = 1) -> list[dict[str, Any]]:
  return [{name: value}] * length


HYPER = types.SimpleNamespace(sweep=_sweep, product=_product,
                              chainit=_chainit, zipit=_zipit, fixed=_fixed)


def load_config(spec: str):
  """Imports `path.py[:arg]`; returns (module, config)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  mod_spec = importlib.util.spec_from_file_location(
      "_sweep_config_" + re.sub(r"\W", "_", path), path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config(arg)")
  return module, module.get_config(arg or None)


def _strip(key: str) -> str:
  return key[len("config."):] if key.startswith("config.") else key


def _flatten(d, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if hasattr(v, "items"):  # nested: {'method': {'k': [...]}} -> method.k
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def points(module, config) -> list[dict[str, Any]]:
  """The sweep's points as `{dotted_key: value}` dicts (one empty if none)."""
  if hasattr(module, "get_hyper"):
    pts = module.get_hyper(HYPER)
  elif "sweep" in config and config.sweep:
    sweep = _flatten(config.sweep)
    for k, v in sweep.items():
      if not isinstance(v, (list, tuple)):
        raise ValueError(f"config.sweep[{k!r}] must be a list of values, got "
                         f"{v!r}")
    pts = _product([_sweep(k, v) for k, v in sweep.items()])
  else:
    pts = [{}]
  return [{_strip(k): v for k, v in p.items()} for p in pts]


def check_keys(config, pts, where: str) -> None:
  """Raises ValueError naming the first sweep key the config lacks."""
  for p in pts:
    for key in p:
      node = config
      for i, part in enumerate(key.split(".")):
        if not hasattr(node, "keys") or part not in node:
          have = sorted(node.keys()) if hasattr(node, "keys") else []
          prefix = ".".join(key.split(".")[:i]) or "config"
          raise ValueError(f"sweep key {key!r} is not in {where}: {prefix} "
                           f"has no field {part!r} (it has: "
                           f"{', '.join(have)})")
        node = node[part]


def format_value(value) -> str:
  """A value as `config_flags` parses it back (strings raw, others repr)."""
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple, dict, bool, int, float)) or value is None:
    return repr(value)
  raise ValueError(f"cannot pass sweep value {value!r} of type "
                   f"{type(value).__name__} on the command line")


def run_name(index: int, point: dict[str, Any]) -> str:
  """`NNN_key=value_...`: sortable, unique, filesystem-safe."""
  parts = [f"{k.split('.')[-1]}={format_value(v)}" for k, v in point.items()]
  name = re.sub(r"[^\w.=+-]+", "-", "_".join(parts)).strip("-")[:120]
  return f"{index:03d}" + (f"_{name}" if name else "")


def commands(config_spec: str, workdir: str, python: str = sys.executable,
             extra: tuple[str, ...] = ()) -> list[list[str]]:
  """One `python -m mtmerge.main ...` argv per sweep point."""
  module, config = load_config(config_spec)
  pts = points(module, config)
  check_keys(config, pts, config_spec)
  out = []
  for i, p in enumerate(pts):
    argv = [python, "-m", "mtmerge.main", "--config", config_spec,
            "--workdir", os.path.join(workdir, run_name(i, p))]
    argv += [f"--config.{k}={format_value(v)}" for k, v in p.items()]
    out.append(argv + list(extra))
  return out


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = []
  if "--" in argv:
    extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("config", help="configs/X.py or configs/X.py:arg")
  parser.add_argument("--workdir", required=True, help="parent of run dirs")
  parser.add_argument("--dry-run", action="store_true",
                      help="print the commands instead of running them")
  parser.add_argument("--python", default=sys.executable)
  args = parser.parse_args(argv)
  try:
    cmds = commands(args.config, args.workdir, args.python, tuple(extra))
  except (ValueError, FileNotFoundError) as e:
    print(f"sweep.py: error: {e}", file=sys.stderr)
    return 2
  for i, cmd in enumerate(cmds):
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
      continue
    rc = subprocess.call(cmd)
    if rc:
      print(f"sweep.py: run {i} failed with exit code {rc}; stopping",
            file=sys.stderr)
      return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
