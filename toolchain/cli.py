"""The `edgetool` command line: a thin Click layer over the stage functions (toolchain.stages), and
the only module that imports click. Stage modules are imported inside each command, so `edgetool
--version` and `--help` stay instant."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import click

from . import __version__
from .backends import ENGINE_CHOICES
from .backends.trtplan import BUILD_MODES, STRONGLY_TYPED
from .bench.executors import EXECUTORS
from .errors import EdgetoolError

RECIPE = click.argument("recipe", type=click.Path(path_type=Path))
DEVICE = click.option("--device", help="Train on auto (CUDA when usable), cpu, cuda or cuda:N (overrides the recipe's "
                                       "train.device, and pretrain.device where the base is pretrained).")
PRECISION = click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]),
                         help="Training precision (overrides train.precision, and pretrain.precision where the base "
                              "is pretrained); fp16/bf16 run the forward under autocast.")


def load_with_device(recipe: Path, device: str | None, precision: str | None, sections=("pretrain", "train")):
    """The recipe with --device / --precision applied to the training sections this command runs."""
    from .training.device import check_precision, resolve_device
    from .recipe import load_recipe

    r = load_recipe(recipe)
    if device is None and precision is None:
        return r
    # Checked here so a refusal names the option; the recipe's own values are checked by the stage.
    main_cfg = getattr(r, sections[-1])
    resolved = resolve_device(device or main_cfg.device, "--device" if device else f"{sections[-1]}.device")
    check_precision(resolved, precision or main_cfg.precision, "--precision" if precision else f"{sections[-1]}.precision")
    for section in sections:
        cfg = getattr(r, section)
        cfg.device = device or cfg.device
        cfg.precision = precision or cfg.precision
    return r


def reports_errors(fn):
    """Bad input -> one line on stderr and the error's exit code; never a traceback.
    Set EDGETOOL_DEBUG=1 to see the traceback of an unexpected failure."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # Libraries' warnings are held back while the command runs: shown after it when it succeeds, dropped
        # when it fails, so an error is the one line that names the problem and not the noise before it.
        with warnings.catch_warnings(record=True) as held:
            try:
                result = fn(*args, **kwargs)
            except Exception:
                held.clear()
                raise
        for w in held:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry={})
        return result

    return reporting(wrapper)


def reporting(fn):
    """The one-line error and exit code of each kind of failure (see reports_errors)."""

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
        except OSError as exc:  # the environment (a full disk, a vanished file, permissions): not a bug of ours
            if os.environ.get("EDGETOOL_DEBUG"):
                raise
            from .artifacts import os_error_message
            click.echo(f"edgetool: error: {os_error_message(exc)}", err=True)
            sys.exit(2)
        except MemoryError:
            if os.environ.get("EDGETOOL_DEBUG"):
                raise
            click.echo("edgetool: error: out of memory: the inputs or settings need more memory than this machine "
                       "has (e.g. fewer or smaller windows, smaller verify.batch_sizes)", err=True)
            sys.exit(2)
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

    Pipeline: pretrain (automatic) -> adapt -> fuse-export -> verify. `apply` makes a run directory
    from an adapter trained elsewhere."""


@main.command("pretrain")
@RECIPE
@DEVICE
@PRECISION
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--force", is_flag=True, help="Replace an existing model.checkpoint (adapters trained on it stop applying).")
@reports_errors
def pretrain_cmd(recipe: Path, device: str | None, precision: str | None, quiet: bool, force: bool) -> None:
    """Train the base model on the recipe's source domain and write model.checkpoint."""
    from .stages.adapt import pretrain

    pretrain(load_with_device(recipe, device, precision, ("pretrain",)), progress=not quiet, echo=echo, force=force)


@main.command("adapt")
@RECIPE
@click.option("--out", type=click.Path(path_type=Path), help="Run directory (default: runs/<recipe name>).")
@click.option("--steps", type=int, help="Override train.steps (e.g. for a quick check).")
@DEVICE
@PRECISION
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def adapt_cmd(recipe: Path, out: Path | None, steps: int | None, device: str | None, precision: str | None,
              quiet: bool) -> None:
    """Fine-tune on the target domain with the recipe's method; write a run directory.

    Pretrains the base first when model.checkpoint does not exist."""
    from .stages.adapt import adapt

    r = load_with_device(recipe, device, precision)
    if steps is not None:
        if steps <= 0:
            raise EdgetoolError("--steps must be positive")
        r.train.steps = steps
    adapt(r, out, progress=not quiet, echo=echo)


INPUTS = click.option("--inputs", type=click.Path(path_type=Path),
                      help="An .npz whose X holds input windows [N, ...] as the model takes them: checked on as well, "
                           "and instead of the data when the run's data files are not here.")


TRUST = click.option("--trust-factory", "trust_factories", multiple=True, metavar="MODULE",
                     help="Import the model factory the run's recipe names from MODULE (a package trusts its "
                          "modules; repeatable; or EDGETOOL_TRUST_FACTORY=MODULE,...). A factory is code: one named "
                          "by a run directory is never imported without this.")


@main.command("fuse-export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Output directory (default: engines/<run name>).")
@INPUTS
@TRUST
@reports_errors
def fuse_export_cmd(run_dir: Path, out: Path | None, inputs: Path | None, trust_factories: tuple[str, ...]) -> None:
    """Fuse the run's adapter into dense convs, prove equivalence, export original/fused ONNX (FP32 + FP16).

    Exit 0: every check passed; 1: a check failed (report in <out>.failed-report.json); 2: bad input."""
    from .stages.fuse_export import fuse_export

    fuse_export(run_dir, out, echo=echo, inputs=inputs, trust_factories=trust_factories)


@main.command("apply")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), required=True,
              help="Recipe for the model, data and fuse/verify settings (the adapter's method settings win).")
@click.option("--base", type=click.Path(path_type=Path), help="Base checkpoint (default: the recipe's model.checkpoint).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory to write.")
@reports_errors
def apply_cmd(adapter: Path, recipe_path: Path, base: Path | None, out: Path) -> None:
    """Make a run directory from an adapter.pt trained anywhere; `edgetool fuse-export OUT` then fuses it.

    The base must be the checkpoint the adapter was trained on (its sha256 is recorded): else exit 2."""
    from .recipe import load_recipe
    from .stages.apply import apply

    apply(adapter, load_recipe(recipe_path), out, base=base, echo=echo)


@main.command("verify")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto", show_default=True,
              help="Backend: TensorRT FP16 engines, ONNX Runtime (FP32 + FP16 graphs), or auto (TensorRT when it and "
                   "a CUDA device are usable).")
@click.option("--iterations", type=click.IntRange(min=1), help="Override verify.iterations (timed runs per engine and batch).")
@click.option("--warmup", type=click.IntRange(min=0), help="Override verify.warmup.")
@click.option("--trt-build", type=click.Choice(BUILD_MODES), default=None,
              help=f"How TensorRT builds the engines (default {STRONGLY_TYPED}: *.fp16.onnx as a strongly typed "
                   "network, the graph ONNX Runtime checked; weak-fp16-flag: the FP32 graph with the FP16 builder "
                   "flag, for TensorRT 8.6 / `trtexec --fp16` deployments; not on TensorRT 11).")
@click.option("--inputs", type=click.Path(path_type=Path),
              help="When the run's data files are not here: an .npz whose X holds windows to check on (besides "
                   "seeded random ones).")
@click.option("--allow-modified", is_flag=True, help="Engine files edited since fuse-export are a warning "
              "(recorded in the report), not a failure.")
@TRUST
@reports_errors
def verify_cmd(engine_dir: Path, engine: str, iterations: int | None, warmup: int | None, trt_build: str | None,
               inputs: Path | None, allow_modified: bool, trust_factories: tuple[str, ...]) -> None:
    """Prove the fused engine matches the fused PyTorch model (accuracy) and the original engine (latency).

    Writes ENGINE_DIR/verify_report.json and verify_junit.xml when every check ran. Exit 0 pass (latency may
    be inconclusive on a noisy machine), 1 a check failed, 2 bad input or environment (e.g. TensorRT not
    installed; earlier reports are left in place)."""
    from .stages.verify import verify

    verify(engine_dir, engine, echo=echo, iterations=iterations, warmup=warmup, trt_build=trt_build, inputs=inputs,
           allow_modified=allow_modified, trust_factories=trust_factories)


@main.command("bench")
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--methods", help="Comma-separated methods (default: the recipe's bench.methods), "
                                "e.g. full,head,bn,bias,lora,dora,galore,adapter,ttlora.")
@click.option("--seeds", type=int, help="Number of seeds (default: bench.seeds); seed i uses recipe seed + i.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Output directory (default: runs/bench/<recipe name>); with several recipes, the directory that "
                   "holds one <recipe name> directory per recipe (default: runs/bench).")
@DEVICE
@PRECISION
@click.option("--executor", type=click.Choice(sorted(EXECUTORS)), default="local", show_default=True,
              help="Where training runs go: local (this machine, --workers processes) or ray (Ray tasks, one CPU "
                   "and with --device cuda one GPU each; needs edgetool[ray]). Results do not depend on it.")
@click.option("--workers", type=int, help="--executor local: training runs in parallel processes, one thread each "
                                          "[default: 1]; results do not depend on it.")
@click.option("--ray-address", help="--executor ray: join a running cluster (auto, or HOST:PORT of `ray start "
                                    "--head`) instead of starting a local Ray sized to this machine.")
@click.option("--quiet", is_flag=True, help="No progress bar: one line per finished run instead (also without a terminal).")
@reports_errors
def bench_cmd(recipes: tuple[Path, ...], methods: str | None, seeds: int | None, out: Path | None, device: str | None,
              precision: str | None, executor: str, workers: int | None, ray_address: str | None, quiet: bool) -> None:
    """Compare adaptation methods on each recipe's protocol with equal step budgets over several seeds,
    each at its learning rate chosen on the validation split (bench.lr_grid).

    Writes bench.json, bench.md and plots per recipe (pretrains the base first when model.checkpoint is
    missing). Several recipes run in one call, one after another on the same workers or Ray cluster."""
    from .stages.bench import parse_methods, run_benches

    if seeds is not None and seeds <= 0:
        raise EdgetoolError(f"--seeds must be a positive number of seeds, got {seeds}")
    runner = EXECUTORS[executor].from_options(workers, ray_address)
    loaded = [load_with_device(r, device, precision) for r in recipes]
    run_benches(loaded, None if methods is None else parse_methods(methods, []), seeds, out, progress=not quiet,
                echo=echo, executor=runner)


if __name__ == "__main__":
    main()
