"""A thin registry of merge methods: `register(name)`, `get(name)`, `merge`.

Each method is a pure function `fn(base, tvs, **hparams)` returning merged
params (or, for one-model-per-task methods, a `compressed.Compressed`).
Hyperparameters are either *static* (they change shapes or control flow:
kept fractions, scopes, merge functions; a new value recompiles) or *traced*
(plain numbers such as `scaling_factor`; a validation sweep over them reuses
one compiled program). `merge()` validates names and values eagerly, before
any JAX work, so a bad input fails with one line naming the problem.

`merge()` jits a whole method by default. A method registered with
`jit=False` is *orchestrated*: `merge()` calls it eagerly and it jits its own
pieces, typically small kernels called once per leaf, which XLA compiles
once per distinct leaf shape. That bounds compile time by the number of
shapes (~10 in a ViT) instead of leaves x tasks of one unrolled program
(TIES: ~20 s cold on a 152-leaf ViT-B/32, a few seconds orchestrated). Such
a method must still be traceable, so `jitted()` (AOT checks, tests) and
callers inside a jit can compile it whole.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable

import jax

Tree = Any


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A registered merge method.

  Attributes:
    name: registry name (FusionBench's where it has the method).
    fn: `fn(base, tvs, **hparams)`.
    defaults: hyperparameter name -> default value (from the signature).
    static: names of hyperparameters that are compile-time constants.
    compressed: True if `fn` returns a `Compressed` (one model per task).
    jit: False if `merge()` calls `fn` eagerly (it jits its own pieces).
    min_tasks / max_tasks: how many task vectors the method accepts.
    validators: name -> callable raising ValueError on a bad value.
    summary: first line of the docstring.
  """
  name: str
  fn: Callable[..., Any]
  defaults: dict[str, Any]
  static: frozenset[str]
  compressed: bool = False
  jit: bool = True
  min_tasks: int = 1
  max_tasks: int | None = None
  validators: dict[str, Callable[[Any], None]] = dataclasses.field(
      default_factory=dict)
  summary: str = ""

  def check(self, hparams: dict[str, Any], num_tasks: int | None = None
            ) -> dict[str, Any]:
    """Returns defaults updated by `hparams`; raises ValueError on bad input."""
    unknown = sorted(set(hparams) - set(self.defaults))
    if unknown:
      raise ValueError(
          f"unknown parameter {unknown[0]!r} for method {self.name!r}; it "
          f"accepts: {', '.join(self.defaults) or '(none)'}")
    full = {**self.defaults, **hparams}
    for k, v in full.items():
      if k in self.validators:
        self.validators[k](v)
    if num_tasks is not None:
      for k, val in full.items():  # every list hparam is one value per task
        if isinstance(val, (list, tuple)) and len(val) != num_tasks:
          raise ValueError(f"{k} has {len(val)} values (one per task) but "
                           f"there are {num_tasks} fine-tuned models")
      if num_tasks < self.min_tasks:
        raise ValueError(f"method {self.name!r} needs at least "
                         f"{self.min_tasks} fine-tuned models, got {num_tasks}")
      if self.max_tasks is not None and num_tasks > self.max_tasks:
        raise ValueError(f"method {self.name!r} takes at most "
                         f"{self.max_tasks} fine-tuned models, got {num_tasks}")
    return full


_REGISTRY: dict[str, MethodSpec] = {}
_JITTED: dict[tuple[str, tuple], Callable] = {}


def register(name: str, *, static: tuple[str, ...] = (),
             compressed: bool = False, min_tasks: int = 2,
             max_tasks: int | None = None,
             validators: dict[str, Callable[[Any], None]] | None = None,
             jit: bool = True):
  """Decorator registering `fn(base, tvs, **hparams)` under `name`.

  Args:
    name: the registry name.
    static: hyperparameters that are compile-time constants.
    compressed: `fn` returns a `Compressed` (one model per task).
    min_tasks, max_tasks: accepted numbers of task vectors.
    validators: hyperparameter name -> callable raising ValueError.
    jit: True: `merge()` runs `fn` under one `jax.jit`. False: `merge()`
      calls `fn` eagerly with the static values as Python constants and the
      traced ones as given; `fn` jits its own pieces (see the module doc).
  """
  def deco(fn):
    if name in _REGISTRY:
      raise ValueError(f"method {name!r} registered twice")
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[2:]
    defaults = {p.name: p.default for p in params
                if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
    missing = [k for k, v in defaults.items() if v is inspect.Parameter.empty]
    if missing:
      raise TypeError(f"method {name!r}: hyperparameters need defaults: "
                      f"{missing}")
    bad_static = set(static) - set(defaults)
    if bad_static:
      raise TypeError(f"method {name!r}: unknown static names {bad_static}")
    doc = (fn.__doc__ or "").strip().splitlines()
    _REGISTRY[name] = MethodSpec(
        name=name, fn=fn, defaults=defaults, static=frozenset(static),
        compressed=compressed, jit=jit, min_tasks=min_tasks,
        max_tasks=max_tasks,
        validators=dict(validators or {}), summary=doc[0] if doc else "")
    return fn
  return deco


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> MethodSpec:
  """The spec registered as `name`; a clear error lists the known names."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; known methods: "
                     f"{', '.join(names())}")
  return _REGISTRY[name]


def _freeze(v):
  if isinstance(v, list):
    return tuple(_freeze(x) for x in v)
  if isinstance(v, dict):
    return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
  return v


def jitted(spec: MethodSpec, static_values: dict[str, Any]) -> Callable:
  """The jitted `fn(base, tvs, traced)` for one set of static values.

  The whole method as one program, also for `jit=False` methods (which
  `merge()` runs eagerly instead).
  """
  key = (spec.name, tuple(sorted((k, _freeze(v))
                                 for k, v in static_values.items())))
  if key not in _JITTED:
    def call(base, tvs, traced):
      return spec.fn(base, tvs, **static_values, **traced)
    _JITTED[key] = jax.jit(call)
  return _JITTED[key]


def merge(name: str, base: Tree, tvs: Tree, **hparams) -> Any:
  """Runs method `name`: validated hparams, static ones as constants.

  Jitted whole, or eagerly for methods registered with `jit=False`.

  Args:
    name: a registered method name.
    base: pretrained params.
    tvs: stacked task vectors `[T, ...]` (see `task_vectors.from_models`).
    **hparams: method hyperparameters (unknown names are an error).

  Returns:
    Merged params with the structure and dtypes of `base`, or a
    `Compressed` for one-model-per-task methods.
  """
  from mtmerge import task_vectors  # local: avoid an import cycle
  spec = get(name)
  full = spec.check(hparams, task_vectors.num_tasks(tvs))
  static = {k: v for k, v in full.items() if k in spec.static}
  traced = {k: v for k, v in full.items() if k not in spec.static}
  if not spec.jit:
    return spec.fn(base, tvs, **static, **traced)
  return jitted(spec, static)(base, tvs, traced)


_CALL = re.compile(r"^\s*([A-Za-z_][\w]*)\s*(?:\((.*)\))?\s*$")


def parse(text: str) -> tuple[str, dict[str, Any]]:
  """Parses `"ties_merging(threshold=0.2, merge_func='sum')"`.

  Returns:
    `(name, hparams)`, values parsed as Python literals; the name must be a
    registered method.
  """
  name, kwargs = parse_call(text)
  get(name)
  return name, kwargs


def parse_call(text: str) -> tuple[str, dict[str, Any]]:
  """`"name(key=value, ...)"` -> `(name, {key: value})`, any name."""
  import ast
  m = _CALL.match(text)
  if not m:
    raise ValueError(f"cannot parse method spec {text!r}; expected "
                     "name(key=value, ...)")
  name, args = m.group(1), m.group(2)
  if not args or not args.strip():
    return name, {}
  try:
    call = ast.parse(f"f({args})", mode="eval").body
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
  except (SyntaxError, ValueError) as e:
    raise ValueError(f"cannot parse arguments of {text!r}: {e}") from None
  if call.args or any(k is None for k in kwargs):
    raise ValueError(f"method arguments must be key=value, got {text!r}")
  return name, kwargs
