"""The one trainer: one jitted step over a device mesh, for every trainer.

Fine-tuning (`mtmerge.finetune`) and the learned merge methods (AdaMerging,
aTLAS, Concrete masks, the Twin-Merging router, skill localization) differ
only in what they learn and in their loss; `fit` runs all of them the same
way:

* an `Objective`: the learned params (encoder weights, coefficients, mask
  logits, a router), frozen constants (theta_0, stacked task vectors,
  heads, frozen encoder params) and a pure
  `loss(params, consts, batch, rng) -> (loss, metrics)`, plus an optional
  projection applied after every update (AdaMerging clamps to [0, 1]);
* a mesh from config data (built once by the caller, `sharding.make_mesh`),
  `NamedSharding`s for the learned params (rules), the optimizer state
  (following the params), the constants (parameter rules plus a task axis
  for stacked task vectors, `sharding.task_vector_sharding`) and the batch
  (split over the data axes);
* the state built abstractly (`jax.eval_shape`, `optax.tree_map_params`)
  and materialized by a jitted init with `out_shardings`, or restored from
  a checkpoint straight into those shards; constants placed device to
  device (`place`), never through host numpy; the state is donated, so XLA
  updates it in place, and one compiled step serves every run with the
  same loss function and optimizer (fine-tuning task after task);
* batches by step index (`batches(step) -> host-local numpy pytree`), each
  host supplying only its rows, assembled into global arrays with
  `jax.make_array_from_process_local_data`; the step's PRNG key is
  `fold_in(seed, step)`; together these make a resumed run end with exactly
  the params of an uninterrupted one;
* orbax checkpoints of `{params, opt, step}` every `save_every` steps
  through `mtmerge.checkpoint.Run` (config fingerprint, atomic writes, a
  `final` checkpoint that marks the run done), metrics kept on device and
  fetched at log steps (written by process 0), a progress bar, and a
  `FloatingPointError` naming the step and the parameter path of the first
  non-finite loss or learned value (checked at the next log step, and
  always before a checkpoint is written).

The loop follows big_vision's and MaxText's trainers: build shardings from
rules, jit the step once with donated state, feed global batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import auto as tqdm

from mtmerge import checkpoint
from mtmerge import distributed
from mtmerge import results
from mtmerge import sharding
from mtmerge import tree as tree_lib

Tree = Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How coefficients are learned (every field is plain config data).

  Attributes:
    steps: optimizer steps.
    optimizer: `adam`, `adamw` or `sgd`.
    lr: peak learning rate.
    b1, b2: Adam betas.
    weight_decay: decoupled weight decay (adamw).
    schedule: `constant` or `cosine` (decay to 0 after `warmup` steps).
    warmup: linear warmup steps.
    clip_norm: global gradient-norm clip (None: off).
    seed: PRNG seed of the per-step keys (`fold_in(seed, step)`).
    save_every: checkpoint period in steps (0: only the final result).
    log_every: metrics period in steps.
    mesh: mesh spec (`sharding.make_mesh`), e.g. `(("data", -1),)`.
    data_axes: mesh axes the batch is split over.
  """
  steps: int = 100
  optimizer: str = "adam"
  lr: float = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.0
  schedule: str = "constant"
  warmup: int = 0
  clip_norm: float | None = None
  seed: int = 0
  save_every: int = 0
  log_every: int = 10
  mesh: Any = (("data", -1),)
  data_axes: tuple[str, ...] = ("data",)

  @classmethod
  def from_dict(cls, d: dict | None = None, **overrides) -> "TrainConfig":
    """A config from a dict (e.g. a ConfigDict's `to_dict()`), checked."""
    d = {**dict(d or {}), **overrides}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown training option(s) {unknown}; known: "
                       f"{sorted(known)}")
    if "data_axes" in d:
      d["data_axes"] = ((d["data_axes"],) if isinstance(d["data_axes"], str)
                        else tuple(d["data_axes"]))
    cfg = cls(**d)
    cfg.check()
    return cfg

  def check(self) -> None:
    if int(self.steps) < 0:
      raise ValueError(f"steps must be >= 0, got {self.steps}")
    if self.optimizer not in ("adam", "adamw", "sgd"):
      raise ValueError(f"optimizer must be adam, adamw or sgd, got "
                       f"{self.optimizer!r}")
    if self.schedule not in ("constant", "cosine"):
      raise ValueError(f"schedule must be constant or cosine, got "
                       f"{self.schedule!r}")
    if not (math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f"lr must be a positive number, got {self.lr}")


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """The optax optimizer (and schedule) a `TrainConfig` describes."""
  if cfg.schedule == "cosine" and cfg.warmup:
    lr = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup, max(cfg.steps, cfg.warmup + 1), 0.0)
  elif cfg.schedule == "cosine":  # full lr at step 0, decaying to 0
    lr = optax.cosine_decay_schedule(cfg.lr, max(cfg.steps, 1))
  elif cfg.warmup:
    lr = optax.linear_schedule(0.0, cfg.lr, cfg.warmup)
  else:
    lr = cfg.lr
  if cfg.optimizer == "adam":
    tx = optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
  elif cfg.optimizer == "adamw":
    tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  else:
    tx = optax.sgd(lr)
  if cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx


class Objective(NamedTuple):
  """What to learn.

  Attributes:
    init: the initial learned params (a pytree of arrays).
    loss: `(params, consts, batch, rng) -> (scalar loss, dict of scalar
      metrics)`, pure and jittable.
    consts: frozen inputs of the loss (theta_0, task vectors, heads...).
    project: `params -> params` applied after every update (None: none).
  """
  init: Tree
  loss: Callable[[Tree, Tree, Tree, jax.Array], tuple[jax.Array, dict]]
  consts: Tree = None
  project: Callable[[Tree], Tree] | None = None


def abstract(tree: Tree, shardings: Tree) -> Tree:
  """`jax.ShapeDtypeStruct`s of `tree` carrying `shardings`."""
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(
      np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x),
      sharding=sh), tree, shardings)


def state_shardings(params: Tree, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh) -> dict:
  """Shardings of the train state `{params, opt, step}`, built abstractly.

  Args:
    params: abstract learned params carrying their shardings (`abstract`).
    tx: the optimizer.
    mesh: the mesh.

  Optimizer entries shaped like the params (Adam's moments) take the
  params' shardings (`optax.tree_map_params` over `jax.eval_shape` of
  `tx.init`, no compilation); everything else (step counts) is replicated.
  """
  repl = NamedSharding(mesh, P())
  p_sh = jax.tree.map(lambda x: x.sharding, params)
  opt = optax.tree_map_params(tx, lambda _, sh: sh,
                              jax.eval_shape(tx.init, params), p_sh,
                              transform_non_params=lambda _: repl)
  return {"params": p_sh, "opt": opt, "step": repl}


def abstract_state(params: Tree, tx: optax.GradientTransformation,
                   state_sh: dict) -> dict:
  """The train state as `jax.ShapeDtypeStruct`s placed by `state_sh`."""
  shapes = jax.eval_shape(lambda p: {"params": p, "opt": tx.init(p),
                                     "step": jnp.zeros((), jnp.int32)},
                          params)
  return abstract(shapes, state_sh)


def build_step(objective: Objective, tx: optax.GradientTransformation,
               seed: int, state_sh: dict, mesh: jax.sharding.Mesh):
  """The jitted train step `(state, consts, batch) -> (state, metrics, ok)`.

  The state is donated (updated in place); `ok` holds one finiteness flag
  per learned leaf, so a non-finite value is reported by its path.
  """
  repl = NamedSharding(mesh, P())
  key = jax.random.key(seed)

  def step_fn(state, consts, batch):
    rng = jax.random.fold_in(key, state["step"])
    (loss, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        state["params"], consts, batch, rng)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if objective.project is not None:
      params = objective.project(params)
    finite = {p: jnp.all(jnp.isfinite(x))
              for p, x in tree_lib.named_leaves(params)}
    metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}
    return ({"params": params, "opt": opt, "step": state["step"] + 1},
            metrics, finite)

  return jax.jit(step_fn, donate_argnums=(0,),
                 out_shardings=(state_sh, repl, repl))


# The last few jitted steps, so that runs with the same loss function and
# optimizer (fine-tuning task after task) share one compiled program. Small:
# a loss closes over its problem's constants.
_STEP_CACHE: list[tuple[tuple, Any]] = []


def _cached_step(objective, tx_key, tx, seed, state_sh, mesh):
  leaves, treedef = jax.tree.flatten(state_sh)
  key = (objective.loss, objective.project, tx_key, seed, mesh, treedef,
         tuple(leaves))
  for k, fn in _STEP_CACHE:
    if k == key:
      return fn
  fn = build_step(objective, tx, seed, state_sh, mesh)
  _STEP_CACHE.insert(0, (key, fn))
  del _STEP_CACHE[2:]
  return fn


class Result(NamedTuple):
  """`params`: the learned params; `log`: per-step metrics (dicts)."""
  params: Tree
  log: list[dict]


def _host_rows(mesh, data_axes) -> tuple[int, int]:
  """(distinct batch shards on this process, batch shards in the mesh)."""
  total = math.prod(mesh.shape[a] for a in data_axes)
  idx = sharding.batch_sharding(mesh, data_axes).addressable_devices_indices_map(
      (total,))
  return len({i[0].indices(total)[:2] for i in idx.values()}), total


def _check_batch(batch: Tree, mesh, data_axes) -> None:
  local, total = _host_rows(mesh, data_axes)
  for path, x in tree_lib.named_leaves(batch):
    n = np.shape(x)[0] if np.ndim(x) else None
    if n is None or n == 0 or n % local:
      raise ValueError(
          f"batch leaf {path or '<root>'!r} of shape {np.shape(x)}: its "
          f"leading (batch) dim must be a positive multiple of the {local} "
          f"batch shard(s) this process feeds (data axes "
          f"{dict((a, mesh.shape[a]) for a in data_axes)}, {total} shards "
          "in all)")


def _scalar(x) -> float:
  return float(np.asarray(x.addressable_data(0) if isinstance(x, jax.Array)
                          else x))


def place(tree: Tree, shardings: Tree) -> Tree:
  """Puts `tree` on `shardings` without a round trip through host numpy.

  Device arrays are resharded device to device (kept as they are when
  already placed so); host arrays (identical on every process) go straight
  to the shards each process owns.
  """
  def one(x, sh):
    if isinstance(x, jax.Array):
      same = x.sharding.is_equivalent_to(sh, x.ndim)
      return x if same else jax.device_put(x, sh)
    if sh.is_fully_addressable:
      return jax.device_put(x, sh)
    return distributed.put_global(x, sh)
  return jax.tree.map(one, tree, shardings)


class _Metrics:
  """Per-step metrics kept on device and fetched together at log steps."""

  def __init__(self, desc: str, log: list[dict]):
    self.desc, self.log, self.pending = desc, log, []

  def add(self, s: int, metrics: dict, finite: dict) -> None:
    self.pending.append((s, metrics, finite))

  def flush(self) -> dict | None:
    """Appends the pending steps to the log; raises at a non-finite one."""
    pending, self.pending = self.pending, []
    for s, metrics, finite in pending:
      metrics = {k: _scalar(v) for k, v in metrics.items()}
      if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"{self.desc}: non-finite loss "
                                 f"{metrics['loss']} at step {s}; lower the "
                                 "learning rate")
      bad = [p for p, ok in finite.items() if not _scalar(ok)]
      if bad:
        raise FloatingPointError(f"{self.desc}: learned parameter {bad[0]!r} "
                                 f"became non-finite at step {s}")
      self.log.append({"step": s + 1, **metrics})
    return self.log[-1] if pending else None


def fit(objective: Objective, batches: Callable[[int], Tree],
        cfg: TrainConfig, *, mesh: jax.sharding.Mesh | None = None,
        const_shardings: Tree | None = None,
        param_shardings: Tree | None = None, workdir: str | None = None,
        fingerprint: dict | None = None, run: checkpoint.Run | None = None,
        average_last: int = 0, host: bool = True, desc: str = "train",
        progress: bool = True) -> Result:
  """Learns `objective.init` for `cfg.steps` steps; resumable.

  The state is built abstractly (`jax.eval_shape`, shardings from
  `param_shardings` and the optimizer's structure) and materialized by one
  jitted init with `out_shardings`, or restored from a checkpoint straight
  into its shards. Constants stay on device (resharded, never copied
  through host numpy). Metrics stay on device until a log step
  (`cfg.log_every`, checkpoint steps and the last step), where they are
  fetched together and checked for non-finite values.

  Args:
    objective: the learned params, loss, constants and projection.
    batches: `step -> host-local batch` (numpy pytree; every leaf's leading
      dim is the rows this process supplies); called with every step index
      once, in order, from the resumed step on.
    cfg: the training config.
    mesh: the device mesh (default: `sharding.make_mesh(cfg.mesh)`).
    const_shardings: shardings of `objective.consts` (a matching tree, or
      one sharding for all leaves); default replicated.
    param_shardings: shardings of the learned params (default replicated;
      optimizer state follows the params it belongs to).
    workdir: checkpoint directory (None: no checkpoints). A finished run in
      it is returned without training; an unfinished one resumes.
    fingerprint: what determines the result (checked against `workdir`'s,
      `checkpoint.ConfigMismatchError` on a difference).
    run: an open `checkpoint.Run` to use instead of `workdir` (the caller
      owns its fingerprint and closes it).
    average_last: return the mean of the last K step checkpoints ("Free
      Lunch" checkpoint averaging, Wortsman et al. 2022); 0 or 1: off.
    host: return host numpy params (else the sharded device arrays).
    desc: progress-bar and error-message label.
    progress: show a progress bar (process 0).

  Returns:
    The learned params and the metrics log.
  """
  cfg.check()
  mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
  data_axes = tuple(cfg.data_axes)
  for a in data_axes:
    if a not in mesh.shape:
      raise ValueError(f"data axis {a!r} is not a mesh axis "
                       f"{tuple(mesh.axis_names)}")
  repl = NamedSharding(mesh, P())
  as_tree = lambda sh, tree: (jax.tree.map(lambda _: sh, tree)
                              if sh is None or isinstance(sh, jax.sharding.Sharding)
                              else sh)
  p_sh = as_tree(param_shardings or repl, objective.init)
  c_sh = as_tree(const_shardings or repl, objective.consts)
  tx = make_optimizer(cfg)
  out = (lambda t: jax.tree.map(_to_host, t)) if host else (lambda t: t)
  own_run = run is None and workdir is not None
  if own_run:
    run = checkpoint.Run(workdir, {"train": dataclasses.asdict(cfg),
                                   **(fingerprint or {})})
  state_sh = state_shardings(abstract(objective.init, p_sh), tx, mesh)
  target = abstract_state(objective.init, tx, state_sh)
  if run is not None and run.done():
    # Wrapped in a dict: orbax's StandardSave takes no bare array (a
    # task-wise coefficient vector is one).
    try:
      params = run.load_final({"params": target["params"]})["params"]
    except ValueError:  # a bare final (fine-tuning runs before train.fit)
      params = run.load_final(target["params"])
    log = _read_log(run.directory)
    if own_run:
      run.close()
    return Result(out(params), log)

  consts = place(objective.consts, c_sh)
  start, log = 0, []
  if run is not None and run.latest_step() is not None:
    start = int(run.latest_step())
    try:
      state = run.restore(start, target)
    except ValueError:  # no "step" entry (fine-tuning before train.fit)
      state = dict(run.restore(start, {k: target[k] for k in ("params",
                                                              "opt")}),
                   step=jax.device_put(jnp.int32(start), state_sh["step"]))
    log = [r for r in _read_log(run.directory) if r["step"] <= start]
  else:
    init = jax.jit(lambda p: {"params": jax.tree.map(jnp.copy, p),
                              "opt": tx.init(p),
                              "step": jnp.zeros((), jnp.int32)},
                   out_shardings=state_sh)
    state = init(place(objective.init, p_sh))
  batch_spec = sharding.batch_sharding(mesh, data_axes).spec
  step = _cached_step(objective, dataclasses.astuple(cfg), tx, cfg.seed,
                      state_sh, mesh)
  bar = tqdm.tqdm(total=cfg.steps, initial=start, desc=desc, leave=False,
                  disable=None if progress and distributed.is_main() else True)
  metrics = _Metrics(desc, log)
  # XLA:CPU deadlocks with collective steps left in flight (distributed.py):
  # wait for each step there; accelerators run ahead until a log step.
  block = jax.default_backend() == "cpu"
  for s in range(start, cfg.steps):
    local = batches(s)
    if s == start:
      _check_batch(local, mesh, data_axes)  # before the first compile
    batch = distributed.global_batch(local, mesh, batch_spec)
    state, m, finite = step(state, consts, batch)
    metrics.add(s, m, finite)
    if block:
      jax.block_until_ready(m["loss"])
    bar.update()
    saving = run is not None and cfg.save_every and (
        (s + 1) % cfg.save_every == 0 or (average_last > 1 and
                                          s + 1 == cfg.steps))
    if saving or (s + 1) % max(1, cfg.log_every) == 0 or s + 1 == cfg.steps:
      last = metrics.flush()  # a non-finite state is never saved
      bar.set_postfix(loss=f"{last['loss']:.4g}")
    if saving:
      run.save(s + 1, state)
      _write_log(run.directory, log)
  metrics.flush()
  bar.close()
  params = state["params"]
  if run is not None and average_last > 1:
    steps = run.all_steps()[-average_last:]
    snaps = [run.restore(t, target)["params"] for t in steps]
    params = jax.tree.map(lambda *xs: sum(xs) / len(xs), *snaps)
  if run is not None:
    run.finish({"params": params})
    _write_log(run.directory, log)
    if own_run:
      run.close()
  return Result(out(params), log)


def _to_host(x) -> np.ndarray:
  """A global array as a full numpy array on every process."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _write_log(directory: str, log: list[dict]) -> None:
  if distributed.is_main():
    results.write_json(os.path.join(directory, "train_log.json"), log)


def _read_log(directory: str) -> list[dict]:
  import json  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, "train_log.json")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return json.load(f)
