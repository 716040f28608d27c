"""Errors a user can fix from the message alone, and the up-front checks that raise them before any
work starts: the CLI prints such an error as one line and exits 2."""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """Anything a user can fix from the message alone."""


class StoreError(UserError):
    """A tracking store or study storage cannot be used; the message names it and what is wrong."""


def check_writable_dir(path: str | Path, what: str) -> Path:
    """`path` is a folder this process can create files in, or can be created: else a UserError
    naming it, so that a command fails before its work rather than after it."""
    path = Path(path).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:  # pragma: no cover - the root always exists
        raise UserError(f"{path}: no part of this path exists")
    if not existing.is_dir():
        raise UserError(f"{what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {existing} is not writable by this user")
    return path


__all__ = ["UserError", "StoreError", "check_writable_dir"]
