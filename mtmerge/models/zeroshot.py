"""Zero-shot classification heads from class names and prompt templates.

The CLIP recipe (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision"), as used by the task-arithmetic vision
benchmark (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
arXiv:2212.04089):
for each class c, embed every prompt `template.format(c)` with the text
encoder, L2-normalize each embedding, average over templates and
renormalize. The head is the `[C, D]` stack of these class vectors and

  logits = scale * normalize(image_features) @ head.T,

with `scale = exp(logit_scale)` (CLIP's learned temperature, 100 for the
OpenAI models). The fine-tuned and merged image encoders are evaluated
with these frozen heads.

Typical use (frozen head, trainable image encoder, as in Ilharco et al.):

  model, pre = clip.load_dir(path)            # a full HF CLIPModel
  text_fn = nnx.jit(lambda m, i, a: m.encode_text(i, a))
  head = zeroshot.build_head(lambda i, a: text_fn(model, i, a), tokenize,
                             zeroshot.classnames("mnist"),
                             zeroshot.templates("mnist"))
  scale = jnp.exp(model.logit_scale[...])
  def loss_fn(m, images, labels):             # differentiate w.r.t. m.vision
    z = zeroshot.logits(m.encode_image(images), head, scale)
    return optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()

`TEMPLATES` has the prompt templates of that benchmark's code for its
eight tasks and `CLASSNAMES` the class names of six of them (not Cars196,
SUN397), in TFDS label order; `clean_classname` turns TFDS label names
(e.g. SUN397's "/a/abbey" or Cars196's names) into prompt text for the
rest.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtmerge.data import clip_extra

Tokenize = Callable[[Sequence[str]], Mapping[str, np.ndarray]]

# The templates of the task-arithmetic code (Ilharco et al. 2023,
# mlfoundations/task_vectors `src/datasets/templates.py`), which TIES,
# AdaMerging, TALL masks and FusionBench reuse for the eight tasks.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "mnist": ('a photo of the number: "{}".',),
    "svhn": ('a photo of the number: "{}".',),
    "eurosat": ("a centered satellite photo of {}.",
                "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."),
    "resisc45": tuple(f"{kind} {what} of {art}{{}}."
                      for art in ("", "a ", "the ")
                      for what in ("imagery", "photo", "view")
                      for kind in ("satellite", "aerial")),
    "gtsrb": tuple(f'a {how} photo of a "{{}}" traffic sign.'
                   for how in ("zoomed in", "centered", "close up")),
    "dtd": tuple(f"a photo of {art} {{}} {what}."
                 for art in ("a", "the")
                 for what in ("texture", "pattern", "thing", "object")),
    "cars196": ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.",
                "i love my {}!", "a photo of my dirty {}.",
                "a photo of my clean {}.", "a photo of my new {}.",
                "a photo of my old {}."),
    "sun397": ("a photo of a {}.", "a photo of the {}."),
}
TEMPLATES["cars"] = TEMPLATES["cars196"]  # the suites' task name
TEMPLATES.update(clip_extra.TEMPLATES)  # the 14- and 20-task benchmarks

# EuroSAT and GTSRB: the task-arithmetic code's class names (descriptive
# phrases instead of the datasets' label names).
_EUROSAT = ("annual crop land", "forest", "brushland or shrubland",
            "highway or road", "industrial buildings or commercial buildings",
            "pasture land", "permanent crop land",
            "residential buildings or homes or apartments", "river",
            "lake or sea")

_RESISC45 = tuple(n.replace("_", " ") for n in (
    "airplane airport baseball_diamond basketball_court beach bridge "
    "chaparral church circular_farmland cloud commercial_area "
    "dense_residential desert forest freeway golf_course ground_track_field "
    "harbor industrial_area intersection island lake meadow "
    "medium_residential mobile_home_park mountain overpass palace "
    "parking_lot railway railway_station rectangular_farmland river "
    "roundabout runway sea_ice ship snowberg sparse_residential stadium "
    "storage_tank tennis_court terrace thermal_power_station wetland"
).split())

_DTD = tuple((
    "banded blotchy braided bubbly bumpy chequered cobwebbed cracked "
    "crosshatched crystalline dotted fibrous flecked freckled frilly gauzy "
    "grid grooved honeycombed interlaced knitted lacelike lined marbled "
    "matted meshed paisley perforated pitted pleated polka-dotted porous "
    "potholed scaly smeared spiralled sprinkled stained stratified striped "
    "studded swirly veined waffled woven wrinkled zigzagged").split())

# GTSRB class ids 0..42.
_RW, _TRI = "red and white circle", "red and white triangle"
_GTSRB = tuple(
    [f"{_RW} {v} kph speed limit" for v in (20, 30, 50, 60, 70, 80)] +
    ["end / de-restriction of 80 kph speed limit"] +
    [f"{_RW} {v} kph speed limit" for v in (100, 120)] +
    [f"{_RW} red car and black car no passing",
     f"{_RW} red truck and black car no passing",
     f"{_TRI} road intersection warning", "white and yellow diamond priority "
     "road", "red and white upside down triangle yield right-of-way", "stop",
     "empty red and white circle", f"{_RW} no truck entry",
     "red circle with white horizonal stripe no entry",
     f"{_TRI} with exclamation mark warning"] +
    [f"{_TRI} with black {c} approaching warning"
     for c in ("left curve", "right curve", "double curve")] +
    [f"{_TRI} rough / bumpy road warning",
     f"{_TRI} car skidding / slipping warning",
     f"{_TRI} with merging / narrow lanes warning",
     f"{_TRI} with person digging / construction / road work warning",
     f"{_TRI} with traffic light approaching warning",
     f"{_TRI} with person walking warning",
     f"{_TRI} with child and person walking warning",
     f"{_TRI} with bicyle warning", f"{_TRI} with snowflake / ice warning",
     f"{_TRI} with deer warning",
     "white circle with gray strike bar no speed limit"] +
    [f"blue circle with white {a} mandatory" for a in (
        "right turn arrow", "left turn arrow", "forward arrow",
        "forward or right turn arrow", "forward or left turn arrow",
        "keep right arrow", "keep left arrow")] +
    ["blue circle with white arrows indicating a traffic circle"] +
    [f"white circle with gray strike bar indicating no passing for {v} has "
     "ended" for v in ("cars", "trucks")])

_DIGITS = tuple(str(i) for i in range(10))

CLASSNAMES: dict[str, tuple[str, ...]] = {
    "mnist": _DIGITS, "svhn": _DIGITS, "eurosat": _EUROSAT,
    "resisc45": _RESISC45, "dtd": _DTD, "gtsrb": _GTSRB,
}


def clean_classname(name: str) -> str:
  """TFDS label -> prompt text: "/a/abbey" -> "abbey", "sea_ice" -> "sea ice".

  SUN397's labels are paths like "/b/bakery/shop"; the last two parts
  become "bakery shop". Other slashes stay ("T-shirt/top").
  """
  if not name.startswith("/"):
    return name.replace("_", " ").strip()
  parts = [p for p in name.strip("/").split("/") if p]
  if len(parts) > 1 and len(parts[0]) == 1:  # SUN397 "/x/..." prefix
    parts = parts[1:]
  return " ".join(parts).replace("_", " ").strip()


def classnames(task: str) -> tuple[str, ...]:
  """Class names for `task` in TFDS label order (see `CLASSNAMES`)."""
  if task not in CLASSNAMES:
    raise KeyError(f"no built-in class names for {task!r} (have "
                   f"{sorted(CLASSNAMES)}); for other tasks pass the TFDS "
                   "label names through clean_classname")
  return CLASSNAMES[task]


def templates(task: str) -> tuple[str, ...]:
  """Prompt templates (with one `{}`) for `task`."""
  if task not in TEMPLATES:
    raise KeyError(f"no templates for {task!r}; have {sorted(TEMPLATES)}")
  return TEMPLATES[task]


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / ||x||_2 along `axis`."""
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def build_head(encode_text: Callable[..., jax.Array], tokenize: Tokenize,
               class_names: Sequence[str], prompt_templates: Sequence[str],
               batch_size: int = 256) -> jax.Array:
  """Builds the `[C, D]` zero-shot head (unit-norm rows).

  Args:
    encode_text: `(input_ids, attention_mask) -> [B, D]` text features,
      e.g. `clip_model.encode_text` (wrap it in `nnx.jit` for speed).
    tokenize: `texts -> {"input_ids": [B, L], "attention_mask": [B, L]}`
      (numpy or JAX int arrays, padded to one length).
    class_names: the C class names.
    prompt_templates: T templates, each with one `{}` for the class name.
    batch_size: prompts encoded per call.

  Returns:
    `[C, D]` float32: per class, the renormalized mean of the normalized
    prompt embeddings.
  """
  if not class_names or not prompt_templates:
    raise ValueError("need at least one class name and one template")
  bad = [t for t in prompt_templates if t.count("{}") != 1]
  if bad:
    raise ValueError(f"templates need exactly one '{{}}': {bad}")
  texts = [t.format(c) for c in class_names for t in prompt_templates]
  feats = []
  for start in range(0, len(texts), batch_size):
    tok = tokenize(texts[start:start + batch_size])
    ids = jnp.asarray(tok["input_ids"])
    mask = tok.get("attention_mask")
    feats.append(encode_text(ids, None if mask is None else jnp.asarray(mask)))
  emb = normalize(jnp.concatenate(feats).astype(jnp.float32))
  emb = emb.reshape(len(class_names), len(prompt_templates), -1)
  return normalize(emb.mean(axis=1))


def logits(image_features: jax.Array, head: jax.Array,
           scale: float | jax.Array = 100.0) -> jax.Array:
  """`scale * normalize(image_features) @ head.T` -> `[B, C]`.

  Args:
    image_features: `[B, D]` from `encode_image`.
    head: `[C, D]` from `build_head`.
    scale: the logit multiplier, `exp(model.logit_scale)` for a CLIP model
      (it only matters for losses; predictions are its argmax either way).
  """
  return scale * normalize(image_features) @ head.T


def accuracy(image_features: jax.Array, head: jax.Array,
             labels: jax.Array) -> jax.Array:
  """Top-1 accuracy of the zero-shot head on one batch."""
  pred = jnp.argmax(logits(image_features, head), axis=-1)
  return jnp.mean(pred == labels)
