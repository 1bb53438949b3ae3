"""The `edgetool` command line: a thin Click layer over the stage functions."""

from __future__ import annotations

from pathlib import Path

import click

from . import __version__
from .cliutil import echo as _echo
from .cliutil import reports_errors
from .errors import EdgetoolError

RECIPE = click.argument("recipe", type=click.Path(path_type=Path))


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
