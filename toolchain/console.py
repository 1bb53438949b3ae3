"""Printing through a stage's optional `echo` callback (None: silent), the one place that checks it."""

from __future__ import annotations

from typing import Callable, Iterable

Echo = Callable[[str], None] | None


def say(echo: Echo, msg: str) -> None:
    if echo is not None:
        echo(msg)


def say_notes(echo: Echo, notes: Iterable[str], prefix: str = "") -> None:
    """One `note:` line per note (data protocol, rank caps, missing data), optionally with a prefix."""
    for note in notes:
        say(echo, f"note: {prefix}{note}")
