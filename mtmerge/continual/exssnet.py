r"""ExSSNeT: exclusive supermask subnetwork training, and its baselines.

Yadav and Bansal, "Exclusive Supermask Subnetwork Training for Continual
Learning", Findings of ACL 2023 (arXiv:2210.10209); official code
github.com/prateeky2806/exessnet (PyTorch: `main_text.py`,
`trainers/weights.py`, `utils/my_utils.py`, `models/modules.py`). Written
from the paper's description and the code's behaviour; no code copied.

Tasks arrive one after another; each task t (with its own frozen head)
gets, over ONE shared set of weights W:

1. knowledge transfer (KKT): on a few of task t's training examples, the
   representation under each earlier task's mask is scored by a k-nearest-
   neighbour classifier (first 66% of the examples as neighbours, the rest
   scored); the new task's scores start from the scores of the earlier
   task whose representation classifies best (`kkt_choice`);
2. a supermask M_t = top-k(|S_t|) of the (fixed) weights, learned through
   the scores S_t with edge-popup's straight-through gradient
   (`mtmerge.continual.supermask`);
3. exclusive weight training: with M_t fixed, W trains only where
   `M_t & ~(M_1 | ... | M_{t-1})`, so earlier tasks' subnetworks, hence
   their outputs, stay bit-for-bit unchanged.

`run_sequence(..., method=...)` runs the same loop for the baselines:
`supsup` (steps 1-2 only: masks over fixed weights, Wortsman et al. 2020;
no forgetting, no weight learning), `ssnet` (weights trained over all of
M_t: the code's SSNeT, `--weight-mask-type original`, which can forget)
and `finetune` (sequential fine-tuning of all weights, no masks: forgets).

Where the paper and the code differ, and what we follow. (Only the
paper's abstract was readable with this project's tools; the method
details below come from the code, read in full, and from the edge-popup /
SupSup formulation the paper builds on.)

* Ranking: edge-popup and SupSup describe the mask as the top-k of the
  scores; the ExSSNeT code ranks `|scores|` (`GetSubnet.apply(
  scores.abs(), sparsity)`, as edge-popup's code does). We follow the
  code, so the straight-through score gradient carries `sign(s)`.
* KKT: the abstract describes a KNN module that initializes a new task's
  mask from earlier tasks; the code implements it as `--sim-init` with
  `knn_best` (the best earlier task, only if its KNN accuracy beats chance
  1/C), `knn_always` and `knn_all` (the mean score of every above-chance
  task), but its README commands leave `--sim-init` empty, i.e. KKT off.
  We default to `best` (= `knn_best`), offer `always`/`all`, and report
  ExSSNeT with and without it. The code scores ~20% of the training
  batches with k = 200 neighbours (`--num-topk`), on datasets of
  thousands of examples per class; we take a fixed number of examples
  (one compiled KNN for every task) and a smaller k.
* Learning rates: the code's README passes separate `--lr` (masks) and
  `--train-weight-lr`, but `get_optim_and_scheduler` uses the weight rate
  for the masks too whenever weight training is on. We keep two rates
  (`mask_lr`, `weight_lr`), as the flags intend.
* Checkpoint choice: the code keeps each task's best-validation epoch; we
  train a fixed number of steps per phase.
* Network: the code's text model masks a CNN (kernels 3/4/5, max-pool)
  over frozen BERT token states plus a masked output layer; this CPU-sized
  version masks an MLP (no biases, ReLU, the code's signed-constant init)
  over the frozen encoder's pooled sentence features, whose L2-normalized
  output feeds the project's frozen zero-shot head (`mtmerge.continual.
  bench`).
* Forgetting: the code prints backward transfer, last accuracy minus the
  best earlier one (negative = forgetting); we report accuracy right
  after learning a task minus accuracy at the end (positive = forgetting).

Weight training uses Adam without weight decay (the code's setting) on a
delta applied with `supermask.apply_delta`: the same updates as the code's
masked gradients, but non-editable weights are unchanged by construction.
Training goes through the one trainer (`train.fit`, data-parallel over the
mesh); every task reuses the same two compiled steps (mask, weights), one
evaluation program and one KNN program.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtmerge import train
from mtmerge.continual import supermask as sm

Tree = Any
METHODS = ("finetune", "supsup", "ssnet", "exssnet")
KKT_MODES = ("best", "always", "all")


class ContinualError(ValueError):
  """Bad continual-learning input (method, KKT mode, sizes)."""


# ---------------------------------------------------------------- network


def mlp_init(rng: np.random.Generator, dims: Sequence[int]) -> dict:
  """Signed-constant kernels `layer_i: {kernel: [dims[i], dims[i+1]]}`."""
  shapes = {f"layer_{i}": {"kernel": jax.ShapeDtypeStruct(
      (int(a), int(b)), jnp.float32)} for i, (a, b) in enumerate(
          zip(dims[:-1], dims[1:]))}
  return sm.signed_constant(rng, shapes)


def _layers(weights: dict) -> list[jax.Array]:
  return [weights[f"layer_{i}"]["kernel"] for i in range(len(weights))]


def mlp_apply(weights: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(output, reps)`: ReLU MLP output and the input of its last layer
  (the representation KKT's nearest neighbours compare)."""
  h = x
  ks = _layers(weights)
  reps = x
  for i, k in enumerate(ks):
    if i == len(ks) - 1:
      reps = h
    h = h @ k
    if i < len(ks) - 1:
      h = jax.nn.relu(h)
  return h, reps


def logits(weights: dict, head: dict, x: jax.Array) -> jax.Array:
  """Frozen-head logits of the (masked) network's L2-normalized output."""
  out, _ = mlp_apply(weights, x)
  out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True),
                          1e-12)
  return out @ head["kernel"] + head["bias"]


# -------------------------------------------------------------------- KNN


def knn_predict(train_x: jax.Array, train_y: jax.Array, test_x: jax.Array,
                k: int, num_classes: int) -> jax.Array:
  """Majority vote of the `k` nearest (Euclidean) training points.

  Distance ties go to the lower training index (`lax.top_k` is stable);
  vote ties to the smallest label.
  """
  d2 = (jnp.sum(test_x ** 2, -1)[:, None] + jnp.sum(train_x ** 2, -1)[None]
        - 2.0 * test_x @ train_x.T)
  _, idx = jax.lax.top_k(-d2, k)
  votes = jax.nn.one_hot(train_y[idx], num_classes).sum(1)
  return jnp.argmax(votes, -1)


def knn_split(n: int) -> int:
  """KKT's neighbours are the first `int(0.66 n)` examples (the code's
  split); the rest are scored."""
  return int(n * 0.66)


def knn_correct(reps: jax.Array, labels: jax.Array, k: int,
                num_classes: int) -> jax.Array:
  """KKT's score of one representation: how many of the scored examples
  the neighbours classify correctly (an exact count; accuracy = count /
  (n - knn_split(n)) on the host)."""
  s = knn_split(reps.shape[0])
  pred = knn_predict(reps[:s], labels[:s], reps[s:], k, num_classes)
  return jnp.sum((pred == labels[s:]).astype(jnp.int32))


def kkt_choice(accs: Sequence[float], num_classes: int,
               mode: str = "best") -> list[int]:
  """Earlier tasks whose scores initialize the new task's (may be empty).

  `best`: the argmax, if its accuracy beats chance 1/C (the code's
  knn_best); `always`: the argmax; `all`: every task above chance (their
  scores are averaged).
  """
  accs = np.asarray(accs, np.float64)
  if mode not in KKT_MODES:
    raise ContinualError(f"kkt mode must be one of {KKT_MODES}, got {mode!r}")
  if accs.size == 0:
    return []
  chance = 1.0 / num_classes
  if mode == "always":
    return [int(np.argmax(accs))]
  if mode == "best":
    return [int(np.argmax(accs))] if accs.max() > chance else []
  return [int(i) for i in np.nonzero(accs > chance)[0]]


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_accs(weights, masks, x, y, *, k, num_classes):
  """KNN correct counts on (x, y) of the representation under every
  stacked mask `[T, ...]` (one program for every task of a run)."""
  def one(m):
    _, reps = mlp_apply(sm.masked(weights, m), x)
    return knn_correct(reps, y, k, num_classes)
  return jax.lax.map(one, masks)


# ------------------------------------------------------------------- loop


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a task sequence is learned.

  Attributes:
    method: `exssnet`, `ssnet`, `supsup` or `finetune`.
    density: each mask's kept fraction per layer, in (0, 1).
    kkt: KKT mode (`best`, `always`, `all`) or "" (off; random scores).
    knn_k: neighbours of KKT's classifier.
    knn_examples: training examples of the new task KKT scores with.
    mask_steps, mask_lr: score training per task (Adam).
    weight_steps, weight_lr: weight training per task (Adam, no decay).
    batch_size: rows per step (divisible by the mesh's data shards).
    hidden: widths of the masked MLP's hidden layers.
    seed: weights, scores and batch order.
  """
  method: str = "exssnet"
  density: float = 0.1
  kkt: str = "best"
  knn_k: int = 15
  knn_examples: int = 200
  mask_steps: int = 100
  mask_lr: float = 1e-2
  weight_steps: int = 100
  weight_lr: float = 1e-3
  batch_size: int = 32
  hidden: tuple[int, ...] = (1024,)
  seed: int = 0

  def check(self) -> "Settings":
    if self.method not in METHODS:
      raise ContinualError(f"method must be one of {METHODS}, got "
                           f"{self.method!r}")
    sm.check_density(self.density)
    if self.kkt and self.kkt not in KKT_MODES:
      raise ContinualError(f"kkt must be one of {KKT_MODES} or '' (off), "
                           f"got {self.kkt!r}")
    for name in ("mask_steps", "weight_steps"):
      if int(getattr(self, name)) < 0:
        raise ContinualError(f"{name} must be >= 0, got "
                             f"{getattr(self, name)}")
    for name in ("knn_k", "knn_examples", "batch_size"):
      if int(getattr(self, name)) < 1:
        raise ContinualError(f"{name} must be >= 1, got "
                             f"{getattr(self, name)}")
    if int(self.knn_k) > int(self.knn_examples * 0.66):
      raise ContinualError(f"knn_k={self.knn_k} exceeds KKT's "
                           f"{int(self.knn_examples * 0.66)} neighbours "
                           f"(66% of knn_examples={self.knn_examples})")
    if not self.hidden or any(int(h) < 1 for h in self.hidden):
      raise ContinualError(f"hidden must list positive widths, got "
                           f"{self.hidden!r}")
    return self

  @property
  def masked(self) -> bool:
    return self.method != "finetune"

  @property
  def trains_weights(self) -> bool:
    return self.method != "supsup"


class Task(NamedTuple):
  """One task of the sequence, as features (float32) and labels (int32).

  `head`: the frozen `{"kernel": [D, C'], "bias": [C']}` (classes may be
  padded so every task shares one shape; padded logits must never win).
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  head: dict
  num_classes: int


class Result(NamedTuple):
  """What a sequence run learned.

  Attributes:
    acc: `[T, T]` test accuracy of task j (column) after learning task i
      (row); NaN for j > i.
    weights: final shared weights (host).
    scores: `[T, ...]` stacked scores (zeros for finetune).
    masks: `[T, ...]` stacked bool masks (all True for finetune).
    info: per task: KKT accuracies and choice, trainable fraction.
    unchanged: per task, whether its test logits at the end equal, bit for
      bit, those right after it was learned.
    history: weights after each task (only with `keep_history`).
    seconds: wall time.
  """
  acc: np.ndarray
  weights: Tree
  scores: Tree
  masks: Tree
  info: list
  unchanged: list
  history: list
  seconds: float


def average_accuracy(acc: np.ndarray) -> float:
  """Mean final accuracy over all tasks (the last row)."""
  return float(np.mean(acc[-1]))


def forgetting(acc: np.ndarray) -> float:
  """Mean over tasks but the last of (accuracy right after learning it)
  minus (accuracy at the end); 0 for one task."""
  t = acc.shape[0]
  if t < 2:
    return 0.0
  return float(np.mean([acc[j, j] - acc[-1, j] for j in range(t - 1)]))


@functools.cache
def _mask_loss(density: float):
  """The score objective for one density (one function object per density,
  so `train.fit` reuses its compiled step across tasks)."""
  def loss(scores, consts, batch, rng):
    del rng
    m = sm.supermask(scores, density)
    w = jax.tree.map(jnp.multiply, consts["weights"], m)
    z = logits(w, consts["head"], batch["x"])
    ce = optax.softmax_cross_entropy_with_integer_labels(z, batch["label"])
    return ce.mean(), {}
  return loss


def _weight_loss(delta, consts, batch, rng):
  """The weight objective: the delta moves only editable entries."""
  del rng
  w = sm.apply_delta(consts["weights"], delta, consts["editable"])
  w = jax.tree.map(jnp.multiply, w, consts["mask"])
  z = logits(w, consts["head"], batch["x"])
  ce = optax.softmax_cross_entropy_with_integer_labels(z, batch["label"])
  return ce.mean(), {}


@jax.jit
def _eval_logits(weights, masks, head, x):
  return logits(sm.masked(weights, masks), head, x)


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
  """`step -> batch`: whole batches of a fresh permutation per epoch."""
  n = len(x)
  per = n // batch_size

  @functools.lru_cache(maxsize=2)
  def perm(epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)

  def at(step):
    epoch, i = divmod(int(step), per)
    idx = perm(epoch)[i * batch_size:(i + 1) * batch_size]
    return {"x": x[idx], "label": y[idx]}
  return at


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])


def check_tasks(tasks: Sequence[Task], s: Settings) -> None:
  """Refuses tasks that cannot run with `s` (one line naming the task)."""
  if not tasks:
    raise ContinualError("no tasks")
  names = [t.name for t in tasks]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ContinualError(f"task order names {dup} more than once")
  dims = {t.x_train.shape[1] for t in tasks}
  if len(dims) != 1:
    raise ContinualError(f"tasks have different feature widths {dims}")
  for t in tasks:
    if len(t.x_train) < s.batch_size:
      raise ContinualError(f"task {t.name!r} has {len(t.x_train)} training "
                           f"examples, fewer than batch_size={s.batch_size}")
    if s.kkt and s.masked and len(t.x_train) < s.knn_examples:
      raise ContinualError(f"task {t.name!r} has {len(t.x_train)} training "
                           f"examples, fewer than knn_examples="
                           f"{s.knn_examples}")


def run_sequence(tasks: Sequence[Task], settings: Settings, *,
                 mesh: jax.sharding.Mesh | None = None,
                 keep_history: bool = False) -> Result:
  """Learns `tasks` in order with `settings.method`; evaluates every
  learned task after each one.

  Args:
    tasks: the sequence (features, labels, frozen heads of one shape).
    settings: the method and its hyperparameters (checked first).
    mesh: device mesh of the training steps (batch split over 'data');
      default one data axis over every device.
    keep_history: also return the weights after each task.

  Returns:
    A `Result`.
  """
  t0 = time.time()
  s = settings.check()
  check_tasks(tasks, s)
  if mesh is None:
    from mtmerge import finetune  # pylint: disable=g-import-not-at-top
    mesh = finetune.default_mesh()
  T = len(tasks)
  dim = tasks[0].x_train.shape[1]
  out_dim = int(np.shape(tasks[0].head["kernel"])[0])
  weights = mlp_init(np.random.default_rng([s.seed, 0]),
                     (dim, *[int(h) for h in s.hidden], out_dim))
  scores = jax.tree.map(lambda *xs: np.stack(xs), *[
      sm.init_scores(np.random.default_rng([s.seed, 1, t]), weights)
      for t in range(T)])
  if s.masked:
    masks = jax.tree.map(lambda x: np.zeros(x.shape, bool), scores)
  else:
    masks = jax.tree.map(lambda x: np.ones(x.shape, bool), scores)
  ones = jax.tree.map(lambda w: np.ones(w.shape, bool), weights)
  n_eval = max(len(t.x_test) for t in tasks)
  x_eval = [_pad_rows(t.x_test, n_eval) for t in tasks]
  heads = [jax.tree.map(np.asarray, t.head) for t in tasks]
  c_max = int(np.shape(tasks[0].head["bias"])[0])
  # seed 0: the losses draw no randomness, and runs with other seeds then
  # share the compiled steps (train.fit's cache key includes the seed).
  mask_cfg = train.TrainConfig(steps=int(s.mask_steps), optimizer="adam",
                               lr=float(s.mask_lr), seed=0,
                               log_every=max(1, int(s.mask_steps)))
  weight_cfg = train.TrainConfig(steps=int(s.weight_steps), optimizer="adam",
                                 lr=float(s.weight_lr), seed=0,
                                 log_every=max(1, int(s.weight_steps)))
  acc = np.full((T, T), np.nan)
  info, after, history = [], [], []
  for t, task in enumerate(tasks):
    row: dict[str, Any] = {"task": task.name}
    batches = _batches(task.x_train, task.y_train, s.batch_size,
                       s.seed * 1000 + t)
    if s.masked:
      init = jax.tree.map(lambda x: x[t], scores)
      if s.kkt and t > 0:
        rng = np.random.default_rng([s.seed, 7, t])
        idx = rng.permutation(len(task.x_train))[:s.knn_examples]
        correct = np.asarray(_knn_accs(
            weights, masks, task.x_train[idx], task.y_train[idx],
            k=int(s.knn_k), num_classes=c_max))[:t]
        accs = correct / (len(idx) - knn_split(len(idx)))  # float64
        chosen = kkt_choice(accs, task.num_classes, s.kkt)
        row["kkt_acc"] = {tasks[i].name: round(float(a), 4)
                          for i, a in enumerate(accs)}
        row["kkt_from"] = [tasks[i].name for i in chosen]
        if chosen:
          init = jax.tree.map(lambda x: x[chosen].mean(0), scores)
      if s.mask_steps > 0:
        obj = train.Objective(init, _mask_loss(float(s.density)),
                              {"weights": weights, "head": heads[t]})
        init = train.fit(obj, batches, mask_cfg, mesh=mesh, progress=False,
                         desc=f"{task.name} mask").params
      init = jax.tree.map(np.asarray, init)
      new_mask = sm.host_masks(init, float(s.density))
      for leaf, new in zip(jax.tree.leaves(scores), jax.tree.leaves(init)):
        leaf[t] = np.asarray(new)
      for leaf, new in zip(jax.tree.leaves(masks), jax.tree.leaves(new_mask)):
        leaf[t] = new
    if s.trains_weights and s.weight_steps > 0:
      mask_t = jax.tree.map(lambda m: m[t], masks) if s.masked else ones
      if s.method == "exssnet":
        editable = sm.exclusive(mask_t, sm.union(masks, t))
      else:
        editable = mask_t
      row["trainable"] = round(sm.fraction(editable) /
                               max(sm.fraction(mask_t), 1e-12), 4)
      obj = train.Objective(
          jax.tree.map(np.zeros_like, weights), _weight_loss,
          {"weights": weights, "head": heads[t], "editable": editable,
           "mask": jax.tree.map(lambda m: m.astype(np.float32), mask_t)})
      delta = train.fit(obj, batches, weight_cfg, mesh=mesh, progress=False,
                        desc=f"{task.name} weights").params
      weights = sm.apply_delta(weights, jax.tree.map(np.asarray, delta),
                               editable)
    if keep_history:
      history.append(jax.tree.map(np.copy, weights))
    for j in range(t + 1):
      z = np.asarray(_eval_logits(weights, jax.tree.map(lambda m: m[j], masks),
                                  heads[j], x_eval[j]))[:len(tasks[j].x_test)]
      acc[t, j] = float(np.mean(np.argmax(z, -1) == tasks[j].y_test))
      if j == t:
        after.append(z)
      if t == T - 1:
        row_j = info[j] if j < t else row
        row_j["unchanged"] = bool(np.array_equal(z, after[j]))
    info.append(row)
  unchanged = [r["unchanged"] for r in info]
  return Result(acc, weights, scores, masks, info, unchanged, history,
                round(time.time() - t0, 2))
