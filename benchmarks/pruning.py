"""Trials completed and best validation Corr in a fixed time budget, with the tune spec's pruner and without.

Both arms search the same space with the same TPE seed on the quick synthetic data (real dims,
160/64/96 samples), each in a fresh in-memory study, nothing tracked. Trials are interleaved, the
arm that has used less time going next, so that machine noise hits both alike; an arm starts no
trial once its budget is spent (the one running may overrun it). Test data is never touched.
The last line printed is `pruning trials_ratio <on/off> best_on <x> best_off <y> fixed_s_per_trial <z>`,
z being a trial's wall time less its time in epochs (sampling, model build, data moves, storage),
averaged over both arms' trials.

    python benchmarks/pruning.py [--budget 120] [--epochs 8] [--threads 1] [--spec pipelines/specs/tune.yaml]
                                 [--pruner '{type: successive_halving, min_resource: 2}']
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import tune
from pipelines.spec import read_yaml, resolve_spec
from pipelines.stages.prepare import prepare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of search per arm (default 120)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per trial (default 8: room to prune)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier than 2 on a shared machine)")
    parser.add_argument("--spec", default=None, help="tune spec (default: pipelines/specs/tune.yaml)")
    parser.add_argument("--pruner", default=None, type=yaml.safe_load,
                        help="a pruner mapping in YAML to use instead of the spec's, e.g. '{type: hyperband}'")
    args = parser.parse_args(argv)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = tune.load_tune_spec(args.spec)
    suite_spec = resolve_spec(spec.ablations, only=None, seeds=None, epochs=args.epochs, quick=True)
    if args.pruner is not None:
        spec = tune.parse_tune_spec({**read_yaml(Path(spec.path)), "pruner": args.pruner}, spec.path)
    setup = tune.TrialSetup.from_specs(spec, suite_spec)
    data = prepare("synthetic", quick=True)
    seed = int(spec.sampler.get("seed", 0))
    arms = {
        "on": optuna.create_study(direction=spec.direction, sampler=tune.make_sampler(spec.sampler, seed),
                                  pruner=tune.make_pruner(spec.pruner, setup.steps)),
        "off": optuna.create_study(direction=spec.direction, sampler=tune.make_sampler(spec.sampler, seed),
                                   pruner=optuna.pruners.NopPruner()),
    }
    used = dict.fromkeys(arms, 0.0)
    print(f"pruner {spec.pruner} vs none; {args.budget:.0f} s per arm, {setup.epochs} epochs per trial, "
          f"validation {spec.metric}, quick synthetic data ({data.sizes})", flush=True)
    while True:
        open_arms = [a for a in arms if used[a] < args.budget]
        if not open_arms:
            break
        arm = min(open_arms, key=used.get)
        start = time.perf_counter()
        arms[arm].optimize(lambda t: tune.objective(t, setup, data, threads=args.threads), n_trials=1,
                           catch=(Exception,))
        used[arm] += time.perf_counter() - start

    best = {}
    trials = sum(len(study.trials) for study in arms.values())
    fixed = (sum(used.values()) - sum(t.user_attrs.get("epoch_seconds", 0.0) for study in arms.values()
                                      for t in study.trials)) / max(1, trials)
    for arm, study in arms.items():
        n = {s: len(study.get_trials(deepcopy=False, states=(s,))) for s in
             (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best[arm] = study.best_value if complete else math.nan
        epochs_run = sum(len(t.intermediate_values) for t in study.trials)
        print(f"pruner {arm:<3}  {sum(n.values()):>3} trials ({n[TrialState.COMPLETE]} complete, "
              f"{n[TrialState.PRUNED]} pruned, {n[TrialState.FAIL]} failed)  {epochs_run:>4} epochs  "
              f"best val {spec.metric} {best[arm]:.4f}  in {used[arm]:.0f} s  "
              f"({3600 * len(study.trials) / max(used[arm], 1e-9):.0f} trials/h)", flush=True)
    # Both arms ran for their budget (give or take the last trial), so trials per hour is the fair ratio.
    ratio = (len(arms["on"].trials) / max(used["on"], 1e-9)) / max(len(arms["off"].trials) / max(used["off"], 1e-9),
                                                                  1e-9)
    print(f"fixed cost per trial: {fixed:.2f} s (wall time less time in epochs, mean over {trials} trials)")
    print(f"pruning trials_ratio {ratio:.2f} best_on {best['on']:.4f} best_off {best['off']:.4f} "
          f"fixed_s_per_trial {fixed:.2f}")


if __name__ == "__main__":
    main()
