"""Adaptation methods behind one interface (see base.py)."""

from .base import METHODS, AdaptationMethod, AdapterLayer, get_method, register_method  # noqa: F401

__all__ = ["METHODS", "AdaptationMethod", "AdapterLayer", "get_method", "register_method"]
