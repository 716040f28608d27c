"""A machine-wide share of the cores, so that commands running side by side do not oversubscribe them.

Every command that trains registers how many worker processes it runs (a small file per process in
a folder of the user's temporary directory); each run or trial then takes `cores // workers of every
live command` torch threads, at least one. Two `tune` sessions on two cores thus train with one
thread each instead of two each, which measured 20-100x slower than one after the other.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def available() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ledger_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(os.environ.get("MSA_CORES_LEDGER") or Path(tempfile.gettempdir()) / f"msa-cores-{uid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def live_claims() -> dict[int, int]:
    """pid -> workers of every live command that registered; entries of dead processes are removed."""
    claims: dict[int, int] = {}
    folder = ledger_dir()
    for path in folder.glob("*.json") if folder.is_dir() else ():
        try:
            pid, workers = int(path.stem), int(json.loads(path.read_text())["workers"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours
        if _alive(pid):
            claims[pid] = workers
        else:
            path.unlink(missing_ok=True)
    return claims


def share(workers: int = 1, *, cores: int | None = None, claims: dict[int, int] | None = None,
          owner: int | None = None) -> int:
    """Torch threads for one of `workers` workers of the command whose process is `owner` (default:
    this one): the cores divided by every live command's workers (the owner's counted once,
    registered or not), at least one."""
    claims = live_claims() if claims is None else claims
    owner = os.getpid() if owner is None else owner
    others = sum(n for pid, n in claims.items() if pid != owner)
    return max(1, (cores or available()) // max(1, others + workers))


@dataclass(frozen=True)
class Share:
    """A job's thread count, taken when it starts (other commands may have started or ended since):
    one of `workers` workers of the command in process `owner`. Picklable, so that a worker process
    can take it without counting its own command twice."""

    workers: int
    owner: int

    def __call__(self) -> int:
        return share(self.workers, owner=self.owner)


@contextmanager
def claim(workers: int) -> Iterator[None]:
    """Register this process's `workers` for as long as the block runs (best effort: a ledger that
    cannot be written only means no sharing)."""
    path = ledger_dir() / f"{os.getpid()}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"workers": workers}))
        tmp.replace(path)
    except OSError:
        path = None
    try:
        yield
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


__all__ = ["available", "share", "Share", "claim", "live_claims", "ledger_dir"]
