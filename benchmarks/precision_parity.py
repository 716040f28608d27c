"""Does `--precision bf16` reach the same conclusions as fp32? Two suites' comparison tables, side by side.

Run the same suite twice on the same data and seeds, once per precision, each on its own store, then
give this script the two `comparison.csv` files (`reports/<experiment>/<label>/comparison.csv`):

    python benchmarks/precision_parity.py FP32.csv BF16.csv [--metrics Corr MAE]

For each ablation and metric it prints the fp32 and bf16 means over seeds, their difference in units
of fp32's seed standard deviation, and both comparison marks (▲ ▼ ~ against the baseline). Issue 12's
parity rule: every mean within one fp32 seed-std, and no mark flips. The last lines are
`within_one_std <k>/<n>` and `marks_flipped <m>` (each flip listed above them).
"""

from __future__ import annotations

import argparse
import math
import sys

import pandas as pd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32", help="the fp32 suite's comparison.csv")
    parser.add_argument("bf16", help="the bf16 suite's comparison.csv")
    parser.add_argument("--metrics", nargs="+", default=["Corr", "MAE"])
    args = parser.parse_args(argv)
    tables = {}
    for name in ("fp32", "bf16"):
        path = getattr(args, name)
        try:
            table = pd.read_csv(path, dtype={"ablation": str}).set_index("ablation")
        except (OSError, pd.errors.ParserError, KeyError) as e:
            print(f"error: {path}: cannot be read as a comparison.csv ({e})", file=sys.stderr)
            return 2
        missing = [f"{m}_{c}" for m in args.metrics for c in ("mean", "std", "mark") if f"{m}_{c}" not in table]
        if missing:
            print(f"error: {path}: no column(s) {missing}; give a comparison.csv from a suite", file=sys.stderr)
            return 2
        tables[name] = table[table["role"] != "oracle"]
    fp32, bf16 = tables["fp32"], tables["bf16"]
    names = [a for a in fp32.index if a in bf16.index]
    within = total = 0
    flips = []
    print(f"{'ablation':22s} {'metric':6s} {'fp32':>8s} {'bf16':>8s} {'diff/std':>9s}  marks")
    for ablation in names:
        for metric in args.metrics:
            a, b = fp32.loc[ablation], bf16.loc[ablation]
            mean_a, mean_b, std = a[f"{metric}_mean"], b[f"{metric}_mean"], a[f"{metric}_std"]
            ratio = abs(mean_b - mean_a) / std if std and not math.isnan(std) else math.nan
            marks = [m if isinstance(m, str) else "" for m in (a[f"{metric}_mark"], b[f"{metric}_mark"])]
            total += 1
            within += bool(ratio <= 1.0)
            if marks[0] != marks[1]:
                flips.append(f"{ablation} {metric}: {marks[0] or '(reference)'} -> {marks[1] or '(reference)'}")
            print(f"{ablation:22s} {metric:6s} {mean_a:8.4f} {mean_b:8.4f} {ratio:9.2f}  "
                  f"{marks[0] or '-':>2s} {marks[1] or '-':>2s}")
    left_out = sorted(set(fp32.index) ^ set(bf16.index))
    if left_out:
        print(f"in one table only (left out): {', '.join(left_out)}")
    for flip in flips:
        print(f"flipped: {flip}")
    print(f"within_one_std {within}/{total}")
    print(f"marks_flipped {len(flips)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
