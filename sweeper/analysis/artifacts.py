"""Log the files of one ``sweeper analyze`` call to the parent run of the execution it analysed.

Each call gets a folder of its own, ``analysis/<UTC time>/`` (``20261202T142600.123456Z``; a
``-2``, ``-3``, ... suffix if that folder already exists), so a re-analysis never overwrites the
files ``sweeper run`` logged under ``analysis/`` nor those of an earlier call. Sub-folders of the
output folder are kept below it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

ROOT = "analysis"


def stamp(now: datetime | None = None) -> str:
    """The folder name of one call: the UTC time to the microsecond, sortable."""
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S.%fZ")


def _taken(client, run_id: str) -> set[str]:
    return {Path(f.path).name for f in client.list_artifacts(run_id, ROOT) if f.is_dir}


def log_to_parent(tracking_uri: str | None, parent_run_id: str, files: Sequence[Path], out_dir: Path,
                  folder: str | None = None) -> str:
    """Log ``files`` (those under ``out_dir`` keep their relative folder) to ``analysis/<folder>/``
    of ``parent_run_id``; return that artifact path. ``folder`` defaults to :func:`stamp`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    base = folder or stamp()
    taken = _taken(client, parent_run_id)
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    dest = f"{ROOT}/{name}"
    out_dir = Path(out_dir).resolve()
    for f in files:
        f = Path(f)
        if not f.is_file():
            continue
        rel = f.resolve().parent.relative_to(out_dir) if f.resolve().is_relative_to(out_dir) else Path()
        client.log_artifact(parent_run_id, str(f), (Path(dest) / rel).as_posix() if rel.parts else dest)
    return dest
