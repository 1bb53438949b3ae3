"""The method registry: a settings object -> its AdaptationMethod. Dispatch is by the settings class
(toolchain.methods.settings), whose `implementation` names the class; implementation modules are
imported on first use, so nothing here imports them eagerly and no import cycle can form."""

from __future__ import annotations

import importlib

from ..errors import InternalError
from .base import AdaptationMethod
from .settings import BY_NAME, MethodSettings


def method_class(settings_cls: type[MethodSettings]) -> type[AdaptationMethod]:
    module, _, attr = settings_cls.implementation.partition(":")
    cls = getattr(importlib.import_module(f"{__package__}.{module}"), attr, None)
    if not (isinstance(cls, type) and issubclass(cls, AdaptationMethod)):
        raise InternalError(f"{settings_cls.__name__}.implementation {settings_cls.implementation!r} is not an AdaptationMethod")
    return cls


def get_method(settings: MethodSettings) -> AdaptationMethod:
    return method_class(type(settings))(settings)


def method_class_by_name(name: str) -> type[AdaptationMethod]:
    return method_class(BY_NAME[name])
