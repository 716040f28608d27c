"""The `tune` pipeline: a study session, then `improved_tuned` trained beside `compare_with` over the
suite's seeds (runs already in the store are reused) and the comparison refreshed."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from pipelines import suite
from pipelines.executor import Engine
from pipelines.stages.compare import Comparison
from pipelines.tuning.handover import TUNED
from pipelines.tuning.session import StudySession, run_study
from pipelines.tuning.spec import TuneSpec


@dataclass
class TuneResult:
    session: StudySession
    suite: suite.SuiteResult | None            # improved_tuned beside compare_with; None without a best trial
    comparison: Comparison | None = None       # the comparison of that suite
    comparison_note: str | None = None         # why there is no comparison, when there is none


def tune(spec: TuneSpec, *, data_source: str | None = None, quick: bool = False, epochs: int | None = None,
         trials: int | None = None, timeout: float | None = None, storage: str | None = None,
         study_name: str | None = None, workers: int | None = None, stream: TextIO | None = None,
         engine: Engine | None = None,
         on_session: Callable[[StudySession], None] = lambda session: None) -> TuneResult:
    """`on_session` sees the study session as soon as it ends, before the suite trains its choice."""
    stream = stream or sys.stderr
    session = run_study(spec, data_source=data_source, quick=quick, epochs=epochs, trials=trials, timeout=timeout,
                        storage=storage, study_name=study_name, workers=workers or 1, stream=stream, engine=engine)
    on_session(session)
    if session.override is None:
        return TuneResult(session, None, comparison_note=f"study '{session.study}' has no COMPLETE trial yet: "
                                                         "nothing to add to the comparison")
    suite_spec = session.suite_spec
    suite_spec = (suite_spec.select(spec.compare_with) if spec.compare_with
                  else dataclasses.replace(suite_spec, ablations={}, overrides={}))
    result = suite.run_suite(suite_spec, data_source=data_source, quick=quick, workers=workers, stream=stream,
                             extra_ablations={TUNED: session.override}, suite_name="tune", engine=engine)
    comparison, note = suite.compare(result)
    return TuneResult(session, result, comparison, note)


__all__ = ["TuneResult", "tune"]
