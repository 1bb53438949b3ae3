"""Errors the CLI turns into one line and an exit code (never a traceback)."""


class EdgetoolError(Exception):
    """Bad input or environment: malformed recipe, missing file, wrong shapes, missing backend. Exit 2."""

    exit_code = 2


class ParityError(EdgetoolError):
    """A check ran and failed (equivalence, graph identity, accuracy or latency parity). Exit 1."""

    exit_code = 1


class NotMergeableError(EdgetoolError):
    """The adaptation method cannot be folded into the dense weights without adding inference cost."""


class DivergedError(EdgetoolError):
    """Training's loss became NaN or inf (the learning rate is too high for this method). Exit 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class InternalError(RuntimeError):
    """A broken invariant of edgetool itself, not of the user's input: the CLI reports it as an internal
    error (exit 3), never as bad input."""
