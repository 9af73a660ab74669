"""The data layer's exceptions, in a module of their own so that :mod:`dmlcore.data.base`
and :mod:`dmlcore.data.cache` both import them without importing each other."""

from __future__ import annotations


class DataError(ValueError):
    """Unusable data, layout, split or batch composition. ``str(err)`` is one line for the user."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded; ``path`` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"unreadable image {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # rebuilt from (path, reason): pickle (Ray, DataLoader workers) calls cls(*args)
        return (type(self), (self.path, self.reason))
