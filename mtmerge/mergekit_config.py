"""mergekit's YAML merge configurations: parsing and per-tensor parameters.

    merge_method: ties
    base_model: base/
    models:
      - model: a/
        parameters: {weight: 1.0, density: [0.2, 0.5]}   # a per-layer gradient
      - model: b/
        parameters:
          density: [{filter: mlp, value: 0.3}, {value: 0.2}]
          weight: 0.5
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32
    out_dtype: bfloat16

`load(path)` validates a file (every problem is one ValueError line naming
the key or model), `Config.tensor_params(name)` resolves a tensor's
parameters as mergekit 0.1.5 does (a model's own settings, then the global
`parameters`, then the method's defaults; in a `filter` list the first
entry whose filter is a substring of the tensor name, `*` or absent wins; a
list of numbers is a gradient over the layers, interpolated at
t = layer / (layers - 1), t = 0 outside the layers). `mergekit_kernels`
maps resolved parameters onto mtmerge's methods (or computes the rest), and
`mergekit_merge` runs the merge.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

# method -> (per-model parameters with defaults (None: required), shared
# parameters with defaults). Mirrors mergekit 0.1.5's method specs.
_GTA_SHARED = {"int8_mask": False, "normalize": False, "rescale": False,
               "lambda": 1.0}
_GTA = {  # name: (sparsification, consensus, normalize, rescale)
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False),
    "della": ("della_magprune", True, True, True),
    "della_linear": ("della_magprune", False, False, True),
}
METHODS = ("linear", *_GTA, "slerp", "model_stock")
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype",
             "out_dtype", "tokenizer_source")
_FLAGS = ("normalize", "rescale", "int8_mask", "filter_wise")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def spec(method: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(per-model parameter defaults, shared defaults)`; None = required."""
  if method == "linear":
    return {"weight": None}, {"normalize": True}
  if method == "slerp":
    return {}, {"t": None}
  if method == "model_stock":
    return {}, {"filter_wise": False}
  sparse, _, normalize, rescale = _GTA[method]
  per = {"weight": None, "density": 1.0}
  if sparse == "magnitude_outliers":
    per["gamma"] = 0.01
  if sparse == "della_magprune":
    per["epsilon"] = 0.15
  shared = dict(_GTA_SHARED, normalize=normalize, rescale=rescale)
  if sparse in ("random", "della_magprune"):
    shared["seed"] = 0  # mtmerge's: mergekit takes --random-seed instead
  return per, shared


def gta(method: str) -> tuple[str | None, bool] | None:
  """`(sparsification, sign consensus)` of a task-arithmetic family method."""
  return _GTA[method][:2] if method in _GTA else None


@dataclasses.dataclass
class Config:
  """A validated configuration.

  Attributes:
    method: mergekit's `merge_method`.
    base: the base model's path (None for `linear`).
    models: the merged models' paths (the base excluded, except for
      `linear`, which has no base: all its models are averaged).
    model_settings: each model's own `parameters` (raw settings).
    settings: the global `parameters` (raw settings).
    out_dtype: output dtype of floating tensors (None: as stored).
    layers: the number of layers gradients interpolate over.
  """
  method: str
  base: str | None
  models: list[str]
  model_settings: list[dict[str, Any]]
  settings: dict[str, Any]
  out_dtype: str | None
  layers: int = 1

  def tensor_params(self, name: str) -> tuple[list[dict], dict[str, Any]]:
    """`(per-model parameters, shared parameters)` of tensor `name`."""
    per, shared = spec(self.method)
    m = _LAYER.search(name)
    t = int(m.group(1)) / (self.layers - 1) if m and self.layers > 1 else 0.0
    sh = {k: _resolve(k, self.settings, name, t, d) for k, d in shared.items()}
    glob = {k: _resolve(k, self.settings, name, t, d, required=False)
            for k, d in per.items()}
    pm = [{k: _resolve(k, s, name, t, glob[k], where=f"model {p!r}")
           for k in per} for p, s in zip(self.models, self.model_settings)]
    for p in pm:
      if "density" in p and not 0.0 < float(p["density"]) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {p['density']!r} "
                         f"for tensor {name!r}")
    return pm, sh


def _resolve(key: str, settings: dict, name: str, t: float, default: Any,
             where: str = "parameters", required: bool = True) -> Any:
  value = _evaluate(settings.get(key), name, t) if key in settings else None
  if value is None:
    value = default
  if value is None and required:
    raise ValueError(f"{where} has no {key!r} for tensor {name!r} (mergekit "
                     "requires it)")
  return value


def _evaluate(setting: Any, name: str, t: float) -> Any:
  """A setting's value for tensor `name` at layer position `t` (or None)."""
  if isinstance(setting, dict):
    setting = [setting]
  if isinstance(setting, (bool, int, float, str)):
    return setting
  if not isinstance(setting, list) or not setting:
    return None
  if all(isinstance(e, (bool, int, float, str)) for e in setting):
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool)
               for e in setting):
      return setting[int(t * (len(setting) - 1))]
    x = t * (len(setting) - 1)
    i0 = int(x)
    i1 = min(len(setting) - 1, i0 + 1)
    return (1 - (x - i0)) * setting[i0] + (x - i0) * setting[i1]
  for cond in setting:
    f = cond.get("filter")
    if f is None or f == "*" or f in name:
      return _evaluate(cond["value"], name, t)
  return None


def _check_setting(key: str, setting: Any, where: str) -> None:
  """Raises ValueError for a malformed value, filter list or gradient."""
  items = setting if isinstance(setting, list) else [setting]
  if isinstance(setting, list) and not setting:
    raise ValueError(f"{where}: {key} is an empty list")
  for e in items:
    if isinstance(e, dict):
      bad = sorted(set(e) - {"filter", "value"})
      if bad or "value" not in e:
        raise ValueError(f"{where}: {key}: a filter entry takes 'filter' and "
                         f"'value', got {sorted(e)}")
      _check_setting(key, e["value"], where)
    elif key in _FLAGS and not isinstance(e, bool):
      raise ValueError(f"{where}: {key} must be true or false, got {e!r}")
    elif key not in _FLAGS and (isinstance(e, bool) or not isinstance(
        e, (int, float)) or (key == "seed" and not isinstance(e, int))):
      raise ValueError(f"{where}: {key} must be a number, got {e!r}")


def _model_path(entry: Any, where: str, root: str) -> tuple[str, dict]:
  if isinstance(entry, str):
    entry = {"model": entry}
  if not isinstance(entry, dict) or "model" not in entry:
    raise ValueError(f"{where}: expected a mapping with a 'model' key")
  for k in entry:
    if k not in ("model", "parameters"):
      raise ValueError(f"{where}: unsupported key {k!r}")
  path = str(entry["model"])
  full = path if os.path.isabs(path) else os.path.join(root, path)
  if not os.path.exists(full):
    raise ValueError(f"{where}: model path {path!r} does not exist (mtmerge "
                     "reads local checkpoints only)")
  params = entry.get("parameters") or {}
  if not isinstance(params, dict):
    raise ValueError(f"{where}: parameters must be a mapping")
  return os.path.normpath(full), params


def parse(doc: Any, root: str = ".") -> Config:
  """Validates a parsed YAML document; relative paths are under `root`."""
  if not isinstance(doc, dict):
    raise ValueError("a mergekit configuration is a mapping (merge_method, "
                     "base_model, models, parameters, ...)")
  for k in doc:
    if k not in _TOP_KEYS:
      raise ValueError(f"unsupported key {k!r} (mtmerge reads "
                       f"{', '.join(_TOP_KEYS)})")
  method = doc.get("merge_method")
  if method not in METHODS:
    import difflib  # local: only for the message
    close = difflib.get_close_matches(str(method), METHODS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown or unsupported merge_method {method!r}{hint} "
                     f"(supported: {', '.join(METHODS)})")
  if doc.get("tokenizer_source") not in (None, "base"):
    raise ValueError("unsupported tokenizer_source "
                     f"{doc['tokenizer_source']!r}: mtmerge copies the "
                     "base's tokenizer files ('base')")
  dtypes = {}
  for k in ("dtype", "out_dtype"):
    v = doc.get(k)
    v = v[len("torch."):] if isinstance(v, str) and v.startswith(
        "torch.") else v
    if v is not None and v not in _DTYPES:
      raise ValueError(f"{k} {doc[k]!r} is not supported (float32, "
                       "bfloat16, float16)")
    dtypes[k] = v
  entries = doc.get("models")
  if not isinstance(entries, list) or not entries:
    raise ValueError("models must be a non-empty list of {model: PATH, "
                     "parameters: {...}}")
  models = [_model_path(e, f"models[{i}]", root)
            for i, e in enumerate(entries)]
  base = None
  if doc.get("base_model") is not None:
    if method == "linear":
      raise ValueError("linear takes no base_model (mergekit: list every "
                       "model with its weight)")
    base, _ = _model_path(doc["base_model"], "base_model", root)
  elif method != "linear":
    raise ValueError(f"{method} needs a base_model")
  models = [(p, s) for p, s in models if p != base]  # mergekit skips it
  per, shared = spec(method)
  settings = doc.get("parameters") or {}
  if not isinstance(settings, dict):
    raise ValueError("parameters must be a mapping")
  for k, v in settings.items():
    if k not in per and k not in shared:
      raise ValueError(f"unsupported parameter {k!r} for {method} (it takes "
                       f"{', '.join([*per, *shared])})")
    _check_setting(k, v, "parameters")
  for i, (p, s) in enumerate(models):
    for k, v in s.items():
      if k not in per:
        raise ValueError(f"unsupported parameter {k!r} for model {p!r} "
                         f"({method} takes {', '.join(per) or 'none'} per "
                         "model)")
      _check_setting(k, v, f"model {p!r}")
  T = len(models)
  need = {"slerp": (1, 1), "model_stock": (2, None), "linear": (1, None)}
  lo, hi = need.get(method, (1, None))
  if T < lo or (hi is not None and T > hi):
    raise ValueError(f"{method} takes {lo if hi == lo else f'{lo} or more'} "
                     f"model{'s' if lo > 1 else ''} besides the base, got {T}")
  if method == "model_stock" and settings.get("filter_wise") not in (
      None, False):
    raise ValueError("unsupported parameter value filter_wise: true "
                     "(mtmerge's model_stock is per tensor)")
  return Config(method, base, [p for p, _ in models], [s for _, s in models],
                settings, dtypes["out_dtype"] or dtypes["dtype"],
                _num_layers(base or models[0][0]))


def _num_layers(path: str) -> int:
  cfg = os.path.join(path, "config.json")
  if os.path.isdir(path) and os.path.exists(cfg):
    with open(cfg, encoding="utf-8") as f:
      n = json.load(f).get("num_hidden_layers")
    if isinstance(n, int) and n > 0:
      return n
  from mtmerge import checkpoint_io  # local: reads headers only
  idx = [int(m.group(1)) for k in checkpoint_io.read_layout(path).weight_map
         if (m := _LAYER.search(k))]
  return max(idx) + 1 if idx else 1


def load(path: str) -> Config:
  """Reads and validates a mergekit YAML file (paths relative to the
  working directory, as mergekit-yaml reads them)."""
  import yaml  # local: only --config needs it
  try:
    with open(path, encoding="utf-8") as f:
      doc = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})"
                     ) from None
  return parse(doc)
