"""Flax NNX models and their importers.

Public API (resolved lazily, so `from mtmerge.models import convert` stays
free of Flax and tokenizers imports):

  load(name_or_path, *, dtype=jnp.float32, rngs=None)
      -> (model, tokenizer_or_preprocessor)       see `hub.load`
  embed(model, tokenizer, texts, batch_size=64, max_length=128)
      -> np.ndarray [N, H]                        see `hub.embed`
  split_params(model) -> (static, params_dict)    see `hub.split_params`
  merge_params(static, params_dict) -> model      see `hub.merge_params`
  KNOWN_NAMES                                     names `load` resolves

Modules: `bert` (BERT encoder, HF import), `tokenizer` (batch tokenization),
`hub` (loading by name), `convert` (name/shape mapping engine), and `vit`,
`clip` for image encoders.
"""

import importlib

_LAZY = {"load": "hub", "embed": "hub", "split_params": "hub",
         "merge_params": "hub", "KNOWN_NAMES": "hub"}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"mtmerge.models.{_LAZY[name]}"),
                   name)
  raise AttributeError(f"module 'mtmerge.models' has no attribute {name!r}")
