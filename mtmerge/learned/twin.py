"""Twin-Merging: a shared expert plus routed, SVD-compressed exclusive parts.

"Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging"
(Lu et al., NeurIPS 2024; official code LZY-the-boys/Twin-Merging):

* shared expert theta* = theta_0 + lambda sum_t tau_t (task arithmetic);
* exclusive parts theta_t - theta* compressed per tensor by truncated SVD
  to rank max(1, floor(rank_fraction min(m, n))) (the official code floors);
  0-D/1-D tensors kept whole, more dims matricized `[prod(shape[:-1]),
  shape[-1]]` (conv kernels, `[1, N, D]` embeddings);
* a 3-layer MLP router (official: Linear-BatchNorm-LeakyReLU-Dropout(0.5)
  twice, then Linear; width 2 D), trained by cross-entropy on task identity
  (Adam, lr 5e-4) on a few validation inputs per task. Its input (theta*'s
  mean-pooled last hidden states in the paper) is `problem.features(theta*,
  x)`: that pooled, L2-normalized sentence embedding for text encoders, the
  image embedding for CLIP. BatchNorm becomes a fixed standardization by
  the router set's mean/std (objectives are stateless; BatchNorm at
  inference is a fixed affine map too);
* per input: w = softmax(router(f(theta*, x))), model theta* + sum_t w_t
  SVD_r(theta_t - theta*).

`TwinModel.features` runs this per example: `jax.lax.map` over chunks of
`chunk_size` examples, each materializing its merged params (memory:
chunk_size models plus the T exclusive parts, held dense: mixing costs T m
n per example, against T r m n from factors; `storage_bytes` counts
factors). `routing="batch"`: one model per batch from the mean weights.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import encoders
from mtmerge import sharding
from mtmerge import train
from mtmerge import tree as tree_lib
from mtmerge.learned import common
from mtmerge.learned import problem as problem_lib

Tree = Any
ROUTINGS = ("example", "batch")
TRAIN_DEFAULTS = dict(optimizer="adam")


def shared_expert(base: Tree, tvs: Tree, scaling_factor: float) -> Tree:
  """theta* = theta_0 + lambda sum_t tau_t (host numpy, base's dtypes)."""
  return jax.tree.map(lambda b, v: (np.asarray(b, np.float32) + scaling_factor
                                    * np.asarray(v, np.float32).sum(0)
                                    ).astype(np.asarray(b).dtype), base, tvs)


def exclusive_parts(tvs: Tree, scaling_factor: float) -> Tree:
  """theta_t - theta* = tau_t - lambda sum_s tau_s, stacked `[T, ...]`."""
  return jax.tree.map(lambda v: np.asarray(v, np.float32) - scaling_factor
                      * np.asarray(v, np.float32).sum(0, keepdims=True), tvs)


def rank_for(shape: Sequence[int], rank_fraction: float) -> int:
  """Kept rank of a tensor of `shape` (>= 2 dims): floor(f min(m, n)) >= 1."""
  m, n = int(np.prod(shape[:-1])), int(shape[-1])
  return max(1, int(math.floor(rank_fraction * min(m, n))))


def svd_compress(stacked: Tree, rank_fraction: float) -> Tree:
  """Per-leaf, per-task truncated SVD of stacked `[T, ...]` tensors.

  Returns a tree with `stacked`'s structure as a prefix: each leaf becomes
  `{"u": [T, m, r], "v": [T, r, n]}` (u @ v is the truncation) for tensors
  of 2+ dims, `{"full": [T, ...]}` for 0-D/1-D tensors kept whole. The
  truncation of A is U_r U_r^T A, U_r the top eigenvectors of the smaller
  Gram matrix A A^T or A^T A: exact, and ~6x faster than LAPACK's SVD on
  the 2-core CPU (~1 s per 384 x 1536 matrix there).
  """
  ok = isinstance(rank_fraction, (int, float, np.floating)) and not isinstance(
      rank_fraction, bool) and 0 < float(rank_fraction) <= 1
  _need(ok, f"rank_fraction must be in (0, 1], got {rank_fraction!r}")
  xp = np if jax.default_backend() == "cpu" else jnp  # host float64 on CPU

  def one(x):
    if np.ndim(x) <= 2:
      return {"full": np.asarray(x, np.float32)}
    a = xp.asarray(x, np.float64 if xp is np else np.float32)
    a = a.reshape(a.shape[0], -1, a.shape[-1])
    flip = a.shape[1] > a.shape[2]
    a = xp.swapaxes(a, 1, 2) if flip else a  # now [T, k, n'], k <= n'
    _, vecs = xp.linalg.eigh(a @ xp.swapaxes(a, 1, 2))  # ascending
    u = vecs[..., ::-1][..., :rank_for(a.shape[1:], rank_fraction)]
    v = xp.swapaxes(u, 1, 2) @ a
    u, v = (xp.swapaxes(v, 1, 2), xp.swapaxes(u, 1, 2)) if flip else (u, v)
    return {"u": np.asarray(u, np.float32), "v": np.asarray(v, np.float32)}
  return jax.tree.map(one, stacked)


def dense_parts(factors: Tree, like: Tree) -> Tree:
  """SVD_r(theta_t - theta*) as dense `[T, ...]` leaves shaped like `like`."""
  one = lambda ref, f: (jnp.asarray(f["full"]) if "full" in f else jnp.einsum(
      "tmr,trn->tmn", f["u"], f["v"]).reshape((-1,) + tuple(np.shape(ref))))
  return jax.tree.map(one, like, factors)


def mix(star: Tree, dense: Tree, w: jax.Array) -> Tree:
  """theta* + sum_t w_t D_t for one weight vector `w` `[T]`."""
  return jax.tree.map(lambda s, d: (s.astype(jnp.float32) + jnp.tensordot(
      w.astype(jnp.float32), d.astype(jnp.float32), 1)).astype(s.dtype),
                      star, dense)


def router_init(seed: int, dim: int, hidden: int, num_tasks: int
                ) -> dict[str, np.ndarray]:
  """3-layer MLP params, PyTorch's default uniform(+-1/sqrt(fan_in)) init."""
  rng = np.random.default_rng(seed)  # host: no compile per shape
  out = {}
  for i, (a, b) in enumerate([(dim, hidden), (hidden, hidden),
                              (hidden, num_tasks)], 1):
    for name, shape in ((f"w{i}", (a, b)), (f"b{i}", (b,))):
      out[name] = (rng.uniform(-1, 1, shape) / math.sqrt(a)).astype(np.float32)
  return out


def router_apply(p: dict, stats: dict, x: jax.Array, *, dropout: float = 0.0,
                 rng: jax.Array | None = None) -> jax.Array:
  """Router logits `[B, T]` of features `x` `[B, D]` (dropout if rng)."""
  h = (x.astype(jnp.float32) - stats["mean"]) / stats["std"]
  for i in (1, 2):
    h = jax.nn.leaky_relu(h @ p[f"w{i}"] + p[f"b{i}"], 0.01)
    if rng is not None and dropout > 0:
      rng, k = jax.random.split(rng)
      h = jnp.where(jax.random.bernoulli(k, 1 - dropout, h.shape),
                    h / (1 - dropout), 0.0)
  return h @ p["w3"] + p["b3"]


def _weighted(features, chunk, star, dense, w, inputs):
  if w.ndim == 1:  # one model for the whole batch
    return features(mix(star, dense, w), inputs)

  one = lambda a: features(mix(star, dense, a[0]),  # a: (w_i, x_i)
                           jax.tree.map(lambda v: v[None], a[1]))[0]
  return jax.lax.map(one, (w, inputs), batch_size=chunk)


class TwinModel:
  """Twin-Merging's input-dependent model: theta*, the `svd_compress`
  factors, the router and its input standardization (`stats`)."""

  def __init__(self, features, star: Tree, factors: Tree, router: dict,
               stats: dict, *, routing: str = "example", chunk_size: int = 8):
    _need(routing in ROUTINGS and int(chunk_size) >= 1, f"need routing in "
          f"{ROUTINGS} and chunk_size >= 1, got {routing!r}, {chunk_size}")
    self.star = jax.tree.map(jnp.asarray, star)
    self.factors, self.routing_mode = factors, routing
    self.router, self.stats = jax.tree.map(jnp.asarray, (router, stats))
    self.dense = jax.jit(dense_parts)(factors, self.star)
    self._route = jax.jit(lambda s, r, st, x: jax.nn.softmax(router_apply(
        r, st, features(s, x))))
    self._weighted = jax.jit(functools.partial(_weighted, features,
                                               int(chunk_size)))

  def routing(self, inputs: dict) -> jax.Array:
    """Routing weights softmax(router(f(theta*, x))), `[B, T]`."""
    return self._route(self.star, self.router, self.stats,
                       problem_lib.inputs_of(inputs))

  def features_with_weights(self, inputs: dict, weights) -> jax.Array:
    """Features under given weights: `[B, T]` per example, `[T]` per batch."""
    w, T = jnp.asarray(weights, jnp.float32), self.router["b3"].shape[0]
    _need(w.ndim in (1, 2) and w.shape[-1] == T,
          f"weights must be [B, {T}] or [{T}], got shape {w.shape}")
    return self._weighted(self.star, self.dense, w,
                          problem_lib.inputs_of(inputs))

  def features(self, inputs: dict) -> jax.Array:
    """The routed forward `[B, D]` (per example, or per batch if so set)."""
    w = self.routing(inputs)
    if self.routing_mode == "batch":  # mean over the real (unpadded) rows
      m = jnp.asarray(inputs.get("mask", np.ones(len(w))), jnp.float32)
      w = m @ w / jnp.maximum(m.sum(), 1.0)
    return self.features_with_weights(inputs, w)

  def storage_bytes(self) -> int:
    """theta* + compressed exclusive factors + router."""
    return sum(map(tree_lib.tree_bytes, (self.star, self.factors,
                                         self.router)))


def accuracy(model: TwinModel, head: dict, batches) -> float:
  """Accuracy of `head` on `model.features` over batches with `label`."""
  hits = []
  for b in batches:
    pred = np.argmax(np.asarray(encoders.logits(head, model.features(b))), -1)
    hits.append((pred == b["label"])[b.get("mask", np.ones(len(pred), bool))])
  return float(np.mean(np.concatenate(hits)))


def _need(ok: bool, message: str) -> None:
  if not ok: raise ValueError(message)  # pylint: disable=multiple-statements


def router_set(problem: problem_lib.MergeProblem, star: Tree, split: str,
               examples_per_task: int, batch_size: int = 32
               ) -> tuple[np.ndarray, np.ndarray]:
  """theta*'s features of the first examples of each task, task ids."""
  feats = jax.jit(problem.features)
  xs, ys = [], []
  for t, task in enumerate(problem.tasks):
    for batch in problem.data(task, split, batch_size,
                              limit=examples_per_task).epoch(0):
      f = np.asarray(feats(star, problem_lib.inputs_of(batch)), np.float32)
      xs.append(f[batch.get("mask", np.ones(len(f), bool))])
      ys.append(np.full(len(xs[-1]), t, np.int32))
  return np.concatenate(xs), np.concatenate(ys)


def twin_merging(problem: problem_lib.MergeProblem, *,
                 scaling_factor: float = 0.3, rank_fraction: float = 0.1,
                 router_hidden: int | None = None, router_steps: int = 300,
                 router_lr: float = 5e-4, router_batch_size: int = 64,
                 router_dropout: float = 0.5, examples_per_task: int = 128,
                 split: str = "validation", routing: str = "example",
                 chunk_size: int = 8, train_config: dict | None = None,
                 mesh=None, rules: Sequence[tuple[str, Any]] | None = None,
                 workdir: str | None = None, progress: bool = True
                 ) -> common.LearnedResult:
  """Twin-Merging: shared expert, compressed exclusive parts, a router.

  Args:
    problem: the merge problem.
    scaling_factor: lambda of the shared expert (task arithmetic).
    rank_fraction: kept fraction of each matrix's rank, in (0, 1].
    router_hidden: router width (default 2 D, as the official code).
    router_steps, router_lr, router_batch_size, router_dropout: router
      training (Adam); `train_config` overrides win.
    examples_per_task, split: the router's labeled-by-task inputs.
    routing, chunk_size: see `TwinModel`.
    train_config, mesh, rules, workdir, progress: as in `adamerging`
      (`rules` unused: only the small router is trained).

  Returns:
    `LearnedResult(params=theta*, learned=router params, log, extra)`,
    extra: `model` (the `TwinModel`), `storage_bytes`,
    `router_train_accuracy`.
  """
  del rules
  _need(math.isfinite(scaling_factor), f"bad scaling_factor {scaling_factor}")
  _need(routing in ROUTINGS, f"routing must be in {ROUTINGS}, got {routing!r}")
  _need(0 <= router_dropout < 1 and examples_per_task >= 1,
        f"need router_dropout in [0, 1) and examples_per_task >= 1, got "
        f"{router_dropout} and {examples_per_task}")
  cfg = common.train_config(dict(TRAIN_DEFAULTS, steps=router_steps,
                                 lr=router_lr), train_config)
  star = shared_expert(problem.base, problem.tvs, scaling_factor)
  factors = svd_compress(exclusive_parts(problem.tvs, scaling_factor),
                         rank_fraction)
  x, y = router_set(problem, star, split, examples_per_task)
  _need(len(x) >= router_batch_size,
        f"router_batch_size={router_batch_size} exceeds the {len(x)} router "
        f"examples ({examples_per_task} per task of {split!r})")
  stats = {"mean": x.mean(0), "std": x.std(0) + 1e-6}
  hidden = int(router_hidden or 2 * x.shape[1])
  init = router_init(cfg.seed, x.shape[1], hidden, problem.num_tasks)
  nb = len(x) // router_batch_size

  def batches(step):
    epoch, i = divmod(int(step), nb)
    perm = np.random.default_rng([cfg.seed, epoch]).permutation(len(x))
    idx = perm[i * router_batch_size:(i + 1) * router_batch_size]
    return {"x": x[idx], "label": y[idx]}

  def loss(p, k, batch, rng):
    z = router_apply(p, k["stats"], batch["x"], dropout=router_dropout, rng=rng)
    return common.cross_entropy(z, batch["label"]), {
        "accuracy": common.accuracy(z, batch["label"])}

  objective = train.Objective(init, loss, {"stats": stats})
  mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
  res = train.fit(
      objective, batches, cfg, mesh=mesh, workdir=workdir,
      const_shardings=common.const_shardings(mesh, objective.consts),
      fingerprint=dict(method="twin_merging", scaling_factor=scaling_factor,
                       rank_fraction=rank_fraction, hidden=hidden,
                       dropout=router_dropout, batch=router_batch_size,
                       examples_per_task=examples_per_task, split=split,
                       tasks=problem.tasks),
      desc="twin_merging router", progress=progress)
  model = TwinModel(problem.features, star, factors, res.params, stats,
                    routing=routing, chunk_size=chunk_size)
  train_acc = float(np.mean(np.argmax(np.asarray(router_apply(
      model.router, model.stats, jnp.asarray(x))), -1) == y))
  return common.LearnedResult(star, res.params, res.log, {
      "model": model, "storage_bytes": model.storage_bytes(),
      "router_train_accuracy": train_acc})
