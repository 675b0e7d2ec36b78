r"""Entry point: `python -m mtmerge.main --config configs/X.py --workdir DIR`.

Thin by design: parse flags, initialize (multi-host when detected), dispatch
to the `run(config, workdir)` function of the config's job; notebooks call
the same `run` functions.
"""

import sys

from mtmerge import runtime

# Before anything imports jax (the setting is read at jax's import):
runtime.hoist_constants()  # frozen params as arguments, not constants

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")

JOBS = {"benchmark": "mtmerge.benchmark", "demo": "mtmerge.demo"}
JOBS["logits_fusion"] = "mtmerge.fusion.logits_bench"  # Dynamic Logits Fusion
JOBS["scalearn"] = "mtmerge.transfer.bench"  # ScaLearn transfer
JOBS["ot_fusion"] = "mtmerge.fusion.ot_bench"  # Transformer OT fusion
JOBS["flat_sam"] = "mtmerge.flat.bench"  # task-based flat regions (SAM)
JOBS["exssnet"] = "mtmerge.continual.bench"  # ExSSNeT continual learning
JOBS["controllable"] = "mtmerge.controllable.bench"  # controllable MTL


def main(argv):
  del argv
  import importlib
  from mtmerge import distributed
  distributed.maybe_initialize()  # multi-host only when detected
  if logging.get_verbosity() == logging.INFO and not flags.FLAGS[
      "verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  runtime.enable_compile_cache()
  config = _CONFIG.value
  if config.job not in JOBS:
    raise app.UsageError(f"unknown job {config.job!r}; known: {sorted(JOBS)}")
  job = importlib.import_module(JOBS[config.job])
  try:
    job.run(config, _WORKDIR.value)
  except getattr(job, "ConfigError", ()) as e:
    print(f"mtmerge: error: {e}", file=sys.stderr)  # one line, no traceback
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
