"""Adaptation methods behind one interface: base.py (the interface), settings.py (each method's recipe
settings: the one place names are spelled), registry.py (settings -> method), one module per method.
Kept import-free so the recipe schema can read settings.py without loading torch."""
