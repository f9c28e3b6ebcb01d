"""autograd-lab: a training-dynamics research harness.

Importing the package is cheap on purpose: torch and Lightning are imported by the modules that
need them, so `autograd-lab train --help` and `--cfg job` answer without paying for them.
"""

__version__ = "0.1.0"
RUN_FORMAT_VERSION = 1  # bumped when run.json / metrics.parquet change shape
