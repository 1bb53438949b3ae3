"""The `edgetool` command line: a thin Click layer over the stage functions."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import EdgetoolError

RECIPE = click.argument("recipe", type=click.Path(path_type=Path))


def _echo(msg: str) -> None:
    click.echo(msg)


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
        except KeyboardInterrupt:
            click.echo("edgetool: interrupted; no partial output was kept", err=True)
            sys.exit(130)
        except Exception as exc:  # an internal error: still one line unless debugging
            if os.environ.get("EDGETOOL_DEBUG"):
                raise
            click.echo(f"edgetool: internal error: {type(exc).__name__}: {exc} (EDGETOOL_DEBUG=1 shows the traceback)", err=True)
            sys.exit(3)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgetool")
def main() -> None:
    """Adapt CNNs with TT-LoRA, fuse to dense convs, export ONNX/TensorRT FP16 and prove parity.

    Pipeline: pretrain (automatic) -> adapt -> fuse-export -> verify."""


@main.command("pretrain")
@RECIPE
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def pretrain_cmd(recipe: Path, quiet: bool) -> None:
    """Train the base model on the recipe's source domain and write model.checkpoint."""
    from .adapt import pretrain
    from .recipe import load_recipe

    pretrain(load_recipe(recipe), progress=not quiet, echo=_echo)


@main.command("adapt")
@RECIPE
@click.option("--out", type=click.Path(path_type=Path), help="Run directory (default: runs/<recipe name>).")
@click.option("--steps", type=int, help="Override train.steps (e.g. for a quick check).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def adapt_cmd(recipe: Path, out: Path | None, steps: int | None, quiet: bool) -> None:
    """Fine-tune on the target domain with the recipe's method; write a run directory.

    Pretrains the base first when model.checkpoint does not exist."""
    from .adapt import adapt
    from .recipe import load_recipe

    r = load_recipe(recipe)
    if steps is not None:
        if steps <= 0:
            raise EdgetoolError("--steps must be positive")
        r.train.steps = steps
    adapt(r, out, progress=not quiet, echo=_echo)


def _register_optional_commands() -> None:
    """Stages that live in their own modules register here, so a missing one never breaks the CLI."""
    from importlib import import_module

    for module in ("fuse", "verify", "bench"):
        try:
            mod = import_module(f".{module}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{module}":
                continue
            raise
        if hasattr(mod, "cli_command"):
            main.add_command(mod.cli_command)


_register_optional_commands()


if __name__ == "__main__":
    main()
