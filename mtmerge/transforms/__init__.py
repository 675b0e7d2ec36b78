"""Composable merge primitives in the optax `(init, apply)` / `chain` style.

Build a new method in three lines, e.g. TIES:

    tau = transforms.run(transforms.chain(
        transforms.trim_by_magnitude(0.2), transforms.elect_sign(),
        transforms.disjoint_merge("mean")), tvs)
"""

from mtmerge.transforms.base import (EmptyState, MergeTransform, chain,
                                     masked, run, stateless)
from mtmerge.transforms.combine import (disjoint_merge, elect_sign,
                                        elected_signs, mean_tasks, sum_tasks,
                                        task_sum, trimmed_disjoint_merge)
from mtmerge.transforms.scale import (check_coeffs, scale, scale_by_regex,
                                      scale_per_leaf, scale_per_task)
from mtmerge.transforms.sparsify import (apply_mask, check_fraction,
                                         drop_and_rescale,
                                         magnitude_rank_drop,
                                         remove_outliers_and_trim,
                                         trim_by_magnitude)
