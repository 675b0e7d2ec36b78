"""Transformer fusion with optimal transport: align BERTs, then average.

Imfeld, Graldi, Giordano, Hofmann, Anagnostidis & Singh (ICLR 2024),
"Transformer Fusion with Optimal Transport"; official code
github.com/graldij/transformer-fusion (`otfusion/otfusion_lib.py`). Every
parent is aligned to an anchor (its neurons moved into the anchor's basis
by transport maps computed layer by layer), then the aligned parents are
averaged. The anchor fixes the fused shape, so a narrower anchor gives
heterogeneous fusion (a compressed model).

The walk over mtmerge's BERT (`mtmerge.models.bert` parameter paths,
post-LN layers) follows the paper's transportation-map flow graph:

* embeddings: word, position and token-type tables are summed, so they
  share one map, computed from their stacked columns;
* each layer norm is aligned with the map of the stream it normalizes
  and passes that map on;
* attention: queries and keys share one map (their dot products stay
  intact), values get their own, both per head (`ot_align.head_plans`);
  the output projection reads the value map and computes its own output
  map;
* residual adds combine the stream's map with the sublayer's output map
  (`ot_align.combine_residual`, `mean` by default);
* MLP: the intermediate map passes through the elementwise GELU;
* an optional classifier `head` (`{"kernel": [H, C], "bias": [C]}`) reads
  the final stream map.

Where the paper and the official code disagree, and what this follows:

* Attention maps: the paper aligns multi-head attention per head; the
  code (`act_attention_fusion`) computes unrestricted maps over all of
  `H` for W_Q, W_K and W_V, and by default (`qk_fusion: separate`)
  separate ones for W_Q and W_K, which break `q.k` even for a permuted
  copy. Followed: the paper (per head, one Q/K map, head matching shared
  by Q/K and V), so a permuted copy is recovered exactly.
* Normalization: the paper inherits OTFusion's `T diag(1/beta)` (target
  marginal); the code rescales by the source width (`beta = 1 /
  t.shape[0]`) on both axes. They agree when widths match. For
  heterogeneous fusion this module uses the target marginal on output
  axes (mean of the neurons sent to a target neuron) and the source
  marginal on input axes (`ot_align.lift`), which keeps activation scales.
* Descriptors: the paper's best results use activations; this module
  defaults to weights (the code's `type: wts`, no data needed) and takes
  activations per site through `acts`.
* Embeddings: the public code fuses only ViT (`hf_vit_fusion.py`), with
  one map per embedding (class token, positions, patches) combined by the
  residual policy; BERT's three tables here get one joint map, exact for
  permuted copies. BERT's post-LN order follows the code's `hf_bert_*`
  branches of `encoder_fusion`.
* Anchor: the code aligns model 0 to model 1; here `anchor` is an
  argument (default the first model), and more than two models are
  aligned to it one by one, as the paper describes for N models.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import tree as tree_lib
from mtmerge.fusion import ot_align
from mtmerge.fusion import ot_checks

Params = dict[str, Any]
_EMB = ot_checks.EMBEDDINGS


FusionError = ot_checks.FusionError
describe = ot_checks.describe
check_compatible = ot_checks.check_compatible


def _descriptor(kernel, bias):
  """Neuron descriptors of a dense layer: `[out, in + 1]`."""
  return jnp.concatenate([kernel.T, bias[:, None]], axis=1)


def align(src: Params, tgt: Params, num_heads: int, *, reg: float = 0.0,
          residual: str = "mean", acts: tuple[dict, dict] | None = None
          ) -> tuple[Params, dict[str, jax.Array]]:
  """Moves `src` into the basis (and shape) of the anchor `tgt`.

  Args:
    src: the parent to align (flat or nested BERT params).
    tgt: the anchor.
    num_heads: attention heads of both.
    reg: 0 for hard alignment, else Sinkhorn regularization (relative to
      the largest cost; the official config uses 0.06 for weights).
    residual: residual-map policy (`ot_align.combine_residual`).
    acts: optional `(src_acts, tgt_acts)`, dicts of `[samples, width]`
      activations per site (`embeddings`, `layers/<i>/qk`,
      `layers/<i>/value`, `layers/<i>/attention_out`, `layers/<i>/mlp`,
      `layers/<i>/mlp_out`), used instead of weights as descriptors.

  Returns:
    `(aligned flat params in tgt's shapes, {site: transport map})`.
  """
  s, t = tree_lib.to_flat_dict(src), tree_lib.to_flat_dict(tgt)
  acts = [{}, {}] if acts is None else [tree_lib.to_flat_dict(a) for a in acts]
  sub = lambda d, p: {k[len(p) + 1:]: v for k, v in d.items()
                      if k.startswith(p + "/")}
  hard = float(reg) == 0
  reg = jnp.float32(reg)  # traced by the solver: no recompile per value
  static = dict(num_heads=int(num_heads), hard=hard, residual=residual)
  out, maps = {}, {}
  tables = [f"embeddings/{e}/embedding" for e in _EMB]
  # Word, position and token-type vectors are summed: one map for all.
  res = _plan(jnp.concatenate([jnp.asarray(s[k]) for k in tables]).T,
              jnp.concatenate([jnp.asarray(t[k]) for k in tables]).T,
              acts[0].get("embeddings"), acts[1].get("embeddings"), reg,
              hard=hard)
  maps["embeddings"] = res
  out.update(_apply_out(sub(s, "embeddings"), res))
  out = {"embeddings/" + k: v for k, v in out.items()}
  depth = len({k.split("/")[1] for k in s if k.startswith("layers/")})
  for i in range(depth):
    p = f"layers/{i}"
    # Layers of equal shapes reuse the same compiled kernels.
    layer, lmaps, res = _layer(sub(s, p), sub(t, p), sub(acts[0], p),
                               sub(acts[1], p), res, reg, **static)
    out.update({f"{p}/{k}": v for k, v in layer.items()})
    maps.update({f"{p}/{k}": v for k, v in lmaps.items()})
  maps["output"] = res
  if "head/kernel" in s:
    out["head/kernel"] = ot_align.lift(res).T @ jnp.asarray(
        s["head/kernel"], jnp.float32)
    out["head/bias"] = jnp.asarray(s["head/bias"], jnp.float32)
  return out, maps


def _plan(ws, wt, as_, at, reg, *, hard):
  """Transport map from weight descriptors, or activations when given."""
  xs, xt = (ws, wt) if as_ is None else (as_.T, at.T)
  return ot_align.transport(ot_align.cost_matrix(xs, xt),
                            0.0 if hard else reg)


@jax.jit
def _apply_out(leaves, tm):
  """Moves the output axis (last) of every leaf by `barycentric(tm)`."""
  bary = ot_align.barycentric(tm)
  return {k: jnp.asarray(v, jnp.float32) @ bary for k, v in leaves.items()}


def _layer(s, t, as_, at, res, reg, *, num_heads, hard, residual):
  """Aligns one post-LN BERT layer; returns `(params, maps, stream map)`.

  Runs eagerly: the solvers and cost kernels are compiled once per shape
  and shared by every layer, by hard and soft alignment and by weight and
  activation descriptors (one compiled program per combination compiled
  several times slower on CPU); exact assignments are solved on the host,
  so inputs may be sharded over any devices.
  """
  return _layer_impl(s, t, as_, at, res, 0.0 if hard else reg,
                     num_heads=num_heads, residual=residual)


def _layer_impl(s, t, as_, at, res, reg, *, num_heads, residual):
  s = {k: jnp.asarray(v, jnp.float32) for k, v in s.items()}
  t = {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}
  out, maps = {}, {}

  def desc(site, ws, wt):
    return (as_[site].T, at[site].T) if site in as_ else (ws, wt)

  def dense(prefix, lift_in, site):  # input from `lift_in`, own output map
    k = lift_in.T @ s[prefix + "/kernel"]
    maps[site] = tm = ot_align.transport(ot_align.cost_matrix(*desc(
        site, _descriptor(k, s[prefix + "/bias"]),
        _descriptor(t[prefix + "/kernel"], t[prefix + "/bias"]))), reg)
    bary = ot_align.barycentric(tm)
    out[prefix + "/kernel"], out[prefix + "/bias"] = (
        k @ bary, s[prefix + "/bias"] @ bary)
    return tm

  def norm(prefix, tm):
    for q in ("scale", "bias"):
      out[f"{prefix}/{q}"] = s[f"{prefix}/{q}"] @ ot_align.barycentric(tm)

  lift = ot_align.lift(res)
  names = ("query", "key", "value")
  ks = {n: lift.T @ s[f"attention/{n}/kernel"] for n in names}
  dsc = {n: _descriptor(ks[n], s[f"attention/{n}/bias"]) for n in names}
  dtg = {n: _descriptor(t[f"attention/{n}/kernel"], t[f"attention/{n}/bias"])
         for n in names}
  qk_s, qk_t = desc("qk", jnp.concatenate([dsc["query"], dsc["key"]], 1),
                    jnp.concatenate([dtg["query"], dtg["key"]], 1))
  v_s, v_t = desc("value", dsc["value"], dtg["value"])
  (t_qk, t_v), maps["heads"] = ot_align.head_plans(
      [qk_s, v_s], [qk_t, v_t], num_heads, reg)
  maps["qk"], maps["value"] = t_qk, t_v
  for n, tm in (("query", t_qk), ("key", t_qk), ("value", t_v)):
    bary = ot_align.barycentric(tm)
    out[f"attention/{n}/kernel"] = ks[n] @ bary
    out[f"attention/{n}/bias"] = s[f"attention/{n}/bias"] @ bary
  t_o = dense("attention/out", ot_align.lift(t_v), "attention_out")
  res = ot_align.combine_residual(res, t_o, residual)
  norm("attention_norm", res)
  t_f = dense("mlp/intermediate", ot_align.lift(res), "mlp")
  t_o = dense("mlp/output", ot_align.lift(t_f), "mlp_out")
  res = ot_align.combine_residual(res, t_o, residual)
  norm("mlp_norm", res)
  return out, maps, res



def fuse(models: Sequence[Params], num_heads: int | Sequence[int], *,
         anchor: int = 0, weights: Sequence[float] | None = None,
         reg: float = 0.0, residual: str = "mean",
         acts: Sequence[dict] | None = None) -> Params:
  """OT fusion: align every model to `models[anchor]`, then average.

  Args:
    models: two or more BERT param trees (flat or nested) of equal depth,
      head count and vocabulary; widths may differ.
    num_heads: heads (one int, or one per model; they must agree).
    anchor: index of the model whose basis and shape the result takes
      (the narrower model for heterogeneous fusion).
    weights: averaging weights (default uniform), normalized to sum 1.
    reg: 0 for hard alignment (exact OT), > 0 for soft (Sinkhorn).
    residual: residual-map policy.
    acts: optional per-model activation dicts (see `align`).

  Returns:
    Fused params, nested like `tree_lib.from_flat_dict`, in the anchor's
    shapes.

  Raises:
    FusionError: models that cannot be aligned.
  """
  check_compatible(models, num_heads)
  heads = int(np.ravel(num_heads)[0])
  w = np.ones(len(models)) if weights is None else np.asarray(weights, float)
  w = w / w.sum()
  tgt = tree_lib.to_flat_dict(models[anchor])
  total = _axpy({k: jnp.zeros(np.shape(v)) for k, v in tgt.items()}, tgt,
                w[anchor])
  for i, m in enumerate(models):
    if i == anchor:
      continue
    pair = None if acts is None else (acts[i], acts[anchor])
    aligned, _ = align(m, tgt, heads, reg=reg, residual=residual, acts=pair)
    total = _axpy(total, aligned, w[i])
  return tree_lib.from_flat_dict(total)


@jax.jit
def _axpy(total, x, w):
  return {k: total[k] + w * jnp.asarray(x[k], jnp.float32) for k in total}


def vanilla_average(models: Sequence[Params],
                    weights: Sequence[float] | None = None) -> Params:
  """Plain weight averaging, the paper's "vanilla fusion" baseline.

  Models of different widths are cut to the smallest shape per leaf (the
  naive heterogeneous baseline: the first neurons of each axis).
  """
  flats = [tree_lib.to_flat_dict(m) for m in models]
  w = np.ones(len(models)) if weights is None else np.asarray(weights, float)
  return tree_lib.from_flat_dict(_vanilla(flats, jnp.asarray(w / w.sum())))


@jax.jit
def _vanilla(flats, w):
  out = {}
  for k in flats[0]:
    shape = np.min([np.shape(f[k]) for f in flats], axis=0)
    cut = tuple(slice(0, int(n)) for n in shape)
    out[k] = sum(w[i] * jnp.asarray(f[k], jnp.float32)[cut]
                 for i, f in enumerate(flats))
  return out
