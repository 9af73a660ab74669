"""``sweeper --version``: the installed package's version and, when the code runs from a
git checkout of the project, its commit."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "dml-platform"
"""The distribution name in pyproject.toml (``[project] name``)."""


def package_version() -> str:
    """The installed distribution's version (importlib.metadata), else dmlcore's ``__version__``."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        import dmlcore

        return str(getattr(dmlcore, "__version__", "unknown"))


def checkout_commit() -> tuple[str, bool] | None:
    """(commit, dirty) of the git checkout this code is imported from; None when the
    ``sweeper`` package is not the top of a git work tree's ``sweeper/`` (e.g. an installed wheel)."""
    pkg = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=pkg, capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != pkg.parent:
            return None
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pkg, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=pkg,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(dirty.returncode == 0 and dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None


def version_text() -> str:
    """``sweeper 0.1.0 (dml-platform, git 41922e8d, modified)``: one line."""
    out = f"sweeper {package_version()} ({DISTRIBUTION}"
    git = checkout_commit()
    if git is not None:
        out += f", git {git[0][:12]}" + (", modified" if git[1] else "")
    return out + ")"
