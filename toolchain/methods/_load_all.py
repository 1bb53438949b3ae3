"""Importing this registers every built-in method (each module calls @register_method)."""

from . import adapter, dora, galore, lora, simple, ttlora  # noqa: F401
