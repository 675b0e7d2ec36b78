"""A tiny merge problem for learned-method tests: a 2-layer MLP, 3 tasks.

The encoder is `Linear(8 -> 16) -> tanh -> Linear(16 -> 8)` built from
`nnx.Linear` (so RegMean's capture sees real modules), its features feed a
per-task head. Task vectors are small random perturbations of theta_0; each
task's labels come from its own fine-tuned model (theta_0 + tau_t) so that
supervised objectives have something to find.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtmerge import encoders
from mtmerge.learned import problem as problem_lib
from mtmerge.models import hub

TASKS = ("a", "b", "c")
D_IN, D_HID, D_FEAT, CLASSES = 8, 16, 8, 4


class Mlp(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(D_IN, D_HID, rngs=rngs)
    self.fc2 = nnx.Linear(D_HID, D_FEAT, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jnp.tanh(self.fc1(x)))


def tiny_problem(seed: int = 0, n: int = 64, tv_scale: float = 0.3
                 ) -> problem_lib.MergeProblem:
  """The tiny problem; every split of every task has `n` examples."""
  model = Mlp(nnx.Rngs(seed))
  static, params = hub.split_params(model)
  base = encoders.canonical(params)
  rng = np.random.default_rng(seed)
  tvs = jax.tree.map(lambda b: (rng.standard_normal((len(TASKS),) + b.shape)
                                * tv_scale).astype(np.float32), base)

  def features(p, inputs):
    return hub.merge_params(static, p)(inputs["x"])

  heads = {t: {"kernel": (rng.standard_normal((D_FEAT, CLASSES))
                          ).astype(np.float32),
               "bias": np.zeros(CLASSES, np.float32)} for t in TASKS}
  splits = {}
  for i, t in enumerate(TASKS):
    theta = jax.tree.map(lambda b, v: b + v[i], base, tvs)
    splits[t] = {}
    for j, split in enumerate(("train", "validation", "test")):
      x = rng.standard_normal((n, D_IN)).astype(np.float32)
      y = np.asarray(jnp.argmax(encoders.logits(
          heads[t], features(theta, {"x": x})), -1)).astype(np.int32)
      splits[t][split] = {"x": x, "label": y}
  return problem_lib.from_arrays(TASKS, base, tvs, features, heads, splits,
                                 capture_model=features)
