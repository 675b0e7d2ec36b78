"""Batches of one task's split, prepared for an encoder.

Text is tokenized per batch and padded to the batch's longest example
rounded up to `multiple` tokens (so a run compiles for few shapes), with
length bucketing when shuffling; images go through the encoder's
preprocessor. Sizes are capped by `limit` (first N examples of the split's
fixed order) so configs can trade accuracy noise for time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mtmerge.data import pipeline
from mtmerge.data import suites


def _limited(source, limit: int | None):
  if limit is None or limit >= len(source):
    return source
  return suites.Subset(source, np.arange(int(limit)))


def _text_transform(tok, max_len: int, multiple: int):
  def fn(examples):
    texts = [pipeline.as_text(e["text"]) for e in examples]
    out = tok(texts, max_length=max_len, pad_to_multiple_of=multiple)
    return {"input_ids": out["input_ids"],
            "attention_mask": out["attention_mask"],
            "label": np.asarray([e["label"] for e in examples], np.int32)}
  return fn


def _text_lengths(tok, source, max_len: int) -> np.ndarray:
  out = []
  for start in range(0, len(source), 512):
    texts = [pipeline.as_text(source[i]["text"])
             for i in range(start, min(start + 512, len(source)))]
    out.append(tok(texts, max_length=max_len,
                   pad_to_multiple_of=1)["attention_mask"].sum(1))
  return np.concatenate(out)


def batcher(encoder: Any, task: Any, split: str, batch_size: int, *,
            shuffle: bool = False, seed: int = 0, limit: int | None = None,
            max_len: int = 48, multiple: int = 16,
            data_dir: str | None = None,
            sort_by_length: bool = False, process_index: int | None = None,
            process_count: int | None = None) -> pipeline.Batcher:
  """A `Batcher` over `task`'s `split` for `encoder`.

  Args:
    encoder: an `mtmerge.encoders.Encoder` (its tokenizer/preprocessor).
    task: a task name or `TaskSpec`.
    split: `train`, `validation` or `test`.
    batch_size: rows per batch (per host).
    shuffle: training order (new permutation per epoch, whole batches
      only); otherwise every example once, in order, the last batch padded
      with a `mask`.
    seed: shuffle seed.
    limit: use only the first `limit` examples of the split.
    max_len: text truncation length in tokens.
    multiple: text padding granularity in tokens.
    data_dir: TFDS data dir (default: the mtmerge cache).
    sort_by_length: text without shuffling: batch the examples in order of
      token length (every example still once), so batches carry little
      padding; for evaluation, where the order does not matter.
    process_index, process_count: which block of the examples this process
      reads (default `jax.process_index()` of `jax.process_count()`).
  """
  hosts = dict(process_index=process_index, process_count=process_count)
  task = suites.get_task(task)
  if task.modality != encoder.modality:
    raise ValueError(f"task {task.name!r} is {task.modality} but the encoder "
                     f"{encoder.name!r} takes {encoder.modality}")
  source = _limited(suites.load_split(task, split, data_dir), limit)
  if task.modality == "text":
    transform = _text_transform(encoder.tokenizer, max_len, multiple)
    sort = sort_by_length and not shuffle
    lengths = _text_lengths(encoder.tokenizer, source, max_len) if (
        shuffle or sort) else None
    window = batch_size * 8 if shuffle else (len(source) if sort else 0)
    return pipeline.Batcher(
        source, min(batch_size, len(source)) if not shuffle else batch_size,
        transform=transform, shuffle=shuffle, seed=seed,
        drop_remainder=shuffle, lengths=lengths, bucket_window=window,
        **hosts)
  pre = encoder.tokenizer

  def image_fn(examples):
    images = [np.asarray(e[task.input_key]) for e in examples]
    if len({x.shape for x in images}) == 1:
      images = pre(np.stack(images))
    else:  # datasets of mixed sizes (SUN397, Cars, DTD): one by one
      images = np.concatenate([pre(x[None]) for x in images])
    return {"image": images,
            "label": np.asarray([e[task.label_key] for e in examples],
                                np.int32)}
  return pipeline.Batcher(source, batch_size, transform=image_fn,
                          shuffle=shuffle, seed=seed, drop_remainder=shuffle,
                          **hosts)


def batch_at(b: pipeline.Batcher, step: int) -> dict[str, np.ndarray]:
  """The training batch of global step `step` (epoch = step // batches).

  Random access by step makes resuming exact: a resumed run sees the same
  batches as an uninterrupted one.
  """
  epoch, i = divmod(int(step), b.num_batches)
  idx = b.indices(epoch)[i]
  return b.transform([b.source[int(j)] for j in idx])
