"""Data through TFDS: offline task suites, the CLIP-8 suite, input pipelines.

* `suites`: task registry (`get_task`, `get_suite`, `load_split`).
* `builders`: TFDS builders of the offline `text` and `images` suites, and
  their self-verifying cache.
* `pipeline`: seeded, host-sharded, length-bucketed numpy batches.
* `sources`: the raw files inside installed wheels the offline suites use.
"""

from mtmerge.data import builders
from mtmerge.data import pipeline
from mtmerge.data import sources
from mtmerge.data import suites
