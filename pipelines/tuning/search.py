"""The search's sampler and pruner, built from the tune spec's `sampler` and `pruner` mappings."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning

from msa.config import stable_hash

PRUNERS = ("median", "hyperband", "successive_halving", "threshold", "none")


def make_sampler(sampler: Mapping[str, Any], seed: int) -> optuna.samplers.TPESampler:
    """A seeded TPE sampler with the spec's other `sampler` arguments."""
    kwargs = {k: v for k, v in sampler.items() if k != "seed"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, **kwargs)


def session_seed(base_seed: int, n_existing: int, worker: int) -> int:
    """The sampler seed of one worker in one session. A resumed study must not replay the first
    session's random start-up draws, nor may two parallel workers draw the same ones."""
    return int(stable_hash([base_seed, n_existing, worker]), 16) % (2**31)


def make_pruner(pruner: Mapping[str, Any], steps: int) -> optuna.pruners.BasePruner:
    """The spec's pruner; `steps` (epochs x seeds) is Hyperband's default max_resource. Both
    multi-fidelity pruners count their resource in the steps the objective reports: one per epoch."""
    kwargs = {k: v for k, v in pruner.items() if k != "type"}
    kind = pruner.get("type", "median")
    if kind in ("hyperband", "successive_halving"):
        _check_halving(kwargs)
    if kind == "median":
        return optuna.pruners.MedianPruner(**kwargs)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(**{"max_resource": steps, **kwargs})
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**kwargs)
    if kind == "threshold":
        return optuna.pruners.ThresholdPruner(**kwargs)
    if kind == "none":
        return optuna.pruners.NopPruner(**kwargs)
    raise ValueError(f"pruner type must be one of {list(PRUNERS)}, got {kind!r}")



def _check_halving(kwargs: Mapping[str, Any]) -> None:
    """What Optuna's halving pruners take without checking and then fail on in every trial (a
    reduction_factor of 1 divides by zero in each trial's pruning decision)."""
    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if "reduction_factor" in kwargs and not (integer(kwargs["reduction_factor"]) and kwargs["reduction_factor"] >= 2):
        raise ValueError(f"reduction_factor must be an integer >= 2, got {kwargs['reduction_factor']!r}")
    if "min_resource" in kwargs and not (kwargs["min_resource"] == "auto"
                                         or (integer(kwargs["min_resource"]) and kwargs["min_resource"] >= 1)):
        raise ValueError(f"min_resource must be 'auto' or an integer >= 1, got {kwargs['min_resource']!r}")
