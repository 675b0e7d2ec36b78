"""The TFDS-available tasks of the 14- and 20-task CLIP benchmarks.

TALL masks (Wang et al. 2024, "Localizing Task Information for Improved
Model Merging and Compression") extend the eight tasks of task arithmetic
(Ilharco et al. 2023) to 14 (+ Flowers102, PCam, FER2013, Oxford-IIIT Pet,
STL-10, CIFAR-100) and 20 (+ CIFAR-10, Food-101, Fashion-MNIST,
EMNIST-letters, KMNIST, Rendered SST-2). `TASKS` lists the nine of them that
the TFDS catalog has with the papers' label spaces; FER2013 and Rendered
SST-2 are not in the catalog, and TFDS's `emnist/letters` labels 1..26 out
of 37 classes (the papers use 26), so those three are not registered.

Each entry: `(task, TFDS name, classes, class names or (), splits)` where
`splits` is `"tfds"` (train/validation/test as TFDS has them), `"carve"`
(validation carved from train, as `suites.Holdout()`) or `"carve_test"`
(TFDS's `validation` split is the official test set, as Food-101's).
Class names are the ones the papers' code prompts with, where TFDS's label
names are numbers or differ; the rest come from TFDS.
"""

_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
            "horse", "ship", "truck")
_CIFAR100 = tuple(n.replace("_", " ") for n in (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl "
    "boy bridge bus butterfly camel can castle caterpillar cattle chair "
    "chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree "
    "motorcycle mountain mouse mushroom oak_tree orange orchid otter "
    "palm_tree pear pickup_truck pine_tree plain plate poppy porcupine "
    "possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper "
    "table tank telephone television tiger tractor train trout tulip turtle "
    "wardrobe whale willow_tree wolf woman worm").split())
_STL10 = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey",
          "ship", "truck")
_PCAM = ("lymph node", "lymph node containing metastatic tumor tissue")
_FASHION = ("T - shirt / top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_KMNIST = ("\u304a", "\u304d", "\u3059", "\u3064", "\u306a", "\u306f",
           "\u307e", "\u3084", "\u308c", "\u3092")  # o ki su tsu na ha ...

TASKS = (
    ("oxford_flowers102", "oxford_flowers102", 102, (), "tfds"),
    ("pcam", "patch_camelyon", 2, _PCAM, "tfds"),
    ("oxford_iiit_pet", "oxford_iiit_pet", 37, (), "carve"),
    ("stl10", "stl10", 10, _STL10, "carve"),
    ("cifar100", "cifar100", 100, _CIFAR100, "carve"),
    ("cifar10", "cifar10", 10, _CIFAR10, "carve"),
    ("food101", "food101", 101, (), "carve_test"),
    ("fashion_mnist", "fashion_mnist", 10, _FASHION, "carve"),
    ("kmnist", "kmnist", 10, _KMNIST, "carve"),
)

_CIFAR_T = tuple(f"a {q}photo of {a} {s}{{}}." for a in ("a", "the")
                 for q, s in (("", ""), ("blurry ", ""),
                              ("black and white ", ""),
                              ("low contrast ", ""), ("high contrast ", ""),
                              ("bad ", ""), ("good ", ""), ("", "small "),
                              ("", "big ")))
# The papers' code templates of these tasks (task_vectors / FusionBench).
TEMPLATES = {
    "oxford_flowers102": ("a photo of a {}, a type of flower.",),
    "pcam": ("this is a photo of {}",),
    "oxford_iiit_pet": ("a photo of a {}, a type of pet.",),
    "stl10": ("a photo of a {}.", "a photo of the {}."),
    "cifar100": _CIFAR_T,
    "cifar10": _CIFAR_T,
    "food101": ("a photo of {}, a type of food.",),
    "fashion_mnist": ("a photo of a {}.", "a photo of the {}."),
    "kmnist": ("a photo of the character {}.",),
}
