"""A suite's parent run: one per suite identity (its resolved spec, data digest and code version),
resumed when the same suite runs again, so that every child of a suite nests under one parent in
the MLflow UI; and the description (`mlflow.note.content`) a person reads there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from msa.config import RunConfig, stable_hash
from pipelines import claims, tracking
from pipelines.status import RunStatus

KEY_TAG = "suite_key"      # the suite's identity, on its parent run
LABEL_TAG = "suite_label"  # its readable, stable name: the reports folder reports/<experiment>/<label>/


def suite_key(suite: str, ablations: Mapping[str, RunConfig], seeds: Sequence[int], data_digest: str,
              code_version: str) -> str:
    """A suite's identity: which pipeline, every ablation's resolved config (epochs included), the seeds,
    the data digest and the code version. Another spec, data set or commit is another suite."""
    return stable_hash({"suite": suite, "ablations": {n: c.to_dict() for n, c in ablations.items()},
                        "seeds": list(seeds), "data": data_digest, "code": code_version})


def open_parent(client: MlflowClient, experiment_id: str, suite: str, key: str, *, tags: Mapping[str, str],
                params: Mapping[str, Any]) -> tuple[str, bool]:
    """The parent run of suite `key`: the existing one set RUNNING again (True), or a new one (False).
    One that another command is running now (a live claim: the same suite started twice at once) is
    its own: this command gets a new parent. A resumed parent takes `tags` again before it is RUNNING:
    its claim tags (a fresh heartbeat, this process) must never make it look like a dead command's."""
    found = client.search_runs([experiment_id], filter_string=f"tags.{KEY_TAG} = '{key}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and not claims.is_live(found[0]):
        run_id = found[0].info.run_id
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        for stale in (claims.KILLED_REASON, "error"):  # why it ended before (killed, interrupted, failed)
            if stale in found[0].data.tags:
                client.delete_tag(run_id, stale)
        client.update_run(run_id, status=RunStatus.RUNNING)
        return run_id, True
    now = time.localtime()
    label = f"{suite}-{time.strftime('%Y%m%d-%H%M%S', now)}-{key[:6]}"
    run_id = tracking.start_run(client, experiment_id, f"{suite} {time.strftime('%Y-%m-%d %H:%M:%S', now)}",
                                tags={**tags, KEY_TAG: key, LABEL_TAG: label}, params=params)
    return run_id, False


def label_of(run) -> str:
    """A suite run's label; a suite recorded before labels existed gets `<suite>-<run id prefix>`."""
    tags = run.data.tags
    return tags.get(LABEL_TAG) or f"{tags.get('suite', 'suite')}-{run.info.run_id[:8]}"


def describe(client: MlflowClient, run_id: str, *, experiment: str, experiment_id: str, spec_path: str,
             ablations: Sequence[str], seeds: Sequence[int], epochs: str, data_source: str, data_digest: str,
             synthetic: bool, rows: Iterable | None = None, cached_runs: Mapping[str, Any] | None = None,
             champion: str | None = None) -> None:
    """Write the parent's description: what the suite is and how to read it, then (once it has run) how
    its runs ended, which it reused from earlier suites, and the champion."""
    label = label_of(client.get_run(run_id))
    data = f"`{data_source}` (digest `{data_digest}`)"
    if synthetic:
        data += ", **SYNTHETIC** MOSI-like data: its numbers are not MOSI results"
    lines = [
        f"**Suite `{label}`**: {len(ablations)} ablations x {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
        f"({', '.join(map(str, seeds))}), epochs {epochs}, spec `{spec_path}`, data {data}, "
        f"code `{tracking.code_version()}`.",
        "",
        "Each child run `<ablation>/seed-<n>` is one (ablation, seed): its resolved config as params, the "
        "per-epoch `train_loss`, `val_loss` and `val_*` curves, the `test_*` metrics of the checkpoint chosen "
        "on validation, and its model `<ablation>-seed-<n>` (the Models tab). A run this suite needs that an "
        "earlier suite already finished is reused, not trained again: it stays nested under the suite that "
        "trained it, and is listed below and in `suite.json`.",
        "",
        "How to read it: Artifacts -> `comparison/report.html` compares every ablation with the baseline on "
        "test (mean ± std over seeds, intervals that hold test-sample and seed noise); tick child runs -> "
        "Compare to line up curves and metrics. The ablation with the best mean *validation* score is registered as "
        f"`models:/{experiment}@champion` (Models -> {experiment}).",
    ]
    if rows is not None:
        rows = list(rows)
        count = {s: sum(r.status == s for r in rows) for s in RunStatus}
        failed = len(rows) - count[RunStatus.FINISHED] - count[RunStatus.CACHED]
        lines += ["", f"**Last run:** {count[RunStatus.FINISHED]} trained, {count[RunStatus.CACHED]} already "
                      f"done, {failed} not finished, of {len(rows)} runs."]
        elsewhere = []
        for r in rows:
            origin = (cached_runs or {}).get(r.run_key)
            parent = origin.data.tags.get(MLFLOW_PARENT_RUN_ID) if origin is not None else None
            if r.status == RunStatus.CACHED and r.run_id and parent != run_id:
                where = f" (trained in suite run [{parent[:8]}](#/experiments/{experiment_id}/runs/{parent}))" \
                    if parent else ""
                elsewhere.append(f"- [{r.ablation}/seed-{r.seed}](#/experiments/{experiment_id}/runs/{r.run_id})"
                                 + where)
        if elsewhere:
            lines += ["", "Reused from earlier suites (nested there, not here):", *elsewhere]
    if champion:
        lines += ["", f"**Champion:** {champion.removeprefix('champion: ')}"]
    client.set_tag(run_id, MLFLOW_RUN_NOTE, "\n".join(lines))


__all__ = ["KEY_TAG", "LABEL_TAG", "suite_key", "open_parent", "label_of", "describe"]
