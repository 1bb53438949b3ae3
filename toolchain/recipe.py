"""Recipe schema (YAML), validated with pydantic. Unknown keys are errors, relative paths resolve
against the recipe file's directory, and every problem is reported as one line naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .errors import EdgetoolError
from .methods.settings import DEFAULT_METHOD, STRICT, MethodConfig, TTLoRASettings, method_names


class _Strict(BaseModel):
    model_config = STRICT


class ShiftConfig(_Strict):
    """A seeded physical shift applied to the target domain (a moved or swapped sensor)."""

    rotation_deg: float = Field(0.0, ge=0, le=180, description="rotation of each 3-axis group about a random axis")
    gain: float = Field(0.0, ge=0, lt=1, description="per-channel gain drawn from U(1-gain, 1+gain)")
    offset: float = Field(0.0, ge=0, description="per-channel offset drawn from U(-offset, offset), in channel std units")
    noise: float = Field(0.0, ge=0, description="additive Gaussian noise std, in channel std units")
    axis_groups: list[list[int]] | None = Field(None, description="channel triples rotated together; default: consecutive triples")
    seed: int = Field(1234, ge=0)  # numpy's generators take non-negative seeds only

    @field_validator("axis_groups")
    @classmethod
    def _triples(cls, v: list[list[int]] | None) -> list[list[int]] | None:
        if v is not None and any(len(g) != 3 for g in v):
            raise ValueError("every axis group must list exactly 3 channels")
        return v


class DataConfig(_Strict):
    format: Literal["basicmotions", "ts", "uci_har", "npz"] = "basicmotions"
    train_path: Path | None = Field(None, description="ts: the _TRAIN.ts file; uci_har: dataset root; npz: the .npz")
    test_path: Path | None = Field(None, description="ts: the _TEST.ts file; npz: optional separate test .npz")
    source_domains: list[int] | None = Field(None, min_length=1)
    target_domains: list[int] | None = Field(None, min_length=1)
    shift: ShiftConfig | None = None
    target_shots: int | None = Field(None, gt=0, description="labelled target windows per class for adaptation")
    target_shots_per: Literal["class", "domain_class"] = Field(
        "class", description="target_shots per class (pooled over target domains) or per target domain x class pair")
    val_shots: int = Field(2, ge=0, description="labelled target windows per class (or domain x class) for validation, "
                           "drawn after target_shots from recordings neither the shots nor the test use; 0: none")
    val_domains: list[int] | None = Field(None, min_length=1, description="domains whose windows form the validation "
                                          "split (instead of val_shots)")
    test_fraction: float = Field(0.5, gt=0, lt=1, description="target share held out for testing when there is no test split")
    source_classes: list[str] | None = Field(None, description="new-classes scenario: classes the source domain has")
    classes: list[str] | None = Field(None, description="the class names the recipe expects; other labels are errors")

    @field_validator("source_domains", "target_domains", "val_domains", "source_classes", "classes")
    @classmethod
    def _no_duplicates(cls, v: list | None) -> list | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"lists {sorted({x for x in v if v.count(x) > 1})} more than once")
        return v

    @model_validator(mode="after")
    def _paths_needed(self) -> "DataConfig":
        if self.format != "basicmotions" and self.train_path is None:
            raise ValueError(f"data.train_path is required for format '{self.format}'")
        if self.format == "ts" and self.test_path is None:
            raise ValueError("data.test_path is required for format 'ts'")
        if (self.source_domains is None) != (self.target_domains is None):
            raise ValueError("set both data.source_domains and data.target_domains, or neither")
        if self.val_domains is not None:
            if self.source_domains is None:
                raise ValueError("data.val_domains needs data.source_domains and data.target_domains")
            both = sorted(set(self.val_domains) & (set(self.source_domains) | set(self.target_domains)))
            if both:
                raise ValueError(f"data.val_domains {both} are also source or target domains")
            # val_shots has a default, so only an explicit value conflicts with val_domains.
            if "val_shots" in self.model_fields_set and self.val_shots:
                raise ValueError("set data.val_domains or data.val_shots, not both")
        return self


class ModelConfig(_Strict):
    arch: Literal["resnet1d", "mobilenet1d", "factory"] = "resnet1d"
    factory: str | None = Field(None, description="'package.module:function' returning an nn.Module (arch: factory)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the model constructor")
    width: int = Field(32, gt=0, description="channel width of the built-in backbones")
    checkpoint: Path = Field(..., description="base checkpoint (state dict); `pretrain` writes it, `adapt` makes it if missing")
    head: str | None = Field(None, description="module name of the classifier (an nn.Linear or a Conv1d/Conv2d); "
                                  "default: the last nn.Linear, else the last conv")

    @model_validator(mode="after")
    def _factory_needed(self) -> "ModelConfig":
        if self.arch == "factory" and not self.factory:
            raise ValueError("model.factory ('package.module:function') is required when model.arch is 'factory'")
        if self.factory and ":" not in self.factory:
            raise ValueError("model.factory must look like 'package.module:function'")
        return self


class OptimConfig(_Strict):
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    steps: int = Field(200, gt=0)
    batch_size: int = Field(16, gt=0)
    eval_every: int = Field(10, gt=0, description="evaluate macro-F1 on the target test split every N steps")
    target_f1: float = Field(0.9, gt=0, le=1, description="steps_to_target is the first evaluation step reaching this")
    lean_step: bool = Field(True, description="train frozen layers through toolchain.training.lean (keep for backward only what "
                            "the trainable parameters' and input gradients need); false: plain autograd, to compare")
    # Per section: the base may be pretrained on a workstation GPU and adapted on the device.
    device: str = Field("auto", description="auto (CUDA when usable, else CPU), cpu, cuda or cuda:N")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="fp16/bf16: the forward runs under autocast (fp16 with a gradient scaler); weights stay fp32")

    @field_validator("device")
    @classmethod
    def _device_spec(cls, v: str) -> str:
        from .training.device import DEVICE_SPEC

        if not DEVICE_SPEC.fullmatch(v):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {v!r}")
        return v


class FuseConfig(_Strict):
    opset: int = Field(17, ge=13, le=23)
    atol: float = Field(1e-4, gt=0, description="max |adapted - fused| allowed (FP32)")
    rtol: float = Field(1e-5, gt=0, description="max error relative to the output's scale (max |output|)")
    random_inputs: int = Field(16, ge=0, description="seeded random inputs added to the target test split")
    ort_atol: float = Field(1e-4, gt=0, description="max |ORT - PyTorch| on the fused model")
    fp16_min_agreement: float = Field(0.95, ge=0, le=1, description="FP16 vs FP32 argmax agreement required; "
                                      "the other FP16 criteria are verify's (one function judges both)")


MAX_BATCH_SIZE = 65536


class VerifyConfig(_Strict):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    warmup: int = Field(20, ge=0)
    iterations: int = Field(200, gt=0, description="timed rounds per batch size (original, fused and control "
                            "interleaved); fewer than 8 cannot bound a 99 % interval, so latency is inconclusive")
    sessions: int = Field(8, ge=1, description="the timed rounds are split over this many fresh sets of runtime "
                          "sessions (original, fused, control), and the latency interval is taken over them: a "
                          "session's own slowness then cannot pass for the graph's; fewer than 8 cannot bound a "
                          "99 % interval")
    warmup_seconds: float = Field(0.2, ge=0, description="each engine also warms up at least this long per batch "
                                  "size (interleaved), as trtexec's --warmUp 200 ms")
    min_seconds: float = Field(1.0, ge=0, description="timed rounds go on past `iterations` until this much wall "
                               "time has passed, per batch size (trtexec's --duration)")
    latency_band: float = Field(0.05, gt=0, lt=1, description="fused may be at most this much slower than the "
                                "original (median of per-round fused/original ratios)")
    latency_confidence: float = Field(0.99, gt=0.5, lt=1, description="confidence of the intervals the latency "
                                      "verdict rests on (docs/verify.md)")
    unfused_iterations: int = Field(50, gt=0, description="timed runs per model and batch for the (informational) "
                                    "unfused-vs-fused comparison; at most `iterations`")
    latency_band_max: float = Field(0.5, gt=0, lt=1, description="on a machine noisier than the band, latency can "
                                    "still fail beyond 2 x the control's deviation, but never for less than this")
    min_argmax_agreement: float = Field(1.0, ge=0, le=1)
    max_f1_delta: float = Field(0.0, ge=0)
    error_margin: float = Field(4.0, ge=1, description="the fused engine's output error may be this many times the "
                                "original engine's on the same inputs (both relative to the output's magnitude)")
    error_floor: float = Field(1e-5, gt=0, description="FP32: output error always allowed, relative to max |logit|")
    fp16_error_floor: float = Field(1e-3, gt=0, description="FP16: output error always allowed, relative to max |logit|")
    fp16_min_argmax_agreement: float = Field(0.95, ge=0, le=1)
    fp16_max_f1_delta: float = Field(0.05, ge=0)
    # Fixed absolute tolerances did not scale with the model (docs/verify.md, "Accuracy"). Still accepted, so
    # older recipes and run directories load; verify says they are ignored.
    atol: float | None = Field(None, exclude=True, description="no longer used (see error_margin, error_floor)")
    rtol: float | None = Field(None, exclude=True, description="no longer used (see error_margin, error_floor)")
    fp16_atol: float | None = Field(None, exclude=True, description="no longer used (see error_margin, fp16_error_floor)")
    fp16_rtol: float | None = Field(None, exclude=True, description="no longer used (see error_margin, fp16_error_floor)")

    def unused_fields(self) -> list[str]:
        return [f for f in ("atol", "rtol", "fp16_atol", "fp16_rtol") if getattr(self, f) is not None]

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes_bounded(cls, v: list[int]) -> list[int]:
        # Checked when the recipe loads (adapt, fuse-export), not when verify allocates the batch.
        if not v or any(b < 1 or b > MAX_BATCH_SIZE for b in v):
            raise ValueError(f"must list batch sizes from 1 to {MAX_BATCH_SIZE}, got {v}")
        return v


# Training settings every method must share in a benchmark: equal step budgets, the same batches
# (fit's data order depends only on seed, batch size and step count), the same evaluation grid, and
# the same device and precision (cost ratios to full fine-tuning compare like with like).
BENCH_SHARED_TRAIN_FIELDS = ("steps", "batch_size", "eval_every", "target_f1", "device", "precision")


class BenchConfig(_Strict):
    methods: list[str] = Field(default_factory=lambda: list(method_names()))
    seeds: int = Field(3, gt=0)
    method_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-method settings fields")
    train_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-method optimizer settings (e.g. lr); steps, batch_size, eval_every and target_f1 stay shared")
    resample_shots: bool = Field(
        True, description="seed i re-draws the few target shots with data seed (seed + i); the source split must not change")
    timing_steps: int = Field(10, gt=0, description="timed training steps per method and seed (median = wall time per step)")
    lr_grid: list[float] | None = Field(
        None, min_length=1, description="learning rates every method is tried at; each method's rate is chosen on the "
        "validation split (data.target_val). Unset: each method trains at train.lr (or its train_overrides lr)")
    lr_grids: dict[str, list[float]] = Field(default_factory=dict, description="per-method grid, replacing lr_grid")
    eval_subsample: int = Field(256, ge=0, description="training curves are scored on a fixed stratified subsample of "
                                "this many target test windows (0: the whole test split); final scores use all of it")
    convergence_fractions: list[float] = Field(
        default_factory=lambda: [0.5, 0.9], min_length=1,
        description="convergence targets: zero-shot F1 + fraction x (best final F1 of any method - zero-shot F1), per seed")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        known = method_names()
        unknown = [m for m in v if m not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {sorted(known)}")
        if not v:
            raise ValueError("list at least one method")
        return v

    @field_validator("lr_grid")
    @classmethod
    def _grid(cls, v: list[float] | None) -> list[float] | None:
        return None if v is None else _check_grid(v)

    @field_validator("lr_grids")
    @classmethod
    def _grids(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        for method, grid in v.items():
            try:
                _check_grid(grid)
            except ValueError as exc:
                raise ValueError(f"{method}: {exc}") from None
        return v

    @field_validator("convergence_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in v):
            raise ValueError("every fraction must be in (0, 1]")
        if len(set(v)) != len(v):
            raise ValueError("lists a fraction more than once")
        return sorted(v)

    @field_validator("method_overrides", "train_overrides", "lr_grids")
    @classmethod
    def _keys_are_methods(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        known = method_names()
        unknown = [m for m in v if m not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {sorted(known)}")
        return v

    @field_validator("train_overrides")
    @classmethod
    def _budget_shared(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for method, fields in v.items():
            shared = [f for f in fields if f in BENCH_SHARED_TRAIN_FIELDS]
            if shared:
                raise ValueError(f"{method}: {shared} must be equal for every method (set them in 'train')")
        return v

    @model_validator(mode="after")
    def _one_source_of_lr(self) -> "BenchConfig":
        for method, fields in self.train_overrides.items():
            if "lr" in fields and (self.lr_grid is not None or method in self.lr_grids):
                raise ValueError(f"train_overrides.{method}.lr: this method's rate is chosen from its learning-rate "
                                 f"grid; give it its own grid in bench.lr_grids.{method} instead")
        return self

    def rate_grid(self, method: str) -> list[float] | None:
        """The learning rates `method` is tried at, or None (it trains at its one configured rate)."""
        return self.lr_grids.get(method, self.lr_grid)


def _check_grid(grid: list[float]) -> list[float]:
    if not grid:
        raise ValueError("a learning-rate grid lists at least one rate")
    if any(not lr > 0 for lr in grid):
        raise ValueError(f"learning rates must be positive, got {grid}")
    if len(set(grid)) != len(grid):
        raise ValueError(f"lists a learning rate more than once: {grid}")
    return sorted(grid)


class Recipe(_Strict):
    name: str
    seed: int = Field(0, ge=0)  # numpy's generators take non-negative seeds only
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    pretrain: OptimConfig = Field(default_factory=lambda: OptimConfig(steps=300, lr=3e-3, batch_size=16))
    method: MethodConfig = Field(default_factory=TTLoRASettings)
    train: OptimConfig = Field(default_factory=OptimConfig)
    fuse: FuseConfig = Field(default_factory=FuseConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    source: Path | None = Field(None, exclude=True, description="the file this recipe was read from")

    @field_validator("method", mode="before")
    @classmethod
    def _default_method_name(cls, v: Any) -> Any:
        # `method: {rank: 2}` means TT-LoRA, the method this tool is about.
        return {**v, "name": DEFAULT_METHOD} if isinstance(v, dict) and "name" not in v else v

    def input_files(self) -> tuple[tuple[str, Path], ...]:
        """(what, path) of every file this recipe reads: a stage refuses to replace an output directory
        that holds one of them (replacing it would delete the input)."""
        named = (("base checkpoint (model.checkpoint)", self.model.checkpoint),
                 ("training data (data.train_path)", self.data.train_path),
                 ("test data (data.test_path)", self.data.test_path), ("recipe", self.source))
        return tuple((what, Path(path)) for what, path in named if path is not None)

    def resolved_dict(self) -> dict[str, Any]:
        """Everything with defaults filled in and absolute paths (a run directory records them relative to itself)."""
        return self.model_dump(mode="json", exclude={"source"})


def format_validation_error(exc: ValidationError, where: str) -> str:
    err = exc.errors()[0]
    parts = [str(p) for p in err["loc"]]
    # The method union's tag sits in the location ('method.full.rank'): say it in words instead.
    tag = next((i for i in range(1, len(parts)) if parts[i - 1].endswith("method") and parts[i] in method_names()), None)
    suffix = ""
    if tag is not None:
        suffix = f" (method '{parts[tag]}')"
        del parts[tag]
    loc = ".".join(parts)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "finite_number":
        msg = f"must be a finite number, got {err.get('input')!r}"
    elif err["type"] == "union_tag_invalid":
        loc += ".name"
        msg = f"unknown method {err['ctx']['tag']!r} (known: {', '.join(method_names())})"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: field '{loc}': {msg}{suffix}{more}" if loc else f"{where}: {msg}{suffix}{more}"



def recipe_from_dict(raw: Any, base_dir: Path, where: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise EdgetoolError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise EdgetoolError(format_validation_error(exc, where)) from None
    # Relative paths are relative to the recipe file, so a recipe works from any working directory.
    for cfg, attr in ((recipe.data, "train_path"), (recipe.data, "test_path"), (recipe.model, "checkpoint")):
        value = getattr(cfg, attr)
        if value is not None and not value.is_absolute():
            setattr(cfg, attr, (base_dir / value).resolve())
    return recipe


def load_recipe(path: Path | str) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise EdgetoolError(f"recipe {path} is a directory: name the recipe's YAML file (e.g. {path / 'recipe.yaml'})")
    if not path.is_file():
        raise EdgetoolError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise EdgetoolError(f"recipe {path}: not UTF-8 text (byte {exc.start}); is this a YAML recipe?") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise EdgetoolError(f"recipe {path}: malformed YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raise EdgetoolError(f"recipe {path}: the file is empty")
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)
    recipe = recipe_from_dict(raw, path.parent.resolve(), where=f"recipe {path}")
    recipe.source = path.resolve()
    return recipe


def check_inputs_exist(recipe: Recipe) -> None:
    """Missing data paths are recipe errors that name the field (checked before any work starts)."""
    for field, value in (("data.train_path", recipe.data.train_path), ("data.test_path", recipe.data.test_path)):
        if value is not None and not value.exists():
            raise EdgetoolError(f"recipe field '{field}': path does not exist: {value}")
