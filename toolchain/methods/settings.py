"""Per-method recipe settings: the one place method names are spelled.

Each settings class is both the recipe schema of its method (unknown keys are errors, so
`name: full, rank: 8` is refused) and the dispatch key of the registry (after pytorch/ao's
config-as-key habit): its `implementation` names the AdaptationMethod class that runs it. The recipe's
`method` field is the discriminated union of these classes, so adding a method is one settings class
here plus its implementation module; nothing else lists method names.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator


# Every schema of a recipe (here and toolchain/recipe.py): unknown fields refused; NaN passes no comparison, so
# without allow_inf_nan=False `lr: .nan` would be reported as "should be greater than 0".
STRICT = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class MethodSettings(BaseModel):
    """Fields every method has."""

    model_config = STRICT
    implementation: ClassVar[str]  # "module:Class" under toolchain.methods

    name: str
    train_head: bool = Field(False, description="also train the classifier (always on when new classes appear)")
    bn: Literal["frozen", "stats"] = Field("frozen", description="frozen: BN in eval mode; stats: running statistics update")


class _ConvSelection(MethodSettings):
    layers: Literal["all", "pointwise"] | list[str] = Field("all", description="convs to adapt: all, pointwise, or name patterns")

    @field_validator("layers", mode="before")
    @classmethod
    def _patterns(cls, v: Any) -> Any:
        # Checked before pydantic's union, whose error would name its internal branch, not the problem.
        if isinstance(v, str) and v not in ("all", "pointwise"):
            raise ValueError(f"expected 'all', 'pointwise' or a list of name patterns such as ['{v}'], got {v!r}")
        if isinstance(v, list) and not v:
            raise ValueError("give at least one layer name pattern")
        if isinstance(v, list) and not all(isinstance(p, str) for p in v):
            raise ValueError(f"layer name patterns must be strings, got {v!r}")
        return v


class _Ranked(_ConvSelection):
    rank: int = Field(4, gt=0)


class TTLoRASettings(_Ranked):
    implementation = "ttlora:TTLoRA"
    name: Literal["ttlora"] = "ttlora"


class LoRASettings(_Ranked):
    implementation = "lora:LoRA"
    name: Literal["lora"] = "lora"
    alpha: float | None = Field(None, gt=0, description="scaling numerator (scale = alpha/rank); default rank")


class DoRASettings(LoRASettings):
    implementation = "dora:DoRA"
    name: Literal["dora"] = "dora"


class GaLoreSettings(_Ranked):
    implementation = "galore:GaLore"
    name: Literal["galore"] = "galore"
    update_proj_gap: int = Field(50, gt=0, description="steps between projection refreshes")
    galore_scale: float = Field(1.0, gt=0, description="scale of the projected-back update")


class AdapterSettings(_ConvSelection):
    implementation = "adapter:Adapter"
    name: Literal["adapter"] = "adapter"
    adapter_reduction: int = Field(4, gt=0, description="bottleneck width = channels // reduction")
    adapter_kind: Literal["nonlinear", "linear"] = Field("nonlinear", description="the linear variant is fusable")


class FullSettings(MethodSettings):
    implementation = "simple:FullFineTune"
    name: Literal["full"] = "full"


class HeadSettings(MethodSettings):
    implementation = "simple:HeadOnly"
    name: Literal["head"] = "head"


class BNSettings(MethodSettings):
    implementation = "simple:BatchNormOnly"
    name: Literal["bn"] = "bn"


class BiasSettings(MethodSettings):
    implementation = "simple:BiasOnly"
    name: Literal["bias"] = "bias"


# In the order benches list them: the classic baselines, the PEFT baselines, then TT-LoRA.
SETTINGS_CLASSES: tuple[type[MethodSettings], ...] = (
    FullSettings, HeadSettings, BNSettings, BiasSettings,
    LoRASettings, DoRASettings, GaLoreSettings, AdapterSettings, TTLoRASettings,
)
MethodConfig = Annotated[Union[SETTINGS_CLASSES], Field(discriminator="name")]  # noqa: UP007 (a runtime tuple)
_ADAPTER: TypeAdapter = TypeAdapter(MethodConfig)
BY_NAME: dict[str, type[MethodSettings]] = {get_args(c.model_fields["name"].annotation)[0]: c for c in SETTINGS_CLASSES}


def method_names() -> tuple[str, ...]:
    return tuple(BY_NAME)


DEFAULT_METHOD = "ttlora"


def method_settings(**fields: Any) -> MethodSettings:
    """Validate one method's settings from keyword fields (raises pydantic's ValidationError)."""
    return _ADAPTER.validate_python({"name": DEFAULT_METHOD, **fields})


def settings_for(name: str, inherited: dict[str, Any], overrides: dict[str, Any]) -> MethodSettings:
    """Settings for method `name`: the fields of `inherited` (another method's settings) that this method
    has, then `overrides`. Lets a bench derive every method's settings from the recipe's one method."""
    cls = BY_NAME[name]
    base = {k: v for k, v in inherited.items() if k in cls.model_fields and k != "name"}
    return cls.model_validate({**base, **overrides, "name": name})
