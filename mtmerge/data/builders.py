"""TFDS builders for the offline suites, and a cache that checks itself.

Two `tfds.core.GeneratorBasedBuilder`s, one per suite, with one
BuilderConfig per task: `mtmerge_text/<task>` and `mtmerge_images/<task>`.
A suite shares its readers, features and split logic, so one builder class
per suite keeps them in one place, while per-task configs give every task
its own versioned directory, splits and `DatasetInfo`.

Splits are fixed by a seed: examples are grouped (by speech, movie, debate
statement, or image), groups are shuffled and dealt, class by class, to
`test`, then `validation`, until each holds its share; the rest is
`train`, subsampled to `max_train`. So no group straddles two splits and,
because duplicate texts are dropped first, no text appears in two splits.
The MNIST-5k variants share images, order, strata and seed, hence the same
split, so no test image of one variant is a training image of another.

Data is stored as `array_record` with `Tensor`, `ClassLabel` and `Text`
features, which prepare and read back through `as_data_source` without
TensorFlow (`tfds.features.Image` would need TF to encode). Images are
uint8 `[28, 28, 1]` (zlib-compressed records); conversion to float happens
in the input pipeline.

`load` prepares a task on first use into `default_data_dir()` (or a given
data dir) and, after preparation, writes a manifest with every file's size
and SHA-256 and every split's example count. Each later load checks the
manifest (and the packages' versions it was built from); a corrupted,
partial or stale cache is logged and rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import shutil
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from mtmerge.data import sources

log = logging.getLogger(__name__)

TEXT_BUILDER = "mtmerge_text"
IMAGE_BUILDER = "mtmerge_images"
MANIFEST = "mtmerge_manifest.json"
IMAGE_SHAPE = (28, 28, 1)


@dataclasses.dataclass(frozen=True)
class TaskDef:
  """How one offline task is made.

  Attributes:
    name: the task (and BuilderConfig) name.
    input_key: `text` or `image`.
    class_names: label index -> name.
    make: returns the task's `sources.RawTask`.
    raw: `sources.FILES` keys it reads (their versions are recorded).
    description: one line for the DatasetInfo.
    balance: downsample every class to the rarest one before splitting.
  """
  name: str
  input_key: str
  class_names: tuple[str, ...]
  make: Callable[[], sources.RawTask]
  raw: tuple[str, ...]
  description: str
  balance: bool = True


TEXT_TASKS = (
    TaskDef("sentiment", "text", ("rotten", "fresh"), sources.sentiment,
            ("rotten_tomatoes",), "Rotten Tomatoes review snippets."),
    TaskDef("subjectivity", "text", ("plot", "review"), sources.subjectivity,
            ("rotten_tomatoes",), "Plot-summary sentences vs reviews."),
    TaskDef("party", "text", ("democrat", "republican"), sources.party,
            ("political",), "2012 convention speech passages by party."),
    TaskDef("rnc_year", "text", ("2012", "2016"), sources.rnc_year,
            ("political", "rnc2016"),
            "Republican convention speech passages, 2012 vs 2016."),
    # Moderators say least, and balancing would leave ~270 training
    # examples: keep the natural mix (majority baseline 44%).
    TaskDef("debate_role", "text", sources.DEBATE_ROLES, sources.debate_role,
            ("debates",), "2016 debate passages by speaker role.",
            balance=False),
    # Word-level tasks (a few tokens each): lexicon classes in their
    # natural mix (balancing would cut word_domain to 8 x 41 words).
    TaskDef("moral_foundation", "text", sources.MORAL_FOUNDATIONS,
            sources.moral_foundation, ("mfd",),
            "Moral Foundations Dictionary 2.0 words by foundation.",
            balance=False),
    TaskDef("word_domain", "text",
            tuple(n for _, n in sources.INQUIRER_DOMAINS), sources.word_domain,
            ("inquirer",), "General Inquirer words by semantic domain.",
            balance=False),
    TaskDef("word_valence", "text", ("negative", "positive"),
            sources.word_valence, ("inquirer",),
            "General Inquirer words: negative vs positive valence."),
    TaskDef("concreteness", "text", ("abstract", "concrete"),
            sources.concreteness, ("whissell",),
            "Whissell's Dictionary of Affect words: abstract vs concrete."),
)
_DIGITS = tuple(str(i) for i in range(10))
IMAGE_TASKS = (
    TaskDef("mnist5k", "image", _DIGITS, sources.mnist5k, ("mnist5k",),
            "MNIST-5k digits."),
    TaskDef("mnist5k_rot90", "image", _DIGITS,
            functools.partial(sources.mnist5k, "rot90"), ("mnist5k",),
            "MNIST-5k rotated by 90 degrees."),
    TaskDef("mnist5k_inverted", "image", _DIGITS,
            functools.partial(sources.mnist5k, "inverted"), ("mnist5k",),
            "MNIST-5k with inverted intensities."),
    TaskDef("mnist5k_parity", "image", ("even", "odd"),
            functools.partial(sources.mnist5k, "parity"), ("mnist5k",),
            "Parity of the MNIST-5k digit."),
    TaskDef("digits28", "image", _DIGITS, sources.digits28, ("digits",),
            "scikit-learn 8x8 digits upsampled to 28x28."),
)
TASKS = {**{(TEXT_BUILDER, t.name): t for t in TEXT_TASKS},
         **{(IMAGE_BUILDER, t.name): t for t in IMAGE_TASKS}}


@dataclasses.dataclass(eq=False)
class SuiteConfig(tfds.core.BuilderConfig):
  """A task's BuilderConfig: split sizes and seed (part of the cache key)."""
  num_test: int = 500
  num_validation: int = 250
  max_train: int = 2000
  seed: int = 0


def split_indices(labels: np.ndarray, groups: Sequence[str], *,
                  num_test: int, num_validation: int, max_train: int,
                  seed: int, balance: bool) -> dict[str, np.ndarray]:
  """Deals whole groups to test, then validation, per class; rest is train.

  Each group is filed under its most common label, and each class fills
  its share of test and validation (proportional to its frequency), so
  splits keep the class mix even when groups are large (a speech is ~25
  passages of one party).

  Args:
    labels: `[N]` labels (or the strata to balance and stratify on).
    groups: `[N]` group keys.
    num_test: test examples wanted (whole groups: it may be a few more).
    num_validation: validation examples wanted.
    max_train: cap on train examples (a seeded subsample).
    seed: the seed of every random choice.
    balance: first downsample every class to the rarest class's count.

  Returns:
    `{split: sorted example indices}` for train, validation, test.
  """
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  keep = np.arange(len(labels))
  if balance:
    classes, counts = np.unique(labels, return_counts=True)
    keep = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(labels == c), counts.min(), replace=False)
        for c in classes]))
  unique, inverse = np.unique(np.asarray(groups)[keep], return_inverse=True)
  members = [[] for _ in unique]
  for i, g in enumerate(inverse):
    members[g].append(keep[i])
  major = np.array([np.bincount(labels[m]).argmax() for m in members])
  classes, counts = np.unique(labels[keep], return_counts=True)
  out = {"test": [], "validation": [], "train": []}
  for c, n_c in zip(classes, counts):
    quota = {"test": -(-num_test * n_c // len(keep)),
             "validation": -(-num_validation * n_c // len(keep))}
    filled = {"test": 0, "validation": 0}
    for g in rng.permutation(np.flatnonzero(major == c)):
      name = next((s for s in ("test", "validation")
                   if filled[s] < quota[s]), "train")
      out[name].extend(members[g])
      if name != "train":
        filled[name] += len(members[g])
  if len(out["train"]) > max_train:
    out["train"] = rng.choice(out["train"], max_train, replace=False)
  return {k: np.sort(np.asarray(v, np.int64)) for k, v in out.items()}


class _SuiteBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared code of the suite builders; subclasses set the configs."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  # Nothing is downloaded, so there are no URL checksums to look up (TFDS
  # would locate a checksums file through `importlib_resources`, which it
  # does not install).
  url_infos = None

  @property
  def task(self) -> TaskDef:
    base = self.builder_config.name.split(".")[0]
    return TASKS[(self.name, base)]

  def _info(self) -> tfds.core.DatasetInfo:
    task = self.task
    if task.input_key == "text":
      x = tfds.features.Text()
    else:
      x = tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8,
                               encoding=tfds.features.Encoding.ZLIB)
    return tfds.core.DatasetInfo(
        builder=self, description=task.description,
        features=tfds.features.FeaturesDict({
            task.input_key: x,
            "label": tfds.features.ClassLabel(names=list(task.class_names)),
            "group": tfds.features.Text(),
        }),
        supervised_keys=(task.input_key, "label"))

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is read from installed packages.
    task, cfg = self.task, self.builder_config
    raw = task.make()
    strata = raw.labels if raw.strata is None else raw.strata
    parts = split_indices(strata, raw.groups, num_test=cfg.num_test,
                          num_validation=cfg.num_validation,
                          max_train=cfg.max_train, seed=cfg.seed,
                          balance=task.balance)
    return {split: self._generate_examples(raw, idx)
            for split, idx in parts.items()}

  def _generate_examples(self, raw, indices):
    key = self.task.input_key
    for i in indices:
      yield int(i), {key: raw.inputs[i], "label": int(raw.labels[i]),
                     "group": raw.groups[i]}


def _configs(tasks):
  return [SuiteConfig(name=t.name, description=t.description) for t in tasks]


class MtmergeText(_SuiteBuilder):
  """Offline English text classification tasks (the `text` suite)."""
  BUILDER_CONFIGS = _configs(TEXT_TASKS)


class MtmergeImages(_SuiteBuilder):
  """Offline 28x28 digit classification tasks (the `images` suite)."""
  BUILDER_CONFIGS = _configs(IMAGE_TASKS)


_BUILDERS = {TEXT_BUILDER: MtmergeText, IMAGE_BUILDER: MtmergeImages}


class CacheError(RuntimeError):
  """A prepared dataset that fails verification after a rebuild."""


def default_data_dir() -> str:
  """`$MTMERGE_CACHE/tfds` if set, else `~/.cache/mtmerge/tfds`."""
  base = os.environ.get("MTMERGE_CACHE")
  if base:
    return os.path.join(os.path.expanduser(base), "tfds")
  return os.path.expanduser(os.path.join("~", ".cache", "mtmerge", "tfds"))


def _parse(tfds_name: str) -> tuple[type[_SuiteBuilder], TaskDef]:
  builder_name, _, task = tfds_name.partition("/")
  if builder_name not in _BUILDERS:
    raise KeyError(f"unknown offline builder {builder_name!r} in "
                   f"{tfds_name!r}; known: {sorted(_BUILDERS)}")
  if (builder_name, task) not in TASKS:
    known = [t for b, t in TASKS if b == builder_name]
    raise KeyError(f"unknown task {task!r} of {builder_name}; known: {known}")
  return _BUILDERS[builder_name], TASKS[(builder_name, task)]


def make_config(tfds_name: str, **overrides: int) -> SuiteConfig:
  """A task's BuilderConfig, with split sizes or seed overridden.

  Args:
    tfds_name: `mtmerge_text/<task>` or `mtmerge_images/<task>`.
    **overrides: `num_test`, `num_validation`, `max_train`, `seed`. A
      non-default config gets its own name (`party.max_train500`), hence
      its own cache directory.

  Returns:
    The SuiteConfig.
  """
  cls, task = _parse(tfds_name)
  base = cls.builder_configs[task.name]
  allowed = ("num_test", "num_validation", "max_train", "seed")
  bad = sorted(set(overrides) - set(allowed))
  if bad:
    raise TypeError(f"unknown config fields {bad}; allowed: {list(allowed)}")
  changed = {k: int(v) for k, v in sorted(overrides.items())
             if int(v) != getattr(base, k)}
  if not changed:
    return base
  suffix = ".".join(f"{k}{v}" for k, v in changed.items())
  return dataclasses.replace(base, name=f"{task.name}.{suffix}", **changed)


def _version_dir(data_dir: str, builder_name: str, config: SuiteConfig):
  return os.path.join(data_dir, builder_name, config.name,
                      str(_BUILDERS[builder_name].VERSION))


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(functools.partial(f.read, 1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _listing(path: str) -> dict[str, os.stat_result]:
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      if rel != MANIFEST:
        out[rel] = os.stat(full)
  return out


def _expected(builder_name: str, config: SuiteConfig) -> dict[str, Any]:
  task = TASKS[(builder_name, config.name.split(".")[0])]
  return {"config": {k: getattr(config, k) for k in (
              "name", "num_test", "num_validation", "max_train", "seed")},
          "version": str(_BUILDERS[builder_name].VERSION),
          "sources": {k: sources.version(k) for k in task.raw}}


# Paths whose files were hashed in this process: path -> stat signature.
_VERIFIED: dict[str, tuple] = {}


def _signature(listing):
  return tuple(sorted((k, s.st_size, s.st_mtime_ns) for k, s in
                      listing.items()))


def verify(path: str, expected: dict[str, Any]) -> str | None:
  """Why the prepared dataset at `path` cannot be used, or None if it can.

  Args:
    path: the dataset's version directory.
    expected: config, version and source versions it must have been built
      with.

  Returns:
    None, or a reason (missing, partial, stale, corrupted file).
  """
  if not os.path.isdir(path):
    return "not prepared"
  try:
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
      manifest = json.load(f)
  except FileNotFoundError:
    return "no manifest: preparation did not finish"
  except (OSError, ValueError) as e:
    return f"unreadable manifest ({e})"
  for key, value in expected.items():
    if manifest.get(key) != value:
      return f"stale: built with {key}={manifest.get(key)}, need {value}"
  listing = _listing(path)
  files = manifest.get("files", {})
  if set(listing) != set(files):
    missing = sorted(set(files) - set(listing))
    extra = sorted(set(listing) - set(files))
    return f"files differ from the manifest (missing {missing}, extra {extra})"
  if _VERIFIED.get(path) == _signature(listing):
    return None
  for rel, meta in files.items():
    if listing[rel].st_size != meta["size"]:
      return (f"{rel} has {listing[rel].st_size} bytes, the manifest says "
              f"{meta['size']}")
    if _sha256(os.path.join(path, rel)) != meta["sha256"]:
      return f"{rel} fails its SHA-256 checksum"
  _VERIFIED[path] = _signature(listing)
  return None


@contextlib.contextmanager
def _lock(data_dir: str):
  """An exclusive lock on the data dir (hosts sharing one file system)."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".mtmerge.lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _write_manifest(builder, expected, seconds):
  path = builder.data_dir
  manifest = dict(expected)
  manifest["splits"] = {k: int(v.num_examples)
                        for k, v in builder.info.splits.items()}
  manifest["prepare_seconds"] = round(seconds, 3)
  manifest["files"] = {rel: {"size": st.st_size,
                             "sha256": _sha256(os.path.join(path, rel))}
                       for rel, st in sorted(_listing(path).items())}
  tmp = os.path.join(path, f".{MANIFEST}.tmp{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(path, MANIFEST))
  _VERIFIED[path] = _signature(_listing(path))
  return manifest


def prepare(tfds_name: str, data_dir: str | None = None,
            **overrides: int) -> tfds.core.DatasetBuilder:
  """Prepares an offline task once; verifies (and if needed rebuilds) it.

  Args:
    tfds_name: `mtmerge_text/<task>` or `mtmerge_images/<task>`.
    data_dir: the TFDS data dir; default `default_data_dir()`.
    **overrides: config fields, see `make_config`.

  Returns:
    The prepared builder (read it with `builder.as_data_source(split)`).

  Raises:
    CacheError: the freshly built dataset fails verification.
  """
  import time  # pylint: disable=g-import-not-at-top
  cls, _ = _parse(tfds_name)
  config = make_config(tfds_name, **overrides)
  data_dir = os.path.abspath(data_dir or default_data_dir())
  path = _version_dir(data_dir, cls.name, config)
  expected = _expected(cls.name, config)
  with _lock(data_dir):
    reason = verify(path, expected)
    if reason is None:
      return cls(config=config, data_dir=data_dir, file_format="array_record")
    if reason != "not prepared":
      log.warning("Rebuilding %s/%s at %s: %s", cls.name, config.name, path,
                  reason)
      shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    builder = cls(config=config, data_dir=data_dir,
                  file_format="array_record")
    # TFDS prints "Downloading and preparing ..." and progress bars although
    # nothing is downloaded: keep them out of the user's log.
    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(io.StringIO()) as said:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              compute_stats=tfds.download.ComputeStatsMode.SKIP))
    log.debug("TFDS: %s", said.getvalue().strip())
    manifest = _write_manifest(builder, expected, time.perf_counter() - start)
    log.info("Prepared %s/%s in %.1f s: %s", cls.name, config.name,
             manifest["prepare_seconds"], manifest["splits"])
    reason = verify(path, expected)
    if reason is not None:
      raise CacheError(f"{path} fails verification right after preparation: "
                       f"{reason}")
    return builder


def manifest(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """The manifest written when `builder`'s dataset was prepared."""
  with open(os.path.join(builder.data_dir, MANIFEST), encoding="utf-8") as f:
    return json.load(f)


def load(tfds_name: str, split: str, data_dir: str | None = None,
         **overrides: int) -> Sequence[dict[str, Any]]:
  """A random-access source of an offline task's split (prepared if needed).

  Args:
    tfds_name: `mtmerge_text/<task>` or `mtmerge_images/<task>`.
    split: `train`, `validation` or `test`.
    data_dir: the TFDS data dir; default `default_data_dir()`.
    **overrides: config fields, see `make_config`.

  Returns:
    The `tfds` array_record data source: examples are dicts of numpy
    values; texts come back as bytes (`pipeline.as_text` decodes them).
  """
  builder = prepare(tfds_name, data_dir, **overrides)
  counts = manifest(builder)["splits"]
  if split not in counts:
    raise KeyError(f"{tfds_name} has no split {split!r}; splits: "
                   f"{sorted(counts)}")
  source = builder.as_data_source(split=split)
  if len(source) != counts[split]:
    raise CacheError(f"{tfds_name}[{split}] has {len(source)} examples, the "
                     f"manifest says {counts[split]}")
  return source
