"""How the sweeper prints numbers: the one formatting rule of every table (``sweeper show``,
the live table, the leaderboard, ``sweeper train``'s results, ``sweeper ls``).

The rule (:func:`fmt_num`): **4 significant digits**, trailing zeros dropped;

* plain decimals for ``1e-2 <= |x| < 1e4``: ``0.8123``, ``0.05``, ``123.5``, ``2048``;
* scientific otherwise, with a short exponent: ``5.496e-3`` (not ``0.005495716186411619``),
  ``1e-4``, ``1.235e4``;
* ``0``, ``nan``, ``inf``, ``-inf`` as such; integers (``int``, not ``float``) in full
  (``epochs 100000``); booleans and strings unchanged.

JSON outputs (``--json``) carry the full values; only what is printed for people is rounded.
"""

from __future__ import annotations

import math
from typing import Any

SIGNIFICANT = 4
"""Significant digits of a printed float."""
FIXED_RANGE = (1e-2, 1e4)
"""``|x|`` in ``[low, high)`` is printed as a plain decimal, anything else in scientific notation."""


def fmt_num(x: Any, digits: int = SIGNIFICANT) -> str:
    """``x`` as printed for people (see the module docstring); a non-number: ``str(x)``."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    mantissa, exp = f"{x:.{digits - 1}e}".split("e")
    e = int(exp)
    if FIXED_RANGE[0] <= abs(float(f"{mantissa}e{e}")) < FIXED_RANGE[1]:
        decimals = max(digits - 1 - e, 0)
        return _strip(f"{x:.{decimals}f}")
    return f"{_strip(mantissa)}e{e}"


def _strip(s: str) -> str:
    return s.rstrip("0").rstrip(".") if "." in s else s


def fmt_value(v: Any) -> str:
    """A config value in a table cell: floats by :func:`fmt_num` (also inside lists and
    mappings, written in YAML flow style), the rest as text."""
    if isinstance(v, float):
        return fmt_num(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt_value(x)}" for k, x in v.items()) + "}"
    return str(v)
