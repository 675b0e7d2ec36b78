"""configs/clip_vit.py end to end, offline.

A fake Hugging Face cache in tmp_path is laid out like the real
repositories (`models--openai--clip-vit-base-patch32/snapshots/<rev>/` with
config.json, model.safetensors, tokenizer.json; `models--tanganke--
clip-vit-base-patch32_<task>/...` with vision-only checkpoints) and holds
tiny random CLIPs written as HF state dicts (PyTorch key names and
layouts); TFDS's mock_data stands in for the datasets.
"""

import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers
from safetensors import numpy as st_numpy
from tensorflow_datasets.core.data_sources import array_record

from configs import clip_vit
from mtmerge import benchmark
from mtmerge import benchmark_learned
from mtmerge import encoders
from mtmerge import heads as heads_lib
from mtmerge.data import suites
from mtmerge.models import zeroshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "openai/clip-vit-base-patch32"
V = dict(image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=1,
         num_attention_heads=2, intermediate_size=32, hidden_act="quick_gelu")
T = dict(max_position_embeddings=16, hidden_size=16, num_hidden_layers=1,
         num_attention_heads=2, intermediate_size=32, hidden_act="quick_gelu")
PROJ = 8


def _vocab():
  texts = [t.format(c) for task in ("mnist", "eurosat")
           for t in zeroshot.TEMPLATES[task] for c in zeroshot.CLASSNAMES[task]]
  words = sorted({w for s in texts for w in re.findall(r"\w+|[^\w\s]+", s)})
  return {w: i for i, w in enumerate(["<unk>", "<|startoftext|>"] + words +
                                     ["<|endoftext|>"])}


def _tokenizer(vocab) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<|startoftext|> $A <|endoftext|>",
      special_tokens=[("<|startoftext|>", 1),
                      ("<|endoftext|>", len(vocab) - 1)])
  return tok


def _tower(prefix, c, rng, layers=None):
  """HF tensors of one encoder stack (PyTorch layouts: Linear [out, in])."""
  d, m = c["hidden_size"], c["intermediate_size"]
  out = {}
  for i in range(layers or c["num_hidden_layers"]):
    p = f"{prefix}.encoder.layers.{i}."
    for ln in ("layer_norm1", "layer_norm2"):
      out[p + ln + ".weight"] = 1 + 0.1 * rng.standard_normal(d)
      out[p + ln + ".bias"] = 0.1 * rng.standard_normal(d)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      out[p + f"self_attn.{proj}.weight"] = 0.3 * rng.standard_normal((d, d))
      out[p + f"self_attn.{proj}.bias"] = 0.1 * rng.standard_normal(d)
    out[p + "mlp.fc1.weight"] = 0.3 * rng.standard_normal((m, d))
    out[p + "mlp.fc1.bias"] = 0.1 * rng.standard_normal(m)
    out[p + "mlp.fc2.weight"] = 0.3 * rng.standard_normal((d, m))
    out[p + "mlp.fc2.bias"] = 0.1 * rng.standard_normal(d)
  return out


def _vision(rng, v=V):
  d, p = v["hidden_size"], v["patch_size"]
  n = (v["image_size"] // p) ** 2 + 1
  out = _tower("vision_model", v, rng)
  out.update({
      "vision_model.embeddings.class_embedding": rng.standard_normal(d),
      "vision_model.embeddings.patch_embedding.weight":
          0.1 * rng.standard_normal((d, 3, p, p)),
      "vision_model.embeddings.position_embedding.weight":
          0.1 * rng.standard_normal((n, d))})
  for ln in ("pre_layrnorm", "post_layernorm"):
    out[f"vision_model.{ln}.weight"] = 1 + 0.1 * rng.standard_normal(d)
    out[f"vision_model.{ln}.bias"] = 0.1 * rng.standard_normal(d)
  return out


def _clip(rng, vocab_size):
  out = _vision(rng)
  out.update(_tower("text_model", T, rng))
  d = T["hidden_size"]
  out.update({
      "text_model.embeddings.token_embedding.weight":
          rng.standard_normal((vocab_size, d)),
      "text_model.embeddings.position_embedding.weight":
          0.1 * rng.standard_normal((T["max_position_embeddings"], d)),
      "text_model.final_layer_norm.weight": np.ones(d),
      "text_model.final_layer_norm.bias": np.zeros(d),
      "visual_projection.weight": rng.standard_normal((PROJ, V["hidden_size"])),
      "text_projection.weight": rng.standard_normal((PROJ, d)),
      "logit_scale": np.asarray(np.log(50.0))})
  return out


def _write_repo(cache, repo, config, tensors, tokenizer=None, rev="0" * 40):
  """One repository in the hub cache's layout: refs/main + snapshots/<rev>."""
  root = cache / ("models--" + repo.replace("/", "--"))
  snap = root / "snapshots" / rev
  snap.mkdir(parents=True)
  (root / "refs").mkdir()
  (root / "refs" / "main").write_text(rev)
  (snap / "config.json").write_text(json.dumps(config))
  st_numpy.save_file({k: np.asarray(v, np.float32) for k, v in
                      tensors.items()}, str(snap / "model.safetensors"))
  if tokenizer is not None:
    tokenizer.save(str(snap / "tokenizer.json"))
  return snap


def fake_cache(cache, tasks, bad=None):
  """The pretrained CLIP and one fine-tuned vision tower per task.

  `bad`: task -> "shape" (a wider model) or "keys" (not a CLIP at all).
  """
  rng = np.random.default_rng(0)
  vocab = _vocab()
  sd = _clip(rng, len(vocab))
  config = {"model_type": "clip", "projection_dim": PROJ,
            "vision_config": V,
            "text_config": dict(T, vocab_size=len(vocab),
                                eos_token_id=len(vocab) - 1)}
  _write_repo(cache, MODEL, config, sd, _tokenizer(vocab))
  vis = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
  for task, repo in clip_vit.task_models(MODEL, tasks).items():
    kind = (bad or {}).get(task)
    tensors = {k: v + 0.05 * rng.standard_normal(np.shape(v))
               for k, v in vis.items()}
    cfg = dict(V, model_type="clip_vision_model")
    if kind == "shape":
      cfg = dict(cfg, hidden_size=24)
      tensors = _vision(rng, cfg)
    elif kind == "keys":
      tensors = {"bert.embeddings.word_embeddings.weight": np.zeros((4, 4))}
    _write_repo(cache, repo, cfg, tensors)


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  # TFDS 4.9's mock sets `__getitems__` on a MagicMock without binding
  # `self`; read one by one (as tests/test_data.py does).
  monkeypatch.setattr(
      array_record.ArrayRecordDataSource, "__getitems__",
      lambda self, keys: [self[k] for k in keys])
  (tmp_path / "hub").mkdir()
  return tmp_path / "hub"


def _accuracy(encoder, params, head, task):
  """Test accuracy recomputed directly: features @ head, argmax."""
  src = suites.load_split(task, "test")
  n = min(len(src), 16)
  images = encoder.tokenizer(np.stack(
      [np.asarray(src[i]["image"]) for i in range(n)]))
  feats = np.asarray(jax.jit(encoder.features)(params, {"image": images}))
  labels = np.asarray([src[i]["label"] for i in range(n)])
  return 100 * np.mean(np.argmax(feats @ head["kernel"], 1) == labels)


def test_clip_config_runs_end_to_end_offline(offline_env, tmp_path, capsys):
  config = clip_vit.get_config("runlocal")
  assert config.tasks == ["mnist", "eurosat"]
  # Budget: one merge of each kind (one model; one model per task) and the
  # learned row; the other methods' kernels are tested elsewhere.
  config.methods = [m for m in config.methods
                    if m["method"] in ("task_arithmetic", "emr_merging")]
  fake_cache(offline_env, config.tasks)
  with tfds.testing.mock_data(num_examples=200):
    out = benchmark.run(config, str(tmp_path / "run"))
    printed = capsys.readouterr().out
    enc = encoders.load(MODEL)
    # The zero-shot head: CLIP's own scale exp(logit_scale) = 50 on unit
    # class vectors built from the papers' templates.
    head = heads_lib.zeroshot_head(enc, "eurosat", None)
    np.testing.assert_allclose(np.linalg.norm(head["kernel"], axis=0), 50.0,
                               rtol=1e-5)
    rows = {r["method"]: r for r in out["rows"]}
    assert list(rows) == ["zero-shot", "individual", "task_arithmetic",
                          "emr_merging", "adamerging(layer)"]
    for task in config.tasks:
      h = heads_lib.zeroshot_head(enc, task, None)
      assert rows["zero-shot"][task] == pytest.approx(
          _accuracy(enc, enc.params, h, task), abs=0.01)
      # "individual" is the published checkpoint itself, not fine-tuned.
      snap = (offline_env / ("models--tanganke--clip-vit-base-patch32_" +
                             task) / "snapshots" / ("0" * 40))
      tuned = encoders.load(str(snap))
      params = encoders.join(
          {k: v for k, v in encoders.split(enc.params, ".*")[0].items()
           if not k.startswith("vision/")},
          encoders.split(tuned.params, "vision/.*")[0])
      assert rows["individual"][task] == pytest.approx(
          _accuracy(enc, params, h, task), abs=0.01)
  assert rows["individual"]["norm"] == pytest.approx(100.0)
  assert not (tmp_path / "run" / "finetune").exists()
  assert "fine-tuning skipped" in printed
  assert "published average accuracy" in printed and "69.1" in printed
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["config"]["task_models"]["mnist"] == (
      "tanganke/clip-vit-base-patch32_mnist")


def test_missing_model_stops_in_seconds_with_one_line(tmp_path):
  env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty"),
             HF_HUB_OFFLINE="1", TFDS_DATA_DIR=str(tmp_path / "tfds"),
             PYTHONPATH=REPO)
  t0 = time.time()
  p = subprocess.run(
      [sys.executable, "-m", "mtmerge.main", "--config",
       "configs/clip_vit.py:runlocal", "--workdir", str(tmp_path / "w")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2, p.stderr[-2000:]
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert "'openai/clip-vit-base-patch32'" in lines[0]
  assert "HF_HUB_OFFLINE" in lines[0]
  assert time.time() - t0 < 60


def test_missing_task_model_or_dataset_is_named(offline_env, tmp_path,
                                                monkeypatch):
  config = clip_vit.get_config("runlocal")
  fake_cache(offline_env, ["mnist"])
  with pytest.raises(benchmark.ConfigError, match=r"task model for 'eurosat'"
                     r".*tanganke/clip-vit-base-patch32_eurosat"):
    benchmark.run(config, str(tmp_path / "w"))
  fake_cache(tmp_path / "hub2", config.tasks)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub2"))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  with pytest.raises(benchmark.ConfigError, match=r"'mnist'.*not prepared"):
    benchmark.run(config, str(tmp_path / "w"))  # no mock data: no datasets
  snap = lambda repo: next((tmp_path / "hub2" / (
      "models--" + repo.replace("/", "--")) / "snapshots").iterdir())
  (snap(config.task_models["eurosat"]) / "model.safetensors").unlink()
  with pytest.raises(benchmark.ConfigError, match=r"clip-vit-base-patch32_"
                     r"eurosat.*has no model.safetensors"):
    benchmark.run(config, str(tmp_path / "w"))
  (snap(MODEL) / "tokenizer.json").unlink()
  with pytest.raises(benchmark.ConfigError, match=r"'openai/clip-vit-base-"
                     r"patch32'.*no tokenizer.json"):
    benchmark.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


@pytest.mark.parametrize("bad,match", [
    ("shape", r"clip-vit-base-patch32_eurosat.*does not match the model "
              r"'openai/clip-vit-base-patch32'.*shape mismatch"),
    ("keys", r"clip-vit-base-patch32_eurosat.*unmapped key.*bert"),
])
def test_checkpoint_that_does_not_fit_is_named(offline_env, tmp_path, bad,
                                               match):
  config = clip_vit.get_config("runlocal")
  fake_cache(offline_env, config.tasks, bad={"eurosat": bad})
  with tfds.testing.mock_data(num_examples=200):
    with pytest.raises(benchmark.ConfigError, match=match):
      benchmark.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "learned").exists()


def test_bad_task_and_task_sets(offline_env, tmp_path):
  config = clip_vit.get_config("runlocal")
  config.tasks = ["mnist", "no_such_task"]
  with pytest.raises(benchmark.ConfigError, match="no_such_task"):
    benchmark.run(config, str(tmp_path / "w"))
  config = clip_vit.get_config("tasks=14")
  with pytest.raises(benchmark.ConfigError, match=r"1 task\(s\) not in any "
                     r"suite.*: fer2013 \(known"):
    benchmark.run(config, str(tmp_path / "w"))
  config = clip_vit.get_config("tasks=20")
  with pytest.raises(benchmark.ConfigError, match=r"3 task\(s\) not in any "
                     r"suite.*: fer2013, emnist_letters, rendered-sst2 \("):
    benchmark.run(config, str(tmp_path / "w"))
  assert config.task_models["oxford_iiit_pet"] == (
      "tanganke/clip-vit-base-patch32_oxford-iiit-pet")
  # The registered extra tasks have prompts for every class.
  for t in suites.get_suite("clip20"):
    names, templates = heads_lib.task_prompts(t)
    assert len(names) == t.num_classes and templates == (
        zeroshot.TEMPLATES[t.name])
  assert len(zeroshot.TEMPLATES["cifar100"]) == 18
  with pytest.raises(ValueError, match="model='B/8'"):
    clip_vit.get_config("model=B/8")
  c = clip_vit.get_config("model=L/14,tasks=8")
  assert c.model == "openai/clip-vit-large-patch14" and len(c.tasks) == 8
  assert c.task_models["cars"] == (
      "tanganke/clip-vit-large-patch14_stanford-cars")
  assert not c.published  # the published numbers are for ViT-B/32
  # Every method string, grid and training option of the full config is
  # valid (what `benchmark.run` checks before any work).
  c = clip_vit.get_config("model=B/32")
  assert len(benchmark._method_entries(c)) == len(clip_vit.METHODS)
  learned = benchmark_learned.entries(c, benchmark.ConfigError)
  assert [e[0] for e in learned][:3] == ["adamerging(task)",
                                         "adamerging++(task)",
                                         "adamerging(layer)"]
  labels = {"zero-shot", "individual"} | {e[0] for e in learned} | {
      e[0] for e in benchmark._method_entries(c)}
  assert set(c.published) <= labels  # every published number has a row
  # Learned results are cached per task-model set, not reused across sets.
  other = clip_vit.get_config("model=B/32")
  other.task_models["mnist"] = "org/other_mnist"
  assert benchmark_learned._key(other) != benchmark_learned._key(c)
  assert c.published["task_arithmetic"].to_dict() == dict(paper=69.1,
                                                       fusionbench=68.0)
