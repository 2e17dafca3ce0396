"""``type=`` converters for numeric command-line flags.

argparse calls them while parsing, so a value out of range (``--batch-size 0``, ``-k -5``,
``--fps nan``) ends the command at once with ``argument --batch-size: expected a positive integer,
got '0'`` and exit status 2, before any model, index or data is touched.
"""

from __future__ import annotations

import argparse
import math


def _integer(text: str, expected: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts, k)."""
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (where 0 means "none" or "all", e.g. ``--workers 0``)."""
    value = _integer(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (rates, e.g. ``--fps``)."""
    try:
        value = float(str(text).strip())
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def port_number(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port)."""
    try:
        value = int(str(text).strip())
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {text!r}")
    return value
