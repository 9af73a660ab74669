"""``sweeper dashboard [STUDY|EXECUTION]``: optuna-dashboard on a search's persisted Optuna study.

STUDY is a study file, its stem or its name (its latest execution under ``--storage``,
default ``./runs/<study>``; ``--execution NAME`` picks another); EXECUTION is an execution
folder (the one holding ``sweeper.json``). The storage and the Optuna study name come from
that ``sweeper.json`` (:mod:`sweeper.optuna_store`). The server listens on 127.0.0.1 by
default (this machine only) and prints the study's page; Ctrl-C stops it. A grid study
has no Optuna study: one line says so (``sweeper ui`` shows its runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dmlcore.config import ConfigError



def add_parser(sub: Any) -> argparse.ArgumentParser:
    from .cli_help import add_examples

    d = sub.add_parser("dashboard", help="optuna-dashboard on a search study's Optuna storage (127.0.0.1)")
    add_examples(d, ("sweeper dashboard my_search --port 8081",
                     "the latest execution of the search study my_search (a server: Ctrl-C stops it)", False))
    d.add_argument("ref", metavar="STUDY|EXECUTION", nargs="?", default=".",
                   help="study file, stem or name (latest execution), or an execution folder (default: .)")
    d.add_argument("--execution", metavar="NAME", help="this execution of the study instead of the latest")
    d.add_argument("--storage", help="Tune storage folder of the study (default: ./runs/<study>)")
    d.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    d.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    return d


def find_exec_dir(ref: str, execution: str | None = None, storage: str | None = None) -> Path:
    """The execution folder ``ref`` means (see the module docstring); one-line ConfigError."""
    from .refs import study_name_of
    from .tune import STATE_FILE, find_execution, storage_root

    p = Path(ref).expanduser()
    if p.is_dir() and (p / STATE_FILE).is_file():
        return p.resolve()
    name = study_name_of(ref)
    if name is None:
        if p.is_dir() and any(p.glob(f"*/{STATE_FILE}")):  # a study's storage folder
            return find_execution(p.resolve(), execution)
        if p.is_dir() or ref == ".":
            raise ConfigError(f"sweeper dashboard: {ref} holds no study execution ({STATE_FILE}); "
                              "give a study or an execution folder")
        name = ref  # a study name with executions but no file here
    return find_execution(storage_root(name, storage), execution)


def resolve(ref: str, execution: str | None = None, storage: str | None = None) -> tuple[str, str, Path]:
    """(storage URL, Optuna study name, execution folder) of a search execution."""
    from . import optuna_store
    from .tune import read_state

    exec_dir = find_exec_dir(ref, execution, storage)
    state = read_state(exec_dir)
    url, name = state.get(optuna_store.STATE_URL), state.get(optuna_store.STATE_STUDY)
    if not url or not name:
        raise ConfigError(
            f"{state.get('study', exec_dir.parent.name)} ({exec_dir.name}) has no Optuna study: "
            "it is a grid (only a search keeps one); its runs are in the MLflow UI: sweeper ui"
        )
    if "***" in url:  # the password is never stored: it comes from the study's search.storage
        from .refs import resolve_study_file
        from .study import load_study

        try:
            configured = load_study(resolve_study_file(state.get("study_file") or ref)).spec.search.storage
        except Exception:
            configured = None
        url = optuna_store.resolve_url(configured, exec_dir, state)
    return url, name, exec_dir


def make_server(url: str, host: str, port: int) -> Any:
    """A threaded WSGI server with optuna-dashboard's app on ``url`` (not started)."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
    from wsgiref.simple_server import make_server as _make

    import optuna_dashboard

    from . import optuna_store

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:  # no line per request
            pass

    app = optuna_dashboard.wsgi(optuna_store.open_storage(url))
    try:
        return _make(host, port, app, server_class=Server, handler_class=QuietHandler)
    except OSError as err:
        raise ConfigError(f"sweeper dashboard: cannot listen on {host}:{port}: {err.strerror or err}") from None


def cmd_dashboard(args: argparse.Namespace) -> int:
    from rich.console import Console

    from . import optuna_store, tracking

    url, name, exec_dir = resolve(args.ref, args.execution, args.storage)
    storage = optuna_store.open_storage(url)
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        raise ConfigError(f"the Optuna storage {tracking.redact_uri(url)} has no study '{name}' "
                          "(the execution has not proposed a trial yet)") from None
    server = make_server(url, args.host, args.port)
    Console(highlight=False).print(
        f"optuna-dashboard at http://{args.host}:{server.server_port}/dashboard/studies/{study_id}  "
        f"(study {name}, storage {tracking.redact_uri(url)}); Ctrl-C stops it", soft_wrap=True,
    )
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
