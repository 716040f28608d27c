"""The command line's value types: each turns a bad value into argparse's one-line error (exit 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _parse(text: str, convert: Callable[[str], T], what: str) -> T:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _parse(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed_value(text: str) -> int:
    from pipelines.spec import SEED_LIMIT

    value = _parse(text, int, "a whole number")
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def positive_seconds(text: str) -> float:
    value = _parse(text, float, "a number of seconds")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def name_value(text: str) -> str:
    """A name that becomes part of file names (a study's `<name>.best.yaml`): the specs' rule for names."""
    from pipelines.spec import SpecError, check_name

    try:
        return check_name(text, "", "")
    except SpecError:
        raise argparse.ArgumentTypeError(f"must be a name of letters, digits, '_', '.' or '-' (not starting "
                                         f"with a symbol), got {text!r}") from None


def path_value(text: str) -> str:
    """A file path: an empty one (`--spec ""`, an unset shell variable) is a mistake, not the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a file path, got an empty one")
    return text


__all__ = ["positive_int", "seed_value", "positive_seconds", "name_value", "path_value"]
