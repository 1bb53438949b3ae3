"""The `edgetool` command line: a thin Click layer over the stage functions."""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from . import __version__
from .cliutil import echo as _echo
from .cliutil import reports_errors
from .errors import EdgetoolError

RECIPE = click.argument("recipe", type=click.Path(path_type=Path))


class LazyGroup(click.Group):
    """Stage commands live in their own modules and import torch/onnx/matplotlib; load a module only
    when its command runs (or --help lists it), so `edgetool --version` stays instant."""

    lazy_commands = {
        "fuse-export": "toolchain.fuse:cli_command",
        "verify": "toolchain.verify:cli_command",
        "bench": "toolchain.bench:cli_command",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_commands])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands:
            module, _, attr = self.lazy_commands[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


if __name__ == "__main__":
    main()
