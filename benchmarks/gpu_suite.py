"""The full default suite on one GPU, K runs sharing it at once (K worker processes, one GPU slot
each), for each K: wall time and runs per hour. Each K trains into a fresh store, so nothing is cached.

    python benchmarks/gpu_suite.py                      # K in 1 4 8 16, the full default suite
    python benchmarks/gpu_suite.py --slots 4 --quick    # a smoke check of the set-up

Refuses, with one line and exit status 2, on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", nargs="+", type=int, default=[1, 4, 8, 16], metavar="K")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    parser.add_argument("--quick", action="store_true", help="the quick suite instead of the full default one")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"error: no CUDA device on this machine (torch {torch.__version__}); run this on a GPU machine",
              file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name(args.device)}, torch {torch.__version__}, "
          f"{'quick' if args.quick else 'full default'} suite")
    for k in args.slots:
        with tempfile.TemporaryDirectory(prefix=f"gpu-suite-{k}-") as tmp:
            env = {k_: v for k_, v in os.environ.items() if k_ not in ("MSA_SCHEDULER", "MLFLOW_TRACKING_URI")}
            paths = [str(ROOT), env.get("PYTHONPATH")]
            env |= {"MSA_PROGRESS": "0", "PYTHONPATH": os.pathsep.join(filter(None, paths))}
            cmd = [sys.executable, "-m", "pipelines.run", "ablations", "--device", args.device, "--gpu-slots", str(k),
                   *(["--quick"] if args.quick else [])]
            start, lines = time.monotonic(), []
            # The suite's own progress lines pass through as they come (prefixed with K), so a run cut
            # short still shows how far it got and at what pace.
            with subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) as child:
                for line in child.stdout:
                    lines.append(line)
                    if line.startswith("["):
                        print(f"K={k:>2} {time.monotonic() - start:7.1f} s  {line}", end="", flush=True)
            wall = time.monotonic() - start
        if child.returncode != 0:
            print(f"K={k}: the suite failed (exit {child.returncode}):\n{''.join(lines)[-3000:]}", file=sys.stderr)
            return 1
        trained = int(re.search(r"^(\d+) trained", "".join(lines), re.MULTILINE).group(1))
        print(f"K={k:>2}  {trained} runs  wall {wall:8.1f} s  {3600 * trained / wall:7.1f} runs/hour", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
