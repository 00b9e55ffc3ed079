"""Durations as a user writes them: ``"250ms"``, ``"2s"``, ``"1m"``, ``"1h"`` or a plain
number of seconds (``"0.5"``, or a YAML number), as float seconds."""

from __future__ import annotations

import math
import re

from .errors import ConfigError

# ASCII only: \d and \s would also take other scripts' digits (fullwidth '80') and spaces.
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*", re.ASCII)
# (multiplier, divisor): dividing by 1000 keeps "250ms" exactly equal to 250 / 1000.
_UNITS: dict[str | None, tuple[float, float]] = {
    "ms": (1.0, 1000.0),
    "s": (1.0, 1.0),
    "m": (60.0, 1.0),
    "h": (3600.0, 1.0),
    None: (1.0, 1.0),
}
EXAMPLES = "'250ms', '2s' or '1m'"


def parse_duration(value: object, key: str, *, allow_zero: bool = False) -> float:
    """``value`` (a string as above, or an int or float of seconds) as float seconds.

    Raises :class:`ConfigError` naming ``key`` for anything else, for a negative or
    non-finite value, and for zero unless ``allow_zero`` (where 0 means "off").
    """
    seconds: float
    if isinstance(value, bool):  # YAML's yes/no: a bool is an int, but never a duration
        raise ConfigError(key, f"expected a duration such as {EXAMPLES}, got {value!r}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float
            seconds = math.inf
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        multiplier, divisor = _UNITS[match.group(2)]
        seconds = float(match.group(1)) * multiplier / divisor
    else:
        raise ConfigError(key, f"expected a duration such as {EXAMPLES}, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(key, f"must be a finite, non-negative duration, got {value!r}")
    if seconds == 0 and not allow_zero:
        raise ConfigError(key, "must be greater than zero")
    return seconds
