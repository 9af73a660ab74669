"""Examples at the end of every subcommand's ``--help`` (an argparse epilog, laid out as
written), and the ``--version`` action.

A subcommand (also one registered by another module) adds its examples with::

    from sweeper.cli_help import add_examples
    p = sub.add_parser("embed", help="...")
    add_examples(p, ("sweeper embed RUN_ID --data glyphs --out emb.npy", "embed a dataset with a run's model"))

Each example is a command that works as written from the project folder (``studies/``,
``configs/``); ``tests/test_cli_habits.py`` parses every one and runs those marked
``runs=True`` (the cheap ones) in a scratch folder.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    command: str
    """The command line, starting with ``sweeper``."""
    note: str = ""
    runs: bool = True
    """Cheap and self-contained: the test runs it (False: a long run, a server, the network)."""


EXAMPLES_ATTR = "sweeper_examples"


def add_examples(parser: argparse.ArgumentParser, *examples: Example | tuple[str, ...]) -> None:
    """Append ``examples:`` to ``parser``'s help. A tuple is ``(command, note[, runs])``."""
    items = [e if isinstance(e, Example) else Example(*e) for e in examples]
    if not items:
        raise ValueError("add_examples: give at least one example")
    for e in items:
        if not e.command.startswith("sweeper "):
            raise ValueError(f"add_examples: an example starts with 'sweeper ': {e.command!r}")
    known = list(getattr(parser, EXAMPLES_ATTR, []))
    setattr(parser, EXAMPLES_ATTR, known + items)
    lines = ["examples:"]
    for e in known + items:
        lines.append(f"  {e.command}")
        if e.note:
            lines.append(f"      {e.note}")
    parser.epilog = "\n".join(lines)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def examples_of(parser: argparse.ArgumentParser) -> list[Example]:
    return list(getattr(parser, EXAMPLES_ATTR, []))


class VersionAction(argparse.Action):
    """``--version``: print :func:`sweeper.version.version_text` (computed only when asked) and exit 0."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, default: str = argparse.SUPPRESS,
                 help: str = "print the version (and the git commit of a checkout) and exit"):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        from .version import version_text

        print(version_text())
        parser.exit(0)


# ----------------------------------------------------------------------------- the built-in commands
BUILTIN_EXAMPLES: dict[str, list[Example]] = {
    "train": [
        Example("sweeper train configs/quickstart.yaml --set train.epochs=1 --no-mlflow",
                "one short run of the quickstart config, not logged", runs=False),
        Example("sweeper train --set loss.name=margin --set model.embed_dim=64 --json results.json",
                "the defaults with two keys changed; results also as JSON", runs=False),
    ],
    "show": [
        Example("sweeper show quickstart", "the trials of studies/quickstart.yaml"),
        Example("sweeper show quickstart --quick --set 'seeds=[0,1]'", "the quick variant, with two seeds"),
        Example("sweeper show quickstart --json", "the resolved study as JSON"),
    ],
    "run": [
        Example("sweeper run quickstart --quick --dry-run", "validate and preflight; start nothing"),
        Example("sweeper run quickstart --quick --set 'seeds=[0]'", "run the quick variant with one seed", runs=False),
        Example("sweeper run quickstart --resume", "continue the latest execution with its flags", runs=False),
        Example("sweeper run quickstart --quick --json", "the outcome as JSON on stdout, progress on stderr",
                runs=False),
    ],
    "analyze": [
        Example("sweeper analyze quickstart", "the analyses again on the latest execution's runs", runs=False),
        Example("sweeper analyze quickstart --no-cache --out report/", "listing the runs from MLflow again",
                runs=False),
    ],
    "list": [
        Example("sweeper list losses", "every loss with its parameters"),
        Example("sweeper list miner --json", "the miners as JSON"),
    ],
    "keys": [
        Example("sweeper keys optim.", "the optimiser's keys with their defaults"),
    ],
    "ls": [
        Example("sweeper ls", "every execution under ./runs: status, trials, best value, parent run"),
        Example("sweeper ls quickstart --json", "one study's executions as JSON"),
    ],
    "splits": [
        Example("sweeper splits cub200 --root /data/cub200 --n 8", "8 ooDML splits of CUB-200 by FID (ImageNet ResNet-50)",
                runs=False),
        Example("sweeper splits import cars196_splits.pkl --out cars196_oodml.json",
                "the ooDML authors' split file as JSON", runs=False),
    ],
    "weights": [
        Example("sweeper weights list", "which ImageNet weights are present"),
        Example("sweeper weights fetch resnet50", "download them once (network)", runs=False),
    ],
    "ui": [
        Example("sweeper ui", "the MLflow UI on 127.0.0.1:5000 over ./mlflow.db (until Ctrl-C)", runs=False),
        Example("sweeper ui --port 5001 --tracking-uri sqlite:///mlflow.db", "another port and store", runs=False),
    ],
}
"""Examples of the sweeper's own subcommands (a subcommand of another module adds its own)."""
_NESTED = {"weights": {"list": [Example("sweeper weights list", "which ImageNet weights are present")],
                       "fetch": [Example("sweeper weights fetch resnet50 --force", "download again", runs=False)]}}


def add_cli_examples(choices: dict[str, argparse.ArgumentParser]) -> None:
    """Give the built-in subcommands in ``choices`` (``sub.choices``) their examples."""
    for name, examples in BUILTIN_EXAMPLES.items():
        if name in choices:
            add_examples(choices[name], *examples)
            for action in choices[name]._actions:  # nested subcommands (sweeper weights list)
                if isinstance(action, argparse._SubParsersAction):
                    for sub_name, sub_parser in action.choices.items():
                        if sub_name in _NESTED.get(name, {}):
                            add_examples(sub_parser, *_NESTED[name][sub_name])
