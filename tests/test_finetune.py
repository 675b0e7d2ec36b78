"""Fine-tuning: resume equals an uninterrupted run, tangent-space forward,
checkpoint averaging, caches that reject stale or corrupt entries."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtmerge import checkpoint
from mtmerge import encoders
from mtmerge import finetune
from mtmerge import sharding
from mtmerge import taskdata
from mtmerge import taskpool
from mtmerge import train
from mtmerge import tree as tree_lib


@pytest.fixture(scope="module")
def enc():
  return encoders.load("minilm", num_layers=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
  # Data prepared once per module into a private cache.
  monkeypatch.setenv("MTMERGE_CACHE", str(tmp_path_factory.getbasetemp() /
                                          "cache"))


def _cfg(**kw):
  c = dict(mode="standard", trainable=r"layers/0/attention/.*", steps=4,
           batch_size=8, lr=1e-3, warmup=1, weight_decay=0.01, save_every=2,
           average_last=0, seed=0, limit=48, max_len=32)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def _probe_cfg():
  return ml_collections.ConfigDict(dict(steps=50, lr=0.05, weight_decay=1e-4,
                                        limit=48, batch_size=16, max_len=32))


def test_resume_after_interruption_equals_uninterrupted(enc, tmp_path,
                                                        monkeypatch):
  head = finetune.linear_probe(enc, "sentiment", _probe_cfg(), str(tmp_path))
  want = finetune.finetune_task(enc, "sentiment", head, _cfg(),
                                str(tmp_path / "a"), progress=False)
  real = taskdata.batch_at

  def crash_at_3(b, step):
    if step == 3:
      raise KeyboardInterrupt("simulated preemption")
    return real(b, step)
  monkeypatch.setattr(taskdata, "batch_at", crash_at_3)
  with pytest.raises(KeyboardInterrupt):
    finetune.finetune_task(enc, "sentiment", head, _cfg(),
                           str(tmp_path / "b"), progress=False)
  run = checkpoint.Run(str(tmp_path / "b" / "finetune" / "sentiment-standard"),
                       finetune.fingerprint(enc, finetune.suites.get_task(
                           "sentiment"), _cfg(), head))
  assert run.latest_step() == 2 and not run.done()
  monkeypatch.setattr(taskdata, "batch_at", real)
  got = finetune.finetune_task(enc, "sentiment", head, _cfg(),
                               str(tmp_path / "b"), progress=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7), got, want)
  # The fine-tuned params moved away from the pretrained ones.
  sel, _ = encoders.split(enc.params, _cfg().trainable)
  moved = sum(float(jnp.abs(tree_lib.to_flat_dict(got)[k] - v).max())
              for k, v in sel.items())
  assert moved > 1e-4
  # A finished task is served from its final checkpoint.
  again = finetune.finetune_task(enc, "sentiment", head, _cfg(),
                                 str(tmp_path / "b"), progress=False)
  jax.tree.map(np.testing.assert_array_equal, again, got)
  # The three runs went through one compiled train.fit step.
  assert train._STEP_CACHE[0][1]._cache_size() == 1


def test_eight_devices_equal_one(enc, tmp_path):
  """Through train.fit: 1 device == a 4 x 2 data/fsdp mesh, kernels sharded."""
  head = finetune.linear_probe(enc, "sentiment", _probe_cfg(), str(tmp_path))
  cfg = _cfg(steps=2)
  one = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
  eight = sharding.make_mesh([("data", 4), ("fsdp", 2)])
  r1 = finetune.finetune_task(enc, "sentiment", head, cfg,
                              str(tmp_path / "one"), progress=False, mesh=one)
  r8 = finetune.finetune_task(
      enc, "sentiment", head, cfg, str(tmp_path / "eight"), progress=False,
      mesh=eight, rules=[(".*kernel", (None, "fsdp")), (".*", None)])
  k = tree_lib.to_flat_dict(r8)["layers/0/attention/query/kernel"]
  assert k.sharding.shard_shape(k.shape) == (k.shape[0], k.shape[1] // 2)
  # Adam's first steps are ~lr * sign(g): entries whose gradient is near 0
  # move by different amounts under another summation order, so the bound
  # is a few percent of one step (lr 1e-3); a wrong gradient moves by ~lr.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0,
                                                       atol=3e-5), r8, r1)
  logs = [checkpoint.Run(str(tmp_path / d / "finetune" / "sentiment-standard"),
                         finetune.fingerprint(enc, finetune.suites.get_task(
                             "sentiment"), cfg, head)) for d in ("one", "eight")]
  losses = [[r["loss"] for r in train._read_log(run.directory)] for run in logs]
  assert len(losses[0]) == 2
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
  with pytest.raises(ValueError, match="global batch size 6 is not a "
                     "positive multiple of the 8 batch shards"):
    finetune.finetune_task(enc, "sentiment", head, _cfg(batch_size=6),
                           str(tmp_path / "bad"), progress=False, mesh=eight)


def test_checkpoint_from_another_config_is_rejected(tmp_path):
  checkpoint.Run(str(tmp_path / "r"), {"lr": 1e-3, "steps": 4})
  with pytest.raises(checkpoint.ConfigMismatchError, match="lr: 0.001 -> 0.01"):
    checkpoint.Run(str(tmp_path / "r"), {"lr": 1e-2, "steps": 4})


def test_average_last_is_the_mean_of_the_last_checkpoints(enc, tmp_path):
  head = finetune.linear_probe(enc, "sentiment", _probe_cfg(), str(tmp_path))
  cfg = _cfg(average_last=2, save_every=1, steps=3)
  got = finetune.finetune_task(enc, "sentiment", head, cfg, str(tmp_path),
                               progress=False)
  run = checkpoint.Run(str(tmp_path / "finetune" / "sentiment-standard"),
                       finetune.fingerprint(enc, finetune.suites.get_task(
                           "sentiment"), cfg, head), max_to_keep=2)
  like = {"params": got, "opt": None}
  snaps = []
  for s in (2, 3):
    restored = run.manager.restore(s)
    snaps.append(restored["params"])
  want = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, *snaps)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               got, want)
  del like


def test_tangent_forward_is_the_first_order_expansion(enc):
  trainable = r"layers/0/mlp/.*"
  lin = jax.jit(encoders.linearized(enc.features, enc.params, trainable))
  sel, rest = encoders.split(enc.params, trainable)
  batch = enc.tokenizer(["a fine film", "dull and long plot summary"],
                        max_length=16)
  batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
  f0 = enc.features(enc.params, batch)
  zero = jax.tree.map(jnp.zeros_like, sel)
  np.testing.assert_allclose(lin(zero, batch), f0, atol=1e-6)
  rng = np.random.default_rng(0)
  d = {k: jnp.asarray(rng.normal(size=v.shape) * 1e-3, jnp.float32)
       for k, v in sel.items()}
  # Linear in delta ...
  d2 = jax.tree.map(lambda x: 2 * x, d)
  np.testing.assert_allclose(lin(d2, batch) - f0, 2 * (lin(d, batch) - f0),
                             atol=2e-6)
  # ... and matching the true model to first order (error ~ eps^2).
  for eps, tol in ((1.0, 5e-4), (0.1, 5e-6)):
    de = jax.tree.map(lambda x: eps * x, d)
    moved = encoders.join({k: sel[k] + de[k] for k in sel}, rest)
    err = float(jnp.abs(enc.features(moved, batch) - lin(de, batch)).max())
    assert err < tol, (eps, err)


def test_padded_head_gives_the_same_loss_and_gradient(enc):
  rng = np.random.default_rng(0)
  head = {"kernel": jnp.asarray(rng.normal(size=(enc.dim, 3)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  padded = finetune.pad_classes(head)
  assert padded["kernel"].shape == (enc.dim, 8)
  loss, init = finetune._loss_fn(enc, "standard", r"layers/0/attention/.*")
  batch = enc.tokenizer(["a fine film", "dull and long", "so so"],
                        max_length=16)
  batch = {"input_ids": batch["input_ids"],
           "attention_mask": batch["attention_mask"],
           "label": np.asarray([0, 2, 1], np.int32)}
  (l1, a1), g1 = jax.value_and_grad(loss, has_aux=True)(init, head, batch)
  (l2, a2), g2 = jax.value_and_grad(loss, has_aux=True)(init, padded, batch)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  assert float(a1) == float(a2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-8), g2, g1)


def test_corrupt_head_cache_is_recomputed(enc, tmp_path):
  head = finetune.linear_probe(enc, "subjectivity", _probe_cfg(),
                               str(tmp_path))
  path = tmp_path / "heads" / "subjectivity.npz"
  path.write_bytes(path.read_bytes()[:50])
  again = finetune.linear_probe(enc, "subjectivity", _probe_cfg(),
                                str(tmp_path))
  np.testing.assert_allclose(again["kernel"], head["kernel"], rtol=1e-5)


def test_taskpool_accuracy_matches_a_direct_computation(enc, tmp_path):
  head = finetune.linear_probe(enc, "sentiment", _probe_cfg(), str(tmp_path))
  trainable = r"layers/0/attention/.*"
  pool = taskpool.TaskPool(enc, ["sentiment"], {"sentiment": head},
                           trainable=trainable, batch_size=16,
                           limits={"test": 40})
  sel, _ = encoders.split(enc.params, trainable)
  got = pool.accuracy(sel, "sentiment")
  # Direct: every test example alone (no batching), padded to the full 48
  # tokens so one jitted program serves all (padding invariance is
  # tested in test_bert).
  src = finetune.suites.load_split("sentiment", "test")
  features = jax.jit(enc.features)
  correct = 0
  for i in range(40):
    ex = src[i]
    b = enc.tokenizer([taskdata.pipeline.as_text(ex["text"])], max_length=48,
                      pad_to_multiple_of=48)
    assert b["input_ids"].shape == (1, 48)
    f = features(enc.params, {"input_ids": b["input_ids"],
                              "attention_mask": b["attention_mask"]})
    correct += int(np.argmax(encoders.logits(head, f)[0]) == ex["label"])
  assert got == pytest.approx(correct / 40)
