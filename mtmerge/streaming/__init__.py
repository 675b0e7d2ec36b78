"""Streamed, out-of-core merges of checkpoints on disk.

    from mtmerge import streaming
    streaming.merge_files("ties_merging", "base/", ["a/", "b/"], "out/",
                          max_memory=2 << 30, threshold=0.2)

Memory is bounded by one block (a row range of one tensor), not by the
model: see `executor` (the block loop), `reader` (memory-mapped inputs),
`writer` (shard-by-shard atomic output), `stats` (model-wide statistics as
per-block partials) and `recipes` (which statistics each method needs;
`recipes_masks`, `recipes_lowrank` and `recipes_pcb` for TALL/EMR,
DELLA/TSV and PCB).
"""

from mtmerge.streaming.executor import (DEFAULT_MAX_MEMORY, merge_files,
                                        parse_size)
from mtmerge.streaming.recipes import streams, supported
