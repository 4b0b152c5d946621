"""The algorithms: one module each, its class and config schema side by side, registered by
``@register`` (algorithms/base.py). Every module of this package is imported here, so a new
algorithm is one new module: nothing else lists it."""

from __future__ import annotations

import importlib
import pkgutil

from algorithms.base import REGISTRY

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY"]
