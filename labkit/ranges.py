"""Numbered names in topology files (pure): ``client.{001..200}`` is 200 names.

A pattern holds at most one range ``{FIRST..LAST}`` of decimal numbers, FIRST <= LAST,
as in a shell's brace expansion: when either bound is written with a leading zero,
every number is zero-padded to the wider bound's width (``u{01..24}``: ``u01`` ..
``u24``), otherwise not (``u{1..24}``: ``u1`` .. ``u24``). Text without braces is one
name. Anything else with a brace in it is an error naming the key, as is a range of
more than :data:`MAX_NAMES` names.
"""

from __future__ import annotations

import re

MAX_NAMES = 10_000  # one pattern; a lab of this size does not fit one engine anyway

_RANGE = re.compile(r"\{([0-9]+)\.\.([0-9]+)\}")


class RangeError(ValueError):
    """A pattern that is not a name or a name with one numeric range."""


def expand(pattern: str, key: str) -> list[str]:
    """The names ``pattern`` stands for, in order (see the module docstring)."""
    found = list(_RANGE.finditer(pattern))
    if not found:
        if "{" in pattern or "}" in pattern:
            raise RangeError(
                f"{key}: expected a range like {{1..24}} or {{001..200}} in {pattern!r}"
            )
        return [pattern]
    if len(found) > 1:
        raise RangeError(f"{key}: at most one {{FIRST..LAST}} range per name: {pattern!r}")
    match = found[0]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    if any(c in head + tail for c in "{}"):
        raise RangeError(f"{key}: stray brace in {pattern!r}")
    first_text, last_text = match.groups()
    first, last = int(first_text), int(last_text)
    if first > last:
        raise RangeError(f"{key}: the range in {pattern!r} runs backwards ({first} > {last})")
    if last - first + 1 > MAX_NAMES:
        raise RangeError(
            f"{key}: {pattern!r} is {last - first + 1} names, at most {MAX_NAMES} per range"
        )
    padded = any(len(t) > 1 and t.startswith("0") for t in (first_text, last_text))
    width = max(len(first_text), len(last_text)) if padded else 0
    return [f"{head}{number:0{width}d}{tail}" for number in range(first, last + 1)]


def expand_all(value: object, key: str) -> list[str] | None:
    """A pattern or a list of patterns as the names they stand for; None if ``value`` is
    neither (the caller says what it expected)."""
    if isinstance(value, str):
        return expand(value, key)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [name for i, item in enumerate(value) for name in expand(item, f"{key}[{i}]")]
    return None
