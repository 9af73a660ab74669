"""Copy-pasteable ``sweeper`` command lines for hints ("continue with ...", "start a new
execution with ..."): every argument shell-quoted, ``--set`` values written so that
``parse_overrides`` reads back the same value."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Mapping

import yaml


def set_value(v: Any) -> str:
    """``v`` as the text after ``--set KEY=`` (YAML flow style; strings plain when safe)."""
    from dmlcore.config import parse_value

    if isinstance(v, str) and parse_value(v) == v:
        return v
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def run_command(
    study_ref: str | Path,
    *,
    quick: bool = False,
    overrides: Mapping[str, Any] | None = None,
    resume: str | None = None,
    storage: str | Path | None = None,
) -> str:
    """``sweeper run STUDY [--quick] [--set k=v ...] [--resume EXECUTION] [--storage DIR]``."""
    argv = ["sweeper", "run", str(study_ref)]
    if quick:
        argv.append("--quick")
    for k, v in (overrides or {}).items():
        argv += ["--set", f"{k}={set_value(v)}"]
    if resume:
        argv += ["--resume", resume]
    if storage is not None:
        argv += ["--storage", str(storage)]
    return shlex.join(argv)


def flags_text(quick: bool, overrides: Mapping[str, Any] | None) -> str:
    """How an execution's flags read in a message: ``--quick --set k=v`` or ``no flags``."""
    argv = (["--quick"] if quick else []) + [a for k, v in (overrides or {}).items() for a in ("--set", f"{k}={set_value(v)}")]
    return shlex.join(argv) if argv else "no --quick/--set"
