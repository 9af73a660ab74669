"""Team tracking: studies against an MLflow tracking server backed by PostgreSQL, and no secret leaks.

A throwaway PostgreSQL cluster (``initdb`` in a temp dir, a free port on 127.0.0.1,
password authentication over TCP) backs ``mlflow server --app-name basic-auth
--artifacts-destination <tmp>``, which refuses requests without credentials. A team
member's commands run against it with ``MLFLOW_TRACKING_URI=http://admin:<password>@...``
and a ``MLFLOW_TRACKING_TOKEN`` set: the runs, params, metrics and artifacts arrive, and
neither secret is written anywhere (params, tags, artifacts, storage, output, Ray logs).

PostgreSQL comes from the system: when ``initdb`` is missing and this runs as root with
apt (CI), the fixture installs the ``postgresql`` package; otherwise the tests skip,
saying why.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import write_study
from sweeper import tracking

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- PostgreSQL
def _pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(cands[-1]).parent if cands else None


def _install_postgres() -> str | None:
    """Install PostgreSQL with apt (root only). Returns why it could not, or None."""
    if os.geteuid() != 0:
        return "PostgreSQL (initdb) is not installed and this is not root (apt-get install postgresql)"
    if not shutil.which("apt-get"):
        return "PostgreSQL (initdb) is not installed and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # no default cluster: the tests start their own
    conf = Path("/etc/postgresql-common/createcluster.d")
    try:
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "no-main-cluster.conf").write_text("create_main_cluster = false\n")
    except OSError:
        pass
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if r.returncode != 0:
            return f"could not install PostgreSQL ({' '.join(cmd)}: {r.stderr.strip().splitlines()[-1:]})"
    return None


class Postgres:
    """A PostgreSQL cluster in a temp dir, run by the ``postgres`` user when we are root."""

    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            why = _install_postgres()
            if why:
                pytest.skip(why)
            bindir = _pg_bindir()
            if bindir is None:
                pytest.skip("PostgreSQL was installed but initdb was not found")
        self.bindir = bindir
        self.port = free_port()
        self.superpw = secrets.token_urlsafe(12)
        self.user = None
        if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
            import pwd

            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root without a 'postgres' user to own the database cluster")
        # outside pytest's 0700 tmp dirs so the postgres user can reach it; short socket path
        self.dir = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.user is not None:
            cmd = ["runuser", "-u", "postgres", "--", *cmd] if shutil.which("runuser") else [
                "su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in cmd)
            ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.dir)

    def start(self) -> None:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.superpw + "\n")
        if self.user is not None:
            os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        r = self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
        )
        assert r.returncode == 0, r.stdout + r.stderr
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses={HOST} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        r = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "start")
        assert r.returncode == 0, r.stdout + r.stderr + (self.log.read_text() if self.log.exists() else "")

    def create_db(self, name: str, user: str, password: str) -> str:
        """A database owned by a password-authenticated role; returns its SQLAlchemy URI."""
        import psycopg2

        con = psycopg2.connect(host=HOST, port=self.port, user="postgres", password=self.superpw, dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f"CREATE ROLE {user} LOGIN PASSWORD %s", (password,))
            cur.execute(f"CREATE DATABASE {name} OWNER {user}")
        con.close()
        # SQLAlchemy >= 2.1 reads a bare postgresql:// as psycopg 3; name the driver
        return f"postgresql+psycopg2://{user}:{password}@{HOST}:{self.port}/{name}"

    def stop(self) -> None:
        if self.data.exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------- the server
class Server:
    def __init__(self, url: str, admin_password: str, artifacts: Path, log: Path):
        self.url, self.admin_password, self.artifacts, self.log = url, admin_password, artifacts, log


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer in {timeout}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with PostgreSQL as its backend store, served artifacts
    and basic authentication (admin password: ``Server.admin_password``)."""
    pytest.importorskip("psycopg2", reason="psycopg2-binary is in the 'test' extra")
    pytest.importorskip("flask_wtf", reason="mlflow[auth] (Flask-WTF) is in the 'test' extra")
    pg = Postgres()
    work = tmp_path_factory.mktemp("mlflow-server")
    proc = None
    try:
        pg.start()
        backend = pg.create_db("mlflow", "mlflow", secrets.token_urlsafe(12))
        admin_password = "adm-" + secrets.token_urlsafe(16)
        auth_ini = work / "auth.ini"
        auth_ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{work / 'auth.db'}\n"
            "admin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 600\n"
        )
        port = free_port()
        artifacts = work / "artifacts"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
            MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        )
        mlflow_exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_exe)] if mlflow_exe.exists() else [sys.executable, "-m", "mlflow"]
        log = work / "server.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                [*cmd, "server", "--app-name", "basic-auth", "--backend-store-uri", backend,
                 "--artifacts-destination", str(artifacts), "--host", HOST, "--port", str(port), "--workers", "1"],
                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True,
            )
        url = f"http://{HOST}:{port}"
        _wait_http(url, proc, log)
        yield Server(url, admin_password, artifacts, log)
    finally:
        if proc is not None:
            try:  # the server and its uvicorn worker: the process group started here
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        pg.stop()


def _get(url: str, path: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url + path)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def team_study(ray_session, tracking_server, tmp_path_factory):
    """What a team member does against the server, in this process (the session's Ray):
    with ``MLFLOW_TRACKING_URI=http://admin:<password>@127.0.0.1:PORT`` and a
    ``MLFLOW_TRACKING_TOKEN`` set, ``sweeper run --dry-run``, ``sweeper run`` (two trials),
    ``sweeper train`` and ``sweeper run --resume``; then ``--resume`` once more with the
    URI without its password. Returns the exit codes and everything printed."""
    from sweeper.cli import main

    srv = tracking_server
    work = tmp_path_factory.mktemp("team")
    port = srv.url.rsplit(":", 1)[1]
    secret = {"password": srv.admin_password, "token": "tok-" + secrets.token_hex(12)}
    uri = f"http://admin:{secret['password']}@{HOST}:{port}"
    mp = pytest.MonkeyPatch()
    for k in [k for k in os.environ if k.startswith("MLFLOW_TRACKING_")]:
        mp.delenv(k)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_TRACKING_TOKEN", secret["token"])
    mp.chdir(work)
    logs_before = {p: p.stat().st_size for p in _ray_log_files()}
    path = write_study(work, "team", axes={"model.embed_dim": [8, 16]}, max_concurrent=2)
    storage = str(work / "runs")
    out, err = io.StringIO(), io.StringIO()
    rcs = {}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rcs["dry-run"] = main(["run", str(path), "--dry-run"])
            rcs["run"] = main(["run", str(path), "--storage", storage, "--no-live"])
            rcs["train"] = main(["train", *_train_sets(), "--experiment", "team-train"])
            rcs["resume"] = main(["run", str(path), "--storage", storage, "--no-live", "--resume"])
        resume_err = io.StringIO()
        mp.setenv("MLFLOW_TRACKING_URI", srv.url)  # the URI without its password
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(resume_err):
            rcs["resume-without-password"] = main(["run", str(path), "--storage", storage, "--no-live", "--resume"])
    finally:
        mp.undo()
    return {
        "rcs": rcs, "output": out.getvalue() + err.getvalue(), "resume_err": resume_err.getvalue(),
        "secrets": list(secret.values()), "storage": Path(storage), "work": work, "logs_before": logs_before,
    }


@pytest.fixture
def client(tracking_server, monkeypatch):
    from mlflow import MlflowClient

    for k in [k for k in os.environ if k.startswith("MLFLOW_TRACKING_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", tracking_server.admin_password)
    return MlflowClient(tracking_uri=tracking_server.url)


def _runs(client, name: str):
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return exp, [r for r in runs if r.data.tags.get("role") == "study"], [r for r in runs if r.data.tags.get("role") == "trial"]


def test_study_logs_to_a_postgres_backed_server_with_auth(tracking_server, team_study, client, tmp_path):
    srv, ts = tracking_server, team_study
    # the server refuses requests without (or with wrong) credentials: the trials had them
    assert _get(srv.url, "/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert _get(srv.url, "/api/2.0/mlflow/experiments/search?max_results=1", "admin", "wrong") == 401
    assert ts["rcs"] == {"dry-run": 0, "run": 0, "train": 0, "resume": 0, "resume-without-password": 2}, ts["output"]

    exp, parents, children = _runs(client, "team")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # served by the tracking server
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["resumes"] == "1"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children), ts["output"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.params["model.embed_dim"] for c in children) == ["16", "8"]
    for c in children:
        assert c.data.params["data.dataset"] == "digits" and c.data.tags["trial_key"].startswith(parents[0].data.tags["execution"])
        assert [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")] == [1, 2]
        assert sorted(m.step for m in client.get_metric_history(c.info.run_id, "test/recall_at_1")) == [1, 2]
        assert c.data.metrics["best_epoch"] == 2
        assert [a.path for a in client.list_artifacts(c.info.run_id)] == ["config.yaml"]
        text = Path(client.download_artifacts(c.info.run_id, "config.yaml", str(tmp_path))).read_text()
        assert f"embed_dim: {c.data.params['model.embed_dim']}" in text
    parent_files = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"study.yaml", "base_config.yaml", "trials.json", "leaderboard.csv"} <= parent_files
    (train,) = client.search_runs([client.get_experiment_by_name("team-train").experiment_id])
    assert train.info.status == "FINISHED" and train.data.tags["role"] == "train"
    # the artifacts went through the server into its --artifacts-destination
    stored = {p.name for p in srv.artifacts.rglob("*") if p.is_file()}
    assert {"config.yaml", "leaderboard.csv", "study.yaml"} <= stored


def _ray_log_files() -> list[Path]:
    try:
        import ray

        session = Path(ray._private.worker._global_node.get_session_dir_path())
    except Exception:
        return []
    return [p for p in (session / "logs").rglob("*") if p.is_file()]


def _leaks(text: str, secret_values: list[str]) -> list[str]:
    return [s for s in secret_values if s in text]


def test_no_secret_in_runs_storage_or_output(team_study, client, tmp_path):
    """The tracking URI's password and ``MLFLOW_TRACKING_TOKEN`` are used but never
    written: not into params, tags or artifacts, not into ``sweeper.json`` or Tune's
    storage, not into what the driver prints, not into the Ray logs."""
    ts = team_study
    secret_values = ts["secrets"]
    out = ts["output"]
    assert f"admin:***@{HOST}" in out, out  # the URI is shown, without its password
    assert not _leaks(out, secret_values), out
    # --resume without the password: one line saying what is missing
    err = ts["resume_err"].strip()
    assert len(err.splitlines()) == 1 and "password is not stored" in err and "admin:***@" in err, err
    assert not _leaks(err, secret_values)

    checked = 0
    for name in ("team", "team-train"):
        exp = client.get_experiment_by_name(name)
        for run in client.search_runs([exp.experiment_id], max_results=100):
            values = [*run.data.params.values(), *run.data.tags.values(), *run.data.tags, *run.data.params]
            assert not _leaks("\n".join(values), secret_values), run.info.run_name
            dest = tmp_path / run.info.run_id
            dest.mkdir()
            client.download_artifacts(run.info.run_id, "", str(dest))
            for f in dest.rglob("*"):
                if f.is_file():
                    assert not _leaks(f.read_text(errors="replace"), secret_values), f
                    checked += 1
    assert checked >= 7  # study.yaml, base_config.yaml, trials.json, leaderboard.csv, 3 x config.yaml

    state = next(ts["storage"].rglob("sweeper.json")).read_text()
    assert f"admin:***@{HOST}" in state
    for f in ts["storage"].rglob("*"):  # sweeper.json, Tune's experiment state, checkpoints
        if f.is_file():
            assert not _leaks(f.read_bytes().decode("latin-1"), secret_values), f
    for f in _ray_log_files():  # what the Ray workers wrote meanwhile
        with open(f, "rb") as fh:
            fh.seek(ts["logs_before"].get(f, 0))
            assert not _leaks(fh.read().decode("latin-1"), secret_values), f


@pytest.mark.filterwarnings("ignore:`get_trial_id` is meant to only be called")
def test_trials_get_the_drivers_tracking_settings_and_their_cpu_share(monkeypatch):
    """Ray workers on other nodes do not inherit the driver's environment: the sweeper hands
    its MLflow client settings (token, user, password, TLS) to every trial in the trial
    context, which the trial applies before it connects; and the trial's CPU share becomes
    ``DMLCORE_NUM_CPUS`` (DataLoader workers sized to the trial, not to the node)."""
    from dmlcore.config import ConfigError
    from sweeper.tune import TrialContext, run_trial

    env = {
        "MLFLOW_TRACKING_URI": "http://x", "MLFLOW_TRACKING_TOKEN": "t0k3n", "MLFLOW_TRACKING_USERNAME": "u",
        "MLFLOW_TRACKING_PASSWORD": "pw", "MLFLOW_TRACKING_INSECURE_TLS": "true", "MLFLOW_RUN_ID": "r",
        "PATH": "/bin", "AWS_SECRET_ACCESS_KEY": "no",
    }
    fwd = tracking.forwarded_env(env)
    assert fwd == {k: env[k] for k in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                                       "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_INSECURE_TLS")}
    assert "t0k3n" not in repr(TrialContext("s", "e", {}, "m", "max", env=fwd))  # not in reprs/logs
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "before")  # both restored after the test
    monkeypatch.setenv("DMLCORE_NUM_CPUS", "64")
    ctx = TrialContext("s", "e", {}, "test/recall_at_1", "max", env={"MLFLOW_TRACKING_TOKEN": "t0k3n"}, cpus=0.5)
    with pytest.raises(ConfigError):  # a trial whose config is refused still applied the settings first
        run_trial({"point": {"index": 0, "overrides": {"model.embed_dim": 0}}}, ctx)
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "t0k3n"
    from dmlcore.resources import resolve_workers

    assert os.environ["DMLCORE_NUM_CPUS"] == "0.5" and resolve_workers(-1) == 0


@pytest.mark.parametrize("uri, shown", [
    ("http://admin:s3cret@host:5000", "http://admin:***@host:5000"),
    ("https://u:p%40ss@mlflow.example.com/path", "https://u:***@mlflow.example.com/path"),
    ("postgresql+psycopg2://mlflow:pw@db:5432/mlflow", "postgresql+psycopg2://mlflow:***@db:5432/mlflow"),
    ("http://host:5000?token=abc&x=1", "http://host:5000?token=***&x=1"),
    ("http://host:5000", "http://host:5000"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_redact_uri(uri, shown):
    assert tracking.redact_uri(uri) == shown
    assert tracking.uri_password(uri) == (uri != shown)


def _train_sets() -> list[str]:
    sets = [
        "data.dataset=digits", "data.image_size=16", "data.augmentation=none",
        "model.backbone_params={width: 8, depth: 2}", "model.embed_dim=8",
        "batch.size=32", "batch.samples_per_class=8", "batch.iterations_per_epoch=2",
        "train.epochs=1", "train.device=cpu", "eval.clustering=false", "eval.embedding_metrics=false",
    ]
    out: list[str] = []
    for s in sets:
        out += ["--set", s]
    return out
