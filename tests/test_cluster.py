"""A two-node Ray cluster on one machine.

A study's trials run on both nodes and log to one MLflow store; trials that fail (NaN
loss, a loss that raises, an impossible batch composition) fail alone, each with a
one-line error, and the others finish.

The nodes are ``ray start --block`` processes (a head and a second node, one CPU each, in
their own temp dir and process group, with their own Ray token); the study runs in a
separate ``sweeper run --address`` process, so neither clashes with the session's own
local Ray (``conftest.ray_session``). Teardown stops exactly the processes started here
(SIGTERM to each ``ray start --block``, which takes its Ray processes down; SIGKILL to its
process group for anything left) — never ``ray stop``, which would stop every Ray on the
machine.

Loopback only (F11): Ray 2.60's GCS and raylet bind every interface (``::``) whatever
``--node-ip-address`` says, and the runtime-env agent binds the machine's address. So the
nodes and the driver run inside one network namespace of their own that has nothing but
loopback (``unshare --user --net``, joined with ``nsenter``): nothing of the cluster can be
reached from outside the machine's loopback. ``test_cluster_listens_on_loopback_only``
lists every listening socket of the cluster's processes and holds that.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import write_study
from sweeper import tracking

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"

# Ray >= 2.5x turns token authentication on for `ray start --head`; every process of this
# cluster (nodes, probe, driver) gets this test's own token, as on a real cluster.
RAY_TOKEN = secrets.token_hex(32)

# A test-only regularizer whose forward raises, loaded at interpreter start (sitecustomize on
# PYTHONPATH) by the driver and by every process of the cluster's nodes (Ray workers included).
PLUGIN = '''\
"""Test-only plug-in (tests/test_cluster.py): a loss term that raises."""
try:
    from dmlcore.registry import register
except Exception:  # not the project's environment
    register = None

if register is not None:

    @register("regularizer", "raise_for_tests")
    def raise_for_tests():
        """Raises RuntimeError when called (fault-injection tests only)."""
        import torch

        class _Raise(torch.nn.Module):
            def forward(self, embeddings, labels=None, **kw):
                raise RuntimeError("synthetic failure in the loss (raise_for_tests)")

        return _Raise()
'''

# trial index -> (what, expected start of the MLflow `error` tag); trial 0 is a good one
FAILURES = {
    1: ("NaN loss", "TrainingDiverged: loss became nan"),
    2: ("raising loss", "RuntimeError: synthetic failure in the loss (raise_for_tests)"),
    3: ("impossible batch", "DataError: batch.samples_per_class=200 but 5 train classes have fewer than 200 samples"),
}


class LoopbackNamespace:
    """A user + network namespace whose only interface is loopback, held open by a
    sleeping process (``unshare -rn``); ``wrap(cmd)`` runs a command inside it."""

    def __init__(self):
        if not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")):
            pytest.skip("unshare / nsenter / ip not available (util-linux, iproute2)")
        self.proc = subprocess.Popen(
            ["unshare", "--map-root-user", "--net", "sh", "-c", "ip link set lo up && echo up && exec sleep 86400"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        line = self.proc.stdout.readline().strip()
        if line != "up":
            self.close()
            pytest.skip(f"no unprivileged network namespace on this machine: {line}")

    def wrap(self, cmd: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.proc.pid}", "--user", "--net", "--preserve-credentials", *cmd]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cluster_env(plugins: Path) -> dict[str, str]:
    """This process's environment without anything that points Ray or MLflow elsewhere,
    plus the cluster's Ray token and the plug-in folder on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    path = os.pathsep.join(p for p in (str(plugins), os.environ.get("PYTHONPATH")) if p)
    env.update(
        RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_TOKEN,
        PYTHONPATH=path,
    )
    return env


def _bin(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", {"ray": "ray.scripts.scripts"}.get(name, name)]


def sweeper_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("sweeper")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "sweeper.cli"]


class RayNode:
    """One ``ray start --block`` process (and the Ray processes it owns)."""

    def __init__(self, name: str, args: list[str], temp_dir: str, log_dir: Path, env: dict[str, str],
                 netns: LoopbackNamespace):
        self.name = name
        self.log_path = log_dir / f"ray-{name}.log"
        ports = [  # fixed defaults (e.g. the agent's 52365) would clash with the other node
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        cmd = [
            *_bin("ray"), "start", "--block", "--disable-usage-stats", f"--node-ip-address={HOST}",
            "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir}", *ports, *args,
        ]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(netns.wrap(cmd), stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "Ray runtime started" in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start ({self.name}) exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"ray start ({self.name}) did not come up in {timeout}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its processes down
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything of this node still alive: the process group created for it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """Head (``--resources {"head": 1}``) + a second node (``{"worker2": 1}``), one CPU each.

    Every process of the cluster has the test plug-in (``raise_for_tests``) on its path.
    Yields ``(address, env, netns, nodes)``: the GCS address, the environment a driver
    needs (the cluster's token, the plug-in path), the loopback-only network namespace the
    cluster lives in (a driver must run inside it) and the node processes.
    """
    pytest.importorskip("ray")
    logs = tmp_path_factory.mktemp("ray-cluster")
    plugins = logs / "plugins"
    plugins.mkdir()
    (plugins / "sitecustomize.py").write_text(PLUGIN)
    env = cluster_env(plugins)
    # Ray's socket paths live under the temp dir and must stay short (< 108 bytes).
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    port = free_port()
    address = f"{HOST}:{port}"
    nodes: list[RayNode] = []
    netns = LoopbackNamespace()
    try:
        head = RayNode(
            "head", ["--head", f"--port={port}", "--include-dashboard=false", '--resources={"head": 1}'],
            temp_dir, logs, env, netns,
        )
        nodes.append(head)
        head.wait_started()
        second = RayNode("worker2", [f"--address={address}", '--resources={"worker2": 1}'], temp_dir, logs, env, netns)
        nodes.append(second)
        second.wait_started()
        yield address, env, netns, nodes
    finally:
        for node in reversed(nodes):
            node.stop()
        netns.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_study(two_node_cluster, tmp_path_factory, _mlflow_template_db):
    """One ``sweeper run --address`` on the cluster: a good trial and three that fail
    (optim.lr 1e30 -> NaN; the raising loss term; 200 samples per class where digits'
    train classes have fewer), half a CPU each: the four run at once, two per node. Logged
    to one SQLite store (reachable: both nodes are on this machine)."""
    address, env, netns, _ = two_node_cluster
    work = tmp_path_factory.mktemp("cluster-study")
    db = work / "mlflow.db"
    shutil.copyfile(_mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    path = write_study(
        work, "cluster",
        zip=[{
            "optim.lr": [1.0e-3, 1.0e30, 1.0e-3, 1.0e-3],
            "loss.regularizers": [{}, {}, {"raise_for_tests": {"weight": 1.0}}, {}],
            "batch.size": [32, 32, 32, 400],
            "batch.samples_per_class": [8, 8, 8, 200],
        }],
        resources={"cpu": 0.5},
    )
    r = subprocess.run(
        netns.wrap([*sweeper_cmd(), "run", str(path), "--address", address, "--storage", str(work / "runs"),
         "--tracking-uri", uri, "--no-live"]),
        cwd=work, capture_output=True, text=True, timeout=480, env=env,
    )
    t = tracking.Tracker(uri)
    exp = t.client.get_experiment_by_name("cluster")
    runs = t.search([exp.experiment_id], "") if exp is not None else []
    return {
        "rc": r.returncode, "out": r.stdout + r.stderr, "tracker": t, "work": work,
        "parents": [c for c in runs if c.data.tags.get("role") == "study"],
        "children": {int(c.data.tags["trial_index"]): c for c in runs if c.data.tags.get("role") == "trial"},
    }


def test_study_runs_on_both_nodes_into_one_mlflow_store(cluster_study):
    cs = cluster_study
    out, t, children = cs["out"], cs["tracker"], cs["children"]
    assert cs["rc"] == 0, out  # a study with failed trials still completed
    assert len(cs["parents"]) == 1 and cs["parents"][0].info.status == "FINISHED", out
    assert sorted(children) == [0, 1, 2, 3], out
    # the trials ran on both nodes (two each when both had joined before the first trial):
    # their Ray node ids tell the nodes apart
    nodes = [c.data.tags["node_id"] for c in children.values()]
    assert len(set(nodes)) == 2, nodes
    # (one machine: one host name and one IP; Ray maps 127.0.0.1 to the machine's address)
    assert len({c.data.tags["node_ip"] for c in children.values()}) == 1
    assert len({c.data.tags["host"] for c in children.values()}) == 1
    assert len({c.data.tags["pid"] for c in children.values()}) == 4
    # every trial logged into the one store, the good one every epoch
    good = children[0]
    assert good.info.status == "FINISHED", out
    assert sorted(m.step for m in t.client.get_metric_history(good.info.run_id, "test/recall_at_1")) == [1, 2]
    assert "config.yaml" in [a.path for a in t.client.list_artifacts(good.info.run_id)]
    assert all("config.yaml" in [a.path for a in t.client.list_artifacts(c.info.run_id)] for c in children.values())


def test_failing_trials_fail_with_one_line_and_the_others_finish(cluster_study):
    """NaN loss, a loss that raises, a batch composition the data cannot give: each trial is
    FAILED in MLflow with a one-line ``error`` tag and ``error.txt``; the good trial finishes;
    the driver exits 0 and reports each error as one line, without a traceback."""
    cs = cluster_study
    out, t, children = cs["out"], cs["tracker"], cs["children"]
    assert cs["rc"] == 0, out
    assert "1 done" in out and "3 failed" in out, out
    assert "Traceback" not in out, out
    lines = out.splitlines()
    for what, expected in FAILURES.values():  # the driver's one-line event per failed trial
        assert any("failed" in ln and expected in ln for ln in lines), (what, out)
    for index, (what, expected) in FAILURES.items():
        run = children[index]
        error = run.data.tags.get("error", "")
        assert run.info.status == "FAILED", (what, run.info.status)
        assert error.startswith(expected), (what, error)
        assert "\n" not in error and "Traceback" not in error and len(error) < 300, (what, error)
        assert "error.txt" in [a.path for a in t.client.list_artifacts(run.info.run_id)], what
    # the traceback is kept as an artifact
    tb = Path(t.client.download_artifacts(children[2].info.run_id, "error.txt", str(cs["work"]))).read_text()
    assert "Traceback" in tb and "raise_for_tests" in tb
    assert cs["parents"][0].data.tags["trials_failed"] == "3"


def _process_tree(roots: list[int]) -> set[int]:
    """The given processes, their descendants and everything in their sessions (Linux /proc)."""
    children: dict[object, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d))  # parent pid
        children.setdefault(("session", int(fields[3])), []).append(int(d))
    todo = [*roots, *(p for r in roots for p in children.get(("session", r), []))]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    return seen


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int, bool]]:
    """``(address, port, pid, netns_has_only_loopback)`` for every listening TCP socket one of
    ``pids`` holds, read from /proc (each process's own network namespace)."""
    found = []
    for pid in sorted(pids):
        try:
            inodes = {
                int(t[8:-1]) for fd in os.listdir(f"/proc/{pid}/fd")
                if (t := os.readlink(f"/proc/{pid}/fd/{fd}")).startswith("socket:[")
            }
            devs = [ln.split(":")[0].strip() for ln in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]]
            tables = [(fam, Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:])
                      for fam, name in ((socket.AF_INET, "tcp"), (socket.AF_INET6, "tcp6"))]
        except OSError:  # the process ended meanwhile
            continue
        for fam, lines in tables:
            for ln in lines:
                f = ln.split()
                if f[3] != "0A" or int(f[9]) not in inodes:  # 0A: LISTEN
                    continue
                hexaddr, port = f[1].split(":")
                raw = bytes.fromhex(hexaddr)  # /proc prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((socket.inet_ntop(fam, raw), int(port, 16), pid, devs == ["lo"]))
    return found


def test_cluster_listens_on_loopback_only(two_node_cluster):
    """F11: no process of the test cluster accepts connections from beyond the machine's
    loopback: every listening socket is bound to a loopback address, or lives in a network
    namespace whose only interface is ``lo``."""
    _, _, _, nodes = two_node_cluster
    sockets = listening_sockets(_process_tree([n.proc.pid for n in nodes]))
    assert len(sockets) >= 4, sockets  # GCS, 2 x raylet, ... : the listing sees the cluster
    reachable = [
        (addr, port, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:100].decode(errors="replace"))
        for addr, port, pid, only_lo in sockets
        if not only_lo and not ipaddress.ip_address(addr).is_loopback
    ]
    assert not reachable, reachable
