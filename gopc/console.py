"""The commands print their own lines. MLflow's, Ray's and Optuna's INFO chatter (database migrations, a
new experiment or study, the system-metrics monitor, Ray's start-up) is shown only with --verbose; their
warnings and errors are always shown."""
from __future__ import annotations

import logging
import os

_level = logging.WARNING


def quiet_libraries(verbose: bool) -> None:
    global _level
    _level = logging.INFO if verbose else logging.WARNING
    name = logging.getLevelName(_level)
    if verbose or "MLFLOW_LOGGING_LEVEL" not in os.environ:  # a level the user set is theirs
        os.environ["MLFLOW_LOGGING_LEVEL"] = name  # read when mlflow is imported: here, and in Ray's workers
    for logger in ("mlflow", "ray", "optuna"):  # already imported: set them as well
        logging.getLogger(logger).setLevel(_level)


def library_level() -> int:
    """For ray.init(logging_level=...) and Optuna, which set their loggers again when they start."""
    return _level
