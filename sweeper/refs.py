"""A study named on the command line: a file path, a file's stem or the study's ``name``.

``sweeper run``, ``show``, ``analyze`` and ``--resume`` take any of the three:
``studies/fair_benchmark.yaml``, ``fair_benchmark`` (the stem) or
``revisiting_fair_benchmark`` (the ``name:`` inside). Study files are looked for in
``./studies/`` and ``./`` (and the repository's own ``studies/`` folder); an unknown
name is one line with a did-you-mean over the study names, the stems and the studies
that have executions under ``./runs/``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml

from dmlcore.config import ConfigError

_SUFFIXES = (".yaml", ".yml")


def study_dirs() -> list[Path]:
    here = Path.cwd()
    repo = Path(__file__).resolve().parent.parent / "studies"
    out = []
    for d in (here / "studies", here, repo):
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def _shown(p: Path) -> str:
    """``p`` relative to the current directory when under it (what a hint should print)."""
    try:
        return os.path.relpath(p) if p.resolve().is_relative_to(Path.cwd().resolve()) else str(p)
    except ValueError:
        return str(p)


def known_studies() -> dict[str, str]:
    """Study name and file stem -> the study file (as shown), over :func:`study_dirs`."""
    found: dict[str, str] = {}
    for d in study_dirs():
        for p in sorted(d.iterdir()):
            if p.suffix not in _SUFFIXES or not p.is_file():
                continue
            try:
                raw = yaml.safe_load(p.read_text())
            except (OSError, yaml.YAMLError):
                continue
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or "base" not in raw:
                continue  # a run config, not a study
            shown = _shown(p)
            found.setdefault(raw["name"], shown)
            found.setdefault(p.stem, shown)
    return found


def executed_studies(runs: Path | None = None) -> list[str]:
    """Studies with at least one execution under ``./runs/`` (folders holding a ``sweeper.json``)."""
    root = runs or Path("runs")
    if not root.is_dir():
        return []
    return sorted({p.parent.parent.name for p in root.glob("*/*/sweeper.json")})


def suggestion(ref: str, names: list[str]) -> str:
    close = difflib.get_close_matches(ref, names, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def resolve_study_file(ref: str) -> str:
    """The study file ``ref`` means: ``ref`` itself when it is a file, else the file whose
    stem or study name is ``ref``. Raises a one-line ConfigError (did-you-mean) otherwise."""
    if Path(ref).expanduser().is_file():
        return ref
    known = known_studies()
    key = Path(ref).stem if ref.endswith(_SUFFIXES) else ref
    if key in known:
        return known[key]
    names = sorted(set(known) | set(executed_studies()))
    if ref.endswith(_SUFFIXES) or "/" in ref:
        raise ConfigError(f"{ref}: no such file{suggestion(key, names)}")
    listing = f"; studies: {', '.join(sorted(set(known)))}" if known else ""
    raise ConfigError(f"no study '{ref}' (a file, a file's stem or a study name){suggestion(ref, names)}{listing}")


def study_name_of(ref: str) -> str | None:
    """The ``name`` inside the study file ``ref`` means (None when there is no such file)."""
    try:
        path = resolve_study_file(ref)
        raw = yaml.safe_load(Path(path).read_text())
    except (ConfigError, OSError, yaml.YAMLError):
        return None
    return raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else None
