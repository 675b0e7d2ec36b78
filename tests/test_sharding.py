"""Mesh from config data, shardings from regex rules, batch checks."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mtmerge import methods, sharding, testing
from mtmerge import tree as tree_lib

MESH = [("data", -1), ("fsdp", 2), ("task", 1)]
RULES = [(r"embed/table", ("fsdp", None)),
         (r".*/kernel", (None, "fsdp")),
         (r".*", None)]


def test_make_mesh_fills_the_free_axis():
  mesh = sharding.make_mesh(MESH)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "task": 1}
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  mesh = sharding.make_mesh("data:2,fsdp:-1", axis_types="explicit")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}
  mesh = sharding.make_mesh([["x", 4]], devices=jax.devices()[4:])
  assert [d.id for d in mesh.devices.flat] == [4, 5, 6, 7]


@pytest.mark.parametrize("spec, match", [
    ([("data", 3), ("fsdp", -1)], r"mesh axes \(data=3, fsdp=-1\) need a "
     r"multiple of 3 devices, but there are 8"),
    ([("data", 2), ("fsdp", 2)], r"use 4 devices but there are 8"),
    ([("data", -1), ("fsdp", -1)], "at most one mesh axis may be -1"),
    ([("data", 8), ("data", 1)], "repeats an axis name"),
    ([("data", 0)], "size must be >= 1 or -1"),
    ([("data",)], r"\(axis_name, size\) pairs"),
])
def test_make_mesh_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(spec)


def test_shardings_from_rules_specs_and_shards():
  mesh = sharding.make_mesh(MESH)
  params = testing.random_params(0)
  abstract = jax.eval_shape(lambda x: x, params)
  sh = tree_lib.to_flat_dict(sharding.shardings_from_rules(abstract, RULES,
                                                           mesh))
  assert sh["embed/table"].spec == P("fsdp", None)
  assert sh["block_0/attn/kernel"].spec == P(None, "fsdp")
  assert sh["block_0/mlp/kernel"].spec == P(None, "fsdp")
  assert sh["block_1/dense/kernel"].spec == P(None, None)  # 13 % 2: replicated
  assert sh["block_0/attn/bias"].spec == P()
  assert sh["head/temperature"].spec == P()
  placed = jax.device_put(tree_lib.to_flat_dict(params), sh)
  shard0 = lambda k: placed[k].addressable_shards[0].data.shape
  assert shard0("block_0/attn/kernel") == (16, 12)
  assert shard0("embed/table") == (20, 16)
  with pytest.raises(ValueError, match=r"'block_1/dense/kernel': dim 1 of "
                     r"shape \(24, 13\) is not divisible by mesh axes"):
    sharding.shardings_from_rules(abstract, RULES, mesh, strict=True)


@pytest.mark.parametrize("rules, exc, match", [
    ([(r"(block|head).*", None)], tree_lib.UncoveredPathError,
     "'embed/table' is not covered"),
    ([(r"embed/table", (None, None, "fsdp")), (".*", None)], ValueError,
     r"'embed/table' of shape \(40, 16\) has 2 dims but its sharding spec"),
    ([(r".*", ("model",))], ValueError, "names mesh axis 'model'"),
    ([(r"embed/table", ("fsdp", "fsdp")), (".*", None)], ValueError,
     "'fsdp' appears twice"),
])
def test_shardings_from_rules_errors(rules, exc, match):
  mesh = sharding.make_mesh(MESH)
  with pytest.raises(exc, match=match):
    sharding.shardings_from_rules(testing.random_params(0), rules, mesh)


def test_task_vector_sharding_and_sharded_merge():
  mesh = sharding.make_mesh([("task", 4), ("fsdp", 2)])
  base = testing.random_params(0)
  models = testing.random_models(base, 4, seed=1)
  tvs = jax.tree.map(lambda b, *m: np.stack([x - b for x in m]), base,
                     *models)
  sh = sharding.task_vector_sharding(tvs, mesh, RULES)
  flat = tree_lib.to_flat_dict(sh)
  assert flat["block_0/attn/kernel"].spec == P("task", None, "fsdp")
  assert flat["head/temperature"].spec == P("task")
  # Three tasks do not divide the task axis of 4: that dim is replicated.
  three = jax.tree.map(lambda x: x[:3], tvs)
  flat3 = tree_lib.to_flat_dict(sharding.task_vector_sharding(three, mesh,
                                                              RULES))
  assert flat3["block_0/attn/kernel"].spec == P(None, None, "fsdp")
  assert flat3["head/temperature"].spec == P(None)
  # A merge over inputs placed by these shardings equals the NumPy formula.
  base_sh = sharding.shardings_from_rules(base, RULES, mesh)
  merged = methods.merge("task_arithmetic", jax.device_put(base, base_sh),
                         jax.device_put(tvs, sh), scaling_factor=0.3)
  for path, x in tree_lib.named_leaves(merged):
    want = (tree_lib.to_flat_dict(base)[path] +
            0.3 * tree_lib.to_flat_dict(tvs)[path].sum(0))
    np.testing.assert_allclose(np.asarray(x), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="task axis 'tasks' is not a mesh axis"):
    sharding.task_vector_sharding(tvs, mesh, task_axis="tasks")


def test_batch_sharding_and_divisibility():
  mesh = sharding.make_mesh(MESH)
  assert sharding.batch_sharding(mesh).spec == P(("data",))
  assert sharding.batch_sharding(mesh, ("data", "fsdp")).spec == P(
      ("data", "fsdp"))
  assert sharding.check_batch_divides(12, mesh) == 12  # one process: all rows
  assert sharding.check_batch_divides(16, mesh, ("data", "fsdp")) == 16
  with pytest.raises(ValueError, match=r"global batch size 12 is not a "
                     r"positive multiple of the 8 batch shards of data axes "
                     r"\(data=4, fsdp=2\); use a multiple of 8"):
    sharding.check_batch_divides(12, mesh, ("data", "fsdp"))
  with pytest.raises(ValueError, match="data axis 'batch' is not a mesh axis"):
    sharding.batch_sharding(mesh, "batch")
