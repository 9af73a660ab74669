"""ImageNet weights for studies: ``sweeper weights list|fetch`` and the pre-launch check.

* :func:`needed_backbones` — the backbones a study's trials load with ``model.pretrained: imagenet``.
* :func:`check_local` — those files are on this machine and intact (before Ray starts).
* :func:`check_nodes` — on a Ray cluster: one tiny task pinned to every alive node that can run a
  trial (``NodeAffinitySchedulingStrategy``) checks that node's own torch hub cache; the driver
  names the nodes that lack a file. Nothing is fetched there: a node without internet could
  not, and one download per worker would race.
* :func:`study_problems` — the same checks as a list of one-line problems (for a preflight).
* :func:`fetch` — the one place that downloads (``torch.hub.download_url_to_file``, with a
  progress bar and the sha256 check); never called by a run or a test.

The catalogue of files and the checks live in :mod:`dmlcore.models.weights`.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Iterable

from dmlcore.config import ConfigError, RunConfig
from dmlcore.models import weights as W
from dmlcore.models.pretrained import PretrainedError

NODE_CHECK_TIMEOUT_S = 120.0


def needed_backbones(configs: Iterable[RunConfig]) -> list[str]:
    """Sorted backbone names whose ImageNet weights some config loads."""
    return sorted({c.model.backbone for c in configs if W.is_imagenet(c.model.pretrained)})


def study_configs(study: Any) -> list[RunConfig]:
    """Every config a study may run: its trials, or (a search) the base with each categorical backbone."""
    if study.trials:
        return [t.config for t in study.trials]
    out = [study.base]
    space = study.spec.search.space if study.spec.search else {}
    for key in ("model.backbone", "model.pretrained"):
        values = getattr(space.get(key), "values", None) or []
        for v in values:
            try:
                out.append(study.base.with_overrides({key: v}))
            except ConfigError:
                pass
    return out


def local_problems(backbones: Iterable[str], checksum: bool | None = None) -> list[str]:
    """One line per backbone whose weights are missing or do not fit on this machine."""
    out = []
    for b in backbones:
        path = W.find(b)
        if path is None:
            out.append(W.missing_message(b))
            continue
        try:
            W.verify(b, path, checksum)
        except PretrainedError as err:
            out.append(str(err))
    return out


def check_local(backbones: Iterable[str], checksum: bool | None = None) -> None:
    """Raise :class:`PretrainedError` (one line: the first problem) unless every file is here and intact."""
    problems = local_problems(list(backbones), checksum)
    if problems:
        more = f" (+{len(problems) - 1} more backbone(s))" if len(problems) > 1 else ""
        raise PretrainedError(problems[0] + more)


def _node_report(backbones: list[str], checksum: bool) -> dict[str, Any]:
    """Runs ON a node: its host name, hub folder and the problems there."""
    return {"host": socket.gethostname(), "dir": str(W.checkpoint_dir()), "problems": local_problems(backbones, checksum)}


def trial_nodes(cpu: float = 0.0, gpu: float = 0.0) -> list[dict[str, Any]]:
    """Alive Ray nodes whose total resources can hold one trial (``cpu`` CPUs, ``gpu`` GPUs)."""
    import ray

    out = []
    for n in ray.nodes():
        res = n.get("Resources") or {}
        if n.get("Alive") and res.get("CPU", 0.0) >= cpu and res.get("GPU", 0.0) >= gpu:
            out.append(n)
    return out


def node_problems(backbones: list[str], cpu: float = 0.0, gpu: float = 0.0,
                  checksum: bool | None = None, timeout_s: float = NODE_CHECK_TIMEOUT_S,
                  runtime_env: dict | None = None) -> list[str]:
    """One line per node that may run a trial and lacks (or has a bad copy of) a weight file.

    ``runtime_env``: for the check tasks only (tests point ``TORCH_HOME`` somewhere).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not backbones:
        return []
    if checksum is None:
        checksum = W.checksum_enabled()
    nodes = trial_nodes(cpu, gpu)
    if not nodes:
        return [f"no alive Ray node can run a trial ({cpu:g} CPU, {gpu:g} GPU) to hold the weights of {', '.join(backbones)}"]
    task = ray.remote(num_cpus=0)(_node_report)
    extra = {"runtime_env": runtime_env} if runtime_env else {}
    refs = {
        n["NodeID"]: task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False), **extra
        ).remote(backbones, checksum)
        for n in nodes
    }
    out = []
    for node_id, ref in refs.items():
        addr = next((n.get("NodeManagerAddress", "?") for n in nodes if n["NodeID"] == node_id), "?")
        try:
            rep = ray.get(ref, timeout=timeout_s)
        except Exception as err:  # timeout, node died
            out.append(f"node {addr} ({node_id[:8]}): weights check did not answer ({type(err).__name__})")
            continue
        for p in rep["problems"]:
            out.append(f"node {rep['host']} ({addr}, hub {rep['dir']}): {p}")
    return out


def check_nodes(backbones: list[str], cpu: float = 0.0, gpu: float = 0.0, checksum: bool | None = None) -> None:
    """Raise :class:`PretrainedError` naming the nodes that lack a file (one line)."""
    problems = node_problems(backbones, cpu, gpu, checksum)
    if problems:
        n = len(problems)
        raise PretrainedError(f"{n} node problem(s) before any trial started: " + " | ".join(problems))


def study_problems(study: Any, on_nodes: bool = False) -> list[str]:
    """The weight problems of a study: on this machine, or (``on_nodes``, Ray initialised) on its nodes."""
    backbones = needed_backbones(study_configs(study))
    if on_nodes:
        res = study.spec.resources
        return node_problems(backbones, float(res.cpu), float(res.gpu))
    return local_problems(backbones)


def check_study(study: Any, on_nodes: bool = False) -> None:
    """Raise a one-line :class:`PretrainedError` when :func:`study_problems` finds any."""
    problems = study_problems(study, on_nodes)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PretrainedError(f"{study.source}: {problems[0]}{more}")


# ----------------------------------------------------------------------------- fetch
def fetch(backbone: str, progress: bool = True, force: bool = False) -> tuple[Path, bool]:
    """Download the catalogue's first file of ``backbone`` into the hub cache (once).

    Returns ``(path, downloaded)``. A file already there and intact is kept.
    """
    import torch.hub

    wf = W.files_of(backbone)[0]
    present = W.find(backbone)
    if present is not None and not force:
        W.verify(backbone, present)
        return present, False
    dst = W.checkpoint_dir() / wf.filename
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(wf.url, str(dst), hash_prefix=wf.sha256_prefix, progress=progress)
    except (OSError, RuntimeError) as err:  # no network, HTTP error, hash mismatch
        line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise ConnectionError(f"cannot download {wf.url} to {dst}: {line}") from None
    W.verify(backbone, dst)
    return dst, True
