"""Batch tokenization to padded numpy arrays over a `tokenizer.json`.

Wraps Hugging Face `tokenizers.Tokenizer` (the fast Rust tokenizer; no
transformers or torch needed). Each batch is padded to its longest example,
rounded up to a multiple of `pad_to_multiple_of`, so a jitted encoder sees a
handful of sequence lengths (one compile each) instead of one per batch,
without paying for a fixed 128/512 pad. Any padding or truncation stored in
the tokenizer.json (all-MiniLM-L6-v2's pads every text to 128) is turned off
and replaced by the per-call settings.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tokenizers


class Tokenizer:
  """`tok(texts) -> {input_ids, attention_mask, token_type_ids}` (int32)."""

  def __init__(self, path_or_tokenizer: str | tokenizers.Tokenizer):
    """Loads the tokenizer.

    Args:
      path_or_tokenizer: a `tokenizer.json` path, a directory holding one,
        or a `tokenizers.Tokenizer`.
    """
    if isinstance(path_or_tokenizer, tokenizers.Tokenizer):
      tok = path_or_tokenizer
    else:
      path = str(path_or_tokenizer)
      if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer file at {path}")
      try:
        tok = tokenizers.Tokenizer.from_file(path)
      except Exception as e:  # tokenizers raises bare Exceptions
        raise ValueError(
            f"{path} is not a valid tokenizer.json ({e})") from None
    padding = tok.padding or {}
    self.pad_id = int(padding.get("pad_id", tok.token_to_id("[PAD]") or 0))
    self.pad_type_id = int(padding.get("pad_type_id", 0))
    tok.no_padding()  # padding is done here, per batch
    tok.no_truncation()
    self._tok = tok
    self._max_length = None

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def _set_truncation(self, max_length: int) -> None:
    if max_length != self._max_length:
      # The post-processor's special tokens ([CLS], [SEP]) count toward it.
      self._tok.enable_truncation(max_length)
      self._max_length = max_length

  def __call__(self, texts: str | Sequence[str | tuple[str, str]], *,
               max_length: int = 128,
               pad_to_multiple_of: int = 8) -> dict[str, np.ndarray]:
    """Tokenizes, truncates and pads a batch.

    Args:
      texts: a string, a list of strings, or a list of `(text_a, text_b)`
        pairs (segment ids 0 and 1).
      max_length: longest sequence kept, special tokens included.
      pad_to_multiple_of: the padded length is the longest example rounded
        up to this multiple (capped at `max_length`); 1 pads to the longest.

    Returns:
      `input_ids`, `attention_mask` and `token_type_ids`, int32 `[B, L]`.
    """
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    for i, t in enumerate(texts):
      ok = isinstance(t, str) or (isinstance(t, tuple) and len(t) == 2 and
                                  all(isinstance(s, str) for s in t))
      if not ok:
        raise TypeError(f"texts[{i}] is {type(t).__name__} {t!r:.60}; "
                        "expected a str or a (str, str) pair")
    if not texts:
      raise ValueError("texts is empty")
    if max_length < 2 or pad_to_multiple_of < 1:
      raise ValueError(f"need max_length >= 2 and pad_to_multiple_of >= 1, "
                       f"got {max_length} and {pad_to_multiple_of}")
    self._set_truncation(max_length)
    encs = self._tok.encode_batch(texts)
    longest = max(len(e.ids) for e in encs)
    m = pad_to_multiple_of
    length = min(-(-longest // m) * m, max(max_length, longest))
    ids = np.full((len(encs), length), self.pad_id, np.int32)
    types = np.full((len(encs), length), self.pad_type_id, np.int32)
    mask = np.zeros((len(encs), length), np.int32)
    for i, e in enumerate(encs):
      n = len(e.ids)
      ids[i, :n], types[i, :n], mask[i, :n] = e.ids, e.type_ids, 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
