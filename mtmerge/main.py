r"""Entry point: `python -m mtmerge.main --config configs/X.py --workdir DIR`.

Thin by design: parse flags, initialize (multi-host when detected), dispatch
to the `run(config, workdir)` function of the config's job; notebooks call
the same `run` functions.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")

JOBS = {"demo": "mtmerge.demo"}


def main(argv):
  del argv
  import importlib
  from mtmerge import runtime
  runtime.enable_compile_cache()
  config = _CONFIG.value
  if config.job not in JOBS:
    raise app.UsageError(f"unknown job {config.job!r}; known: {sorted(JOBS)}")
  importlib.import_module(JOBS[config.job]).run(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
