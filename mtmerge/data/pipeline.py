"""Numpy batches from a random-access source: shuffles, host shards, buckets.

A source is anything with `__len__` and `__getitem__` (a `tfds.data_source`,
a `suites.Subset`, a list of dicts). `Batcher` turns it into per-host
batches of dicts of numpy arrays:

* every epoch draws one global permutation from `(seed, epoch)`, identical
  on all hosts, and host `i` of `n` reads the strided slice `perm[i::n]`,
  so hosts are disjoint and together cover the epoch;
* all hosts yield the same number of batches of exactly `batch_size` rows
  (what a collective training or eval step needs): with `drop_remainder`
  the ragged tail is dropped (a different tail each shuffled epoch); without
  it the last batch is filled with copies of a real example and a boolean
  `mask` marks the real rows, so every example is seen exactly once;
* text can be bucketed by length: inside windows of `bucket_window`
  examples, examples are sorted by token length and cut into batches whose
  order is then shuffled, so a batch holds similar lengths (less padding)
  and, with lengths rounded up to a multiple of 8, few distinct shapes (few
  XLA recompiles);
* a per-batch `transform(list_of_examples) -> dict of arrays` does the
  tokenizing or the uint8 -> float image conversion, so storage stays
  compact.

The batch size is per host: the global batch is
`batch_size * process_count`, assembled with
`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np

Example = Any
Transform = Callable[[list[Example]], dict[str, np.ndarray]]


def pad_length(n: int, multiple: int = 8, max_len: int | None = None) -> int:
  """`n` rounded up to a multiple of `multiple`, capped at `max_len`.

  Args:
    n: the longest sequence in a batch.
    multiple: the padded length is a multiple of this (fewer shapes).
    max_len: an upper bound (e.g. the model's maximum sequence length).

  Returns:
    The padded length, at least `multiple`.
  """
  out = max(multiple, int(math.ceil(n / multiple)) * multiple)
  return out if max_len is None else min(out, max_len)


def stack_examples(examples: list[Example]) -> dict[str, np.ndarray]:
  """Default transform: stacks each feature of a list of dict examples."""
  keys = examples[0].keys()
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}


def _process_defaults(index, count) -> tuple[int, int]:
  if index is None or count is None:
    import jax  # pylint: disable=g-import-not-at-top
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} is not in [0, {count}).")
  return int(index), int(count)


class Batcher:
  """Seeded, host-sharded, optionally length-bucketed batches of a source.

  Example:
    batches = Batcher(source, 32, seed=0, transform=image_transform())
    for epoch in range(2):
      for batch in batches.epoch(epoch):
        ...
  """

  def __init__(self, source: Sequence[Example], batch_size: int, *,
               transform: Transform | None = None, shuffle: bool = True,
               seed: int = 0, drop_remainder: bool = True,
               process_index: int | None = None,
               process_count: int | None = None,
               lengths: Sequence[int] | np.ndarray | None = None,
               bucket_window: int = 0):
    """Args:

      source: random-access examples (`__len__`, `__getitem__`; a
        `__getitems__` batch read is used when present).
      batch_size: rows per batch on this host.
      transform: `list_of_examples -> dict of arrays`; default
        `stack_examples`.
      shuffle: draw a new permutation each epoch from `(seed, epoch)`;
        without it the order is the source order (eval).
      seed: the shuffle seed; every host must use the same one.
      drop_remainder: drop examples that do not fill a whole batch on every
        host; otherwise pad the last batch and add a `mask` key.
      process_index: this host; default `jax.process_index()`.
      process_count: number of hosts; default `jax.process_count()`.
      lengths: per-example lengths (e.g. token counts) for bucketing.
      bucket_window: examples per bucketing window (rounded up to a multiple
        of `batch_size`); 0 turns bucketing off. Needs `lengths`.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    self.source = source
    self.n = len(source)
    self.batch_size = int(batch_size)
    self.transform = transform or stack_examples
    self.shuffle = shuffle
    self.seed = int(seed)
    self.drop_remainder = drop_remainder
    self.process_index, self.process_count = _process_defaults(
        process_index, process_count)
    if bucket_window and lengths is None:
      raise ValueError("bucket_window needs per-example `lengths`.")
    self.lengths = None if lengths is None else np.asarray(lengths)
    if self.lengths is not None and self.lengths.shape != (self.n,):
      raise ValueError(f"lengths has shape {self.lengths.shape}, expected "
                       f"({self.n},) for a source of {self.n} examples.")
    self.bucket_window = (
        int(math.ceil(bucket_window / self.batch_size)) * self.batch_size
        if bucket_window else 0)
    if self.num_batches == 0:
      raise ValueError(
          f"{self.n} examples over {self.process_count} host(s) give no "
          f"batch of {self.batch_size} with drop_remainder=True.")

  @property
  def per_host(self) -> int:
    """Real examples each host reads per epoch (drop_remainder) or at most."""
    if self.drop_remainder:
      return self.n // self.process_count
    return -(-self.n // self.process_count)

  @property
  def num_batches(self) -> int:
    """Batches per epoch, the same on every host."""
    if self.drop_remainder:
      return self.per_host // self.batch_size
    return -(-self.per_host // self.batch_size)

  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.n)
    rng = np.random.default_rng([self.seed, int(epoch)])
    return rng.permutation(self.n)

  def indices(self, epoch: int = 0) -> list[np.ndarray]:
    """This host's batches of source indices for `epoch` (padding rows: -1).

    Args:
      epoch: the epoch number (selects the permutation).

    Returns:
      `num_batches` int64 arrays of `batch_size` indices each.
    """
    mine = self._order(epoch)[self.process_index::self.process_count]
    if self.drop_remainder:
      mine = mine[:self.num_batches * self.batch_size]
    if self.bucket_window:
      mine = self._bucket(mine, epoch)
    total = self.num_batches * self.batch_size
    padded = np.full(total, -1, np.int64)
    padded[:len(mine)] = mine
    return list(padded.reshape(self.num_batches, self.batch_size))

  def _bucket(self, order: np.ndarray, epoch: int) -> np.ndarray:
    """Sorts each window by length; shuffles the batch order inside it."""
    rng = np.random.default_rng([self.seed, int(epoch), 1])
    out = []
    bs = self.batch_size
    for start in range(0, len(order), self.bucket_window):
      window = order[start:start + self.bucket_window]
      # A stable sort keeps ties in shuffled order, so buckets still vary
      # from epoch to epoch.
      window = window[np.argsort(self.lengths[window], kind="stable")]
      batches = [window[i:i + bs] for i in range(0, len(window), bs)]
      if self.shuffle:
        # A ragged final batch stays last so that only it gets padding.
        full = [b for b in batches if len(b) == bs]
        rest = [b for b in batches if len(b) != bs]
        batches = [full[i] for i in rng.permutation(len(full))] + rest
      out.extend(batches)
    return np.concatenate(out) if out else order

  def _read(self, idx: np.ndarray) -> list[Example]:
    keys = [int(i) for i in idx]
    if hasattr(self.source, "__getitems__"):
      return list(self.source.__getitems__(keys))
    return [self.source[i] for i in keys]

  def epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yields this host's batches for one epoch.

    Args:
      epoch: the epoch number (selects the permutation).

    Yields:
      `transform(examples)`; plus a bool `mask` `[batch_size]` when
      `drop_remainder` is False (False on padding rows).
    """
    for idx in self.indices(epoch):
      real = idx >= 0
      # Padding rows repeat a real example so the transform sees valid data.
      filler = idx[real][0] if real.any() else 0
      batch = self.transform(self._read(np.where(real, idx, filler)))
      if not self.drop_remainder:
        batch = dict(batch, mask=real)
      yield batch

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches, epoch after epoch."""
    epoch = 0
    while True:
      yield from self.epoch(epoch)
      epoch += 1

  def __len__(self) -> int:
    return self.num_batches


def as_text(value: Any) -> str:
  """A stored text feature (bytes from TFDS, or str) as str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def text_lengths(source: Sequence[Example],
                 encode: Callable[[list[str]], Sequence[Sequence[int]]],
                 text_key: str = "text", chunk: int = 1024) -> np.ndarray:
  """Token counts of every example, the `lengths` for bucketing.

  Args:
    source: random-access examples with a text feature.
    encode: `list_of_texts -> list of token id sequences`.
    text_key: the text feature's key.
    chunk: texts encoded per call.

  Returns:
    int64 `[len(source)]`.
  """
  out = []
  for start in range(0, len(source), chunk):
    texts = [as_text(source[i][text_key])
             for i in range(start, min(start + chunk, len(source)))]
    out.extend(len(ids) for ids in encode(texts))
  return np.asarray(out, np.int64)


def text_transform(encode: Callable[[list[str]], Sequence[Sequence[int]]], *,
                   max_len: int = 64, multiple: int = 8, pad_id: int = 0,
                   text_key: str = "text", label_key: str = "label"
                   ) -> Transform:
  """Tokenizes a batch and pads it to its longest example (multiple of 8).

  Args:
    encode: `list_of_texts -> list of token id sequences`; it should
      truncate to `max_len` itself (keeping the final special token);
      longer sequences are cut here as a last resort.
    max_len: the longest padded length.
    multiple: padded lengths are multiples of this, so batches take few
      distinct shapes (each new shape is an XLA compile).
    pad_id: the padding token id.
    text_key: the text feature's key.
    label_key: the label feature's key.

  Returns:
    A transform giving int32 `input_ids`, `attention_mask` `[B, L]` and
    `label` `[B]`.
  """
  def fn(examples):
    ids = [list(x)[:max_len]
           for x in encode([as_text(e[text_key]) for e in examples])]
    length = pad_length(max(len(x) for x in ids), multiple, max_len)
    input_ids = np.full((len(ids), length), pad_id, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for row, x in enumerate(ids):
      input_ids[row, :len(x)] = x
      mask[row, :len(x)] = 1
    labels = np.asarray([e[label_key] for e in examples], np.int32)
    return {"input_ids": input_ids, "attention_mask": mask, "label": labels}
  return fn


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """CLIP-style preprocessing: bicubic resize of the shorter side, crop."""
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Resizing images needs Pillow: pip install pillow "
                      "(it also decodes TFDS images without TensorFlow)."
                      ) from e
  h, w = image.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  squeeze = image.shape[2] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((nw, nh), Image.Resampling.BICUBIC))
  top, left = (nh - size) // 2, (nw - size) // 2
  out = out[top:top + size, left:left + size]
  return out[..., None] if squeeze else out


def image_transform(size: int | None = None, channels: int | None = None,
                    mean: float | Sequence[float] = 0.0,
                    std: float | Sequence[float] = 1.0, *,
                    image_key: str = "image", label_key: str = "label"
                    ) -> Transform:
  """uint8 images -> normalized float32 `[B, H, W, C]` plus int32 labels.

  Args:
    size: if set, images that are not `size x size` are resized (shorter
      side, bicubic) and center-cropped to it, as CLIP preprocesses.
    channels: if 3, grayscale images are repeated to RGB (MNIST for CLIP);
      an alpha channel is dropped.
    mean: subtracted after scaling to [0, 1] (per channel or scalar).
    std: divided by after subtracting `mean`.
    image_key: the image feature's key.
    label_key: the label feature's key.

  Returns:
    A transform giving `image` float32 and `label` int32.
  """
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)

  def prepare(image):
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f"expected uint8 images, got {image.dtype} "
                       f"of shape {image.shape}.")
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 4:
      image = image[..., :3]
    if channels == 3 and image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    if size is not None and image.shape[:2] != (size, size):
      image = _resize_center_crop(image, size)
    return image

  def fn(examples):
    images = np.stack([prepare(e[image_key]) for e in examples])
    x = (images.astype(np.float32) / 255.0 - mean) / std
    labels = np.asarray([e[label_key] for e in examples], np.int32)
    return {"image": x.astype(np.float32), "label": labels}
  return fn
