"""What a person watching a suite sees: a bar over all epochs with ETA, and one line per finished run."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

from pipelines.status import RunStatus

if TYPE_CHECKING:
    from pipelines.stages.train import RunOutcome


def brief(text: str, width: int) -> str:
    """`text`'s first line in at most `width` characters, cut at a word with '...' when longer (the
    summary after the suite says the whole of it)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) <= width:
        return line
    cut = line[:width - 4].rsplit(" ", 1)[0] if " " in line[:width - 4] else line[:width - 4]
    return cut.rstrip(" ,;:") + " ..."


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class SuiteProgress:
    """`plan` maps each (ablation, seed) to train to (epochs, estimated cost of one of its epochs). The
    bar counts epochs; the ETA weighs each epoch by its cost, since a 2-layer Transformer epoch over
    three modalities takes several times as long as a text-only LSTM one, and the suite runs the
    long ones first."""

    def __init__(self, plan: Mapping[tuple[str, int], tuple[int, float]], stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream, self.clock = stream or sys.stderr, clock
        self.plan = dict(plan)
        self.total_runs, self.total_epochs = len(self.plan), sum(e for e, _ in self.plan.values())
        self.total_cost = sum(e * c for e, c in self.plan.values())
        self.done_runs, self.done_epochs, self.done_cost = 0, 0, 0.0
        self.seen: dict[tuple[str, int], int] = {}   # (ablation, seed) -> epochs reported
        self.finished: set[tuple[str, int]] = set()
        self.start = clock()
        show_bar = os.environ.get("MSA_PROGRESS", "1") != "0" and self.stream.isatty()
        self.bar = tqdm(total=self.total_epochs, unit="epoch", file=self.stream, disable=not show_bar,
                        dynamic_ncols=True, leave=False)

    def eta(self) -> float:
        if self.done_cost <= 0:
            return math.inf
        rate = (self.clock() - self.start) / self.done_cost
        return rate * max(0.0, self.total_cost - self.done_cost)

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") != "epoch":
            return
        key = (event["ablation"], event["seed"])
        if key in self.finished or key not in self.plan:  # late, or not ours: already off the totals
            return
        self.done_epochs += 1
        self.done_cost += self.plan[key][1]
        self.seen[key] = self.seen.get(key, 0) + 1
        self.bar.update(1)
        corr = event.get("val_Corr")
        corr_txt = f"{corr:.3f}" if isinstance(corr, float) and math.isfinite(corr) else "nan"
        self.bar.set_postfix_str(f"{event['ablation']}/seed-{event['seed']} epoch {event['epoch']}/"
                                 f"{event['epochs']} val Corr {corr_txt}")

    def on_done(self, outcome: RunOutcome) -> None:
        self.done_runs += 1
        key = (outcome.ablation, outcome.seed)
        self.finished.add(key)
        epochs, cost = self.plan[key]
        missing = epochs - self.seen.get(key, 0)
        if missing > 0:  # early stop or failure: those epochs will never come; take them off
            self.total_epochs -= missing
            self.total_cost -= missing * cost
            self.bar.total = self.total_epochs
            self.bar.refresh()
        name = f"{outcome.ablation}/seed-{outcome.seed}"
        if outcome.status == RunStatus.FINISHED and outcome.test_metrics:
            m = outcome.test_metrics
            detail = (f"test Corr {m['Corr']:.3f}  MAE {m['MAE']:.3f}  Acc-2 {m['Has0_acc_2']:.3f}  "
                      f"best epoch {outcome.best_epoch}")
        else:
            detail = brief(f"{outcome.status}: {outcome.error or ''}", 120)
        self.write(f"[{self.done_runs:>{len(str(self.total_runs))}}/{self.total_runs}] {name:<30} {detail}  "
                   f"{fmt_duration(outcome.seconds)}  suite ETA {fmt_duration(self.eta())}")

    def again(self, key: tuple[str, int]) -> None:
        """A run that ended without training here (claimed elsewhere) is trained here after all."""
        epochs, cost = self.plan[key]
        self.finished.discard(key)
        self.seen[key] = 0
        self.total_runs, self.total_epochs, self.total_cost = (self.total_runs + 1, self.total_epochs + epochs,
                                                               self.total_cost + epochs * cost)
        self.bar.total = self.total_epochs
        self.bar.refresh()

    def write(self, line: str) -> None:
        self.bar.write(line, file=self.stream)
        self.stream.flush()

    def close(self) -> None:
        self.bar.close()

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start
