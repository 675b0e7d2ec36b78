"""Transport maps for Transformer fusion with optimal transport.

The primitives of OTFusion (Singh & Jaggi, NeurIPS 2020, "Model Fusion via
Optimal Transport") as extended to Transformers by Imfeld et al. (ICLR
2024, "Transformer Fusion with Optimal Transport", official code
github.com/graldij/transformer-fusion): a ground metric between neurons,
a transport map between the neurons of a source layer and those of the
target (anchor) layer, the map's two normalizations used to move weights
into the target's basis, per-head maps for multi-head attention, and the
policy that combines the maps flowing through a residual connection.
`mtmerge.fusion.ot_fusion` walks a BERT layer by layer with these.

Conventions: a map `T` is `[n_src, n_tgt]` with uniform marginals
(rows sum to 1/n_src, columns to 1/n_tgt). `reg == 0` is hard alignment
(an exact optimal plan, a permutation when the widths match); `reg > 0` is
soft alignment, entropic OT solved by a log-domain Sinkhorn written here
(a few lines; ott-jax is not needed). Costs are Euclidean distances
between unit-normalized neuron descriptors, divided by their maximum
(the official code's `gnd_metric` defaults), so `reg` is relative to the
largest cost, as the code's `sinkhorn_reg`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize


@jax.jit
def cost_matrix(x: jax.Array, y: jax.Array) -> jax.Array:
  """Euclidean distances between unit-normalized rows, unscaled.

  Args:
    x: `[n, d]` descriptors of the source neurons (weights or activations).
    y: `[m, d]` descriptors of the target neurons.

  Returns:
    `[n, m]` float32 distances.
  """
  unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1,
                                                   keepdims=True), 1e-12)
  x, y = unit(jnp.asarray(x, jnp.float32)), unit(jnp.asarray(y, jnp.float32))
  sq = (jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :]
        - 2.0 * x @ y.T)
  return jnp.sqrt(jnp.maximum(sq, 0.0))


@functools.partial(jax.jit, static_argnames=("max_iter",))
def sinkhorn(cost: jax.Array, reg: float, tol: float = 1e-6,
             max_iter: int = 5000) -> jax.Array:
  """Entropic OT plan between uniform marginals (log-domain Sinkhorn).

  Solves `min_P <P, C> - reg * H(P)` over plans with uniform marginals
  (Cuturi, 2013), iterating the dual potentials in log space so small
  `reg` does not underflow. Leading axes of `cost` are a batch of
  independent problems (solved together until all converge).

  Args:
    cost: `[..., n, m]` costs.
    reg: entropic regularization (> 0).
    tol: stop when every problem's row marginals are within `tol` (L1)
      of uniform.
    max_iter: iteration cap.

  Returns:
    `[..., n, m]` plans, each summing to 1.
  """
  n, m = cost.shape[-2:]
  loga, logb = -jnp.log(n), -jnp.log(m)
  lse = jax.nn.logsumexp
  logp = lambda f, g: (f[..., :, None] + g[..., None, :] - cost) / reg

  def update(fg):
    f, g = fg
    f = reg * (loga - lse((g[..., None, :] - cost) / reg, axis=-1))
    g = reg * (logb - lse((f[..., :, None] - cost) / reg, axis=-2))
    return f, g

  def cond(state):
    i, (f, g) = state
    rows = jnp.exp(logp(f, g)).sum(-1)
    return (i < max_iter) & (jnp.max(jnp.abs(rows - 1.0 / n).sum(-1)) > tol)

  zeros = (jnp.zeros(cost.shape[:-1]), jnp.zeros(cost.shape[:-2] + (m,)))
  _, (f, g) = jax.lax.while_loop(
      cond, lambda s: (s[0] + 1, update(s[1])), (0, update(zeros)))
  return jnp.exp(logp(f, g))


def exact_host(cost: np.ndarray) -> np.ndarray:
  """Optimal (unregularized) plans between uniform marginals, on the host.

  Equal sizes give a permutation / n. Unequal sizes are solved exactly as
  an assignment between `lcm / n` copies of each source neuron and
  `lcm / m` copies of each target neuron (uniform-marginal transport has
  an integral optimum in units of `1 / lcm`).

  Args:
    cost: `[..., n, m]` costs; leading axes are independent problems.

  Returns:
    `[..., n, m]` float32 plans, each summing to 1.
  """
  c = np.asarray(cost, np.float64)
  n, m = c.shape[-2:]
  k = math.lcm(n, m)
  out = np.zeros(c.shape, np.float32)
  for idx in np.ndindex(c.shape[:-2]):
    rows, cols = optimize.linear_sum_assignment(
        np.repeat(np.repeat(c[idx], k // n, axis=0), k // m, axis=1))
    plan = np.zeros((n, m))
    np.add.at(plan, (rows // (k // n), cols // (k // m)), 1.0 / k)
    out[idx] = plan
  return out


def exact(cost: jax.Array) -> jax.Array:
  """`exact_host` as a JAX op: on the host when eager (any sharding), a
  host callback under `jax.jit` (single-device inputs)."""
  if isinstance(cost, jax.core.Tracer):
    return jax.pure_callback(
        exact_host, jax.ShapeDtypeStruct(cost.shape, jnp.float32), cost)
  return jnp.asarray(exact_host(np.asarray(cost)))


def transport(cost: jax.Array, reg: float) -> jax.Array:
  """Hard (`reg == 0`) or soft (`reg > 0`) plans for `[..., n, m]` costs.

  Each problem's cost is divided by its maximum first (`reg` is relative).
  """
  cost = cost / jnp.maximum(jnp.max(cost, axis=(-2, -1), keepdims=True),
                            1e-12)
  return exact(cost) if _hard(reg) else sinkhorn(cost, reg)


def _hard(reg) -> bool:
  # A Python 0 selects exact OT; a traced regularization is always soft.
  return isinstance(reg, (int, float)) and reg == 0


def barycentric(plan: jax.Array) -> jax.Array:
  """The map for a layer's output axis: columns sum to 1.

  `W @ barycentric(T)` makes each target neuron the `T`-weighted mean of
  the source neurons sent to it (OTFusion's `T diag(1 / beta)`).
  """
  return plan / jnp.sum(plan, axis=0, keepdims=True)


def lift(plan: jax.Array) -> jax.Array:
  """The map for a layer's input axis: rows sum to 1.

  A source neuron's activation is read from the target neurons it is sent
  to, so a next layer keeps its output scale: `lift(T).T @ W_in`. For
  equal widths this equals `barycentric(T)` (both are `n * T`).
  """
  return plan / jnp.sum(plan, axis=1, keepdims=True)


@jax.jit
def _pair_costs(xs, ys):
  cost = jax.vmap(lambda x: jax.vmap(lambda y: cost_matrix(x, y))(ys))(xs)
  return cost / jnp.maximum(jnp.max(cost), 1e-12)


def head_plans(desc_src: list[jax.Array], desc_tgt: list[jax.Array],
               num_heads: int, reg: float) -> tuple[list[jax.Array],
                                                   jax.Array]:
  """Per-head transport maps for multi-head attention.

  Heads are independent channels that attention never mixes, so a map
  that preserves the function sends whole heads to whole heads: every
  (source head, target head) pair gets its own within-head plan, the heads
  are matched by the cost of those plans (summed over the descriptor
  groups, e.g. queries+keys and values, so all groups share one head
  matching), and each group's map is the head plan times its within-head
  plans, a block-structured `[H_src, H_tgt]` map.

  Args:
    desc_src: per group, `[H_src, d]` source neuron descriptors.
    desc_tgt: per group, `[H_tgt, d]` target neuron descriptors.
    num_heads: heads of both models.
    reg: 0 for hard alignment, else Sinkhorn's regularization.

  Returns:
    `(maps, heads)`: one `[H_src, H_tgt]` map per group, and the
    `[num_heads, num_heads]` head plan.
  """
  per_group, head_cost = [], 0.0
  for xs, ys in zip(desc_src, desc_tgt):
    xs = xs.reshape(num_heads, -1, xs.shape[-1])
    ys = ys.reshape(num_heads, -1, ys.shape[-1])
    cost = _pair_costs(xs, ys)  # [h_s, h_t, d_s, d_t], max-normalized
    plans = exact(cost) if _hard(reg) else sinkhorn(cost, reg)
    per_group.append(plans)
    head_cost = head_cost + jnp.sum(plans * cost, axis=(2, 3))
  heads = transport(head_cost, reg)
  maps = []
  for plans in per_group:
    h, _, ds, dt = plans.shape
    # Block (a, b) is heads[a, b] * plans[a, b]; marginals stay uniform.
    full = heads[:, :, None, None] * plans  # [h_s, h_t, d_s, d_t]
    maps.append(full.transpose(0, 2, 1, 3).reshape(h * ds, h * dt))
  return maps, heads


def combine_residual(t_resid: jax.Array, t_layer: jax.Array,
                     policy: str = "mean") -> jax.Array:
  """The map after a residual add `x + f(x)`.

  Args:
    t_resid: the map of the residual branch `x`.
    t_layer: the map of the sublayer's output `f(x)`.
    policy: `mean` (their average, the paper's choice and the official
      config's `resid_policy`), `only_resid` (keep `t_resid`) or
      `no_resid` (take `t_layer`).

  Returns:
    The map the stream carries on.
  """
  if policy == "mean":
    return 0.5 * (t_resid + t_layer)
  if policy == "only_resid":
    return t_resid
  if policy == "no_resid":
    return t_layer
  raise ValueError(f"residual policy {policy!r}; expected mean, only_resid "
                   "or no_resid")
