"""Deferred imports of third-party modules a trial rarely uses.

``lazy_module("scipy.stats")`` registers ``scipy.stats`` in ``sys.modules`` without running
its code; the code runs, in that same module object, on the first access to an attribute
it defines (``scipy.stats.rankdata``, ``from scipy.stats import x``). pytorch-metric-learning
imports ``scipy.stats`` at the top of ``pytorch_metric_learning.utils.common_functions``
(0.6 s: it pulls in ``scipy.spatial``, ``scipy.linalg``, ``scipy.ndimage``, ...) but calls
it in one function only (``rankdata`` for hierarchical labels), which no dmlcore loss or
miner uses; so every trial with a PML loss paid 0.6 s of its start-up for nothing. The
same for ``scipy.special`` (0.2 s), imported by PML's ``large_margin_softmax_loss`` for
``binom`` in that loss's constructor (and by ``scipy.stats`` itself, when it runs).

Not :class:`importlib.util.LazyLoader`: on Python 3.11 its module runs its code on *any*
attribute access, ``__spec__`` included, which every ``import scipy.stats`` statement
reads, so PML's own import statement would load it at once. Here the import metadata
(``__spec__``, ``__path__``, ``__file__``, ...) is there from the start and only a
missing attribute (PEP 562 ``__getattr__``) runs the module; a lock makes the first use
from two threads run it once. A module already imported is left as it is; one that is not
installed is not registered (an ordinary import then raises as before).
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any


def lazy_module(name: str) -> ModuleType | None:
    """``name`` in ``sys.modules``, its code run on first use (None if not installed)."""
    if name in sys.modules:
        return sys.modules[name]
    try:
        spec = importlib.util.find_spec(name)  # imports the parent package (scipy: 3 ms)
    except ImportError:
        return None
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return None
    module = importlib.util.module_from_spec(spec)
    lock = threading.RLock()
    state = {"loaded": False, "loading": False}

    def __getattr__(attr: str) -> Any:
        with lock:
            if state["loading"]:  # the module's own code, still running: a plain miss
                raise AttributeError(f"partially initialized module {name!r} has no attribute {attr!r}")
            if not state["loaded"]:
                state["loading"] = True
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(name, None)  # as a failed import: the next import retries
                    raise
                finally:
                    state["loading"] = False
                state["loaded"] = True
                if module.__dict__.get("__getattr__") is __getattr__:
                    del module.__dict__["__getattr__"]
        return getattr(module, attr)  # the module's own attribute (or its own __getattr__)

    module.__dict__["__getattr__"] = __getattr__
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


PML_UNUSED = ("scipy.stats", "scipy.special")
"""What pytorch-metric-learning imports at its top and a dmlcore trial does not call."""


def defer_pml_imports() -> None:
    """Call before the first ``import pytorch_metric_learning``: :data:`PML_UNUSED`, deferred."""
    for name in PML_UNUSED:
        lazy_module(name)


def is_loaded(name: str) -> bool:
    """Whether ``name`` is imported and its code has run (False for a deferred one)."""
    module = sys.modules.get(name)
    if module is None:
        return False
    hook = module.__dict__.get("__getattr__")
    return getattr(hook, "__qualname__", "") != "lazy_module.<locals>.__getattr__"
