r"""CLIP-ViT benchmark on the published fine-tuned checkpoints.

The vision benchmark of task arithmetic (Ilharco et al. 2023, "Editing
Models with Task Arithmetic"), TIES-Merging (Yadav et al. 2023),
AdaMerging (Yang et al. 2024) and TALL masks (Wang et al. 2024,
"Localizing Task Information for Improved Model Merging and
Compression"): the pretrained CLIP from Hugging Face (`openai/clip-vit-*`),
the task models from FusionBench's published fine-tuned vision towers
(`tanganke/clip-vit-base-patch32_<task>` and siblings; Tang et al. 2024),
frozen zero-shot heads from the pretrained text tower with the papers'
templates (`mtmerge.models.zeroshot`) and CLIP's own logit scale, datasets
by their TFDS names (`mtmerge.data.suites`), every training-free and
learned method with the papers' hyperparameters and grids (chosen on
validation). Fine-tuning is skipped (`config.task_models`). The table is
followed by the published averages (8 tasks, ViT-B/32) beside the measured.

Needs, read offline (`HF_HUB_OFFLINE=1` reads only the cache):
* the Hugging Face cache (`HF_HUB_CACHE` or `~/.cache/huggingface/hub`)
  holding the model and its 8 task repositories; where there is network:
    huggingface-cli download openai/clip-vit-base-patch32
    for t in sun397 stanford-cars resisc45 eurosat svhn gtsrb mnist dtd; do
      huggingface-cli download tanganke/clip-vit-base-patch32_$t; done
* the TFDS datasets prepared in array_record format (`TFDS_DATA_DIR`):
    tfds build mnist eurosat/rgb ... --file_format=array_record
A missing repository or dataset stops the run in seconds with one line
naming it.

Arguments after `:` (comma-separated): `model=B/32|B/16|L/14`,
`tasks=8|14|20` (14 and 20 stop at once with one line naming the tasks
mtmerge does not register: fer2013; emnist_letters, rendered-sst2),
`runlocal` (2 tasks, 16 examples, 4 methods: a smoke
test of the wiring, not a result).

Local smoke test (CPU, needs the checkpoints and mnist, eurosat):
  HF_HUB_OFFLINE=1 python -m mtmerge.main \
      --config configs/clip_vit.py:runlocal --workdir runs/clip_smoke
One GPU (ViT-B/32, 8 tasks; the evaluation splits are cached preprocessed
in host memory, about 0.6 MB per image, roughly 70 GB for the test and
validation splits: cap them with `--config.eval.limits.test=2000
--config.eval.limits.validation=1000` on smaller hosts):
  HF_HUB_OFFLINE=1 python -m mtmerge.main \
      --config configs/clip_vit.py:model=B/32,tasks=8 \
      --workdir runs/clip_b32
TPU pod (every worker needs the cache and the data: point HF_HUB_CACHE and
TFDS_DATA_DIR at copies on each worker or on a shared disk):
  launch/tpu_pod.sh --env HF_HUB_OFFLINE=1 --env TFDS_DATA_DIR=DIR \
      NAME ZONE configs/clip_vit.py:model=L/14,tasks=8 gs://BUCKET/clip_l14
"""

import ml_collections

from configs import common

MODELS = {"B/32": "openai/clip-vit-base-patch32",
          "B/16": "openai/clip-vit-base-patch16",
          "L/14": "openai/clip-vit-large-patch14"}
# The task sets of TALL masks (Wang et al. 2024) and FusionBench, by
# FusionBench's task names; `_OURS` maps them to mtmerge's suite names.
TASKS_8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb",
           "mnist", "dtd"]
TASKS_14 = TASKS_8 + ["oxford_flowers102", "pcam", "fer2013",
                      "oxford-iiit-pet", "stl10", "cifar100"]
TASKS_20 = TASKS_14 + ["cifar10", "food101", "fashion_mnist", "emnist_letters",
                       "kmnist", "rendered-sst2"]
_OURS = {"stanford-cars": "cars", "oxford-iiit-pet": "oxford_iiit_pet"}
# mtmerge.data.suites registers the 8 tasks (suite clip8) and 9 of the
# others (clip20, `mtmerge.data.clip_extra`); fer2013 and rendered-sst2 are
# not in the TFDS catalog and emnist/letters has another label space there,
# so `tasks=14|20` stop at once with one line naming them.


def _grid(lo, hi, step):
  n = int(round((hi - lo) / step)) + 1
  return [round(lo + i * step, 3) for i in range(n)]


# Training-free methods: the papers' settings (METHODS.md), the scaling
# coefficients chosen on validation as the papers do.
METHODS = [
    dict(method="weight_averaging"),
    dict(method="task_arithmetic", grid=dict(scaling_factor=_grid(
        0.05, 1.0, 0.05))),
    dict(method="ties_merging(threshold=0.2, merge_func='sum')",
         grid=dict(scaling_factor=_grid(0.1, 1.0, 0.1))),
    dict(method="dare(drop_rate=0.5, seed=0, scaling_factor=0.3)"),
    dict(method="dare_ties(drop_rate=0.5, seed=0, scaling_factor=0.3)"),
    dict(method="breadcrumbs(threshold=0.15, gamma=0.006)",
         grid=dict(scaling_factor=_grid(0.1, 1.0, 0.1))),
    dict(method="della(drop_rate=0.3, epsilon=0.07)",
         grid=dict(scaling_factor=_grid(0.8, 1.4, 0.1))),
    dict(method="magnitude_prune(threshold=0.2)",
         grid=dict(scaling_factor=_grid(0.1, 1.0, 0.1))),
    dict(method="consensus(k=2)", grid=dict(scaling_factor=_grid(
        0.1, 1.0, 0.1))),
    dict(method="pcb_merging(ratio=0.1)",
         grid=dict(scaling_factor=_grid(0.8, 1.3, 0.1))),
    dict(method="tsv_merging", grid=dict(alpha=[0.5, 1.0, 1.5, 2.0])),
    dict(method="model_stock"),
    dict(method="tall_mask", grid=dict(tall_mask_lambda=[0.2, 0.3, 0.4, 0.5,
                                                         0.6])),
    dict(method="emr_merging"),
]
_AM = dict(steps=500, lr=1e-3)  # AdaMerging: Adam, 500 steps, lr 1e-3
LEARNED = [
    dict(method="adamerging(granularity='task')", label="adamerging(task)",
         train=_AM),
    dict(method="adamerging(granularity='task', plus=True)",
         label="adamerging++(task)", train=_AM),
    dict(method="adamerging(granularity='layer')", label="adamerging(layer)",
         train=_AM),
    dict(method="adamerging(granularity='layer', plus=True)",
         label="adamerging++(layer)", train=_AM),
    # Concrete TA: lambda 0.3, Adam lr 1e-3, 2000 steps.
    dict(method="concrete_task_arithmetic", label="concrete_ta",
         train=dict(steps=2000, lr=1e-3)),
    # Concrete AdaMerging: 1000 mask steps, then 1000 AdaMerging steps
    # under the mask (Adam, lr 1e-3 both).
    dict(method="concrete_adamerging", label="concrete_adamerging",
         train=dict(steps=1000, lr=1e-3)),
    # aTLAS task addition: AdamW lr 1e-3, weight decay 0.1 on labeled
    # validation data (the step count is ours).
    dict(method="atlas(objective='task_addition')", label="atlas",
         train=dict(steps=1000, lr=1e-3, optimizer="adamw",
                    weight_decay=0.1)),
    dict(method="twin_merging", label="twin_merging"),
    # Skill localization (a language-model method): the top 1e-4 of entries
    # by movement, mask logits trained at the paper's lr 1e7 on labeled
    # train data (the step count is ours).
    dict(method="skill_localization(sparsity=0.0001)",
         label="skill_localization", train=dict(steps=100, lr=1e7)),
    dict(method="fisher_merging(num_examples=256)", label="fisher_merging"),
    dict(method="regmean(num_examples=256, alpha=0.95)", label="regmean"),
]

# Average accuracy (%), 8 tasks, ViT-B/32: the papers (open_clip
# checkpoints) and FusionBench (the Hugging Face checkpoints used here), as
# collected in the project's method notes.
PUBLISHED_B32_8 = {
    "zero-shot": dict(paper=48.0, fusionbench=48.2),
    "individual": dict(paper=90.5),
    "weight_averaging": dict(paper=65.8),
    "task_arithmetic": dict(paper=69.1, fusionbench=68.0),
    "ties_merging": dict(paper=72.4, fusionbench=72.2),
    "fisher_merging": dict(paper=68.3),
    "regmean": dict(paper=71.8),
    "adamerging(task)": dict(paper=71.1),
    "adamerging++(task)": dict(paper=73.7),
    "adamerging(layer)": dict(paper=80.1),
    "adamerging++(layer)": dict(paper=81.1),
    "concrete_ta": dict(paper=77.3),
    "concrete_adamerging": dict(paper=84.0),
    "pcb_merging": dict(paper=76.3),
    "emr_merging": dict(paper=88.7),
    "tsv_merging": dict(paper="85.9 (TALL-mask ckpts)"),
    "consensus": dict(paper="73.6-75.0"),
    "twin_merging": dict(paper="83-88"),
}


def task_models(model: str, tasks) -> dict[str, str]:
  """FusionBench's checkpoint of each task: `tanganke/<model>_<task>`."""
  ours = {v: k for k, v in _OURS.items()}
  return {t: f"tanganke/{model.split('/')[1]}_{ours.get(t, t)}"
          for t in tasks}


def get_config(arg=None):
  """The config; see the module docstring for `arg`."""
  args = common.parse_arg(arg, ("runlocal", "model", "tasks"),
                          "runlocal, model=B/32|B/16|L/14, tasks=8|14|20")
  size, count = args.get("model", "B/32"), str(args.get("tasks", "8"))
  if size not in MODELS:
    raise ValueError(f"model={size!r}: expected one of {sorted(MODELS)}")
  sets = {"8": TASKS_8, "14": TASKS_14, "20": TASKS_20}
  if count not in sets:
    raise ValueError(f"tasks={count!r}: expected 8, 14 or 20")
  c = ml_collections.ConfigDict()
  c.job = "benchmark"
  c.model = MODELS[size]
  c.num_layers = None
  c.tasks = [_OURS.get(t, t) for t in sets[count]]
  c.task_models = task_models(c.model, c.tasks)
  # Zero-shot heads from the pretrained text tower with the papers'
  # templates; scale None = the model's own exp(logit_scale).
  c.heads = ml_collections.ConfigDict(dict(
      kind="zeroshot", scale=None,
      probe=dict(steps=300, lr=0.05, weight_decay=1e-4, limit=1000,
                 batch_size=128, max_len=77)))
  # Used only without task_models (`--config.task_models=None`): the
  # task-arithmetic fine-tuning (AdamW lr 1e-5, wd 0.1, batch 128, 2000
  # steps, 500 warmup) of the vision tower.
  c.finetune = ml_collections.ConfigDict(dict(
      mode="standard", trainable=r"vision/.*", steps=2000, batch_size=128,
      lr=1e-5, warmup=500, weight_decay=0.1, save_every=500, average_last=0,
      seed=0, limit=None, max_len=77))
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=128, max_len=77, multiple=16,
      limits=ml_collections.ConfigDict(dict(validation=None, test=None))))
  c.methods = [dict(m) for m in METHODS]
  c.learned = [dict(m) for m in LEARNED]
  c.published = (PUBLISHED_B32_8 if (size, count) == ("B/32", "8") else {})
  c.published_note = ("8 tasks, ViT-B/32; paper: open_clip checkpoints, "
                      "fusionbench: the HF checkpoints used here")

  if "runlocal" in args:
    c.tasks = ["mnist", "eurosat"]
    c.task_models = task_models(c.model, c.tasks)
    c.eval.update(batch_size=16)
    c.eval.limits.update(validation=16, test=16)
    c.methods = [dict(method="task_arithmetic",
                      grid=dict(scaling_factor=[0.3, 0.5])),
                 dict(method="ties_merging(threshold=0.2, merge_func='sum')",
                      grid=dict(scaling_factor=[0.3])),
                 dict(method="tall_mask", grid=dict(tall_mask_lambda=[0.4])),
                 dict(method="emr_merging")]
    c.learned = [dict(LEARNED[2], train=dict(_AM, steps=2))]
  return c
