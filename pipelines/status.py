"""The states a run can be in, as the tracking store (MLflow) and a suite's summary name them."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """A run's state. The first four are MLflow's own run states; CACHED marks a suite row whose run
    FINISHED in an earlier suite and was reused, not trained again."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"
    CACHED = "CACHED"

    @property
    def usable(self) -> bool:
        """The row has a FINISHED run behind it (trained now, or earlier) that can be compared."""
        return self in (RunStatus.FINISHED, RunStatus.CACHED)


__all__ = ["RunStatus"]
