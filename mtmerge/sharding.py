"""Mesh and shardings from config data: mesh specs, regex rules, batches.

The mesh is config data, `config.mesh = [('data', -1), ('fsdp', 1),
('task', 1)]` (-1 takes the devices the other axes leave), and which
parameter dims are sharded over which mesh axes is a list of `(regex, spec)`
rules over `/`-joined parameter paths, first match wins, as in big_vision's
`sharding.py` and MaxText's logical-axis rules. Stacked task vectors
`[T, ...]` additionally put their task axis on a mesh axis
(`task_vector_sharding`), so reductions over tasks become collectives
instead of a gather onto one device.

Axis types: meshes are built with `AxisType.Auto` by default. mtmerge's hot
functions are `jax.jit`s whose shardings come entirely from these rules
(`in_shardings`/`out_shardings`, or already-sharded arguments) and XLA's
propagation does the rest; merge kernels are written as plain per-leaf
numpy-style code without per-op `out_sharding` annotations, which Explicit
axes would demand for every ambiguous dot or reshape. Pass
`axis_types="explicit"` for code written for sharding-in-types.

Dims that an axis does not divide (vocabulary sizes, odd bias lengths) are
replicated by default instead of failing, so a rule like
`('.*/kernel', (None, 'fsdp'))` can cover every kernel of a real model;
`strict=True` turns that into an error naming the parameter.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mtmerge import tree as tree_lib

Tree = Any
AXIS_TYPES = {"auto": jax.sharding.AxisType.Auto,
              "explicit": jax.sharding.AxisType.Explicit}


def _parse_mesh_spec(spec) -> list[tuple[str, int]]:
  if isinstance(spec, str):  # "data:-1,fsdp:2" from a command line
    spec = [tuple(a.split(":")) if ":" in a else (a, -1)
            for a in spec.split(",") if a.strip()]
  elif isinstance(spec, dict):
    spec = list(spec.items())
  out = []
  for item in spec:
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
      raise ValueError(f"mesh spec entries must be (axis_name, size) pairs, "
                       f"got {item!r} in {spec!r}")
    name, size = item
    try:
      size = int(size)
    except (TypeError, ValueError):
      raise ValueError(f"mesh axis {name!r}: size {size!r} is not an "
                       "integer") from None
    if not isinstance(name, str) or not name:
      raise ValueError(f"mesh axis name must be a string, got {name!r}")
    if size == 0 or size < -1:
      raise ValueError(f"mesh axis {name!r}: size must be >= 1 or -1, got "
                       f"{size}")
    out.append((name.strip(), size))
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh spec repeats an axis name: {names}")
  if sum(s == -1 for _, s in out) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {out}")
  if not out:
    raise ValueError("mesh spec is empty")
  return out


def mesh_shape(spec, num_devices: int) -> dict[str, int]:
  """Resolves a mesh spec (with at most one -1) against a device count.

  Returns:
    `{axis_name: size}` in spec order, sizes multiplying to `num_devices`.
  """
  axes = _parse_mesh_spec(spec)
  fixed = math.prod(s for _, s in axes if s != -1)
  desc = ", ".join(f"{n}={s}" for n, s in axes)
  if num_devices % fixed:
    raise ValueError(f"mesh axes ({desc}) need a multiple of {fixed} "
                     f"devices, but there are {num_devices}")
  if any(s == -1 for _, s in axes):
    axes = [(n, num_devices // fixed if s == -1 else s) for n, s in axes]
  elif fixed != num_devices:
    raise ValueError(f"mesh axes ({desc}) use {fixed} devices but there are "
                     f"{num_devices}; make one axis -1 to use them all")
  return dict(axes)


def make_mesh(spec, devices: Sequence[Any] | None = None, *,
              axis_types: str = "auto") -> jax.sharding.Mesh:
  """Builds a `Mesh` from config data like `[('data', -1), ('fsdp', 2)]`.

  Args:
    spec: sequence of `(axis_name, size)` (a size of -1 fills the rest), a
      dict, or a string `"data:-1,fsdp:2"`.
    devices: devices to use (default: all global devices). Their order is
      left to `jax.make_mesh`, which follows the physical topology on TPUs.
    axis_types: `"auto"` (default, see module docstring) or `"explicit"`.

  Returns:
    The mesh; enter it with `jax.set_mesh(mesh)` where code needs it.
  """
  if axis_types not in AXIS_TYPES:
    raise ValueError(f"axis_types must be one of {sorted(AXIS_TYPES)}, got "
                     f"{axis_types!r}")
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  return jax.make_mesh(tuple(shape.values()), tuple(shape),
                       axis_types=(AXIS_TYPES[axis_types],) * len(shape),
                       devices=devices)


def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def fit_spec(spec, shape: Sequence[int], mesh: jax.sharding.Mesh, *,
             path: str = "<array>", strict: bool = False) -> P:
  """Checks a PartitionSpec against a shape, replicating what cannot divide.

  Args:
    spec: PartitionSpec, tuple/list of entries (axis name, tuple of names or
      None), or None for fully replicated.
    shape: the array's shape.
    mesh: the mesh whose axis names and sizes apply.
    path: parameter name for error messages.
    strict: raise instead of replicating a dim its axes do not divide.

  Returns:
    A PartitionSpec valid for `shape` on `mesh`.
  """
  entries = [] if spec is None else list(spec)
  if len(entries) > len(shape):
    raise ValueError(f"parameter {path!r} of shape {tuple(shape)} has "
                     f"{len(shape)} dims but its sharding spec "
                     f"{tuple(entries)} has {len(entries)}")
  used = []
  out = []
  for dim, entry in enumerate(entries):
    axes = _axes_of(entry)
    for a in axes:
      if a not in mesh.shape:
        raise ValueError(f"parameter {path!r}: sharding spec {tuple(entries)} "
                         f"names mesh axis {a!r}, but the mesh has "
                         f"{tuple(mesh.axis_names)}")
      if a in used:
        raise ValueError(f"parameter {path!r}: mesh axis {a!r} appears twice "
                         f"in sharding spec {tuple(entries)}")
      used.append(a)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and shape[dim] % size:
      if strict:
        raise ValueError(f"parameter {path!r}: dim {dim} of shape "
                         f"{tuple(shape)} is not divisible by mesh axes "
                         f"{axes} of size {size}")
      entry = None
    out.append(entry if entry is None or isinstance(entry, str)
               else tuple(entry))
  return P(*out)


def shardings_from_rules(tree: Tree, rules: Iterable[tuple[str, Any]],
                         mesh: jax.sharding.Mesh, *, strict: bool = False,
                         lead: Sequence[Any] = ()) -> Tree:
  """NamedShardings for every leaf from `(regex, spec)` rules.

  Args:
    tree: params (arrays or `jax.ShapeDtypeStruct`s, e.g. from
      `jax.eval_shape`).
    rules: `(regex, spec)` pairs fully matched against `/`-joined paths,
      first match wins; spec is a PartitionSpec, a tuple like
      `(None, 'fsdp')`, or None / `()` for replicated. A path no rule covers
      raises `tree.UncoveredPathError` naming it.
    mesh: the mesh.
    strict: error (instead of replicating) when an axis does not divide.
    lead: spec entries for leading axes that precede the rule's dims (e.g.
      `('task',)` for stacked task vectors).

  Returns:
    A tree of `NamedSharding` with the structure of `tree`.
  """
  lead = tuple(lead)

  def one(path, leaf, spec):
    entries = lead + tuple(() if spec is None else spec)
    return NamedSharding(mesh, fit_spec(entries, np.shape(leaf), mesh,
                                        path=path, strict=strict))

  return tree_lib.tree_map_with_regex(list(rules), tree, one)


def task_vector_sharding(tvs: Tree, mesh: jax.sharding.Mesh,
                         rules: Iterable[tuple[str, Any]] | None = None, *,
                         task_axis: str | None = "task",
                         strict: bool = False) -> Tree:
  """Shardings for stacked task vectors `[T, ...]`.

  Args:
    tvs: stacked task vectors (or abstract ones).
    mesh: the mesh.
    rules: `(regex, spec)` rules for the per-parameter dims (the ones used
      for the base params); default replicates them.
    task_axis: mesh axis for the leading task dim (None: not sharded). When
      it does not divide T the task dim is replicated (unless `strict`).
    strict: see `shardings_from_rules`.

  Returns:
    A tree of `NamedSharding`.
  """
  if task_axis is not None and task_axis not in mesh.shape:
    raise ValueError(f"task axis {task_axis!r} is not a mesh axis "
                     f"{tuple(mesh.axis_names)}")
  return shardings_from_rules(tvs, [(".*", None)] if rules is None else rules,
                              mesh, strict=strict, lead=(task_axis,))


def _data_axes(mesh, data_axes) -> tuple[str, ...]:
  axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
  for a in axes:
    if a not in mesh.shape:
      raise ValueError(f"data axis {a!r} is not a mesh axis "
                       f"{tuple(mesh.axis_names)}")
  return axes


def batch_sharding(mesh: jax.sharding.Mesh,
                   data_axes: str | Sequence[str] = ("data",)
                   ) -> NamedSharding:
  """Sharding of a batch: leading dim split over `data_axes`, rest replicated.

  With FSDP the batch is usually split over `('data', 'fsdp')`.
  """
  return NamedSharding(mesh, P(_data_axes(mesh, data_axes)))


def check_batch_divides(global_batch_size: int, mesh: jax.sharding.Mesh,
                        data_axes: str | Sequence[str] = ("data",)) -> int:
  """Raises a clear ValueError unless the batch splits evenly over devices.

  Returns:
    The number of rows this process supplies to `distributed.global_batch`.
  """
  axes = _data_axes(mesh, data_axes)
  size = math.prod(mesh.shape[a] for a in axes)
  if global_batch_size <= 0 or global_batch_size % size:
    desc = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
    raise ValueError(f"global batch size {global_batch_size} is not a "
                     f"positive multiple of the {size} batch shards of data "
                     f"axes ({desc}); use a multiple of {size}")
  # Rows this process holds = distinct batch slices on its devices (hosts
  # that are replicas along the data axes hold the same rows).
  indices = batch_sharding(mesh, axes).addressable_devices_indices_map(
      (global_batch_size,))
  starts = {idx[0].indices(global_batch_size)[:2] for idx in indices.values()}
  return sum(stop - start for start, stop in starts)


def data_shard(global_batch_size: int, mesh: jax.sharding.Mesh,
               data_axes: str | Sequence[str] = ("data",)) -> tuple[int, int]:
  """`(index, count)`: which block of every global batch this process reads.

  The process's rows of a batch split over `data_axes` form one contiguous
  block (`check_batch_divides` rows long); hosts that are replicas along the
  data axes get the same index, so they read the same examples.

  Returns:
    The block's index and the number of blocks (1 on a single process).
  """
  axes = _data_axes(mesh, data_axes)
  rows = check_batch_divides(global_batch_size, mesh, axes)
  indices = batch_sharding(mesh, axes).addressable_devices_indices_map(
      (global_batch_size,))
  spans = sorted({idx[0].indices(global_batch_size)[:2]
                  for idx in indices.values()})
  start = spans[0][0]
  if any(a != b for (_, a), (b, _) in zip(spans, spans[1:])) or start % rows:
    raise ValueError(f"this process's batch rows {spans} are not one aligned "
                     f"block; order the mesh devices by process along the "
                     f"data axes {axes}")
  return start // rows, global_batch_size // rows


def rows_sharded(x: jax.Array, lead: int, whole_rows: bool = False
                 ) -> jax.Array:
  """Under a mesh (`jax.set_mesh`): `x` with its first param axis sharded.

  Work on whole rows (the last axis) of a leaf whose last axis is split
  over devices needs each row on one device; left to itself XLA replicates
  the whole leaf (measured: TALL's packed masks 36.7 GiB per device at 7B
  x 8 tasks on 64 devices). So the leaf is moved to be split by rows (over
  the mesh axes, except a 'task' axis, whose product divides the rows) and
  every device works on its own rows. Other axes stay unconstrained, or,
  with `whole_rows`, the last axis is replicated (a row sort). Outside a
  mesh: `x` unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or x.ndim < lead + 2:
    return x
  rows, axes, size = x.shape[lead], [], 1
  for a in mesh.axis_names:
    n = mesh.shape[a]
    if a != "task" and n > 1 and rows % (size * n) == 0:
      axes.append(a)
      size *= n
  if not axes:
    return x
  U = P.UNCONSTRAINED
  rest = [U] * (x.ndim - lead - 2) + [None if whole_rows else U]
  return jax.lax.with_sharding_constraint(x, P(*([U] * lead + [tuple(axes)]
                                                  + rest)))


def integer_view(x: jax.Array, view: str) -> jax.Array:
  """`x`'s bits as `view` ('uint' or 'int') integers of its width."""
  return jax.lax.bitcast_convert_type(
      x, np.dtype(f"{view}{8 * x.dtype.itemsize}"))


def pass_view(x: jax.Array, after: Any) -> jax.Array:
  """`x`, bit for bit, as a value of its own: read after `after` (an array
  or a tree of them).

  A whole-model program that reads the same leaves in several passes, each
  waiting on a model-wide statistic of the pass before, would have XLA
  compute each leaf's shared subexpressions (float32 copies, PCB's
  `[T, T, ...]` exponentials) once and keep them alive for every leaf
  across the statistic. Each later pass reads the leaves through this
  function with that statistic as `after`: x's bits are xored with a zero
  computed from `after` (`(v != v) & (v == v)` of its sum, which XLA
  cannot fold), so the reads differ to XLA, and each pass's work fuses
  into that pass.
  """
  # A sum, not an element: picking one entry of a sharded `after` makes
  # XLA all-gather it (a whole leaf, when TSV chains its leaves).
  v = sum(jnp.sum(a, dtype=jnp.float32) for a in jax.tree.leaves(after))
  bits = integer_view(x, "uint")
  zero = ((v != v) & (v == v)).astype(bits.dtype)
  return jax.lax.bitcast_convert_type(bits ^ zero, x.dtype)


def under_mesh() -> bool:
  """True while tracing under `jax.set_mesh` (a sharded program)."""
  return not jax.sharding.get_abstract_mesh().empty
