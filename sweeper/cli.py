"""``sweeper``: run, inspect and track Deep Metric Learning studies.

    sweeper train [CONFIG] [--set k=v ...] [--no-mlflow]     one run, rich progress, MLflow
    sweeper show STUDY [--quick] [--set k=v ...]             the expanded trial table
    sweeper run STUDY [--address A] [--resume] [--dry-run] [--quick] [--set k=v ...]
    sweeper analyze STUDY                                    the analyses again, on the stored runs

STUDY is a study file, its stem (``fair_benchmark``) or the study's name
(``revisiting_fair_benchmark``), looked for in ./studies and ./.
    sweeper list [KIND] [--json]                             registries and their parameters
    sweeper ls [STUDY] [--json]                              the executions under ./runs: status, trials, best
    sweeper --version                                        package version (and git commit of a checkout)
    sweeper keys [PREFIX]                                    every config key with its default
    sweeper ui [--port P] [--host H]                         MLflow UI on the same store
    sweeper dashboard [STUDY|EXECUTION] [--port P]           optuna-dashboard on a search's Optuna study
    sweeper weights list | fetch BACKBONE                    ImageNet weights in the torch hub cache

A user error (bad key, unknown registry name, missing data, ...) is one red line on
stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cli_help import VersionAction, add_cli_examples, add_examples  # noqa: F401 (add_examples: for new subcommands)

EXIT_USAGE = 2


class UserError(ValueError):
    """A problem to report in one line."""


# Outside a terminal (a pipe, nohup, a Slurm log) rich would wrap everything at 80
# columns; there tables get the width they need (up to this) and nothing is folded.
WIDTH_OUTSIDE_A_TERMINAL = 1000


def _console(stderr: bool = False, **kw: Any) -> Console:
    console = Console(stderr=stderr, highlight=False, **kw)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, highlight=False, width=WIDTH_OUTSIDE_A_TERMINAL, **kw)
    return console


def _err_console() -> Console:
    return _console(stderr=True, soft_wrap=True)


def fail_line(err: BaseException | str) -> str:
    from .tracking import redact

    text = str(err) if not isinstance(err, str) else err
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return redact(" ".join(lines)) if lines else type(err).__name__


def _first_line(err: BaseException) -> str:
    from .tracking import redact

    line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return redact(line if len(line) <= 400 else line[:397] + "...")


# User errors that may reach the CLI re-raised by PyTorch from a DataLoader worker
# (as a RuntimeError carrying the worker's traceback as text).
_WORKER_USER_ERRORS = {"DataError", "CorruptImageError", "ConfigError", "RegistryError", "CheckpointError"}


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sweeper",
        description="Deep Metric Learning studies: Ray Tune sweeps of the dmlcore trainer, tracked in MLflow.",
    )
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add_set(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a dotted config key (repeatable), e.g. --set train.epochs=2; on show/run also "
                 "a study key: --set seeds=[0,1], --set search.samples=50",
        )

    t = sub.add_parser("train", help="train one run (rich progress; logged to MLflow)")
    t.add_argument("config", nargs="?", help="run config YAML (default: the built-in defaults)")
    add_set(t)
    t.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    t.add_argument("--experiment", help="MLflow experiment (default: the config's name)")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    t.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint file written by --checkpoint")
    t.add_argument("--checkpoint", metavar="PATH", help="keep the latest checkpoint in this file")
    t.add_argument("--json", metavar="PATH", help="also write the results (best, final, initial, history) as JSON")

    s = sub.add_parser("show", help="validate a study and print its trials")
    s.add_argument("study")
    s.add_argument("--quick", action="store_true", help="apply the study's quick overrides")
    add_set(s)
    s.add_argument("--json", action="store_true", help="print the resolved study as JSON (schema: docs/cli.md)")

    r = sub.add_parser("run", help="run a study with Ray Tune")
    r.add_argument("study")
    r.add_argument("--address", help="join a Ray cluster: 'auto' or ray://HOST:PORT (default: start Ray locally)")
    r.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    r.add_argument(
        "--resume", nargs="?", const="latest", metavar="EXECUTION",
        help="continue the latest (or the named) execution of this study, with the --quick/--set it was started with",
    )
    r.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
    r.add_argument("--quick", action="store_true", help="apply the study's quick overrides")
    add_set(r)
    r.add_argument("--storage", help="Tune storage folder (default: ./runs/<study>)")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    r.add_argument("--no-live", action="store_true", help="print one line per trial event instead of a live table")
    r.add_argument("--verbose", action="store_true", help="show the trials' own output")
    r.add_argument("--json", action="store_true",
                   help="print the outcome as JSON on stdout, the progress on stderr (schema: docs/cli.md)")

    a = sub.add_parser("analyze", help="run the analyses again on a study execution's MLflow runs")
    a.add_argument("ref", help="study YAML (its analyses), study name (latest execution) or parent run id")
    a.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    a.add_argument("--out", help="output folder (default: ./runs/<study>/analysis)")
    a.add_argument("--no-cache", action="store_true",
                   help="list the runs from MLflow even when <out>/.runs_cache.json is current")

    ls = sub.add_parser("list", help="list the registries (datasets, losses, ...) with their parameters")
    ls.add_argument("kind", nargs="?", help="one registry, e.g. loss or losses")
    ls.add_argument("--json", action="store_true", help="print the entries as JSON (schema: docs/cli.md)")

    ex = sub.add_parser("ls", help="the study executions under ./runs: status, trials, best value, parent run")
    ex.add_argument("study", nargs="?", help="only this study's executions (its name, file stem or file)")
    ex.add_argument("--storage", help="storage folder to list (default: ./runs; or a study's --storage folder)")
    ex.add_argument("--json", action="store_true", help="print the executions as JSON (schema: docs/cli.md)")
    ex.add_argument("--no-mlflow", action="store_true",
                    help="only the state files: no MLflow search for the counts of running or crashed executions")
    ex.add_argument("--tracking-uri", help="the full URI (with password) of a store sweeper.json keeps redacted")

    k = sub.add_parser("keys", help="list every config key with its default")
    k.add_argument("prefix", nargs="?", help="only keys starting with this, e.g. loss")

    sp = sub.add_parser("splits", help="build ooDML train/test splits of increasing difficulty (FID), or import the authors' split file",
                        description="sweeper splits DATASET [--n 8 | --ids 0,6,16,R18]  builds splits;  "
                        "sweeper splits import FILE --out SPLITS.json  converts the ooDML authors' split file (pickle or JSON)")  # fmt: skip
    sp.add_argument("dataset", help="a dataset name (e.g. glyphs, cub200), a run-config YAML, or 'import'")
    sp.add_argument("file", nargs="?", help="with 'import': the authors' split file (datasplits/*_splits.pkl or its JSON form)")
    sp.add_argument("--dataset", dest="import_dataset", help="with 'import': cub200|cars196|sop (default: from the file name)")
    sp.add_argument("--n", type=int, default=8, help="number of splits (default 8)")
    sp.add_argument("--ids", help="the authors' split ids instead of even FID spacing, e.g. 0,6,16,20,30,R18,R42,R66")
    sp.add_argument("--pretrained", help="encoder weights (default: the paper's ImageNet ResNet-50, 'imagenet')")
    sp.add_argument("--encoder", help="checkpoint path or backbone name (default: ResNet-50 with ImageNet weights)")
    sp.add_argument("--root", help="data.root of a real dataset")
    sp.add_argument("--image-size", type=int, help="image size fed to the encoder")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", help="split file to write (default: <dataset>_oodml.json)")

    w = sub.add_parser("weights", help="ImageNet backbone weights: which are present, download one (once)")
    wsub = w.add_subparsers(dest="weights_command", metavar="ACTION")
    wsub.required = True
    wsub.add_parser("list", help="the known ImageNet weight files: present, missing or bad, and where")
    wf = wsub.add_parser("fetch", help="download a backbone's ImageNet (V1) weights into the torch hub cache")
    wf.add_argument("backbone", help="resnet50, resnet18 or googlenet")
    wf.add_argument("--force", action="store_true", help="download again even if a good copy is there")

    u = sub.add_parser("ui", help="start the MLflow UI on the study store")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    u.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    u.add_argument("--print-command", action="store_true", help=argparse.SUPPRESS)
    from . import cli_models

    cli_models.add_parsers(sub, add_set)  # embed, retrieve: a run's selected model
    _dashboard.add_parser(sub)
    add_cli_examples(sub.choices)
    for sp_ in sub.choices.values():  # every command: the user's own registry entries (docs/plugins.md)
        sp_.add_argument(
            "--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
            help="import this module first (it registers losses, datasets, ...); repeatable",
        )
    return p


def load_cli_plugins(modules: list[str]) -> None:
    """``--plugin`` modules: imported now and added to ``$DML_PLUGINS`` (so trials import them too)."""
    if not modules:
        return
    from dmlcore import plugins

    names = plugins.load(modules, "--plugin")
    os.environ[plugins.ENV_VAR] = ",".join(plugins.parse([*plugins.env_plugins(), *names]))


# ----------------------------------------------------------------------------- commands
def cmd_show(args: argparse.Namespace) -> int:
    from dmlcore.config import parse_overrides

    from .refs import resolve_study_file
    from .study import load_study

    study = load_study(resolve_study_file(args.study), parse_overrides(args.overrides), quick=args.quick)
    if args.json:
        from .cli_json import dump, study_doc

        dump(study_doc(study))
        return 0
    print_study(study, _console())
    return 0


def print_study(study: Any, console: Console) -> None:
    from .study import trial_table_rows

    spec = study.spec
    cols, rows = trial_table_rows(study)
    kind = f"Optuna search ({spec.search.sampler}), {spec.search.samples} samples" if study.is_search else "grid"
    title = f"{spec.name}: {kind}" + (" [quick]" if study.quick else "")
    table = Table(title=escape(title), title_justify="left")
    for c in cols:
        table.add_column(c, overflow="fold", justify="right" if c == "#" else "left")
    for row in rows:
        table.add_row(*[escape(x) for x in row])
    console.print(table)
    res = spec.resources
    extra = [f"metric {spec.metric} ({spec.mode})", f"resources cpu={res.cpu:g} gpu={res.gpu:g}"]
    if spec.max_concurrent:
        extra.append(f"max_concurrent {spec.max_concurrent}")
    if spec.scheduler:
        sc = spec.scheduler
        extra.append(f"ASHA on {sc.metric or spec.metric} (grace {sc.grace_period}, factor {sc.reduction_factor:g})")
    if spec.analyses:
        extra.append("analyses " + ", ".join(n for n, _ in spec.analysis_specs()))
    console.print(escape(" · ".join(extra)))
    console.print(f"[bold]{study.size} trials[/bold]" + (" (Optuna proposes them while running)" if study.is_search else ""))


def remembered_flags(ref: str, args: argparse.Namespace, given: dict[str, Any]) -> tuple[str, bool, dict[str, Any]]:
    """``--resume``: (execution, --quick, --set) the execution was started with. Flags
    given again must be the same; a change is refused with the commands that work."""
    from dmlcore.config import read_yaml

    from .hints import flags_text, run_command
    from .tune import find_execution, read_state, storage_root

    raw = read_yaml(ref)
    name = raw.get("name") if isinstance(raw, dict) else None
    if not isinstance(name, str):
        return args.resume, args.quick, given  # load_study reports what is wrong with the file
    root = storage_root(name, args.storage)
    exec_dir = find_execution(root, args.resume if args.resume != "latest" else None)
    state = read_state(exec_dir)
    quick, overrides = bool(state.get("quick")), dict(state.get("overrides") or {})
    if (args.quick or given) and (args.quick, given) != (quick, overrides):
        storage = args.storage
        raise UserError(
            f"--resume: execution '{exec_dir.name}' was started with {flags_text(quick, overrides)} and "
            f"resumes with them; continue it with: {run_command(ref, resume=exec_dir.name, storage=storage)}"
            f" -- or start a new execution with: {run_command(ref, quick=args.quick, overrides=given, storage=storage)}"
        )
    return exec_dir.name, quick, overrides


def dry_run_problems(study: Any, args: argparse.Namespace, resume: str | None) -> list[str]:
    """The preflight of ``--dry-run`` (a cluster given by --address is joined to read its nodes)."""
    from . import preflight
    from .tune import _init_ray, plan_run, preflight_context

    plan = plan_run(study, address=args.address, num_cpus=args.num_cpus, resume=resume, storage=args.storage,
                    tracking_uri=args.tracking_uri)
    ctx = preflight_context(plan)
    problems = preflight.run_checks(ctx, [n for n in preflight.CHECKS if n not in ("resources", "data")]
                                    if args.address else None)
    if args.address and not problems:
        started = _init_ray(args.address, args.num_cpus, False)
        try:
            problems = preflight.run_checks(ctx, ["resources", "data"])
        finally:
            if started:
                import ray

                ray.shutdown()
    return problems


def cmd_run(args: argparse.Namespace) -> int:
    from dmlcore.config import parse_overrides

    from . import tracking
    from .refs import resolve_study_file
    from .study import load_study
    from .tune import storage_root

    console = _console(stderr=args.json)  # --json: the document alone on stdout
    ref = resolve_study_file(args.study)
    quick, overrides, resume = args.quick, parse_overrides(args.overrides), args.resume
    if args.resume:
        resume, quick, overrides = remembered_flags(ref, args, overrides)
    study = load_study(ref, overrides, quick=quick)
    from .study import tuning_warning

    if (warning := tuning_warning(study.spec)) is not None:  # once per command
        _err_console().print(f"[yellow]warning:[/] {escape(warning)}")
    if args.dry_run:
        print_study(study, console)
        uri = args.tracking_uri or tracking.default_tracking_uri()
        console.print(f"storage   {storage_root(study.name, args.storage)}", soft_wrap=True)
        console.print(f"tracking  {tracking.redact_uri(uri)}", soft_wrap=True)
        console.print(f"ray       {args.address or 'local'}" + (f" (num_cpus={args.num_cpus})" if args.num_cpus else ""))
        from .preflight import PreflightError

        problems = dry_run_problems(study, args, resume)
        if problems:
            raise PreflightError(problems)
        console.print("[dim]dry run: preflight passed; nothing started[/dim]")
        if args.json:
            from .cli_json import dump, study_doc

            dump(study_doc(study))
        return 0
    from .tune import run_study

    _quiet_logs()
    outcome = run_study(
        study,
        address=args.address,
        num_cpus=args.num_cpus,
        resume=resume,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        console=console,
        live=False if args.no_live else None,
        verbose=args.verbose,
    )
    print_outcome(outcome, console)
    if args.json:
        from .cli_json import dump, outcome_doc

        dump(outcome_doc(outcome))
    return 1 if outcome.interrupted else 0


def print_outcome(outcome: Any, console: Console) -> None:
    from .live import failures_table, leaderboard_table

    console.print(leaderboard_table(outcome))
    ft = failures_table(outcome)
    if ft is not None:
        console.print(ft)
    c = outcome.counts()
    parts = [f"{n} {k}" for k, n in sorted(c.items())]
    console.print(f"[bold]{outcome.study}[/bold] {outcome.execution}: " + ", ".join(parts), soft_wrap=True)
    if outcome.best is not None:
        from .numbers import fmt_num

        console.print(f"best {outcome.metric} = {fmt_num(outcome.best.value)} ({outcome.best.name})", soft_wrap=True)
    console.print(f"storage  {outcome.exec_dir}", soft_wrap=True)
    from .tracking import redact_uri

    console.print(f"mlflow   {redact_uri(outcome.tracking_uri)}  parent run {outcome.parent_run_id}", soft_wrap=True)
    for p in outcome.analysis_paths:
        console.print(f"analysis {p}", soft_wrap=True)
    if outcome.interrupted:
        command = getattr(outcome, "resume_command", None) or f"sweeper run {outcome.study} --resume {outcome.execution}"
        console.print(f"[yellow]interrupted:[/] continue with  {escape(command)}", soft_wrap=True)


class _TrainReporter:
    """``sweeper train``'s reporter: MLflow (optional) + the latest checkpoint on disk (optional)."""

    def __init__(self, logger: Any, checkpoint: str | None):
        self.logger = logger
        self.checkpoint = checkpoint

    def report(self, step: int, metrics: Any, checkpoint: dict | None = None) -> None:
        if self.logger is not None:
            self.logger.report(step, metrics)
        if checkpoint is not None and self.checkpoint:
            from dmlcore.train import save_checkpoint

            save_checkpoint(checkpoint, self.checkpoint)


def cmd_train(args: argparse.Namespace) -> int:
    from dmlcore.config import load_config, parse_overrides

    from .study import check_registries

    console = _console()
    cfg = load_config(args.config, parse_overrides(args.overrides))
    check_registries(cfg)
    from .weights import check_local, needed_backbones

    check_local(needed_backbones([cfg]))  # missing ImageNet weights: one line, before MLflow
    from dmlcore.train import Trainer

    logger = None
    if not args.no_mlflow:
        _quiet_logs()
        from . import tracking

        tracker = tracking.Tracker(args.tracking_uri)
        exp = tracker.experiment_id(args.experiment or cfg.name)
        from dmlcore.oodml.published import split_tags

        from . import conventions  # the experiment kind, source and user (sweeper/conventions.py)

        conventions.set_experiment_tags(tracker, exp, {conventions.EXPERIMENT_KIND_TAG: conventions.EXPERIMENT_KIND})
        logger, _ = tracking.open_run(tracker, exp, cfg.name, cfg, {**tracking.single_run_tags(), **split_tags(cfg),
                                                                    **conventions.source_tags(args.config)})
        console.print(f"[dim]MLflow run {logger.run_id} at {tracking.redact_uri(tracker.uri)}[/dim]", soft_wrap=True)
    reporter = _TrainReporter(logger, args.checkpoint)
    from .conventions import log_split, system_metrics
    from .tracking import recording

    run_id, uri = (logger.run_id, logger.tracker.uri) if logger is not None else (None, None)
    with recording(logger, killed=(KeyboardInterrupt,)), system_metrics(run_id, uri):
        trainer = Trainer(cfg, reporter=reporter, progress=True)
        if logger is not None:  # the split as the run's dataset inputs
            log_split(logger.tracker, logger.run_id, trainer.build().data)
        result = trainer.fit(resume=args.resume)
        from .models import log_selected_model
        from .pictures import log_pictures

        log_selected_model(logger, trainer, result)  # the selected epoch's weights (never fails the run)
        log_pictures(trainer, result, logger)  # never raises (eval.pictures: false: nothing)
    console.print(result_table(result))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(result.to_json(), indent=1))
    return 0


def result_table(result: Any) -> Table:
    best, final = dict(result.best or {}), dict(result.final or {})
    keys = sorted(set(best) | set(final), key=lambda k: (not k.startswith("test/"), not k.startswith("val/"), k))
    keys = [k for k in keys if not k.startswith("time/")]
    table = Table(title=f"{result.config.name}: results", title_justify="left")
    table.add_column("metric")
    initial = dict(getattr(result, "initial", {}) or {})
    if initial:
        table.add_column("untrained", justify="right", style="dim")
    table.add_column(f"best (epoch {result.best_epoch})", justify="right", style="bold")
    table.add_column("final", justify="right")
    for k in keys:
        row = [k] + ([_num(initial.get(k))] if initial else []) + [_num(best.get(k)), _num(final.get(k))]
        table.add_row(*row)
    return table


def _num(v: Any) -> str:
    from .numbers import fmt_num

    if v is None:
        return ""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    return fmt_num(v if isinstance(v, int) and not isinstance(v, bool) else x)


def cmd_analyze(args: argparse.Namespace) -> int:
    from . import tracking
    from .tune import analysis_module, call_run_analyses

    mod = analysis_module()
    if mod is None or not hasattr(mod, "load_runs"):
        raise UserError("sweeper.analysis is not available in this installation")
    from .refs import executed_studies, known_studies, resolve_study_file, suggestion

    uri = args.tracking_uri or tracking.default_tracking_uri()
    analyses = None
    ref = args.ref
    study = None
    known = known_studies()
    if ref.endswith((".yaml", ".yml")) or Path(ref).is_file() or ref in known:
        from .study import load_study

        study = load_study(resolve_study_file(ref))  # a file, or a file's stem / study name
        ref, analyses = study.name, (study.spec.analyses or None)
    try:
        if hasattr(mod, "load_runs_cached"):  # cached beside the outputs, re-listed when runs change
            runs = mod.load_runs_cached(uri, ref, args.out, cache=not args.no_cache)
        else:
            runs = mod.load_runs(uri, ref)
    except ValueError as err:
        names = sorted(set(known) | set(executed_studies()))
        hint = "" if study is not None else suggestion(ref, [n for n in names if n != ref])
        raise UserError(f"{fail_line(err)}{hint}") from None
    name = runs.attrs.get("study") or ref
    out = Path(args.out) if args.out else Path("runs") / str(name) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    console = _console()
    files = call_run_analyses(mod.run_analyses, study, str(name), analyses, runs, out, console)
    for f in files:
        console.print(f"wrote {f}", soft_wrap=True)
    parent = runs.attrs.get("parent_run_id")
    if parent and files:  # its own folder per call: analysis/<UTC time>/ (sweeper/analysis/artifacts.py)
        from .analysis.artifacts import log_to_parent

        try:
            dest = log_to_parent(uri, parent, files, out)
            console.print(f"logged to parent run {parent}: {dest}/", soft_wrap=True, highlight=False)
        except Exception as err:  # noqa: BLE001 - the files are written; say why they are not in MLflow
            console.print(f"[yellow]could not log the analysis to parent run {parent}: {fail_line(err)}[/]", soft_wrap=True)
    return 0


_PLURALS = {
    "datasets": "dataset", "augmentations": "augmentation", "samplers": "sampler", "backbones": "backbone",
    "heads": "head", "losses": "loss", "miners": "miner", "regularizers": "regularizer",
}


def cmd_list(args: argparse.Namespace) -> int:
    from dmlcore import registry

    console = _console()
    kinds = list(registry.KINDS)
    if args.kind:
        k = _PLURALS.get(args.kind, args.kind)
        if k not in kinds:
            close = difflib.get_close_matches(args.kind, kinds + list(_PLURALS), n=1, cutoff=0.5)
            hint = f" (did you mean '{_PLURALS.get(close[0], close[0])}'?)" if close else ""
            raise UserError(f"unknown registry '{args.kind}'{hint}; registries: {', '.join(kinds)}")
        kinds = [k]
    if args.json:
        from .cli_json import dump, registries_doc

        dump(registries_doc(kinds))
        return 0
    for kind in kinds:
        table = Table(title=f"{kind} ({len(registry.names(kind))})", title_justify="left")
        table.add_column("name", style="bold", no_wrap=True)
        table.add_column("parameters (default)", overflow="fold")
        table.add_column("description", overflow="fold")
        for name, params, doc in registry.describe(kind):
            if registry.get(kind, name).meta.get("needs_embeddings"):
                doc = f"[needs embeddings] {doc}"
            ps = ", ".join(
                f"{p}=[italic]required[/italic]" if d is inspect.Parameter.empty else f"{p}={escape(repr(d))}"
                for p, d in params.items()
            )
            module = registry.entry_module(kind, name)
            if not module.startswith("dmlcore."):  # a plug-in: say where it comes from
                doc = f"[plugin {module}] {doc}".strip()
            table.add_row(name, ps or "[dim]—[/dim]", escape(doc))
        console.print(table)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from . import executions as ex

    from .refs import study_name_of, suggestion

    study = args.study
    if study is not None:  # a study file, its stem or a study name -> the name in sweeper.json
        study = study_name_of(study) or study
    root = Path(args.storage).expanduser() if args.storage else Path("runs")
    found = ex.list_executions(root, study, mlflow=not args.no_mlflow, tracking_uri=args.tracking_uri)
    if args.json:
        from .cli_json import dump, executions_doc

        dump(executions_doc(found, str(root.resolve())))
        return 0
    console = _console()
    if not found:
        hint = suggestion(study, sorted({st.get("study", "") for _, st in ex.scan(root)})) if study else ""
        console.print(f"no study executions under {root.resolve()}" + (f" for '{study}'{hint}" if study else ""),
                      soft_wrap=True)
        return 0
    cols, rows = ex.table_rows(found)
    if not console.is_terminal:  # piped: plain tab-separated lines, a header first
        for row in [cols, *rows]:
            print("\t".join(row))
        return 0
    style = {"running": "cyan", "finished": "green", "interrupted": "yellow", "failed": "bold red"}
    table = Table(title=f"study executions under {root.resolve()}", title_justify="left")
    for c in cols:
        table.add_column(c, overflow="fold", no_wrap=c in ("execution", "status", "started"))
    for e, row in zip(found, rows):
        row[2] = f"[{style.get(e.status, 'dim')}]{escape(row[2])}[/]"
        table.add_row(*[cell if i == 2 else escape(cell) for i, cell in enumerate(row)])
    console.print(table)
    return 0


def field_docs() -> dict[str, str]:
    """Attribute docstrings of the RunConfig sections, by dotted key (parsed from the source)."""
    from dmlcore import config as cmod
    from dmlcore.config import RunConfig

    try:
        tree = ast.parse(inspect.getsource(cmod))
    except (OSError, TypeError, SyntaxError):
        return {}
    by_class: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs: dict[str, str] = {}
            body = node.body
            for a, b in zip(body, body[1:]):
                if (
                    isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                    and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)
                ):
                    docs[a.target.id] = " ".join(b.value.value.split())
            by_class[node.name] = docs
    out: dict[str, str] = {}
    for section, f in RunConfig.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type):
            for name, doc in by_class.get(ann.__name__, {}).items():
                out[f"{section}.{name}"] = doc
    for name, doc in by_class.get("RunConfig", {}).items():
        out[name] = doc
    return out


def cmd_keys(args: argparse.Namespace) -> int:
    from dmlcore.config import RunConfig, all_keys

    console = _console()
    defaults = RunConfig().to_dict()
    docs = field_docs()
    table = Table(title="config keys (use with --set, in study axes, as MLflow params)", title_justify="left")
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("default", overflow="fold")
    table.add_column("description", overflow="fold")
    n = 0
    for key in all_keys():
        if args.prefix and not key.startswith(args.prefix):
            continue
        cur: Any = defaults
        for p in key.split("."):
            cur = cur.get(p) if isinstance(cur, dict) else None
        table.add_row(key, escape(repr(cur) if not isinstance(cur, str) else cur), escape(docs.get(key, "")))
        n += 1
    if args.prefix and not n:
        raise UserError(f"no config key starts with '{args.prefix}'")
    console.print(table)
    return 0


def ui_command(args: argparse.Namespace) -> list[str]:
    from .tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]


def cmd_splits(args: argparse.Namespace) -> int:
    if args.dataset == "import":
        return cmd_splits_import(args)
    if args.file is not None:
        raise UserError(f"sweeper splits {args.dataset}: unexpected argument {args.file!r} (did you mean 'sweeper splits import FILE'?)")
    from dmlcore.oodml.splits import make_splits

    console = _console()
    out = Path(args.out or f"{Path(args.dataset).stem}_oodml.json")
    doc = make_splits(args.dataset, n=args.n, encoder=args.encoder, out=out, root=args.root,
                      image_size=args.image_size, device=args.device, seed=args.seed, ids=args.ids,
                      pretrained=args.pretrained)  # fmt: skip
    table = Table(title=f"{doc['dataset']}: {len(doc['splits'])} ooDML splits -> {out}", title_justify="left")
    for col in ("index", "name", "FID", "train classes", "test classes"):
        table.add_column(col, justify="right" if col != "name" else "left")
    for i, sp in enumerate(doc["splits"]):
        table.add_row(str(i), sp["name"], f"{sp['fid']:.2f}", str(len(sp["train_classes"])), str(len(sp["test_classes"])))
    console.print(table)
    console.print(f"encoder: {escape(doc['encoder'])}")
    which = "ID" if args.ids else "INDEX"
    console.print(f"use one in a run or study with  --set data.split={out}#{which}")
    return 0


def cmd_splits_import(args: argparse.Namespace) -> int:
    from dmlcore.oodml.published import import_split_file

    if not args.file:
        raise UserError("sweeper splits import: give the authors' split file, e.g. sweeper splits import cars196_splits.pkl --out splits.json")
    out = Path(args.out or f"{Path(args.file).stem}_oodml.json")
    doc = import_split_file(args.file, out, dataset=args.import_dataset)
    table = Table(title=f"{doc['dataset']}: {len(doc['splits'])} published ooDML splits -> {out}", title_justify="left")
    for col in ("id", "FID", "train", "test", "train/val", "episodes (shots x n)"):
        table.add_column(col, justify="right")
    for sp in doc["splits"]:
        vs = sp.get("val_split")
        eps = sp.get("episodes") or {}
        table.add_row(sp["id"], f"{sp['fid']:.2f}", str(len(sp["train_classes"])), str(len(sp["test_classes"])),
                      f"{len(vs['train'])}/{len(vs['val'])}" if vs else "-",
                      ", ".join(f"{k}x{len(v)}" for k, v in eps.items()) or "-")  # fmt: skip
    _console().print(table)
    _console().print(f"use one in a run or study with  --set data.split={out}#ID")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from dmlcore.models import weights as W

    from . import weights as sw

    console = _console()
    if args.weights_command == "fetch":
        path, downloaded = sw.fetch(args.backbone, progress=True, force=args.force)
        console.print(f"{args.backbone}: {'downloaded to' if downloaded else 'already present and intact:'} {path}", soft_wrap=True)
        return 0
    table = Table(title=f"ImageNet weights in {W.checkpoint_dir()} (model.pretrained: imagenet)", title_justify="left")
    for col in ("backbone", "state", "file", "accepted files"):
        table.add_column(col, overflow="fold")
    for row in W.status():
        style = {"ok": "green", "missing": "yellow", "bad": "red"}[row["state"]]
        detail = row["path"] or f"fix: sweeper weights fetch {row['backbone']}"
        if row["state"] == "bad":
            detail = row["detail"]
        names = ", ".join(wf.filename for wf in W.CATALOGUE[row["backbone"]])
        table.add_row(row["backbone"], f"[{style}]{row['state']}[/{style}]", escape(detail), names)
    console.print(table)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    cmd = ui_command(args)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    from .tracking import redact_uri

    _console().print(
        f"MLflow UI at http://{args.host}:{args.port}  (store {redact_uri(cmd[5])}); Ctrl-C stops it", soft_wrap=True
    )
    sys.stdout.flush()
    sys.stderr.flush()
    # This process becomes the MLflow server: SIGTERM/SIGHUP/Ctrl-C reach it, nothing is left listening.
    os.execvp(cmd[0], cmd)
    return 0  # pragma: no cover (execvp does not return)


def _quiet_logs() -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read by mlflow at import (also in Ray workers)
    for name in ("mlflow", "alembic", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)


COMMANDS = {
    "train": cmd_train, "show": cmd_show, "run": cmd_run, "analyze": cmd_analyze,
    "list": cmd_list, "keys": cmd_keys, "ui": cmd_ui, "splits": cmd_splits,
    "weights": cmd_weights, "ls": cmd_ls,
}
from .cli_models import COMMANDS as _MODEL_COMMANDS  # noqa: E402 (embed, retrieve)
from . import dashboard as _dashboard  # noqa: E402  (sweeper dashboard: its own module)

COMMANDS.update(_MODEL_COMMANDS)
COMMANDS["dashboard"] = _dashboard.cmd_dashboard


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from dmlcore.registry import RegistryError
    except ImportError:  # pragma: no cover
        RegistryError = KeyError  # type: ignore[assignment,misc]
    from .preflight import PreflightError

    env_before = os.environ.get("DML_PLUGINS")
    try:
        load_cli_plugins(getattr(args, "plugins", []))
        return COMMANDS[args.command](args)
    except PreflightError as err:  # one line per problem
        for problem in err.problems:
            _err_console().print(f"[bold red]error:[/] {escape(fail_line(problem))}")
        return EXIT_USAGE
    except (ValueError, RegistryError, ConnectionError) as err:
        _err_console().print(f"[bold red]error:[/] {escape(fail_line(err))}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err_console().print("[yellow]interrupted[/]")
        return 130
    except RuntimeError as err:
        # TrainingDiverged and friends carry a one-line message too
        if type(err).__name__ == "TrainingDiverged":
            _err_console().print(f"[bold red]error:[/] {escape(fail_line(err))}")
            return 1
        from .tracking import unwrap_worker_error

        inner = unwrap_worker_error(err)  # a bad file met by a DataLoader worker
        if inner is not None and inner[0] in _WORKER_USER_ERRORS:
            _err_console().print(f"[bold red]error:[/] {escape(fail_line(inner[1] or inner[0]))}")
            return EXIT_USAGE
        raise
    except Exception as err:
        # The tracking store refused or could not be reached (MlflowException: bad
        # credentials, server down, ...): one line, its URL without a password.
        mlflow_exc = sys.modules.get("mlflow.exceptions")
        if mlflow_exc is None or not isinstance(err, mlflow_exc.MlflowException):
            raise
        _err_console().print(f"[bold red]error:[/] MLflow: {escape(_first_line(err))}")
        return EXIT_USAGE
    finally:  # main() called in-process (tests, notebooks) leaves the environment as it found it
        if env_before is None:
            os.environ.pop("DML_PLUGINS", None)
        else:
            os.environ["DML_PLUGINS"] = env_before


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
