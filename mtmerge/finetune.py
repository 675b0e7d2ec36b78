"""Per-task heads and fine-tuning: one checkpoint per task from one model.

For each task:

1. `linear_probe`: a linear head fit on the frozen pretrained features
   (multinomial logistic regression, full batch). It is the "pretrained"
   row of the benchmark and stays frozen while the encoder is fine-tuned,
   so every task's fine-tuned encoder keeps talking to the same head
   (LP-FT, Kumar et al. 2022; the CLIP merging benchmarks freeze the
   zero-shot head the same way, Ilharco et al. 2023).
2. `finetune_task`: AdamW on the encoder params matching
   `config.trainable`, cross-entropy through the frozen head; `mode` is
   `standard` or `tangent` (train the linearized model, Ortiz-Jimenez et
   al. 2023). Checkpoints every `save_every` steps through orbax; a rerun
   resumes from the last one (same batches, same result) and a finished
   task is skipped. `average_last=K` returns the mean of the last K saved
   checkpoints instead of the last one ("Free Lunch" checkpoint
   averaging; Wortsman et al. 2022, model soups over one run).

Training goes through `mtmerge.train.fit` on the caller's mesh (default a
1-D 'data' mesh over all devices; the global batch must divide over its
data axes, and each process reads only its rows). Dropout is off while
fine-tuning (deterministic steps, exact resume).
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtmerge import checkpoint
from mtmerge import encoders
from mtmerge import sharding
from mtmerge import taskdata
from mtmerge import train
from mtmerge import tree as tree_lib
from mtmerge.data import suites


def features(encoder: encoders.Encoder, params: Any, b) -> tuple:
  """`(features [N, D], labels [N])` of every example a Batcher yields."""
  fn = jax.jit(encoder.features)
  feats, labels = [], []
  for batch in b.epoch(0):
    keep = batch.get("mask", np.ones(len(batch["label"]), bool))
    inputs = {k: v for k, v in batch.items() if k not in ("label", "mask")}
    feats.append(np.asarray(fn(params, inputs))[keep])
    labels.append(batch["label"][keep])
  return np.concatenate(feats), np.concatenate(labels)


@jax.jit
def _fit_head(x, y, w0, b0, lr, wd, steps):
  opt = optax.adam(lr)

  def loss(p):
    logits = x @ p["kernel"] + p["bias"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + wd * jnp.sum(p["kernel"] ** 2)

  def body(_, carry):
    p, s = carry
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s
  p = {"kernel": w0, "bias": b0}
  p, _ = jax.lax.fori_loop(0, steps, body, (p, opt.init(p)))
  return p


def linear_probe(encoder: encoders.Encoder, task: Any, config: Any,
                 workdir: str) -> dict[str, np.ndarray]:
  """A linear head on the pretrained features (cached in workdir/heads).

  Args:
    encoder: the pretrained encoder.
    task: task name or TaskSpec.
    config: `steps`, `lr`, `weight_decay`, `limit` (train examples used),
      `batch_size`, `max_len`.
    workdir: cache root.

  Returns:
    `{"kernel": [D, C], "bias": [C]}` float32.
  """
  task = suites.get_task(task)
  path = os.path.join(workdir, "heads", f"{task.name}.npz")
  if os.path.exists(path):
    try:
      with np.load(path) as z:
        head = {"kernel": z["kernel"], "bias": z["bias"]}
      if head["kernel"].shape == (encoder.dim, task.num_classes):
        return head
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
      pass  # a corrupt cache entry is recomputed, never used
  b = taskdata.batcher(encoder, task, "train", config.batch_size,
                       limit=config.limit, max_len=config.max_len)
  x, y = features(encoder, encoder.params, b)
  head = _fit_head(jnp.asarray(x), jnp.asarray(y),
                   jnp.zeros((x.shape[1], task.num_classes), jnp.float32),
                   jnp.zeros((task.num_classes,), jnp.float32),
                   config.lr, config.weight_decay, config.steps)
  head = {k: np.asarray(v) for k, v in head.items()}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **head)
  os.replace(tmp, path)
  return head


def _loss_fn(encoder, mode, trainable):
  """`(loss(params, head, batch, frozen=None) -> (ce, acc), initial params)`.

  `frozen` (standard mode) is the rest of the encoder's params (default:
  the encoder's own); passing it as an argument keeps it out of the
  compiled program as a constant.
  """
  base_sel, rest = encoders.split(encoder.params, trainable)
  flat = tree_lib.to_flat_dict
  if mode == "tangent":
    lin = encoders.linearized(encoder.features, encoder.params, trainable)
    feats = lambda p, batch, frozen: lin(flat(p), batch)
  else:
    feats = lambda p, batch, frozen: encoder.features(
        encoders.join(flat(p), rest if frozen is None else frozen), batch)

  def loss(p, head, batch, frozen=None):
    inputs = {k: v for k, v in batch.items() if k != "label"}
    logits = encoders.logits(head, feats(p, inputs, frozen))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         batch["label"])
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return ce.mean(), acc
  init = tree_lib.from_flat_dict(base_sel)  # nested: orbax-friendly keys
  if mode == "tangent":
    init = jax.tree.map(jnp.zeros_like, init)
  return loss, init


def pad_classes(head: dict, multiple: int = 8) -> dict:
  """The head with its class count padded up to a multiple of `multiple`.

  Padded classes get zero weights and a -1e4 bias: their softmax
  probability is exactly 0 in float32 and argmax never picks them, so
  the loss, gradients and accuracy equal the unpadded head's, while every
  task of a suite shares one compiled training step.
  """
  c = int(np.shape(head["bias"])[0])
  extra = -c % multiple
  if not extra:
    return head
  return {"kernel": jnp.pad(jnp.asarray(head["kernel"]), ((0, 0), (0, extra))),
          "bias": jnp.pad(jnp.asarray(head["bias"]), (0, extra),
                          constant_values=-1e4)}


# (encoder static id, mode, trainable) -> (encoder, loss, init): tasks
# fine-tuned with the same settings share one loss function, so `train.fit`
# reuses one compiled step (the padded head is a constant argument).
_LOSSES: dict[tuple, tuple] = {}


def _sam_rho(config) -> float | None:
  """`config.sam.rho` (SAM fine-tuning, `mtmerge.flat`), or None if unset."""
  sam_cfg = config.get("sam")
  if not sam_cfg:
    return None
  from mtmerge.flat import sam  # pylint: disable=g-import-not-at-top
  sam_cfg = dict(sam_cfg)
  if set(sam_cfg) != {"rho"}:
    raise sam.FlatError(f"finetune.sam must be dict(rho=...), got {sam_cfg}")
  return sam.check_rho(sam_cfg["rho"])


def _objective(encoder, config, head) -> train.Objective:
  rho = _sam_rho(config)
  key = (id(encoder.static), config.mode, config.trainable, rho)
  if key not in _LOSSES or _LOSSES[key][0] is not encoder:
    loss_fn, init = _loss_fn(encoder, config.mode, config.trainable)

    def loss(params, consts, batch, rng):
      del rng  # deterministic: no dropout while fine-tuning
      ce, acc = loss_fn(params, consts["head"], batch, consts.get("frozen"))
      return ce, {"acc": acc}
    if rho is not None:  # single-task SAM: task vectors from flat regions
      from mtmerge.flat import objective as flat_obj  # pylint: disable=g-import-not-at-top
      loss = flat_obj.sam_loss(loss, rho)
    _LOSSES[key] = (encoder, loss, init)
  _, loss, init = _LOSSES[key]
  consts = {"head": pad_classes(head)}
  if config.mode == "standard":  # frozen params: arguments, not constants
    consts["frozen"] = encoders.split(encoder.params, config.trainable)[1]
  return train.Objective(init, loss, consts)


def train_config(config, data_axes=("data",)) -> train.TrainConfig:
  """The `train.TrainConfig` of a `finetune` config: AdamW, warmup-cosine."""
  return train.TrainConfig(
      steps=int(config.steps), optimizer="adamw", lr=float(config.lr),
      weight_decay=float(config.weight_decay), schedule="cosine",
      warmup=max(1, int(config.warmup)), seed=int(config.seed),
      save_every=int(config.save_every),
      log_every=int(config.get("log_every", 10)), data_axes=tuple(data_axes))


_MESHES: dict[int, jax.sharding.Mesh] = {}


def default_mesh() -> jax.sharding.Mesh:
  """A 1-D 'data' mesh over every device (built once per device count)."""
  n = jax.device_count()
  if n not in _MESHES:
    _MESHES[n] = sharding.make_mesh([("data", -1)])
  return _MESHES[n]


def fingerprint(encoder, task, config, head=None) -> dict:
  """Everything that determines a task's fine-tuned checkpoint."""
  out = dict(model=encoder.name, dim=encoder.dim, task=task.name,
             params=tree_lib.tree_size(encoder.params),
             finetune=config.to_dict())
  if head is not None:
    from mtmerge import heads  # pylint: disable=g-import-not-at-top
    out["head"] = heads.digest(head)
  return out


def finetune_task(encoder: encoders.Encoder, task: Any, head: dict,
                  config: Any, workdir: str, progress: bool = True, *,
                  mesh: jax.sharding.Mesh | None = None,
                  rules: Any = None) -> dict[str, jax.Array]:
  """Fine-tunes the encoder on one task (cached, resumable).

  Runs through `train.fit`: one jitted step with donated state shared by
  every task with the same settings, orbax checkpoints, exact resume.

  Args:
    encoder: the pretrained encoder.
    task: task name or TaskSpec.
    head: the task's frozen head (`linear_probe`).
    config: `mode` (standard | tangent), `trainable` (regex), `steps`,
      `batch_size` (global), `lr`, `warmup`, `weight_decay`, `save_every`,
      `average_last` (0 = off), `seed`, `limit`, `max_len`, optional
      `multiple` (text padded to a multiple of this many tokens on one
      host, default 16: 8 halves the word tasks' tokens), optional
      `log_every`, optional `sam=dict(rho=...)` (sharpness-aware
      fine-tuning, `mtmerge.flat.objective.sam_loss`).
    workdir: runs go to `workdir/finetune/<task>-<mode>` (`-sam<rho>`
      appended with `sam`).
    progress: show a progress bar.
    mesh: the device mesh (default `default_mesh()`); the batch is split
      over its `data` and `fsdp` axes.
    rules: `(regex, spec)` sharding rules of the trained params (default:
      replicated, i.e. data parallel).

  Returns:
    The fine-tuned trainable params (nested canonical dict of device
    arrays): the weights (standard) or the tangent-space offset `delta`
    (tangent).
  """
  task = suites.get_task(task)
  if config.mode not in ("standard", "tangent"):
    raise ValueError(f"finetune.mode must be standard or tangent, got "
                     f"{config.mode!r}")
  mesh = default_mesh() if mesh is None else mesh
  data_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
  if not data_axes:
    raise ValueError(f"the mesh {dict(mesh.shape)} has no 'data' or 'fsdp' "
                     "axis to split fine-tuning batches over")
  # Each process reads only its rows of every global batch.
  rows = sharding.check_batch_divides(config.batch_size, mesh, data_axes)
  index, count = sharding.data_shard(config.batch_size, mesh, data_axes)
  objective = _objective(encoder, config, head)
  p_sh = None
  if rules is not None:
    p_sh = sharding.shardings_from_rules(objective.init, rules, mesh)
  rho = _sam_rho(config)
  suffix = "" if rho is None else f"-sam{rho:g}"
  run = checkpoint.Run(
      os.path.join(workdir, "finetune", f"{task.name}-{config.mode}{suffix}"),
      fingerprint(encoder, task, config, head),
      max_to_keep=max(2, int(config.average_last)))
  b = None

  def batches(step):
    nonlocal b
    if b is None:  # not needed when the task is already done
      # Hosts pad text to one length so their rows form one global array.
      b = taskdata.batcher(
          encoder, task, "train", rows, shuffle=True, seed=config.seed,
          limit=config.limit, max_len=config.max_len,
          multiple=(config.get("multiple", 16) if count == 1
                    else config.max_len),
          process_index=index, process_count=count)
    return taskdata.batch_at(b, step)

  try:
    res = train.fit(objective, batches, train_config(config, data_axes),
                    mesh=mesh, param_shardings=p_sh, run=run,
                    average_last=int(config.average_last), host=False,
                    desc=f"finetune {task.name} ({config.mode})",
                    progress=progress)
  finally:
    run.close()
  return res.params
