"""The Optuna search's public names, kept here for scripts and docs that import `pipelines.tune`;
the implementation is the package `pipelines.tuning`."""

from pipelines.tuning import *  # noqa: F403
from pipelines.tuning import __all__  # noqa: F401
