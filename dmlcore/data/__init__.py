"""Importing this package imports every module in it, so each module's
``@register`` entries are in the registries (a new file is all a new entry needs)."""

import importlib as _importlib
import pkgutil as _pkgutil

for _m in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_m.name}")
