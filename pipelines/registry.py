"""The Model Registry: after a suite, the ablation with the best mean *validation* score has its best
seed's model registered under the experiment's name, with the alias `champion`. Test scores never
take part: validation selects, test is only reported.

On the same data the alias moves only to a better validation mean; on other data (a new file, other
synthetic sizes) the scores are not comparable, so the newest suite's choice takes it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from msa.metrics import is_better

CHAMPION = "champion"  # the alias of the model to use: `models:/<experiment>@champion`


@dataclass(frozen=True)
class Candidate:
    """One ablation's validation scores over a suite's seeds, at the checkpoint each run kept."""

    ablation: str
    scores: dict[int, tuple[str, float]]   # seed -> (run id, validation score)
    higher: bool                            # the metric's direction

    @property
    def mean(self) -> float:
        return statistics.fmean(v for _, v in self.scores.values())

    @property
    def std(self) -> float:
        values = [v for _, v in self.scores.values()]
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def best_seed(self) -> int:
        best = None
        for seed, (_, value) in sorted(self.scores.items()):
            if best is None or is_better(value, self.scores[best][1], higher=self.higher):
                best = seed
        return best


@dataclass(frozen=True)
class Champion:
    """The registered version that holds the alias after a suite."""

    name: str              # the registered model (the experiment's name)
    version: str
    ablation: str
    seed: int
    run_id: str
    metric: str            # e.g. val_Corr
    mean: float
    std: float
    n: int
    moved: bool            # the alias moved to this suite's choice (False: an earlier, better one kept it)
    replaced: str = ""     # the version that held the alias before, when it moved from another one

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{CHAMPION}"

    def line(self) -> str:
        what = "champion" if self.moved else "champion unchanged (it scores better on this data)"
        was = f"; it was version {self.replaced}" if self.replaced and self.replaced != self.version else ""
        return (f"{what}: {self.uri} = version {self.version}, {self.ablation}/seed-{self.seed} "
                f"(validation {self.metric} {_spread(self.mean, self.std, self.n)}{was})")


def choose(candidates: Iterable[Candidate]) -> Candidate | None:
    """The candidate with the best mean validation score (the first of a tie, in suite order)."""
    best = None
    for c in candidates:
        if best is None or is_better(c.mean, best.mean, higher=c.higher):
            best = c
    return best


def validation_score(client: MlflowClient, run, key: str, higher: bool) -> float | None:
    """`key` (e.g. val_Corr) at the epoch whose checkpoint the run kept (its best_epoch metric); for a run
    without one, the best value in its history."""
    history = [m for m in client.get_metric_history(run.info.run_id, key) if math.isfinite(m.value)]
    if not history:
        return None
    best_epoch = run.data.metrics.get("best_epoch")
    at_best = [m.value for m in history if best_epoch is not None and m.step == int(best_epoch)]
    if at_best:
        return at_best[-1]
    return (max if higher else min)(m.value for m in history)


def candidates(client: MlflowClient, rows: Iterable, seeds: Iterable[int], key: str, higher: bool
               ) -> tuple[list[Candidate], list[str]]:
    """Per ablation, its runs' validation scores; an ablation missing a seed (a failed run) is left
    out, since its mean would stand on fewer seeds than the others'. Returns (candidates, left out)."""
    seeds = list(seeds)
    by_ablation: dict[str, dict[int, tuple[str, float]]] = {}
    rows = list(rows)
    order = list(dict.fromkeys(row.ablation for row in rows))
    for row in rows:
        if not row.status.usable or not row.run_id:
            continue
        score = validation_score(client, client.get_run(row.run_id), key, higher)
        if score is not None:
            by_ablation.setdefault(row.ablation, {})[int(row.seed)] = (row.run_id, score)
    complete = [Candidate(a, by_ablation[a], higher) for a in order
                if set(seeds) <= set(by_ablation.get(a, {}))]
    return complete, [a for a in order if a not in {c.ablation for c in complete}]


def logged_model_id(client: MlflowClient, run) -> str | None:
    """The id of the model a run logged (`<ablation>-seed-<n>`, or `model` before models were named)."""
    page = client.search_logged_models([run.info.experiment_id],
                                       filter_string=f"source_run_id = '{run.info.run_id}'", max_results=10)
    ready = [m for m in page if str(m.status).endswith("READY")] or list(page)
    return ready[0].model_id if ready else None


def crown(client: MlflowClient, experiment: str, experiment_id: str, suite_run_id: str, rows: Iterable,
          seeds: Iterable[int], *, select_key: str, higher: bool, data_digest: str, synthetic: bool,
          suite_label: str) -> tuple[Champion | None, str]:
    """Register the suite's best ablation (by mean validation `select_key`) and give it the alias
    `champion` unless a version registered earlier on the same data and metric scores at least as
    well: that one then holds the alias, or takes it back from another data set's champion.
    Returns (the champion, one line for the summary); (None, why not) when nothing could be registered."""
    found, left_out = candidates(client, rows, seeds, select_key, higher)
    best = choose(found)
    skipped = f" ({', '.join(left_out)} left out: not every seed finished)" if left_out else ""
    if best is None:
        return None, f"no champion: no ablation has a validation {select_key} on every seed{skipped}"
    seed = best.best_seed
    run_id = best.scores[seed][0]
    run = client.get_run(run_id)
    model_id = logged_model_id(client, run)
    if model_id is None:
        return None, f"no champion: run {run_id} ({best.ablation}/seed-{seed}) logged no model"

    _ensure_registered_model(client, experiment, experiment_id)
    current = _current(client, experiment)
    was = str(current.version) if current is not None else ""   # said when the alias moves from it
    version = _version_of(client, experiment, model_id)
    # Chosen again (a suite that reuses cached runs): the version keeps the evidence it holds unless
    # this suite's rests on at least as many seeds, so that a lucky mean of fewer seeds never inflates it.
    held = _recorded(client.get_model_version(experiment, version), experiment, select_key) if version else None
    keep = held is not None and held.n > len(best.scores)
    # The title on this data goes to the best version ever registered on it, not merely the present
    # holder: that may be another data set's, and a worse suite must not take it back from there.
    rival, recorded = _best_on(client, experiment, data_digest, select_key, best.higher)
    if rival is not None and _model_of(rival) != model_id and not is_better(held.mean if keep else best.mean,
                                                                             recorded.mean, higher=best.higher):
        moved = current is None or str(current.version) != recorded.version
        if moved:
            client.set_registered_model_alias(experiment, CHAMPION, recorded.version)
        kept = replace(recorded, moved=moved, replaced=was)
        return kept, kept.line() + skipped
    if keep:
        client.set_registered_model_alias(experiment, CHAMPION, version)
        kept = replace(held, moved=True, replaced=was)
        return kept, kept.line() + skipped
    description = _description(best, seed, select_key, synthetic, suite_label, data_digest)
    tags = {"ablation": best.ablation, "seed": str(seed), "data_digest": data_digest,
            "synthetic": str(synthetic).lower(), "validation_metric": select_key,
            "validation": f"{best.mean:.4f} ± {best.std:.4f} (n={len(best.scores)})",
            "validation_mean": repr(best.mean), "validation_std": repr(best.std),
            "validation_n": str(len(best.scores)), "suite_run": suite_run_id, "suite": suite_label}
    if version is None:
        version = client.create_model_version(experiment, source=f"models:/{model_id}", run_id=run_id, tags=tags,
                                              description=description, model_id=model_id).version
        _link(client, model_id, experiment, str(version))
    else:  # the tags and the description say the same suite
        for k, v in tags.items():
            client.set_model_version_tag(experiment, version, k, v)
        client.update_model_version(experiment, version, description=description)
    client.set_registered_model_alias(experiment, CHAMPION, version)
    # Two suites on this data crowning at once both read the registry before either wrote to it, and
    # the later alias wins: read it again now that ours is written, and hand the title to a better one.
    rival, recorded = _best_on(client, experiment, data_digest, select_key, best.higher)
    if rival is not None and str(rival.version) != str(version) and is_better(recorded.mean, best.mean,
                                                                                higher=best.higher):
        client.set_registered_model_alias(experiment, CHAMPION, recorded.version)
        return recorded, recorded.line() + skipped
    champion = Champion(experiment, str(version), best.ablation, seed, run_id, select_key, best.mean, best.std,
                        len(best.scores), moved=True, replaced=was)
    return champion, champion.line() + skipped


def _best_on(client: MlflowClient, name: str, data_digest: str, key: str, higher: bool):
    """The registered version with the best validation mean of `key` on this data, and what its tags
    record (as a Champion); (None, None) when there is none."""
    best, recorded = None, None
    for v in client.search_model_versions(f"name = '{name}'", max_results=1000):
        this = _recorded(v, name, key) if v.tags.get("data_digest") == data_digest else None
        if this is not None and is_better(this.mean, recorded.mean if recorded else None, higher=higher):
            best, recorded = v, this
    return best, recorded


def _recorded(version, name: str, key: str) -> Champion | None:
    """What a version's tags record of its choice on validation `key`, as a Champion; None for a
    version chosen on another metric, or registered by hand without these tags."""
    tags = version.tags
    if tags.get("validation_metric") != key:
        return None
    try:
        return Champion(name, str(version.version), tags["ablation"], int(tags["seed"]), version.run_id, key,
                        float(tags["validation_mean"]), float(tags["validation_std"]), int(tags["validation_n"]),
                        moved=False)
    except (KeyError, ValueError):
        return None


def _ensure_registered_model(client: MlflowClient, name: str, experiment_id: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, tags={"experiment_id": experiment_id}, description=(
                f"The model to use from experiment '{name}': the alias `{CHAMPION}` names the version whose "
                "ablation has the best mean validation score of its suite (the test split never takes part). "
                f"Apply it to a file: `python -m pipelines.run predict --model models:/{name}@{CHAMPION} "
                "--data FILE`."))
        except MlflowException:  # registered meanwhile by a parallel suite
            client.get_registered_model(name)


def _current(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _version_of(client: MlflowClient, name: str, model_id: str) -> str | None:
    """The version already registered from this logged model (a re-run of a suite), if any."""
    for v in client.search_model_versions(f"name = '{name}'", max_results=1000):
        if _model_of(v) == model_id:
            return str(v.version)
    return None


def _link(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """List the version on the logged model, as `mlflow.register_model` and a tracking server do, so the
    model's page shows it as registered (a client on a SQLite store does not do it by itself)."""
    model = client.get_logged_model(model_id)
    versions = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    if {"name": name, "version": version} not in versions:
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            [*versions, {"name": name, "version": version}])})


def _model_of(version) -> str | None:
    # A SQLite store returns no model_id on a version; its source `models:/<model id>` names it.
    return getattr(version, "model_id", None) or version.source.removeprefix("models:/")


def _description(best: Candidate, seed: int, key: str, synthetic: bool, suite: str, digest: str) -> str:
    lines = [f"`{best.ablation}`, seed {seed}: the best mean validation {key} of suite `{suite}` "
             f"({_spread(best.mean, best.std, len(best.scores))}; this seed "
             f"{best.scores[seed][1]:.4f}).",
             "Chosen on the validation split only; the test split took no part in the choice.",
             f"Data digest {digest}."]
    if synthetic:
        lines.insert(0, "**SYNTHETIC data** (msa.synthetic, MOSI-like): its scores are not MOSI results.")
    return "\n\n".join(lines)


def _spread(mean: float, std: float, n: int) -> str:
    """`0.7123 ± 0.0101 over 3 seeds`; one seed has no spread to show: `0.7123 on 1 seed`."""
    return f"{mean:.4f} ± {std:.4f} over {n} seeds" if n > 1 else f"{mean:.4f} on {n} seed"


def describe_tags(tags: Mapping[str, str]) -> str:
    """A registered version's tags as one line (for `predict`)."""
    keys = ("ablation", "seed", "validation_metric", "validation", "data_digest", "synthetic")
    return ", ".join(f"{k} {tags[k]}" for k in keys if k in tags)


__all__ = ["CHAMPION", "Candidate", "Champion", "choose", "candidates", "crown", "logged_model_id",
           "validation_score", "describe_tags"]
