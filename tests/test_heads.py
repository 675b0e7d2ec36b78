"""Frozen task heads: zero-shot heads from prompts, and their bad input."""

import numpy as np
import pytest

from configs import default
from mtmerge import benchmark
from mtmerge import encoders
from mtmerge import heads
from mtmerge.data import suites


@pytest.fixture(scope="module")
def enc():
  return encoders.load("minilm", num_layers=1)


def test_zeroshot_head_is_scaled_mean_prompt_direction(enc):
  head = heads.zeroshot_head(enc, "sentiment", scale=10.0,
                             templates=("a {} review.", "{}"))
  assert head["kernel"].shape == (enc.dim, 2)
  np.testing.assert_array_equal(head["bias"], 0.0)
  # Columns are 10 x unit vectors: the renormalized mean of the unit
  # prompt embeddings of "negative"/"positive".
  np.testing.assert_allclose(np.linalg.norm(head["kernel"], axis=0), 10.0,
                             rtol=1e-5)
  tok = enc.tokenizer(["a positive review.", "positive"], max_length=16)
  e = np.asarray(enc.features(enc.params, {
      "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}))
  want = e.mean(0) / np.linalg.norm(e.mean(0))
  np.testing.assert_allclose(head["kernel"][:, 1] / 10.0, want, atol=1e-5)


def test_bad_heads_are_refused_by_name(enc):
  task = suites.get_task("sentiment")
  with pytest.raises(ValueError, match="template 'a review.' must format"):
    heads.task_prompts(task, ("a review.",))
  with pytest.raises(ValueError, match=r"'debate_role' has kernel shape "
                     r"\(384, 2\), need \(384, 3\)"):
    heads.check({"kernel": np.zeros((384, 2))},
                suites.get_task("debate_role"), 384)
  with pytest.raises(KeyError, match="no zero-shot prompts for task 'x'"):
    heads.prompts.text_prompts("x")


def test_benchmark_refuses_a_bad_template_before_work(tmp_path):
  config = default.get_config("runlocal")
  config.heads.templates = ("a {} review.", "no slot")
  with pytest.raises(benchmark.ConfigError, match="'no slot' must format"):
    benchmark.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "finetune").exists()
