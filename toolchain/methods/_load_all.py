"""Importing this registers every built-in method (each module calls @register_method)."""

from . import simple, ttlora  # noqa: F401
