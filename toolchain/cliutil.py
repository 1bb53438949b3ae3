"""Helpers shared by every CLI command (kept apart from cli.py so stage modules can import them)."""

from __future__ import annotations

import functools
import os
import sys

import click

from .errors import EdgetoolError


def reports_errors(fn):
    """Bad input -> one line on stderr and the error's exit code; never a traceback.
    Set EDGETOOL_DEBUG=1 to see the traceback of an unexpected failure."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgetoolError as exc:
            click.echo(f"edgetool: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            # `edgetool ... | head` closed the pipe: not an error of ours. Point stdout at /dev/null so
            # the interpreter's final flush does not raise again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(141)
        except KeyboardInterrupt:
            click.echo("edgetool: interrupted; no partial output was kept", err=True)
            sys.exit(130)
        except Exception as exc:  # an internal error: still one line unless debugging
            if os.environ.get("EDGETOOL_DEBUG"):
                raise
            click.echo(f"edgetool: internal error: {type(exc).__name__}: {exc} (EDGETOOL_DEBUG=1 shows the traceback)", err=True)
            sys.exit(3)

    return wrapper


def echo(msg: str) -> None:
    click.echo(msg)
