"""Docs that run (issue 16, item 9): every fenced block in README.md and docs/*.md is run,
or marked as a fragment.

The convention (docs/contributing.md): an HTML comment on the line directly before the
opening fence says what the block is, GitHub does not render it:

* ``<!-- fragment: WHY -->`` — not complete on its own (an excerpt, a layout, output);
* ``<!-- needs: WHAT -->`` — complete, but needs what a test cannot have (a real dataset,
  a GPU, a cluster, the network, a long run, a server that runs until Ctrl-C);
* ``<!-- run: dry-run -->`` — a shell block whose ``sweeper run`` lines are checked with
  ``--dry-run`` (validation + preflight) because the full run is long.

Every unmarked block is run, in a temporary folder holding a copy of ``studies/`` and
``configs/`` (and ``.venv`` pointing at this interpreter's environment):

* ``bash``/``sh``/``shell``: as one ``bash -e`` script; ``sweeper train`` gets
  ``--set train.epochs=1 --set batch.iterations_per_epoch=3 --set eval.on_init=false`` appended and ``sweeper run``
  ``--num-cpus 2 --no-live`` (cheap overrides, see ``EXTRA``);
* ``yaml`` with a top-level ``name:`` and ``base:`` (a study): ``sweeper show`` on it;
  other ``yaml`` (a study's section): must be marked;
* ``python``: executed as a script.

Unmarked blocks in any other language (or none) fail the test: mark them.
A failure names the file, the line of the fence and the block's text.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*(fragment|needs|run)\s*:\s*(\S.*?)\s*-->\s*$")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
SHELL = {"bash", "sh", "shell", "console"}
EXTRA = {  # cheap overrides appended to documented sweeper commands
    "train": ["--set", "train.epochs=1", "--set", "batch.iterations_per_epoch=3", "--set", "eval.on_init=false"],
    "run": ["--num-cpus", "2", "--no-live"],
}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: tuple[str, str] | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, j = m.group(1), i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        mk = MARKER.match(lines[i - 1].strip()) if i else None
        found.append(Block(path, i + 1, m.group(2).lower(), "\n".join(lines[i + 1:j]) + "\n",
                           (mk.group(1), mk.group(2)) if mk else None))
        i = j + 1
    return found


ALL = [b for p in DOCS for b in blocks(p)]


def _is_study(text: str) -> bool:
    return bool(re.search(r"^name:", text, re.M) and re.search(r"^base:", text, re.M))


@pytest.fixture
def workdir(tmp_path):
    for name in ("studies", "configs"):
        shutil.copytree(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").symlink_to(sys.prefix)  # the environment running the tests
    return tmp_path


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        MPLBACKEND="Agg", RAY_USAGE_STATS_ENABLED="0", HOME=str(tmp), PYTHONUNBUFFERED="1",
    )
    return env


def _shell_script(block: Block) -> str:
    dry = block.marker == ("run", "dry-run")
    extra_run = " ".join(EXTRA["run"] + (["--dry-run"] if dry else []))
    return (
        "set -e\n"
        f"trap 'echo \"FAILED at {block.path.relative_to(ROOT)}:$(({block.line} + LINENO - 6)): $BASH_COMMAND\" >&2' ERR\n"
        "sweeper() { case \"$1\" in\n"
        f"  train) command sweeper \"$@\" {' '.join(EXTRA['train'])} ;;\n"
        f"  run) command sweeper \"$@\" {extra_run} ;;\n"
        "  *) command sweeper \"$@\" ;; esac; }\n"
        + block.text
    )


def _fail(block: Block, what: str, out: str) -> None:
    pytest.fail(f"{block.where}: {what}\n--- block ---\n{block.text}--- output (tail) ---\n{out[-4000:]}",
                pytrace=False)


def test_blocks_found():
    """The extraction sees the docs' blocks (a broken fence regex would pass everything)."""
    assert len(ALL) > 30 and {"bash", "python", "yaml"} <= {b.lang for b in ALL}
    assert all(b.text.strip() for b in ALL), [b.where for b in ALL if not b.text.strip()]


@pytest.mark.parametrize("block", ALL, ids=[b.where for b in ALL])
def test_doc_block(block: Block, workdir: Path):
    if block.marker and block.marker[0] in ("fragment", "needs"):
        assert block.marker[1], f"{block.where}: say why in the marker"
        return
    if block.marker and block.marker != ("run", "dry-run"):
        _fail(block, f"unknown marker run: {block.marker[1]!r} (only 'run: dry-run')", "")
    env = _env(workdir)
    if block.lang in SHELL:
        r = subprocess.run(["bash", "-c", _shell_script(block)], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=240)
        if r.returncode != 0:
            _fail(block, f"shell block exited {r.returncode}", r.stdout + r.stderr)
    elif block.lang == "python":
        script = workdir / "block.py"
        script.write_text(block.text)
        r = subprocess.run([sys.executable, str(script)], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=240)
        if r.returncode != 0:
            _fail(block, f"python block exited {r.returncode}", r.stdout + r.stderr)
    elif block.lang in ("yaml", "yml") and _is_study(block.text):
        study = workdir / "studies" / "doc_block.yaml"
        study.write_text(block.text)
        r = subprocess.run([str(Path(sys.executable).with_name("sweeper")), "show", str(study)],
                           cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            _fail(block, f"study block: sweeper show exited {r.returncode}", r.stdout + r.stderr)
    else:
        _fail(block, f"a '{block.lang or 'plain'}' block without a marker: mark it "
                     "(<!-- fragment: why --> or <!-- needs: what -->, see docs/contributing.md)", "")
