"""The `edgetool` command line: a thin Click layer over the stage functions (toolchain.stages), and
the only module that imports click. Stage modules are imported inside each command, so `edgetool
--version` and `--help` stay instant."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from . import __version__
from .backends import ENGINE_CHOICES
from .errors import EdgetoolError

RECIPE = click.argument("recipe", type=click.Path(path_type=Path))


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
    from .recipe import load_recipe
    from .stages.adapt import pretrain

    pretrain(load_recipe(recipe), progress=not quiet, echo=echo)


@main.command("adapt")
@RECIPE
@click.option("--out", type=click.Path(path_type=Path), help="Run directory (default: runs/<recipe name>).")
@click.option("--steps", type=int, help="Override train.steps (e.g. for a quick check).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def adapt_cmd(recipe: Path, out: Path | None, steps: int | None, quiet: bool) -> None:
    """Fine-tune on the target domain with the recipe's method; write a run directory.

    Pretrains the base first when model.checkpoint does not exist."""
    from .recipe import load_recipe
    from .stages.adapt import adapt

    r = load_recipe(recipe)
    if steps is not None:
        if steps <= 0:
            raise EdgetoolError("--steps must be positive")
        r.train.steps = steps
    adapt(r, out, progress=not quiet, echo=echo)


@main.command("fuse-export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Output directory (default: engines/<run name>).")
@reports_errors
def fuse_export_cmd(run_dir: Path, out: Path | None) -> None:
    """Fuse the run's adapter into dense convs, prove equivalence, export original/fused ONNX (FP32 + FP16).

    Exit 0: every check passed; 1: a check failed (report in <out>.failed-report.json); 2: bad input."""
    from .stages.fuse_export import fuse_export

    fuse_export(run_dir, out, echo=echo)


@main.command("verify")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto", show_default=True,
              help="Backend: TensorRT FP16 engines, ONNX Runtime (FP32 + FP16 graphs), or auto (TensorRT when it and "
                   "a CUDA device are usable).")
@click.option("--iterations", type=click.IntRange(min=1), help="Override verify.iterations (timed runs per engine and batch).")
@click.option("--warmup", type=click.IntRange(min=0), help="Override verify.warmup.")
@reports_errors
def verify_cmd(engine_dir: Path, engine: str, iterations: int | None, warmup: int | None) -> None:
    """Prove the fused engine matches the fused PyTorch model (accuracy) and the original engine (latency).

    Writes ENGINE_DIR/verify_report.json and verify_junit.xml. Exit 0 pass, 1 a parity check failed,
    2 bad input or environment (e.g. TensorRT not installed)."""
    from .stages.verify import verify

    verify(engine_dir, engine, echo=echo, iterations=iterations, warmup=warmup)


@main.command("bench")
@RECIPE
@click.option("--methods", help="Comma-separated methods (default: the recipe's bench.methods), "
                                "e.g. full,head,bn,bias,lora,dora,galore,adapter,ttlora.")
@click.option("--seeds", type=int, help="Number of seeds (default: bench.seeds); seed i uses recipe seed + i.")
@click.option("--out", type=click.Path(path_type=Path), help="Output directory (default: runs/bench/<recipe name>).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Training runs in parallel processes, one thread each; results do not depend on it.")
@click.option("--quiet", is_flag=True, help="No progress bar: one line per finished run instead (also without a terminal).")
@reports_errors
def bench_cmd(recipe: Path, methods: str | None, seeds: int | None, out: Path | None, workers: int, quiet: bool) -> None:
    """Compare adaptation methods on the recipe's protocol with equal step budgets over several seeds,
    each at its learning rate chosen on the validation split (bench.lr_grid).

    Writes bench.json, bench.md and plots (pretrains the base first when model.checkpoint is missing)."""
    from .recipe import load_recipe
    from .stages.bench import parse_methods, run_bench

    if seeds is not None and seeds <= 0:
        raise EdgetoolError(f"--seeds must be a positive number of seeds, got {seeds}")
    r = load_recipe(recipe)
    if workers <= 0:
        raise EdgetoolError(f"--workers must be a positive number of processes, got {workers}")
    run_bench(r, parse_methods(methods, r.bench.methods), seeds, out, progress=not quiet, echo=echo, workers=workers)


if __name__ == "__main__":
    main()
