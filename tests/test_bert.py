"""BERT encoder: real MiniLM embeddings, HF import parity, tokenizer, API.

References are independent of the Flax model: stored sentence-transformers
embeddings (tests/data/minilm_reference.json, produced with PyTorch), a
float64 NumPy BERT written from the paper and reading Hugging Face key
names directly, and (when installed) PyTorch transformers /
sentence-transformers themselves.
"""

import functools
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import scipy.special

from mtmerge import models
from mtmerge import tree as tree_lib
from mtmerge.models import bert
from mtmerge.models import convert
from mtmerge.models import hub
from mtmerge.models import tokenizer as tokenizer_lib

REF = os.path.join(os.path.dirname(__file__), "data", "minilm_reference.json")
TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=24,
            max_position_embeddings=32, type_vocab_size=2,
            layer_norm_eps=1e-12, hidden_act="gelu", model_type="bert")


@pytest.fixture(scope="module")
def minilm():
  return models.load("minilm")


@pytest.fixture(scope="module")
def reference():
  with open(REF) as f:
    return json.load(f)


# ----------------------------------------------------------------------------
# A tiny random checkpoint with Hugging Face key names, and a NumPy BERT.


def _hf_state(cfg, seed=0):
  """Random HF-named tensors (PyTorch layouts) for a BERT config dict."""
  rng = np.random.default_rng(seed)
  h, f = cfg["hidden_size"], cfg["intermediate_size"]
  r = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)
  sd = {"embeddings.word_embeddings.weight": r(cfg["vocab_size"], h),
        "embeddings.position_embeddings.weight":
            r(cfg["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": r(cfg["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": 1 + r(h),
        "embeddings.LayerNorm.bias": r(h),
        "embeddings.position_ids": np.arange(
            cfg["max_position_embeddings"])[None],
        "pooler.dense.weight": r(h, h), "pooler.dense.bias": r(h)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    for name, (o, n) in {"attention.self.query": (h, h),
                         "attention.self.key": (h, h),
                         "attention.self.value": (h, h),
                         "attention.output.dense": (h, h),
                         "intermediate.dense": (f, h),
                         "output.dense": (h, f)}.items():
      sd[p + name + ".weight"], sd[p + name + ".bias"] = r(o, n), r(o)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      sd[p + name + ".weight"], sd[p + name + ".bias"] = 1 + r(h), r(h)
  return sd


def _write_dir(path, cfg, sd):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  safetensors.numpy.save_file(sd, os.path.join(path, "model.safetensors"))
  return str(path)


def _np_bert(sd, cfg, ids, mask, types):
  """Float64 BERT forward from the equations (post-LN, erf GELU)."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  b, l = ids.shape
  h, nh = cfg["hidden_size"], cfg["num_attention_heads"]

  def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + cfg["layer_norm_eps"]) *
            sd[p + ".weight"] + sd[p + ".bias"])

  lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]
  x = (sd["embeddings.word_embeddings.weight"][ids] +
       sd["embeddings.position_embeddings.weight"][:l] +
       sd["embeddings.token_type_embeddings.weight"][types])
  x = ln(x, "embeddings.LayerNorm")
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    heads = lambda n: lin(x, p + "attention.self." + n).reshape(b, l, nh, -1)
    q, k, v = heads("query"), heads("key"), heads("value")
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(h // nh)
    s = s + np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ctx = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, l, h)
    x = ln(x + lin(ctx, p + "attention.output.dense"),
           p + "attention.output.LayerNorm")
    u = lin(x, p + "intermediate.dense")
    u = 0.5 * u * (1 + scipy.special.erf(u / np.sqrt(2)))
    x = ln(x + lin(u, p + "output.dense"), p + "output.LayerNorm")
  return x


@functools.partial(nnx.jit, static_argnames="deterministic")
def _apply(model, ids, mask, types=None, deterministic=None):
  # Jitted: eagerly, every op of the forward would compile on its own.
  return model(ids, mask, types, deterministic=deterministic)


def _batch(seed=1, b=3, l=10, vocab=50):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (b, l)).astype(np.int32)
  lengths = np.array([l, 4, 7][:b])
  mask = (np.arange(l)[None] < lengths[:, None]).astype(np.int32)
  types = (np.arange(l)[None] >= 2).astype(np.int32) * mask
  return ids, mask, types


# ----------------------------------------------------------------------------
# Real MiniLM against stored sentence-transformers embeddings.


def test_minilm_matches_stored_sentence_transformers(minilm, reference):
  model, tok = minilm
  got = models.embed(model, tok, reference["sentences"])
  want = np.asarray(reference["embeddings"], np.float32)
  assert got.shape == want.shape == (len(reference["sentences"]), 384)
  np.testing.assert_allclose(got, want, atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_a_sentence(minilm, reference):
  """Alone vs batched with a longer sentence: only the mask hides padding."""
  model, tok = minilm
  short, long = reference["sentences"][0], reference["sentences"][-1]
  alone = tok([short])
  both = tok([long, short])
  assert both["input_ids"].shape[1] > alone["input_ids"].shape[1]
  fwd = nnx.jit(lambda m, b: m(b["input_ids"], b["attention_mask"],
                               b["token_type_ids"]))
  h_alone = np.asarray(fwd(model, alone))[0]
  h_both = np.asarray(fwd(model, both))[1]
  n = int(alone["attention_mask"].sum())
  np.testing.assert_allclose(h_both[:n], h_alone[:n], atol=1e-5)
  e = models.embed(model, tok, [long, short, short])
  np.testing.assert_allclose(e[1], e[2], atol=1e-6)
  np.testing.assert_allclose(e[1], models.embed(model, tok, [short])[0],
                             atol=1e-5)


def test_minilm_parity_with_sentence_transformers(minilm):
  st = pytest.importorskip("sentence_transformers",
                           reason="optional parity check against PyTorch")
  model, tok = minilm
  texts = ["Merging task vectors.", "A cat sat on the mat, quietly.",
           "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
           " ".join(["word"] * 90), "?"]
  ref = st.SentenceTransformer(hub.minilm_dir(), device="cpu").encode(
      texts, normalize_embeddings=True)
  np.testing.assert_allclose(models.embed(model, tok, texts, max_length=256),
                             ref, atol=1e-4)


# ----------------------------------------------------------------------------
# Hugging Face import.


def test_hf_dir_matches_numpy_bert(tmp_path):
  sd = _hf_state(TINY)
  model, tok = models.load(_write_dir(tmp_path / "tiny", TINY, sd))
  assert tok is None  # no tokenizer.json in the directory
  ids, mask, types = _batch()
  want = _np_bert(sd, TINY, ids, mask, types)
  got = np.asarray(_apply(model, ids, mask, types))
  np.testing.assert_allclose(got, want, atol=1e-4)
  # token_type_ids default to zeros.
  np.testing.assert_allclose(np.asarray(_apply(model, ids, mask)),
                             _np_bert(sd, TINY, ids, mask, 0 * types),
                             atol=1e-4)


def test_hf_transformers_parity(tmp_path):
  torch = pytest.importorskip("torch", reason="optional PyTorch parity")
  transformers = pytest.importorskip("transformers",
                                     reason="optional PyTorch parity")
  torch.manual_seed(0)
  cfg = transformers.BertConfig(**{k: v for k, v in TINY.items()
                                   if k != "model_type"})
  ref = transformers.BertModel(cfg).eval()
  ref.save_pretrained(tmp_path, safe_serialization=True)
  model, _ = models.load(str(tmp_path))
  ids, mask, types = _batch()
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids, dtype=torch.long),
               attention_mask=torch.tensor(mask, dtype=torch.long),
               token_type_ids=torch.tensor(types, dtype=torch.long)
               ).last_hidden_state.numpy()
  got = np.asarray(_apply(model, ids, mask, types))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4)


def test_conversion_error_names_keys(tmp_path):
  sd = _hf_state(TINY)
  sd["encoder.layer.1.output.dense.weights"] = sd.pop(
      "encoder.layer.1.output.dense.weight")
  del sd["embeddings.LayerNorm.bias"]
  path = _write_dir(tmp_path / "bad", TINY, sd)
  with pytest.raises(convert.ConversionError) as e:
    models.load(path)
  msg = str(e.value)
  assert "1 unmapped key(s): encoder.layer.1.output.dense.weights" in msg
  assert ("2 model parameter(s) missing: embeddings/norm/bias, "
          "layers/1/mlp/output/kernel") in msg
  assert msg.startswith(path)


def test_shape_mismatch_is_named(tmp_path):
  sd = _hf_state(TINY)
  cfg = dict(TINY, intermediate_size=20)
  with pytest.raises(convert.ConversionError, match=r"layers/0/mlp/"
                     r"intermediate/kernel: \(16, 24\) vs model \(16, 20\)"):
    models.load(_write_dir(tmp_path / "bad", cfg, sd))


def test_unknown_names_list_known_ones(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="known names are.*minilm"):
    models.load("no-such-model")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(ValueError, match="unknown model name 'org/nothing'.*"
                     "all-MiniLM-L6-v2.*HF_HUB_OFFLINE"):
    models.load("org/nothing")
  path = _write_dir(tmp_path / "gpt", dict(TINY, model_type="gpt2"), {})
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
    models.load(path)
  with pytest.raises(ValueError, match="hidden_act 'relu'"):
    bert.BertConfig.from_hf_json(dict(TINY, hidden_act="relu"))


def test_dispatch_on_model_type(tmp_path, monkeypatch):
  """vit/clip directories go to those modules' load_dir (stubbed here)."""
  calls = []

  class Stub:
    @staticmethod
    def load_dir(path):  # no dtype argument: load() casts afterwards
      calls.append(path)
      return nnx.Linear(2, 3, rngs=nnx.Rngs(0)), "preprocessor"

  real_import = hub.importlib.import_module
  monkeypatch.setattr(hub.importlib, "import_module", lambda name: (
      Stub if name in ("mtmerge.models.vit", "mtmerge.models.clip")
      else real_import(name)))
  for model_type in ("vit", "clip", "clip_vision_model"):
    path = _write_dir(tmp_path / model_type, {"model_type": model_type}, {})
    model, pre = models.load(path, dtype=jnp.bfloat16)
    assert pre == "preprocessor" and calls[-1] == path
    assert model.kernel[...].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------
# Model API: parameter names, dropout modes, pure-dict params.


def test_parameter_paths_are_documented_names():
  model = nnx.eval_shape(lambda: bert.Bert(bert.BertConfig.from_hf_json(TINY)))
  _, params = models.split_params(model)
  flat = tree_lib.to_flat_dict(params)
  assert flat["embeddings/word/embedding"].shape == (50, 16)
  assert flat["layers/1/attention/query/kernel"].shape == (16, 16)
  assert flat["layers/0/mlp/intermediate/kernel"].shape == (16, 24)
  assert flat["layers/0/mlp_norm/scale"].shape == (16,)
  assert len(flat) == 5 + 2 * 16
  shapes = bert.param_shapes(bert.BertConfig.from_hf_json(TINY))
  assert set(flat) == set(shapes)
  arrays = {k: np.zeros(v, np.float32) for k, v in shapes.items()}
  arrays["layers/0/extra"] = arrays.pop("layers/0/mlp_norm/bias")
  with pytest.raises(ValueError, match=r"missing \['layers/0/mlp_norm/bias'\]"
                     r", not in the model \['layers/0/extra'\]"):
    bert.from_flat_params(bert.BertConfig.from_hf_json(TINY), arrays)


def test_dropout_train_eval_and_split_merge(tmp_path):
  sd = _hf_state(TINY)
  model, _ = models.load(_write_dir(tmp_path / "tiny", TINY, sd))
  ids, mask, types = _batch()
  want = _np_bert(sd, TINY, ids, mask, types)
  # A second load (same config, other weights) must not alias the first's.
  other, _ = models.load(_write_dir(tmp_path / "other", TINY, _hf_state(TINY,
                                                                          1)))
  assert not np.allclose(other.embeddings.word.embedding[...],
                         model.embeddings.word.embedding[...])
  model.train()
  a = np.asarray(_apply(model, ids, mask, types))
  b = np.asarray(_apply(model, ids, mask, types))
  assert np.abs(a - b).max() > 1e-2  # fresh dropout masks each call
  np.testing.assert_allclose(np.asarray(_apply(model, ids, mask, types,
                                               deterministic=True)),
                             want, atol=1e-4)
  model.eval()
  static, params = models.split_params(model)
  # Digit-string keys (as after a checkpoint round trip) are accepted.
  restored = tree_lib.from_flat_dict(tree_lib.to_flat_dict(params))
  np.testing.assert_allclose(np.asarray(_apply(
      models.merge_params(static, restored), ids, mask, types)), want,
                             atol=1e-4)
  doubled = jax.tree.map(lambda x: 2 * x, params)
  got = models.merge_params(static, doubled)
  np.testing.assert_allclose(
      tree_lib.to_flat_dict(nnx.to_pure_dict(nnx.state(got, nnx.Param)))[
          "layers/0/attention/out/bias"],
      2 * sd["encoder.layer.0.attention.output.dense.bias"], rtol=1e-6)
  del restored["layers"]["1"]["mlp"]
  restored["embeddings"]["word"]["embedding"] = jnp.zeros((3, 16))
  with pytest.raises(ValueError, match=r"4 missing: layers/1/mlp/inter.*"
                     r"embeddings/word/embedding \(3, 16\) vs \(50, 16\)"):
    models.merge_params(static, restored)


# ----------------------------------------------------------------------------
# Tokenizer.


def test_tokenizer_pads_to_multiple_and_truncates(minilm):
  _, tok = minilm
  out = tok(["hello world", "hello"])
  assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
  assert all(v.dtype == np.int32 and v.shape == (2, 8) for v in out.values())
  np.testing.assert_array_equal(out["input_ids"][0],
                                [101, 7592, 2088, 102, 0, 0, 0, 0])
  np.testing.assert_array_equal(out["attention_mask"].sum(1), [4, 3])
  assert tok(["hello world"], pad_to_multiple_of=1)["input_ids"].shape == (1, 4)
  long = " ".join(["hello"] * 300)
  t = tok([long, "hello"], max_length=20)  # cap at 20, not 24
  assert t["input_ids"].shape == (2, 20)
  assert t["input_ids"][0, -1] == 102 and t["attention_mask"][0].all()
  assert tok([long])["input_ids"].shape == (1, 128)  # default max_length
  pair = tok([("hello", "world")])
  np.testing.assert_array_equal(pair["token_type_ids"][0, :5], [0, 0, 0, 1, 1])
  with pytest.raises(TypeError, match=r"texts\[1\] is int"):
    tok(["ok", 3])
  with pytest.raises(FileNotFoundError, match="no tokenizer file"):
    tokenizer_lib.Tokenizer("/nonexistent/tokenizer.json")


def test_gelu_erf_form_matches_jax_exact_gelu():
  from mtmerge.models import ops
  x = jnp.linspace(-12.0, 12.0, 20001, dtype=jnp.float32)
  np.testing.assert_allclose(ops.gelu(x),
                             jax.nn.gelu(x, approximate=False), atol=2e-6,
                             rtol=1e-6)
  xb = x.astype(jnp.bfloat16)
  assert ops.gelu(xb).dtype == jnp.bfloat16
