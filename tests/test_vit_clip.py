"""ViT/CLIP models, their converters, zero-shot heads and preprocessing.

The first half needs only JAX (runs in CI). The parity tests at the end
build tiny random Hugging Face models with torch + transformers, save them
with `save_pretrained` and check that `load_dir` reproduces PyTorch's
outputs; they are skipped when torch/transformers are not installed.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtmerge.models import clip
from mtmerge.models import convert
from mtmerge.models import convert_open_clip
from mtmerge.models import image_preprocess
from mtmerge.models import vit
from mtmerge.models import zeroshot

VISION = clip.VisionConfig(image_size=32, patch_size=8, hidden_size=32,
                           num_layers=2, num_heads=4, mlp_dim=64)
TEXT = clip.TextConfig(vocab_size=50, max_len=12, hidden_size=24,
                       num_layers=2, num_heads=3, mlp_dim=48, eos_token_id=49)
TINY = clip.CLIPConfig(vision=VISION, text=TEXT, projection_dim=16)
TINY_VIT = vit.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                         num_layers=2, num_heads=4, mlp_dim=64)


def _random(make, seed=0):
  """`make()`'s module with N(0, 0.3) params drawn in NumPy.

  Cheaper than the modules' own JAX initializers, whose many small random
  ops each compile on first use.
  """
  rng = np.random.default_rng(seed)
  shapes = vit.param_shapes(make)
  flat = {k: (rng.normal(0, 0.3, s) + (k.endswith("scale") and s != ()))
          .astype(np.float32) for k, s in shapes.items()}
  return vit.from_flat(make, flat)


# One jitted function per call kind; models of one config share the cache.
_image = nnx.jit(lambda m, x: m.encode_image(x))
_text = nnx.jit(lambda m, i, a=None: m.encode_text(i, a))
_towers = nnx.jit(lambda m, x, i, a: (m.vision(x), m.text(i, a)))


def _flat(model):
  return {"/".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _images(n=3, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def _ids():
  # Two prompts of different length, EOS (49) then padding (0).
  ids = np.array([[1, 5, 7, 9, 49, 0, 0, 0], [1, 3, 4, 49, 0, 0, 0, 0]],
                 np.int32)
  return jnp.asarray(ids), jnp.asarray((np.cumsum(ids == 49, 1) -
                                        (ids == 49) == 0).astype(np.int32))


# -- Hand-written inverses of the converters (HF / open_clip names). --------

_HF_BLOCK = {"ln1": "layer_norm1", "ln2": "layer_norm2",
             "attn/query": "self_attn.q_proj", "attn/key": "self_attn.k_proj",
             "attn/value": "self_attn.v_proj",
             "attn/out": "self_attn.out_proj", "mlp/fc1": "mlp.fc1",
             "mlp/fc2": "mlp.fc2"}
_HF_TOP = {"vision/cls_token": "vision_model.embeddings.class_embedding",
           "vision/pos_embed":
               "vision_model.embeddings.position_embedding.weight",
           "text/pos_embed": "text_model.embeddings.position_embedding.weight",
           "text/token_embed/embedding":
               "text_model.embeddings.token_embedding.weight",
           "logit_scale": "logit_scale"}
_HF_LN = {"vision/pre_ln": "vision_model.pre_layrnorm",
          "vision/post_ln": "vision_model.post_layernorm",
          "text/final_ln": "text_model.final_layer_norm"}


def _to_hf(flat):
  """Flax CLIP params -> HF CLIPModel state dict (PyTorch layouts)."""
  out = {}
  for path, a in flat.items():
    if path in _HF_TOP:
      out[_HF_TOP[path]] = a
    elif path == "vision/patch_embed/kernel":
      out["vision_model.embeddings.patch_embedding.weight"] = a.transpose(
          3, 2, 0, 1)
    elif path.endswith("projection/kernel"):
      out[path.split("/")[0] + ".weight"] = a.T
    elif path.rsplit("/", 1)[0] in _HF_LN:
      kind = {"scale": "weight", "bias": "bias"}[path.rsplit("/", 1)[1]]
      out[_HF_LN[path.rsplit("/", 1)[0]] + "." + kind] = a
    else:
      tower, _, i, mod1, *rest = path.split("/")
      mod = mod1 if mod1.startswith("ln") else mod1 + "/" + rest[0]
      leaf = path.rsplit("/", 1)[1]
      kind = "bias" if leaf == "bias" else "weight"
      prefix = {"vision": "vision_model", "text": "text_model"}[tower]
      out[f"{prefix}.encoder.layers.{i}.{_HF_BLOCK[mod]}.{kind}"] = (
          a.T if leaf == "kernel" else a)
  return out


def _to_open_clip(hf):
  """HF CLIPModel state dict -> open_clip names (q/k/v packed)."""
  out = {}
  for k, a in hf.items():
    k2 = (k.replace("vision_model.encoder.layers.", "visual.transformer."
                    "resblocks.")
          .replace("text_model.encoder.layers.", "transformer.resblocks.")
          .replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
          .replace("self_attn.out_proj", "attn.out_proj")
          .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
    k2 = {"vision_model.embeddings.class_embedding": "visual.class_embedding",
          "vision_model.embeddings.position_embedding.weight":
              "visual.positional_embedding",
          "vision_model.embeddings.patch_embedding.weight":
              "visual.conv1.weight",
          "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
          "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
          "vision_model.post_layernorm.weight": "visual.ln_post.weight",
          "vision_model.post_layernorm.bias": "visual.ln_post.bias",
          "text_model.embeddings.token_embedding.weight":
              "token_embedding.weight",
          "text_model.embeddings.position_embedding.weight":
              "positional_embedding",
          "text_model.final_layer_norm.weight": "ln_final.weight",
          "text_model.final_layer_norm.bias": "ln_final.bias"}.get(k2, k2)
    if k2 == "visual_projection.weight":
      out["visual.proj"] = a.T
    elif k2 == "text_projection.weight":
      out["text_projection"] = a.T
    elif ".self_attn.q_proj." in k2:
      kind = k2.rsplit(".", 1)[1]
      parts = [hf[k.replace("q_proj", p)] for p in ("q_proj", "k_proj",
                                                     "v_proj")]
      out[k2.split(".self_attn")[0] + ".attn.in_proj_" + kind] = (
          np.concatenate(parts, axis=0))
    elif ".self_attn." not in k2:
      out[k2] = a
  out["attn_mask"] = np.zeros((12, 12), np.float32)  # buffer, ignored
  return out


# -- JAX-only tests. ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip():
  return _random(lambda: clip.CLIP(TINY, rngs=nnx.Rngs(0)))


def test_param_paths_are_readable_and_vision_only_is_a_subset(tiny_clip):
  flat = _flat(tiny_clip)
  for p in ("vision/layers/1/attn/query/kernel", "vision/patch_embed/kernel",
            "text/layers/0/mlp/fc1/kernel", "text/token_embed/embedding",
            "visual_projection/kernel", "logit_scale", "vision/post_ln/scale"):
    assert p in flat, p
  assert flat["vision/layers/1/attn/query/kernel"].shape == (32, 32)
  vis = _random(lambda: clip.CLIP(clip.CLIPConfig(
      vision=VISION, text=None, projection_dim=None), rngs=nnx.Rngs(1)), 1)
  vis_paths = set(_flat(vis))
  assert vis_paths == {p for p in flat if p.startswith("vision/")}
  # Fine-tuned vision weights drop into a full model by path.
  full = _random(lambda: clip.CLIP(TINY, rngs=nnx.Rngs(0)))
  nnx.update(full.vision, nnx.state(vis.vision))
  np.testing.assert_array_equal(_flat(full)["vision/pos_embed"],
                                _flat(vis)["vision/pos_embed"])
  with pytest.raises(ValueError, match="vision-only"):
    vis.encode_text(_ids()[0])


def test_jitted_forward_is_finite_and_deterministic(tiny_clip):
  ids, mask = _ids()
  fwd = nnx.jit(lambda m, x, i, a: m(x, i, a))
  out1 = fwd(tiny_clip, _images(), ids, mask)
  out2 = fwd(tiny_clip, _images(), ids, mask)
  assert out1.logits_per_image.shape == (3, 2)
  assert np.all(np.isfinite(out1.logits_per_image))
  np.testing.assert_array_equal(out1.logits_per_image, out2.logits_per_image)
  np.testing.assert_allclose(np.linalg.norm(out1.image_embeds, axis=-1), 1,
                             rtol=1e-5)
  np.testing.assert_allclose(out1.image_embeds * np.linalg.norm(
      _image(tiny_clip, _images()), axis=-1, keepdims=True),
                             _image(tiny_clip, _images()), rtol=1e-4,
                             atol=1e-5)


def test_text_is_causal_and_pools_at_eos(tiny_clip):
  ids, mask = _ids()
  text = lambda i: _towers(tiny_clip, _images(), i, mask)[1]
  hidden, pooled = text(ids)
  np.testing.assert_array_equal(pooled, hidden[jnp.arange(2), [4, 3]])
  # Tokens after EOS cannot change the pooled feature (causal mask).
  ids2 = ids.at[:, 6].set(7)
  np.testing.assert_allclose(text(ids2)[1], pooled, atol=1e-6)
  # ...but a token before it does.
  ids3 = ids.at[:, 1].set(8)
  assert not np.allclose(text(ids3)[1], pooled, atol=1e-4)


def test_hf_converter_round_trip_and_errors(tiny_clip):
  flat = _flat(tiny_clip)
  hf = _to_hf(flat)
  hf["text_model.embeddings.position_ids"] = np.arange(12)[None]
  model = clip.from_hf_state_dict(hf, TINY)
  for k, v in _flat(model).items():
    np.testing.assert_array_equal(v, flat[k], err_msg=k)
  # Vision-only keys without the "vision_model." prefix (transformers 5.x).
  vis_cfg = clip.CLIPConfig(vision=VISION, text=None, projection_dim=16)
  vis_sd = {k.replace("vision_model.", ""): v for k, v in hf.items()
            if k.startswith("vision_model.") or k.startswith("visual_")}
  vis = clip.from_hf_state_dict(vis_sd, vis_cfg)
  np.testing.assert_allclose(_image(vis, _images()),
                             _image(tiny_clip, _images()), atol=1e-6)
  bad = dict(hf)
  del bad["text_model.encoder.layers.1.mlp.fc2.bias"]
  bad["vision_model.encoder.layers.0.ls_1.gamma"] = np.zeros(32)
  bad["visual_projection.weight"] = np.zeros((5, 32), np.float32)
  with pytest.raises(convert.ConversionError) as e:
    clip.from_hf_state_dict(bad, TINY, what="ckpt/model.safetensors")
  msg = str(e.value)
  assert "ckpt/model.safetensors" in msg
  assert "vision_model.encoder.layers.0.ls_1.gamma" in msg
  assert "missing: text/layers/1/mlp/fc2/bias" in msg
  assert "visual_projection.weight -> visual_projection/kernel: (32, 5)" in msg


def test_open_clip_converter_matches_original(tiny_clip, tmp_path):
  # open_clip pools at the largest id: EOS (49) is the largest in _ids().
  sd = _to_open_clip(_to_hf(_flat(tiny_clip)))
  assert "visual.transformer.resblocks.1.attn.in_proj_weight" in sd
  model = convert_open_clip.from_state_dict(sd, act="quick_gelu",
                                            head_width=8)
  assert model.config.text.pooling == "argmax"
  assert model.config.vision.num_heads == 4
  ids, mask = _ids()
  np.testing.assert_allclose(_text(model, ids, None),
                             _text(tiny_clip, ids, mask), atol=1e-5)
  np.testing.assert_allclose(_image(model, _images()),
                             _image(tiny_clip, _images()), atol=1e-5)
  # A hub-style directory with open_clip's config and safetensors.
  st_numpy = pytest.importorskip("safetensors.numpy")
  st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()},
                     str(tmp_path / "open_clip_model.safetensors"))
  (tmp_path / "open_clip_config.json").write_text(json.dumps({
      "model_cfg": {"quick_gelu": True, "vision_cfg": {"head_width": 8},
                    "text_cfg": {"heads": 3}},
      "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}))
  loaded, pre = convert_open_clip.load(tmp_path)
  assert loaded.config == model.config
  assert pre.std == (0.25,) * 3 and pre.crop_size == (32, 32)
  np.testing.assert_array_equal(_flat(loaded)["text/pos_embed"],
                                _flat(model)["text/pos_embed"])
  del sd["ln_final.bias"]
  sd["visual.transformer.resblocks.0.ls_1.gamma"] = np.zeros(32)
  with pytest.raises(convert.ConversionError,
                     match=r"ls_1\.gamma.*missing: text/final_ln/bias"):
    convert_open_clip.from_state_dict(sd, head_width=8)


def test_vit_forward_and_hf_names():
  model = _random(lambda: vit.ViT(TINY_VIT, rngs=nnx.Rngs(0)))
  out = nnx.jit(lambda m, x: m(x))(model, _images())
  assert out.last_hidden_state.shape == (3, 17, 32)
  assert out.pooler_output.shape == (3, 32)
  assert np.all(np.abs(out.pooler_output) <= 1)  # tanh pooler
  with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\].*\(3, 3, 32, 32\)"):
    model(jnp.zeros((3, 3, 32, 32)))  # NCHW by mistake
  with pytest.raises(convert.ConversionError, match="missing: cls_token"):
    vit.from_hf_state_dict({}, TINY_VIT)


def test_zeroshot_head_matches_numpy():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(50, 6)).astype(np.float32)
  vocab = {}

  def tokenize(texts):
    ids = [[vocab.setdefault(w, len(vocab) + 1) for w in t.split()]
           for t in texts]
    n = max(map(len, ids))
    return {"input_ids": np.array([i + [0] * (n - len(i)) for i in ids]),
            "attention_mask": np.array([[1] * len(i) + [0] * (n - len(i))
                                        for i in ids])}

  def encode_text(ids, mask):  # a bag-of-words "text encoder"
    return (jnp.asarray(table)[ids] * mask[..., None]).sum(1)

  names, temps = ["cat", "dog", "red car"], ["a {} here", "my {}", "{} !"]
  head = zeroshot.build_head(encode_text, tokenize, names, temps,
                             batch_size=4)
  want = []
  for c in names:
    e = np.stack([table[[vocab[w] for w in t.format(c).split()]].sum(0)
                  for t in temps])
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    m = e.mean(0)
    want.append(m / np.linalg.norm(m))
  np.testing.assert_allclose(head, np.stack(want), rtol=1e-5, atol=1e-6)
  feats = rng.normal(size=(4, 6)).astype(np.float32)
  ref = 100 * (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ np.stack(
      want).T
  np.testing.assert_allclose(zeroshot.logits(feats, head), ref, rtol=1e-4)
  assert float(zeroshot.accuracy(feats, head, ref.argmax(1))) == 1.0
  with pytest.raises(ValueError, match="exactly one"):
    zeroshot.build_head(encode_text, tokenize, names, ["no slot"])


def test_zeroshot_data():
  for task in ("mnist", "svhn", "eurosat", "resisc45", "dtd", "gtsrb",
               "cars196", "sun397"):
    assert all(t.count("{}") == 1 for t in zeroshot.templates(task))
  sizes = {k: len(v) for k, v in zeroshot.CLASSNAMES.items()}
  assert sizes == {"mnist": 10, "svhn": 10, "eurosat": 10, "resisc45": 45,
                   "dtd": 47, "gtsrb": 43}
  assert zeroshot.clean_classname("/b/bakery/shop") == "bakery shop"
  assert zeroshot.clean_classname("sea_ice") == "sea ice"
  with pytest.raises(KeyError, match="clean_classname"):
    zeroshot.classnames("sun397")


def test_preprocess_values_and_shapes(tmp_path):
  pre = image_preprocess.ImagePreprocessor.clip(32)
  gray = np.full((2, 28, 40), 51, np.uint8)
  out = pre(gray)
  assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
  want = (0.2 - np.array(image_preprocess.CLIP_MEAN)) / np.array(
      image_preprocess.CLIP_STD)
  np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), atol=1e-4)
  assert image_preprocess.resize_shape(28, 40, 32) == (32, 45)
  # No resize: crop + normalize equal a direct NumPy computation.
  img = np.random.default_rng(0).integers(0, 256, (2, 9, 12, 3), np.uint8)
  pre = image_preprocess.ImagePreprocessor(size=None, crop_size=(5, 6),
                                           mean=(0.1, 0.2, 0.3),
                                           std=(0.5, 0.4, 0.3))
  ref = (img[:, 2:7, 3:9] / 255.0 - [0.1, 0.2, 0.3]) / [0.5, 0.4, 0.3]
  np.testing.assert_allclose(pre(img), ref, rtol=1e-5, atol=1e-5)
  # Smooth image: the bicubic resize keeps a linear ramp linear.
  ramp = np.broadcast_to(np.linspace(0, 255, 16)[None, None, :, None],
                         (1, 16, 16, 3)).astype(np.float32)
  up = image_preprocess.resize(ramp, (32, 32))
  assert np.all(np.diff(up[0, 16, 4:-4, 0]) > 0)
  with pytest.raises(ValueError, match=r"\(2, 3, 4, 5, 6\)"):
    pre(np.zeros((2, 3, 4, 5, 6)))
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({
      "size": {"height": 40, "width": 40}, "do_center_crop": False,
      "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
      "resample": 2}))
  hf = image_preprocess.ImagePreprocessor.from_hf_dir(tmp_path)
  assert (hf.size, hf.crop_size, hf.resample) == ((40, 40), None, "bilinear")
  assert pre.backend == "jax"


# -- Parity with PyTorch / transformers (optional). -------------------------


def _torch():
  torch = pytest.importorskip("torch", reason="parity tests need torch")
  transformers = pytest.importorskip(
      "transformers", reason="parity tests need transformers")
  torch.manual_seed(0)
  return torch, transformers


def _pixels(torch, n=2, size=32):
  x = np.random.default_rng(1).normal(size=(n, size, size, 3))
  return x.astype(np.float32), torch.from_numpy(x.transpose(0, 3, 1, 2)
                                               .astype(np.float32))


@pytest.mark.parametrize("original_format", [True, False])
def test_vit_parity_with_transformers(tmp_path, original_format):
  torch, tr = _torch()
  cfg = tr.ViTConfig(hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64,
                     image_size=32, patch_size=8)
  ref = tr.ViTModel(cfg).eval()
  ref.save_pretrained(tmp_path, safe_serialization=True,
                      save_original_format=original_format)
  model, pre = vit.load_dir(tmp_path)
  x, xt = _pixels(torch)
  with torch.no_grad():
    want = ref(pixel_values=xt)
  out = model(jnp.asarray(x))
  np.testing.assert_allclose(out.last_hidden_state,
                             want.last_hidden_state.numpy(), atol=1e-4)
  np.testing.assert_allclose(out.pooler_output, want.pooler_output.numpy(),
                             atol=1e-4)
  assert pre.mean == image_preprocess.VIT_MEAN and pre.size == (32, 32)


@pytest.mark.parametrize("eos", [2, 49])
def test_clip_parity_with_transformers(tmp_path, eos):
  torch, tr = _torch()
  cfg = tr.CLIPConfig(
      text_config=dict(vocab_size=50, hidden_size=24, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=3,
                       max_position_embeddings=12, eos_token_id=eos),
      vision_config=dict(hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8),
      projection_dim=16)
  ref = tr.CLIPModel(cfg).eval()
  ref.save_pretrained(tmp_path, safe_serialization=True)
  model, pre = clip.load_dir(tmp_path)
  assert model.config.text.pooling == ("argmax" if eos == 2 else "eos")
  x, xt = _pixels(torch)
  ids, mask = _ids()
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(np.asarray(ids)).long(),
               attention_mask=torch.from_numpy(np.asarray(mask)).long(),
               pixel_values=xt)
  out = model(jnp.asarray(x), ids, mask)
  np.testing.assert_allclose(out.logits_per_image,
                             want.logits_per_image.numpy(), atol=1e-4)
  np.testing.assert_allclose(out.image_embeds, want.image_embeds.numpy(),
                             atol=1e-5)
  np.testing.assert_allclose(out.text_embeds, want.text_embeds.numpy(),
                             atol=1e-5)
  tids = torch.from_numpy(np.asarray(ids)).long()
  tmask = torch.from_numpy(np.asarray(mask)).long()
  with torch.no_grad():  # raw tower outputs, before the projections
    tw = ref.text_model(input_ids=tids, attention_mask=tmask)
    vw = ref.vision_model(pixel_values=xt)
  hidden, pooled = model.text(ids, mask)
  np.testing.assert_allclose(pooled, tw.pooler_output.numpy(), atol=1e-4)
  valid = np.asarray(mask, bool)  # padded positions' states are unused
  np.testing.assert_allclose(np.asarray(hidden)[valid],
                             tw.last_hidden_state.numpy()[valid], atol=1e-4)
  vh, vp = model.vision(jnp.asarray(x))
  np.testing.assert_allclose(vh, vw.last_hidden_state.numpy(), atol=1e-4)
  np.testing.assert_allclose(vp, vw.pooler_output.numpy(), atol=1e-4)
  np.testing.assert_allclose(
      model.encode_image(jnp.asarray(x)),
      want.vision_model_output.pooler_output.numpy(), atol=1e-4)
  assert pre.crop_size == (32, 32) and pre.mean == image_preprocess.CLIP_MEAN

  if eos == 2:  # open_clip names, argmax pooling: same outputs as HF.
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    oc = convert_open_clip.from_state_dict(_to_open_clip(sd), head_width=8)
    np.testing.assert_allclose(
        oc.encode_text(ids), want.text_model_output.pooler_output.numpy(),
        atol=1e-4)
    np.testing.assert_allclose(
        oc.encode_image(jnp.asarray(x)),
        want.vision_model_output.pooler_output.numpy(), atol=1e-4)


@pytest.mark.parametrize("with_projection", [False, True])
def test_clip_vision_parity_with_transformers(tmp_path, with_projection):
  torch, tr = _torch()
  cfg = tr.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=16)
  cls = (tr.CLIPVisionModelWithProjection if with_projection
         else tr.CLIPVisionModel)
  ref = cls(cfg).eval()
  ref.save_pretrained(tmp_path, safe_serialization=True)
  model, _ = clip.load_dir(tmp_path)
  assert model.text is None
  assert (model.visual_projection is not None) == with_projection
  x, xt = _pixels(torch)
  with torch.no_grad():
    want = ref(pixel_values=xt)
  got = model.encode_image(jnp.asarray(x))
  ref_out = want.image_embeds if with_projection else want.pooler_output
  np.testing.assert_allclose(got, ref_out.numpy(), atol=1e-4)
  np.testing.assert_allclose(model.vision(jnp.asarray(x))[0],
                             want.last_hidden_state.numpy(), atol=1e-4)


def test_open_clip_parity():
  torch, _ = _torch()
  open_clip = pytest.importorskip("open_clip", reason="needs open_clip_torch")
  oc = open_clip.CLIP(
      embed_dim=16, quick_gelu=True,
      vision_cfg=dict(layers=2, width=32, head_width=8, patch_size=8,
                      image_size=32, mlp_ratio=2),
      text_cfg=dict(context_length=12, vocab_size=50, width=24, heads=3,
                    layers=2, mlp_ratio=2)).eval()
  sd = {k: v.detach().numpy() for k, v in oc.state_dict().items()}
  model = convert_open_clip.from_state_dict(sd, head_width=8)
  x, xt = _pixels(torch)
  ids = np.array([[1, 5, 7, 49, 0, 0, 0, 0, 0, 0, 0, 0],
                  [1, 3, 4, 9, 6, 49, 0, 0, 0, 0, 0, 0]], np.int64)
  with torch.no_grad():
    want_img = oc.encode_image(xt).numpy()
    want_txt = oc.encode_text(torch.from_numpy(ids)).numpy()
  np.testing.assert_allclose(model.encode_image(jnp.asarray(x)), want_img,
                             atol=1e-4)
  np.testing.assert_allclose(model.encode_text(jnp.asarray(ids, jnp.int32)),
                             want_txt, atol=1e-4)


def test_preprocess_matches_hf_pil_processor():
  tr = pytest.importorskip("transformers", reason="needs transformers")
  pytest.importorskip("PIL", reason="needs Pillow")
  proc = tr.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                  crop_size={"height": 32, "width": 32})
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:40, 0:56]
  smooth = 127 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None]
  img = np.clip(smooth + rng.normal(0, 10, (2, 40, 56, 3)), 0, 255)
  img = img.astype(np.uint8)
  want = proc(images=list(img), return_tensors="np")["pixel_values"]
  want = np.asarray(want).transpose(0, 2, 3, 1)
  pil = image_preprocess.ImagePreprocessor(size=32, crop_size=(32, 32),
                                           backend="pil")
  np.testing.assert_allclose(pil(img), want, atol=1e-5)
  # The JAX resize is close to PIL's (same bicubic kernel, no uint8 rounding).
  err = np.abs(image_preprocess.ImagePreprocessor.clip(32)(img) - want)
  assert err.mean() < 0.05 and err.max() < 0.5, (err.mean(), err.max())
