"""The Optuna search around the improved model: spec, storage, objective, session and the hand-over
of its best trial to the suite as the ablation `improved_tuned`.

Layers, each importing only those before it: `spec` (with `search`: sampler and pruner; `storage`:
every contact with Optuna's private API) < `objective` < `confirm` (the top trials re-trained on more
seeds, and the choice of the winner) < `handover` < `session` < `pipeline`.
"""

from pipelines.tuning.confirm import Choice, choose
from pipelines.tuning.handover import (
           TUNED,
           default_study_name,
           tune_spec_for,
           tuned_elsewhere,
           tuned_for,
           tuned_override,
)
from pipelines.tuning.objective import TrialSetup, objective, override_of, sample, search_view
from pipelines.tuning.pipeline import TuneResult, tune
from pipelines.tuning.search import make_pruner, make_sampler
from pipelines.tuning.session import StudySession, run_study, summary
from pipelines.tuning.spec import DEFAULT_TUNE_SPEC, TuneError, TuneSpec, load_tune_spec, parse_tune_spec
from pipelines.tuning.storage import check_storage, default_storage_path, open_storage, storage_label

__all__ = ["TUNED", "TuneSpec", "TuneError", "TuneResult", "StudySession", "DEFAULT_TUNE_SPEC", "load_tune_spec",
           "parse_tune_spec", "check_storage", "open_storage", "storage_label", "default_storage_path", "run_study",
           "tune", "tuned_elsewhere", "tuned_for", "tuned_override", "tune_spec_for", "default_study_name", "summary",
           "objective", "sample", "override_of", "search_view", "make_pruner", "make_sampler", "TrialSetup", "Choice",
           "choose"]
