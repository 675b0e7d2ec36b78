r"""ScaLearn: transfer to a target task by learning to scale source adapters.

Frohmann, Holtermann, Masoudian, Lauscher, Rekabsaz, "ScaLearn: Simple and
Highly Parameter-Efficient Task Transfer by Learning to Scale", Findings of
ACL 2024 (arXiv 2310.01217); official code github.com/CPJKU/ScaLearn (a
modified adapter-transformers: `adapters/modeling.py` classes `ScaLearn`,
`ScaLearnPlusPlus`, `init_shared_parameters_scalearn`; configs in
`adapters/configuration.py`; runs in `src/scripts/scalearn`).

Two stages. Stage 1 trains one bottleneck adapter per task on the frozen
backbone (`mtmerge.transfer.adapters`). Stage 2, for a target task, keeps
the backbone and the n source adapters frozen and learns only scaling
parameters omega that combine the source adapters' outputs in every layer
l:

  u_l = sum_{i=1..n} omega_l^i (.) u_l^i,   y_l = LN(h_l + u_l)

where u_l^i is adapter i's bottleneck output for the shared input LN(h_l)
(no constraint on omega: no softmax, no sum to one). Variants, with the
number of transfer parameters for n sources, L layers, width H:

  scalearn            omega_l^i in R^H, per layer      L n H
  scalearn_uniform    omega_l^i scalar, per layer      L n
  scalearn++          omega^i in R^H, shared by layers n H
  scalearn_uniform++  omega^i scalar, shared by layers n

The `++` variants ARE the layer-shared ones, in the paper (the abstract's
"uniform scaling and layer-sharing ... only 8 transfer parameters": n = 8
GLUE adapters, one scalar each) and in the code (`per_layer=True` configs
build ONE omega in `init_shared_parameters_scalearn` that every layer's
`ScaLearnPlusPlus` reads); `scalearn-shared` and `scalearn_uniform-shared`
are accepted as aliases of them, not separate methods.

omega is stored as one array `[L or 1, n, H or 1]` (a prefix-broadcastable
coefficient tree in the project's terms): the leading 1 is layer sharing,
the trailing 1 uniform scaling.

Where the paper and the code differ, and what this module follows:

* Initialization and dropout. The released configs the scripts run
  (`scalearn_2_avg_d03`, `scalearnUniform_2_avg_d03`,
  `scalearnPP_2_avg_d03`, `scalearnUniformPP_2_avg_d00`) draw omega from
  N(2/n, 1e-3) and apply dropout 0.3 to omega itself (none for
  ScaLearnUniform++). We follow the code (`init_scale=2`, `init_std=1e-3`,
  per-variant `DROPOUT`, all overridable).
* Which adapters are combined. The paper's setting (and the code's
  `af_config_*.json`) combines ALL task adapters, the target's own
  included (8 for GLUE). The issue asks for leave-one-task-out transfer;
  `objective` takes whatever sources it is given and the benchmark
  reports both settings.
* The residual. The code scales only the adapters' bottleneck outputs
  (`up`, before each adapter's own residual) and adds the residual once,
  as the equation above does; we follow that.
* The head. The code loads the source adapters without their heads
  (`fusion_with_head=False`) and, as far as we read `get_trainer.py`, the
  target's prediction head trains with omega; mtmerge's protocol keeps each
  task's frozen zero-shot head, so here only omega (and, in stage 1, only
  the adapter) is learned. Transfer-parameter counts exclude heads, as the
  paper's "8 transfer parameters" do.

Only the paper's abstract (v1 and v3) could be read while writing this;
the variant definitions above are checked against its numbers (8
parameters for ScaLearnUniform++ on 8 GLUE tasks; ~0.35% of AdapterFusion's
for ScaLearn, `tests/test_scalearn.py`) and taken in detail from the code.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import encoders
from mtmerge import train
from mtmerge.transfer import adapters as adapters_lib

Params = dict[str, Any]


class Variant(NamedTuple):
  """A ScaLearn variant: vector or scalar scales, per layer or shared."""
  name: str
  vector: bool
  shared: bool
  dropout: float  # the code's released config for it


VARIANTS = {
    "scalearn": Variant("scalearn", True, False, 0.3),
    "scalearn_uniform": Variant("scalearn_uniform", False, False, 0.3),
    "scalearn++": Variant("scalearn++", True, True, 0.3),
    "scalearn_uniform++": Variant("scalearn_uniform++", False, True, 0.0),
}
ALIASES = {"scalearn-shared": "scalearn++",
           "scalearn_uniform-shared": "scalearn_uniform++"}


def get(name: str) -> Variant:
  """The variant called `name` (or an alias); a clear error otherwise."""
  key = ALIASES.get(name, name)
  if key not in VARIANTS:
    raise ValueError(f"unknown ScaLearn variant {name!r}; known: "
                     f"{sorted(VARIANTS) + sorted(ALIASES)}")
  return VARIANTS[key]


def omega_shape(variant: str, num_sources: int, num_layers: int,
                hidden: int) -> tuple[int, int, int]:
  """Shape `[L or 1, n, H or 1]` of a variant's scaling parameters."""
  v = get(variant)
  return (1 if v.shared else num_layers, num_sources, hidden if v.vector
          else 1)


def num_transfer_params(variant: str, num_sources: int, num_layers: int,
                        hidden: int) -> int:
  """Learned parameters of stage 2: L n H, L n, n H or n (no head)."""
  return int(np.prod(omega_shape(variant, num_sources, num_layers, hidden)))


def init(key: jax.Array, variant: str, num_sources: int, num_layers: int,
         hidden: int, init_scale: float = 2.0, init_std: float = 1e-3
         ) -> jax.Array:
  """omega ~ N(init_scale / n, init_std), the code's "avg" initialization."""
  shape = omega_shape(variant, num_sources, num_layers, hidden)
  return init_scale / num_sources + init_std * jax.random.normal(key, shape)


def combine(scales: jax.Array, outputs: jax.Array) -> jax.Array:
  """`sum_i scales[i] (.) outputs[i]`: one layer's scaled combination.

  Args:
    scales: `[n, H]` or `[n, 1]` scaling parameters of one layer.
    outputs: `[n, ..., H]` the n source adapters' outputs.

  Returns:
    `[..., H]`.
  """
  s = scales.reshape((scales.shape[0],) + (1,) * (outputs.ndim - 2) +
                     (scales.shape[-1],))
  return jnp.sum(s.astype(outputs.dtype) * outputs, axis=0)


def layer_scales(omega: jax.Array, i: int) -> jax.Array:
  """Layer i's `[n, H or 1]` scales (row 0 for every layer when shared)."""
  return omega[i if omega.shape[0] > 1 else 0]


def hook(sources: Params, omega: jax.Array) -> adapters_lib.AdapterFn:
  """The encoder's adapter hook: scaled sum of the stacked source adapters.

  Args:
    sources: the n source adapters stacked (`adapters.stack`), `[n, ...]`.
    omega: `[L or 1, n, H or 1]` scaling parameters.
  """
  run_all = jax.vmap(adapters_lib.apply, in_axes=(0, None))

  def fn(i, x):
    return combine(layer_scales(omega, i), run_all(sources["layers"][str(i)],
                                                   x))
  return fn


def dropout(omega: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Inverted dropout on omega itself (the code's `nn.Dropout(omega)`)."""
  if not rate:
    return omega
  keep = jax.random.bernoulli(rng, 1.0 - rate, omega.shape)
  return jnp.where(keep, omega / (1.0 - rate), 0.0)


def check_sources(target: str, sources: dict[str, Params], num_layers: int,
                  hidden: int) -> int:
  """Refuses an empty or ill-shaped source set; one line naming the culprit.

  Args:
    target: the target task's name.
    sources: source task name -> its (unstacked) adapter.
    num_layers, hidden: the encoder's depth and width.

  Returns:
    The common bottleneck width.

  Raises:
    ValueError: no sources, or a source adapter of the wrong shape.
  """
  if not sources:
    raise ValueError(f"target task {target!r} has no source adapters to "
                     "scale (ScaLearn needs at least one)")
  widths = {name: adapters_lib.check(a, num_layers, hidden,
                                     name=f"source adapter {name!r}")
            for name, a in sources.items()}
  first = next(iter(widths.values()))
  for name, r in widths.items():
    if r != first:
      raise ValueError(f"source adapter {name!r} has bottleneck {r}, the "
                       f"others {first}: they cannot be stacked")
  return first


_LOSSES: dict[tuple, tuple] = {}


def objective(encoder: encoders.Encoder, variant: str, target: str,
              sources: dict[str, Params], head: dict, key: jax.Array, *,
              init_scale: float = 2.0, init_std: float = 1e-3,
              dropout_rate: float | None = None) -> train.Objective:
  """Stage 2 for one target: learn omega over the frozen source adapters.

  Args:
    encoder: the pretrained BERT encoder (frozen backbone).
    variant: a `VARIANTS` name or alias.
    target: the target task's name (for error messages).
    sources: source task name -> adapter (checked, then stacked in order).
    head: the target's frozen head (padded, `finetune.pad_classes`).
    key: omega init key.
    init_scale, init_std: omega ~ N(init_scale / n, init_std).
    dropout_rate: dropout on omega while training (None: the variant's
      released-config value).

  Returns:
    The `train.Objective` (params `{"omega": [L or 1, n, H or 1]}`); its
    loss is shared by every target with the same variant and dropout.
  """
  v = get(variant)
  num_layers = len(encoder.params["layers"])
  check_sources(target, sources, num_layers, encoder.dim)
  rate = v.dropout if dropout_rate is None else float(dropout_rate)
  cache_key = (id(encoder.static), v.name, rate)
  if cache_key not in _LOSSES or _LOSSES[cache_key][0] is not encoder:
    def loss(params, consts, batch, rng):
      omega = dropout(params["omega"], rate, rng)
      f = adapters_lib.features(encoder, consts["backbone"], batch,
                                hook(consts["sources"], omega))
      ce, acc = adapters_lib.cross_entropy(
          encoders.logits(consts["head"], f), batch["label"])
      return ce, {"acc": acc}
    _LOSSES[cache_key] = (encoder, loss)
  omega = init(key, v.name, len(sources), num_layers, encoder.dim,
               init_scale, init_std)
  consts = {"backbone": encoder.params,
            "sources": adapters_lib.stack(list(sources.values())),
            "head": head}
  return train.Objective({"omega": omega}, _LOSSES[cache_key][1], consts)


def expand(omega: jax.Array, num_layers: int, hidden: int) -> jax.Array:
  """omega broadcast to `[L, n, H]` (one evaluation program for all variants)."""
  return jnp.broadcast_to(omega, (num_layers, omega.shape[1], hidden))
