"""User plug-in modules: losses, miners, datasets, backbones, ... registered from outside the package.

A plug-in is any importable module whose import calls :func:`dmlcore.registry.register`.
It is named in a study (``plugins: [my_lab.losses]``), on the command line
(``--plugin my_lab.losses``, repeatable) or, for Python API users, in the environment
variable ``DML_PLUGINS`` (comma-separated). The first registry lookup imports the
``DML_PLUGINS`` modules; the sweeper imports the study's and the CLI's on the driver and in
every trial (see ``sweeper/tune.py``: shipped to Ray workers through the runtime_env's
``py_modules`` and the environment variable). A module that cannot be imported is one
:class:`PluginError` line naming it. See docs/plugins.md.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from typing import Iterable

from dmlcore.config import ConfigError

ENV_VAR = "DML_PLUGINS"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class PluginError(ConfigError):
    """A plug-in module that cannot be imported. ``str(err)`` is one line."""


def parse(spec: str | Iterable[str] | None) -> list[str]:
    """Module names from ``"a.b, c"`` or a list, in order, without repeats."""
    if spec is None:
        return []
    items = re.split(r"[,\s]+", spec) if isinstance(spec, str) else [str(s).strip() for s in spec]
    return list(dict.fromkeys(s for s in items if s))


def env_plugins() -> list[str]:
    return parse(os.environ.get(ENV_VAR))


def load(modules: Iterable[str], source: str = "plugins", paths: Iterable[str] = ()) -> list[str]:
    """Import each module (``paths``: folders tried on ``sys.path`` when a module is not
    importable as it is). Returns the names; raises :class:`PluginError` (one line)."""
    names = parse(list(modules))
    for name in names:
        if not _NAME.match(name):
            raise PluginError(f"{source}: '{name}' is not a module name (e.g. my_lab.losses)")
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            extra = [p for p in paths if p not in sys.path and Path(p).is_dir()]
            if err.name and name.startswith(err.name) and extra:
                sys.path[:0] = extra
                try:
                    importlib.import_module(name)
                    continue
                except Exception as err2:  # noqa: BLE001 - reported below as one line
                    err = err2  # type: ignore[assignment]
            raise PluginError(_failed(source, name, err)) from None
        except Exception as err:  # noqa: BLE001 - a plug-in may raise anything at import
            raise PluginError(_failed(source, name, err)) from None
    return names


def _failed(source: str, name: str, err: BaseException) -> str:
    msg = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    return f"{source}: plugin module '{name}' could not be imported: {type(err).__name__}" + (f": {msg}" if msg else "")


def load_env() -> list[str]:
    return load(env_plugins(), f"${ENV_VAR}")


def _installed(path: str) -> bool:
    return any(part in ("site-packages", "dist-packages") for part in Path(path).parts)


def ship_paths(modules: Iterable[str]) -> list[str]:
    """The local files/folders to ship to Ray workers for ``modules`` (already imported):
    each one's top-level package folder or single file; installed packages are not shipped
    (the workers' environment has them, as it has dmlcore)."""
    out: list[str] = []
    for name in parse(list(modules)):
        top = sys.modules.get(name.split(".")[0])
        if top is None:
            continue
        paths = list(getattr(top, "__path__", []) or [])
        path = paths[0] if len(paths) == 1 else getattr(top, "__file__", None)
        if path and not _installed(path) and path not in out:
            out.append(str(path))
    return out


def search_paths(modules: Iterable[str]) -> list[str]:
    """The ``sys.path`` folders the modules were imported from (tried by :func:`load` in a
    worker on the same machine or a shared file system)."""
    return list(dict.fromkeys(str(Path(p).parent) for p in ship_paths(modules)))
