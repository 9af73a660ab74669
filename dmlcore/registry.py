"""Registries: one per kind of plug-in (dataset, backbone, head, loss, miner, sampler, ...).

Adding a loss is one file with::

    @register("loss", "margin")
    def margin(margin: float = 0.2, beta: float = 1.2, ...) -> torch.nn.Module: ...

``build(kind, name, params, **context)`` calls the factory with the user's ``params``
(checked against the factory's signature: an unknown parameter is a one-line
:class:`RegistryError` naming it) plus the ``context`` arguments the factory asks for
(``embed_dim``, ``num_classes``, ...). ``describe(kind)`` lists every entry with its
parameters and defaults for ``sweeper list``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

KINDS = (
    "dataset",
    "augmentation",
    "sampler",
    "backbone",
    "head",
    "loss",
    "miner",
    "regularizer",
)

# Modules whose import fills the registries. Imported lazily on first lookup so
# that ``import dmlcore.registry`` stays cheap and free of cycles.
_PLUGIN_MODULES = (
    "dmlcore.data",
    "dmlcore.models",
    "dmlcore.losses",
    "dmlcore.guided",
)


class RegistryError(KeyError):
    """Unknown name or parameter. ``str(err)`` is one line meant for the user."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


@dataclass
class Entry:
    kind: str
    name: str
    factory: Callable[..., Any]
    context: tuple[str, ...] = ()
    """Arguments supplied by the platform, not by the user's params."""
    doc: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    module: str = ""
    """The module that registered it (``dmlcore.losses.pml_losses``, or a user's plug-in)."""

    @property
    def plugin(self) -> bool:
        return not self.module.startswith("dmlcore.")

    def params(self) -> dict[str, Any]:
        """User-settable parameters and their defaults (``inspect._empty`` = required)."""
        out = {}
        for p in inspect.signature(self.factory).parameters.values():
            if p.name in self.context or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            out[p.name] = p.default
        return out

    def accepts_any(self) -> bool:
        return any(
            p.kind is p.VAR_KEYWORD for p in inspect.signature(self.factory).parameters.values()
        )


_REGISTRIES: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
_loaded = False


def register(kind: str, name: str, *, context: tuple[str, ...] = (), **meta: Any) -> Callable:
    """Decorator registering ``factory`` as ``name`` in registry ``kind``."""
    if kind not in _REGISTRIES:
        raise ValueError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")

    def deco(factory: Callable) -> Callable:
        table = _REGISTRIES[kind]
        if name in table and table[name].factory is not factory:
            raise ValueError(f"{kind} {name!r} registered twice")
        doc = inspect.getdoc(factory) or ""
        table[name] = Entry(kind, name, factory, tuple(context), doc.split("\n\n")[0], dict(meta),
                            getattr(factory, "__module__", "") or "")
        return factory

    return deco


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _PLUGIN_MODULES:
        importlib.import_module(mod)
    from dmlcore import plugins  # the user's modules named in $DML_PLUGINS

    plugins.load_env()


def names(kind: str) -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRIES[kind])


def get(kind: str, name: str, key: str | None = None) -> Entry:
    """The entry ``name`` of ``kind``; ``key`` is the config key to name in errors."""
    _ensure_loaded()
    table = _REGISTRIES[kind]
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), list(table), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    where = f"{key}: " if key else ""
    raise RegistryError(
        f"{where}unknown {kind} '{name}'{hint}; known: {', '.join(sorted(table)) or 'none'}"
    )


def check_params(kind: str, name: str, params: Mapping[str, Any] | None, key: str | None = None) -> None:
    entry = get(kind, name, key)
    if entry.accepts_any():
        return
    allowed = entry.params()
    for p in params or {}:
        if p not in allowed:
            close = difflib.get_close_matches(p, list(allowed), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"{key}.{p}" if key else p
            raise RegistryError(
                f"{where}: {kind} '{name}' has no parameter '{p}'{hint}; "
                f"parameters: {', '.join(allowed) or 'none'}"
            )


def build(kind: str, name: str, params: Mapping[str, Any] | None = None, key: str | None = None, **context: Any) -> Any:
    """Call the factory of ``name`` with the user's ``params`` and the context it declares."""
    entry = get(kind, name, key)
    check_params(kind, name, params, key)
    sig = inspect.signature(entry.factory).parameters
    ctx = {k: v for k, v in context.items() if k in entry.context and k in sig}
    try:
        return entry.factory(**dict(params or {}), **ctx)
    except TypeError as err:
        where = f"{key}: " if key else ""
        raise RegistryError(f"{where}{kind} '{name}': {err}") from None


def entry_module(kind: str, name: str) -> str:
    """The module that registered ``name`` (shown by ``sweeper list`` for plug-ins)."""
    return get(kind, name).module


def describe(kind: str) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(name, params with defaults, first docstring paragraph) for each entry."""
    _ensure_loaded()
    for name in sorted(_REGISTRIES[kind]):
        e = _REGISTRIES[kind][name]
        yield name, e.params(), e.doc
