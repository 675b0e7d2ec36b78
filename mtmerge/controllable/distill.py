r"""Training the slimmable multi-task SuperNet with configuration-invariant
knowledge distillation (CI-KD).

Paper: A. Aich, S. Schulter, A. K. Roy-Chowdhury, M. Chandraker, Y. Suh,
"Efficient Controllable Multi-Task Architectures", ICCV 2023,
arXiv:2308.11744 (ar5iv.labs.arxiv.org/html/2308.11744). Official code:
none found; the paper's page on Papers with Code lists no implementation,
and no repository of the authors or of NEC Labs holds it. Only the
abstract, the pipeline figure's caption and third-party summaries were
readable with this project's tools. The slimmable training here follows
US-Nets (Yu & Huang, ICCV 2019, code github.com/JiahuiYu/slimmable_networks),
the standard recipe for width-slimmable networks: the "sandwich rule" (each
step trains the widest, the narrowest and randomly sampled widths) and
in-place distillation.

What the paper states and this module does: one SuperNet (shared encoder,
task decoders, both width-slimmable) is trained together with its SubNets;
the task losses of the full configuration and of sampled configurations
are summed, and CI-KD transfers the largest-capacity encoder's
representation (the paper's argument: it has the least task conflict) to
the encoders of the sampled, narrower SubNets, i.e. the encoder's output
is pushed to be the same whatever the runtime width configuration:

  L = sum_{w in S} (1/T) sum_t CE_t(w)  +  lambda sum_{w in S, w != w_max}
      CIKD(w),
  CIKD(w) = 1 / (N H) sum_{real tokens i} || sg(z_i(w_max)) - z_i(w) ||^2,

with S = {w_max, w_min, k random configurations} (the sandwich rule),
z(w) the shared encoder's output hidden states at configuration w ([N
tokens, H]), sg stop-gradient (the teacher is the SuperNet's own encoder in
the same step, as in-place distillation), CE_t task t's cross-entropy
against the ground truth through its decoder at w's width and its frozen
head. A random configuration draws the encoder width and every decoder's
width independently and uniformly from their lists.

Where this differs from what it builds on, and why:
* US-Nets' code distils the widest network's output logits into the
  narrower ones (soft-label cross-entropy); CI-KD, as the paper describes
  it, distils the encoder's representation instead, because the decoders
  are task-specific and differently wide; this module follows the paper
  (decoder outputs are trained on labels only).
* The distance (mean squared error over tokens and features) and the sum
  over configurations (US-Nets accumulates the gradients of every sampled
  width before one update) are this implementation's choices: the text
  available here (abstract, pipeline figure and summaries) does not give
  the exact normalization; lambda is `config.distill.kd_weight`.
* Widths are slimmed by masks (`mtmerge.controllable.slimmable`), so the
  whole sandwich is one jitted program; the paper slims convolution
  channels of dense-prediction networks, here attention heads and FFN units
  of BERT layers (DynaBERT's width axes).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from mtmerge import encoders
from mtmerge import train
from mtmerge.controllable import slimmable

Tree = Any


def sample_configs(rng: jax.Array, space: slimmable.Space, num_random: int
                   ) -> tuple[jax.Array, jax.Array]:
  """The sandwich of one step: `(e [S], ds [S, T])`, S = 2 + num_random.

  Row 0 is the full configuration (the teacher), row 1 the smallest, the
  rest drawn uniformly (encoder and each decoder independently).
  """
  ne, nd, t = len(space.enc_ratios), len(space.dec_ratios), space.num_tasks
  ke, kd = jax.random.split(rng)
  e = jnp.concatenate([jnp.array([ne - 1, 0], jnp.int32),
                       jax.random.randint(ke, (num_random,), 0, ne)])
  ds = jnp.concatenate([jnp.full((1, t), nd - 1, jnp.int32),
                        jnp.zeros((1, t), jnp.int32),
                        jax.random.randint(kd, (num_random, t), 0, nd)])
  return e, ds


def ci_kd(teacher: jax.Array, student: jax.Array, mask: jax.Array
          ) -> jax.Array:
  """CI-KD distance: mean over real tokens and features of the squared
  difference between the (stop-gradient) full-width encoder output and a
  sampled configuration's.

  Args:
    teacher: `[..., L, H]` full-configuration encoder hidden states.
    student: the same shape, at the sampled configuration.
    mask: `[..., L]` 1 for real tokens.
  """
  m = mask.astype(jnp.float32)[..., None]
  d = jnp.square(jax.lax.stop_gradient(teacher) - student) * m
  return jnp.sum(d) / (jnp.maximum(jnp.sum(m), 1.0) * teacher.shape[-1])


def stack_batch(batch: dict, tasks: Sequence[str]) -> tuple[jax.Array, ...]:
  """`(ids, mask, labels)` with a leading task axis from `{task: batch}`."""
  return tuple(jnp.stack([jnp.asarray(batch[t][k]) for t in tasks])
               for k in ("input_ids", "attention_mask", "label"))


def supernet_loss(params: Tree, consts: Tree, batch: dict, rng: jax.Array,
                  *, space: slimmable.Space, tasks: Sequence[str],
                  kd_weight: float, num_random: int
                  ) -> tuple[jax.Array, dict]:
  """The sandwich loss `L` of the module docstring on one multi-task batch.

  Args:
    params: `{"encoder", "decoders"}`.
    consts: `{"emb": frozen embeddings, "heads": {task: head}}`.
    batch: `{task: {"input_ids", "attention_mask", "label"}}`, equal shapes.
    rng: the step's key (draws the random configurations).
    space: the architecture.
    tasks: task order (the decoders' task axis).
    kd_weight: lambda.
    num_random: random configurations besides the largest and smallest.

  Returns:
    `(loss, metrics)`; metrics: the full and smallest configurations' mean
    cross-entropy and the mean CI-KD over the students.
  """
  ids, mask, labels = stack_batch(batch, tasks)
  es, dss = sample_configs(rng, space, num_random)
  # One forward traced once, batched over the S configurations (vmap over
  # the width indices): a small program whatever S is.
  hs, feats = jax.vmap(lambda e, ds: slimmable.forward(
      params, consts["emb"], ids, mask, e, ds, space))(es, dss)
  ce = sum(optax.softmax_cross_entropy_with_integer_labels(
      encoders.logits(consts["heads"][t], feats[:, i]),
      labels[i][None]).mean(-1) for i, t in enumerate(tasks)) / len(tasks)
  kd = jax.vmap(lambda h: ci_kd(hs[0], h, mask))(hs[1:])  # [S - 1]
  loss = jnp.sum(ce) + kd_weight * jnp.sum(kd)
  return loss, {"ce_full": ce[0], "ce_min": ce[1], "ci_kd": jnp.mean(kd)}


def objective(init: Tree, emb: Tree, heads: dict, space: slimmable.Space,
              tasks: Sequence[str], kd_weight: float, num_random: int
              ) -> train.Objective:
  """The `train.Objective` of CI-KD SuperNet training (`train.fit` runs it:
  one jitted step whatever configurations a step samples)."""
  tasks = tuple(tasks)
  missing = [t for t in tasks if t not in heads]
  if missing:
    raise ValueError(f"no head for task(s) {missing}")
  if len(tasks) != space.num_tasks:
    raise ValueError(f"{len(tasks)} tasks for a space of {space.num_tasks}")
  if num_random < 0:
    raise ValueError(f"num_random must be >= 0, got {num_random}")

  def loss(params, consts, batch, rng):
    return supernet_loss(params, consts, batch, rng, space=space, tasks=tasks,
                         kd_weight=float(kd_weight),
                         num_random=int(num_random))
  return train.Objective(init=init, loss=loss, consts={
      "emb": emb, "heads": {t: jax.tree.map(jnp.asarray, heads[t])
                            for t in tasks}})
