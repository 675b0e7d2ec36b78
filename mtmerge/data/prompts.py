"""Class prompts of the offline text tasks, for zero-shot heads.

The CLIP recipe (Radford et al. 2021) applied to a sentence encoder: each
class is described by a short phrase, the phrase is put into several
templates, and the head is the renormalized mean of the prompt embeddings
(`mtmerge.models.zeroshot.build_head`). The templates say what kind of
text an input is ("a movie review", "a word"), and the class phrases say
what tells the classes apart, as CLIP's templates do for images; they are
written once from the task definitions, never tuned on any split.

`TEXT_PROMPTS[task] = (class phrases in label order, templates)`.
"""

from __future__ import annotations

_WORD = ("a word about {}.", "the word is related to {}.", "{}",
         "a term from the field of {}.")
_POLARITY_WORD = ("a word that is {}.", "this word is {}.", "{}",
                  "an example of a {} word.")

TEXT_PROMPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sentiment": (("negative", "positive"),
                  ("a {} movie review.", "a {} review of a film.",
                   "the critic's opinion is {}.", "a {} opinion.")),
    "subjectivity": (("an objective plot summary",
                      "a subjective opinion"),
                     ("{}.", "this sentence is {}.", "{} about a movie.",
                      "a sentence that is {}.")),
    "party": (("the democratic party", "the republican party"),
              ("a speech by {}.", "a convention speech from {}.",
               "a politician of {} said this.", "{}")),
    "rnc_year": (("2012", "2016"),
                 ("a republican convention speech from {}.",
                  "a speech given in {}.", "the year {}.",
                  "political rhetoric of {}.")),
    "debate_role": (("the democratic candidate", "the republican candidate",
                     "the debate moderator"),
                    ("a statement by {}.", "{} said this in a debate.",
                     "{} speaking.", "a question or answer from {}.")),
    "moral_foundation": (("care and harm", "fairness and cheating",
                          "loyalty and betrayal",
                          "authority and subversion",
                          "purity and degradation"), _WORD),
    "word_domain": (("economy and business", "law and crime",
                     "war and the military", "politics and government",
                     "religion", "school and learning",
                     "travel and movement", "tools and instruments"),
                    _WORD),
    "word_valence": (("negative", "positive"), _POLARITY_WORD),
    "concreteness": (("abstract", "concrete"), _POLARITY_WORD),
}


def text_prompts(task: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """`(class phrases, templates)` of an offline text task.

  Raises:
    KeyError: a task without prompts, naming the ones that have them.
  """
  if task not in TEXT_PROMPTS:
    raise KeyError(f"no zero-shot prompts for task {task!r}; tasks with "
                   f"prompts: {sorted(TEXT_PROMPTS)}")
  return TEXT_PROMPTS[task]
