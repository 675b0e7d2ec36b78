r"""Greedy decoding with Dynamic Logits Fusion, re-solved at every step.

Fan et al., 2024, "On Giant's Shoulders: Effortless Weak to Strong by
Dynamic Logits Fusion" (arXiv:2406.15480; code
github.com/Facico/Dynamic-Logit-Fusion; `logits_fusion` has the paper's
objective and search, what the stored copies hold and what we follow). At
decoding step k the strong causal LM, the untuned small LM and each small
task expert score the same prefix; the fusion weights of every sequence
are solved from those next-token logits alone (`logits_fusion.solve`, the
paper's search by default), the fused logits pick the next token
greedily, and the token is appended for all models. Fixed weights
(`weights=`) and solved ones share one compiled program (a `lax.cond`).

Models are pure functions `apply(params, ids [B, L]) -> logits [B, L, V]`
(causal: position i sees tokens <= i). The experts share the small model's
`apply` and come as ONE params pytree with a leading task axis `[T, ...]`
(or a list, stacked here), like `TaskVectors`. Decoding runs in one
`jax.jit`: a `lax.scan` over steps on a fixed `[B, P + N]` token buffer,
each step a full causal forward (no KV cache: these are tiny models; the
causal mask makes the unwritten tail irrelevant), experts `vmap`ped over
the task axis, the solver `vmap`ped over the batch. Prompts share one
length P (no padding).

`init_tiny_lm` / `tiny_lm` are a small random causal transformer (pre-LN,
learned positions) for tests and examples; it need not be trained.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge.fusion import logits_fusion


def init_tiny_lm(seed: int, vocab: int, dim: int = 16, layers: int = 1,
                 heads: int = 2, max_len: int = 32, scale: float = 1.0
                 ) -> dict[str, Any]:
  """Random params of `tiny_lm` (drawn in NumPy: no compile).

  Args:
    seed: NumPy RNG seed.
    vocab, dim, layers, heads, max_len: sizes (`dim % heads == 0`).
    scale: init scale of the output embedding (larger: peakier logits).

  Returns:
    Nested dict of float32 arrays; `heads` is read back from `attn_heads`.
  """
  rng = np.random.default_rng(seed)
  n = lambda *s: rng.normal(size=s) / np.sqrt(s[0])
  p = {"embed": rng.normal(size=(vocab, dim)) * 0.5,
       "pos": rng.normal(size=(max_len, dim)) * 0.5,
       "unembed": n(dim, vocab) * scale,
       "attn_heads": np.zeros((heads,)), "blocks": []}
  for _ in range(layers):
    p["blocks"].append({"qkv": n(dim, 3 * dim), "out": n(dim, dim),
                        "up": n(dim, 4 * dim), "down": n(4 * dim, dim)})
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)


def _norm(x):
  x = x - x.mean(-1, keepdims=True)
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5)


def tiny_lm(params: dict[str, Any], ids: jax.Array) -> jax.Array:
  """Causal LM logits `[B, L, V]` of token ids `[B, L]`."""
  length = ids.shape[1]
  h = params["embed"][ids] + params["pos"][:length]
  heads = params["attn_heads"].shape[0]
  mask = jnp.tril(jnp.ones((length, length), bool))
  for blk in params["blocks"]:
    q, k, v = jnp.split(_norm(h) @ blk["qkv"], 3, axis=-1)
    split = lambda x: x.reshape(x.shape[:2] + (heads, -1))
    q, k, v = split(q), split(k), split(v)
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(h.shape)
    h = h + o @ blk["out"]
    h = h + jax.nn.gelu(_norm(h) @ blk["up"]) @ blk["down"]
  return _norm(h) @ params["unembed"]


class Generation(NamedTuple):
  """Output of `generate`.

  Attributes:
    tokens: `[B, P + N]` prompt followed by the N generated tokens.
    weights: `[B, N, T]` fusion weights used at each step.
  """
  tokens: jax.Array
  weights: jax.Array


def _vocab(apply: Callable, params: Any, prompt: jax.Array) -> int:
  return int(jax.eval_shape(apply, params, prompt).shape[-1])


def generate(strong_apply: Callable, strong_params: Any,
             small_apply: Callable, base_params: Any, expert_params: Any,
             prompt: Any, max_new_tokens: int, *,
             weights: Any = None, names: Sequence[str] | None = None,
             solver: dict[str, Any] | None = None) -> Generation:
  """Greedy decoding of the strong model fused with T small experts.

  Args:
    strong_apply, strong_params: the strong causal LM.
    small_apply: the small LMs' forward (shared by base and experts).
    base_params: the untuned small LM.
    expert_params: the experts, one pytree with a leading task axis
      `[T, ...]`, or a list of T pytrees.
    prompt: int token ids `[B, P]`.
    max_new_tokens: N, tokens generated.
    weights: fixed fusion weights `[T]` (proxy-tuning style, no solver);
      None: solved per sequence at every step.
    names: expert names for error messages.
    solver: keyword arguments of `logits_fusion.solve_weights` (search,
      lo, hi, num, max_grid, sweeps, iters, starts, objective_fn); default
      the paper's search (`search="paper"`).

  Returns:
    A `Generation` (tokens and per-step weights).

  Raises:
    logits_fusion.FusionError: no experts, or a model whose vocabulary
      differs from the strong model's (named).
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  # Shapes are checked on the whole decoding buffer [B, P + N]: a model
  # that cannot take P + N positions fails here, before any compile.
  buf = jax.ShapeDtypeStruct((prompt.shape[0], prompt.shape[1] +
                              int(max_new_tokens)), jnp.int32)
  label = lambda i: repr(names[i]) if names and i < len(names) else str(i)
  if isinstance(expert_params, (list, tuple)):
    if not expert_params:
      raise logits_fusion.FusionError("no experts to fuse: the expert list "
                                      "is empty")
    v_strong = _vocab(strong_apply, strong_params, buf)
    for i, p in enumerate(expert_params):
      v = _vocab(small_apply, p, buf)
      if v != v_strong:
        raise logits_fusion.FusionError(
            f"expert {label(i)} has a vocabulary of {v} tokens but the strong "
            f"model has {v_strong}")
    expert_params = jax.tree.map(lambda *x: jnp.stack(x), *expert_params)
  leaves = jax.tree.leaves(expert_params)
  if not leaves or leaves[0].shape[0] == 0:
    raise logits_fusion.FusionError("no experts to fuse: the expert list is "
                                    "empty")
  v_strong = _vocab(strong_apply, strong_params, buf)
  v_small = _vocab(small_apply, base_params, buf)
  v_exp = int(jax.eval_shape(jax.vmap(small_apply, in_axes=(0, None)),
                             expert_params, buf).shape[-1])
  for who, v in (("the untuned small model has", v_small),
                 ("the experts have", v_exp)):
    if v != v_strong:
      raise logits_fusion.FusionError(f"{who} a vocabulary of {v} tokens but "
                                      f"the strong model has {v_strong}")
  t_count = leaves[0].shape[0]
  # Fixed and solved weights run one compiled program (a `lax.cond`).
  use_fixed = weights is not None
  fixed = jnp.broadcast_to(jnp.asarray(0.0 if weights is None else weights,
                                       jnp.float32), (t_count,))
  opts = dict(search="paper", lo=0.0, hi=2.0, num=21, max_grid=4096,
              sweeps=2, iters=24, starts=8,
              objective_fn=logits_fusion.objective)
  opts.update(solver or {})
  tokens, ws = _generate(strong_params, base_params, expert_params, prompt,
                         fixed, jnp.asarray(use_fixed),
                         strong_apply=strong_apply,
                         small_apply=small_apply, steps=int(max_new_tokens),
                         solver=tuple(sorted(opts.items())))
  return Generation(tokens, ws)


@functools.partial(jax.jit, static_argnames=("strong_apply", "small_apply",
                                             "steps", "solver"))
def _generate(strong_params, base_params, expert_params, prompt, fixed,
              use_fixed, *, strong_apply, small_apply, steps, solver):
  b, p = prompt.shape
  buf = jnp.zeros((b, p + steps), prompt.dtype).at[:, :p].set(prompt)

  def step(buf, i):
    pos = p + i
    last = lambda z: jax.lax.dynamic_index_in_dim(z, pos - 1, 1, False)
    z_strong = last(strong_apply(strong_params, buf))
    z_base = last(small_apply(base_params, buf))
    z_exp = jax.vmap(lambda q: last(small_apply(q, buf)))(expert_params)
    w = jax.lax.cond(
        use_fixed, lambda: jnp.broadcast_to(fixed, (b, fixed.shape[0])),
        lambda: logits_fusion.solve(z_strong, z_exp, z_base, **dict(solver)))
    tok = jnp.argmax(logits_fusion.fuse(z_strong, z_exp, z_base, w), -1)
    buf = jax.lax.dynamic_update_index_in_dim(buf, tok.astype(buf.dtype),
                                              pos, 1)
    return buf, w
  buf, ws = jax.lax.scan(step, buf, jnp.arange(steps))
  return buf, jnp.swapaxes(ws, 0, 1)
