"""Real Airflow components for the demo and the tests: scheduler, triggerer, dag-processor and api-server as
separate processes in one process group, stopped by their pids and that group's id (never by name).

AirflowStack is the demo's machine (LocalExecutor, SQLite, one triggerer). CeleryStack is the distributed
deployment of docker-compose.yaml on loopback: Redis as the broker, PostgreSQL as metadata DB and result
backend, a Celery worker and a triggerer for the queue "default" and one of each per DB-host queue. Both log in
with the SimpleAuthManager or the FAB auth manager (users and roles, pgops.airflow.fab_roles).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pgops.dbhost.procs import free_port, pid_alive, stop_pid
from pgops.inventory import REPO_ROOT

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
ADMIN_USER = "admin"
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
# Set by CeleryStack per worker and triggerer: every process of the lab runs on one machine, so each names the
# "host" it stands for ([core] hostname_callable); task instances record it as their hostname.
HOSTNAME_ENV = "PGOPS_LAB_HOSTNAME"


def celery_commands(dbhost_queues: Sequence[str]) -> dict[str, list[str]]:
    """The processes of a CeleryExecutor deployment, as arguments of `airflow`, by component.

    docker-compose.yaml's services run exactly these (tests/deploy/test_compose.py compares them) and CeleryStack
    starts them, adding only LAB_ONLY_ARGS. Task and trigger logs go to a log directory every component shares
    (compose: the airflow-logs volume), so no worker or triggerer opens a log server (it would bind 0.0.0.0).
    """
    cmds = {
        "api-server": ["api-server"],
        "scheduler": ["scheduler"],
        "dag-processor": ["dag-processor"],
        "triggerer": ["triggerer", "--queues", "default", "--skip-serve-logs"],
        "worker": ["celery", "worker", "--queues", "default", "--skip-serve-logs"],
    }
    for q in dbhost_queues:  # on the database host: its queue only (barman-cloud reads PGDATA there)
        cmds[f"dbhost-worker:{q}"] = ["celery", "worker", "--queues", q, "--concurrency", "2", "--skip-serve-logs"]
        cmds[f"dbhost-triggerer:{q}"] = ["triggerer", "--queues", q, "--skip-serve-logs"]
    return cmds


# What the lab adds to those commands because every process shares one machine and binds loopback.
LAB_ONLY_ARGS = ("--host", "--port", "--celery-hostname")


def lab_hostname() -> str:
    """[core] hostname_callable of the lab: the host a worker or triggerer stands for, else this machine's name."""
    return os.environ.get(HOSTNAME_ENV) or socket.getfqdn()


class StackError(RuntimeError):
    pass


class AirflowStack:
    """auth: "simple" (SimpleAuthManager, the demo's) or "fab" (FabAuthManager: the admin is a FAB user with
    role Admin, the pgops roles are synced from the inventory; docker-compose.yaml's login)."""

    executor = "LocalExecutor"

    def __init__(self, home: str | Path, extra_env: dict[str, str] | None = None, *, auth: str = "simple"):
        if auth not in ("simple", "fab"):
            raise ValueError(f"auth must be 'simple' or 'fab', not {auth!r}")
        self.home = Path(home).resolve()
        self.state_file = self.home / "stack.json"
        self.extra_env = extra_env or {}
        self.auth = auth
        self._token: str | None = None

    # -- state ---------------------------------------------------------------------------------------------
    def load(self) -> dict[str, Any] | None:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else None

    def running(self) -> dict[str, Any] | None:
        st = self.load()
        if st and all(pid_alive(p) for p in st["pids"].values()):
            return st
        return None

    def env(self, port: int) -> dict[str, str]:
        env = {
            **os.environ, **self.extra_env,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGBAG_IMPORT_ERROR_TRACEBACKS": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }
        if self.auth == "fab":
            env["AIRFLOW__CORE__AUTH_MANAGER"] = FAB_AUTH_MANAGER
            env.pop("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", None)
            env.pop("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", None)
        return env

    def commands(self) -> dict[str, list[str]]:
        """component -> `airflow` arguments (the lab-only ones come from lab_args)."""
        return {c: [c] for c in COMPONENTS}

    def lab_args(self, component: str, port: int) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(port)] if component == "api-server" else []

    def component_env(self, component: str, env: dict[str, str]) -> dict[str, str]:
        return env

    # -- start / stop ----------------------------------------------------------------------------------------
    def up(self, timeout_s: float = 180) -> dict[str, Any]:
        st = self.running()
        if st:
            return st
        if self.load():
            self.down()
        self.home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        pw_file = self.home / "passwords.json"
        if not pw_file.exists():
            pw_file.write_text(json.dumps({ADMIN_USER: secrets.token_urlsafe(12)}))
            os.chmod(pw_file, 0o600)
        env = self.env(port)
        self.before_airflow(env)
        res = subprocess.run([*self.airflow_argv(), "db", "migrate"], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise StackError(f"airflow db migrate failed: {res.stderr[-1500:]}")
        if self.auth == "fab":  # the same step as docker/airflow-init.sh: pgops roles, then the admin user
            self._fab_init(env)
        (self.home / "logs").mkdir(exist_ok=True)
        st = {"port": port, "pgid": 0, "pids": {}, "url": f"http://127.0.0.1:{port}"}
        for comp in self.commands():
            self._start(st, comp, env)
        self.state_file.write_text(json.dumps(st, indent=2))
        self._wait_healthy(st, timeout_s)
        return st

    @staticmethod
    def airflow_argv() -> list[str]:
        return [sys.executable, "-m", "airflow"]

    def before_airflow(self, env: dict[str, str]) -> None:
        """Start what Airflow needs before its metadata DB is migrated (CeleryStack: the broker)."""

    def _fab_init(self, env: dict[str, str]) -> None:
        for argv, stdin in (([sys.executable, "-m", "pgops.airflow.fab_roles", "sync"], None),
                            ([sys.executable, "-m", "pgops.airflow.fab_roles", "user", "--username", ADMIN_USER,
                              "--role", "Admin", "--password-stdin"], self.password())):
            res = subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise StackError(f"{' '.join(argv[2:5])} failed: {res.stderr[-1500:]}")

    def _start(self, st: dict[str, Any], comp: str, env: dict[str, str]) -> int:
        """Start one component into the stack's process group (the first one started leads it)."""
        argv = [*self.airflow_argv(), *self.commands()[comp], *self.lab_args(comp, st["port"])]
        log = self.home / "logs" / f"{comp.replace(':', '-')}.out"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, env=self.component_env(comp, dict(env)), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, process_group=st["pgid"])
        st["pgid"] = st["pgid"] or proc.pid
        st["pids"][comp] = proc.pid
        return proc.pid

    def _wait_healthy(self, st: dict[str, Any], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [c for c, p in st["pids"].items() if not pid_alive(p)]
            if dead:
                log = self.home / "logs" / (dead[0].replace(":", "-") + ".out")
                raise StackError(f"airflow {dead[0]} exited during start-up; see {log}")
            try:
                with urllib.request.urlopen(f"{st['url']}/api/v2/monitor/health", timeout=3) as resp:  # noqa: S310
                    health = json.load(resp)
                if health.get("scheduler", {}).get("status") == "healthy":
                    return
            except (OSError, ValueError):
                pass
            time.sleep(1)
        raise StackError(f"the Airflow API server did not become healthy within {timeout_s:.0f} s")

    def down(self) -> None:
        st = self.load()
        if not st:
            self.after_airflow()
            return
        try:
            os.killpg(st["pgid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
        for pid in st["pids"].values():
            stop_pid(pid, timeout_s=20)
        try:  # whatever the components forked (task supervisors) is in the same group
            os.killpg(st["pgid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.state_file.unlink(missing_ok=True)
        self.after_airflow()

    def after_airflow(self) -> None:
        """Stop what before_airflow started."""

    # -- REST API ----------------------------------------------------------------------------------------------
    def password(self) -> str:
        return json.loads((self.home / "passwords.json").read_text())[ADMIN_USER]

    def _send(self, method: str, path: str, body: Any, *, token: str | None, timeout_s: float) -> tuple[int, bytes]:
        """(HTTP status, raw body) of one request as the holder of `token` (None: anonymous)."""
        st = self.load()
        if st is None:
            raise StackError("Airflow is not running")
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{st['url']}{path}", data=data, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:  # any status but 2xx, after redirects
            return exc.code, exc.read()

    def _request(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        if auth and self.load() is None:  # said before the login needs a password file
            raise StackError("Airflow is not running")
        status, raw = self._send(method, path, body, token=self.token() if auth else None, timeout_s=30)
        if not 200 <= status < 300:
            raise StackError(f"{method} {path}: HTTP {status}: {raw[:500]!r}")
        return json.loads(raw) if raw else None

    def token(self) -> str:
        if self._token is None:
            self._token = self.login(ADMIN_USER, self.password())
        return self._token

    def login(self, username: str, password: str) -> str:
        """A bearer token for a user of the auth manager (POST /auth/token)."""
        return self._request("POST", "/auth/token", {"username": username, "password": password}, auth=False)[
            "access_token"]

    def call(self, method: str, path: str, body: Any = None, *, token: str | None) -> tuple[int, Any]:
        """(HTTP status, parsed body or raw bytes) of one request as the holder of `token` (None: anonymous)."""
        status, raw = self._send(method, path, body, token=token, timeout_s=60)
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw

    def wait_for_dag(self, dag_id: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                self._request("GET", f"/api/v2/dags/{dag_id}")
                return
            except StackError as exc:
                last = str(exc)
                time.sleep(2)
        errors = self._request("GET", "/api/v2/importErrors")
        raise StackError(f"DAG {dag_id} was not parsed within {timeout_s:.0f} s ({last}); import errors: {errors}")

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        self._request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        run = self._request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float = 600, on_change=None) -> str:
        deadline = time.monotonic() + timeout_s
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            tis = self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
            for ti in tis:
                if on_change and seen.get(ti["task_id"]) != ti["state"]:
                    on_change(ti["task_id"], ti["state"])
                seen[ti["task_id"]] = ti["state"]
            state = self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                return state
            time.sleep(2)
        raise StackError(f"run {run_id} of {dag_id} did not finish within {timeout_s:.0f} s (tasks: {seen})")

    def unpause(self, dag_id: str) -> None:
        self._request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def wait_for_new_run(self, dag_id: str, *, after: set[str], run_type: str | None = None,
                         timeout_s: float = 120) -> str:
        """The id of a run of dag_id that is not in `after` (e.g. run_type="asset_triggered")."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            runs = self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=20")["dag_runs"]
            new = [r["dag_run_id"] for r in runs
                   if r["dag_run_id"] not in after and run_type in (None, r.get("run_type"))]
            if new:
                return new[0]
            time.sleep(2)
        raise StackError(f"no new run of {dag_id} within {timeout_s:.0f} s")

    def run_ids(self, dag_id: str) -> set[str]:
        return {r["dag_run_id"] for r in self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        entry = self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}")
        return entry.get("value")

    def ensure_pools(self, pools: dict[str, int]) -> None:
        for name, slots in pools.items():
            try:
                self._request("GET", f"/api/v2/pools/{name}")
            except StackError:
                self._request("POST", "/api/v2/pools", {"name": name, "slots": slots,
                                                        "description": "pgops: one DB-host job per cluster at a time"})


class RedisBroker:
    """Debian's redis-server on a loopback port, password in its 0600 config file (never argv), stopped by pid."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.state_file = self.root / "redis.json"

    def load(self) -> dict[str, Any] | None:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else None

    def up(self, timeout_s: float = 20) -> dict[str, Any]:
        st = self.load()
        if st and pid_alive(st["pid"]):
            return st
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        port, password = free_port(), secrets.token_urlsafe(24)
        conf = self.root / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"bind 127.0.0.1\nport {port}\nprotected-mode yes\nrequirepass {password}\n"
                     f"dir {self.root}\nsave \"\"\nappendonly no\ndaemonize no\nlogfile {self.root / 'redis.log'}\n")
        proc = subprocess.Popen(["redis-server", str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        st = {"pid": proc.pid, "port": port}
        self.state_file.write_text(json.dumps(st))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not pid_alive(proc.pid):
                raise StackError(f"redis-server exited during start-up; see {self.root / 'redis.log'}")
            if self.ping(port, password):
                return st
            time.sleep(0.2)
        raise StackError(f"redis-server did not answer PING within {timeout_s:.0f} s")

    def password(self) -> str:
        for line in (self.root / "redis.conf").read_text().splitlines():
            if line.startswith("requirepass "):
                return line.split(" ", 1)[1]
        raise StackError("redis.conf has no requirepass")

    def url(self) -> str:
        st = self.load()
        if st is None:
            raise StackError("redis-server is not running")
        return f"redis://:{self.password()}@127.0.0.1:{st['port']}/0"

    @staticmethod
    def ping(port: int, password: str | None) -> bool:
        """PING over RESP; with a password, AUTH first. True when the server answers PONG."""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if password is not None:
                    sock.sendall(f"*2\r\n$4\r\nAUTH\r\n${len(password)}\r\n{password}\r\n".encode())
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def down(self) -> None:
        st = self.load()
        if st:
            stop_pid(st["pid"], timeout_s=10)
        self.state_file.unlink(missing_ok=True)


class CeleryStack(AirflowStack):
    """docker-compose.yaml's deployment on loopback: the CeleryExecutor with Redis as broker, PostgreSQL (URLs given)
    as metadata DB and result backend, and celery_commands(dbhost_queues) as processes.

    Each worker and DB-host triggerer stands for its own host: its Celery hostname and its [core] hostname (what a
    task instance records) are `<queue>-host`, so the REST API shows where every task ran.
    """

    executor = "CeleryExecutor"

    def __init__(self, home: str | Path, extra_env: dict[str, str] | None = None, *, sql_alchemy_conn: str,
                 result_backend: str, dbhost_queues: Sequence[str], auth: str = "simple",
                 worker_concurrency: int = 2):
        super().__init__(home, extra_env, auth=auth)
        self.sql_alchemy_conn, self.result_backend = sql_alchemy_conn, result_backend
        self.dbhost_queues = list(dbhost_queues)
        self.worker_concurrency = worker_concurrency
        self.broker = RedisBroker(self.home / "redis")

    def env(self, port: int) -> dict[str, str]:
        env = super().env(port)
        env.update({
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
            "AIRFLOW__CELERY__RESULT_BACKEND": self.result_backend,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
            "AIRFLOW__TRIGGERER__QUEUES_ENABLED": "True",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "pgops.lab.airflow_stack.lab_hostname",
        })
        if self.broker.load():
            env["AIRFLOW__CELERY__BROKER_URL"] = self.broker.url()
        return env

    def before_airflow(self, env: dict[str, str]) -> None:
        self.broker.up()
        env["AIRFLOW__CELERY__BROKER_URL"] = self.broker.url()

    def after_airflow(self) -> None:
        self.broker.down()

    def commands(self) -> dict[str, list[str]]:
        return celery_commands(self.dbhost_queues)

    @staticmethod
    def host_of(component: str) -> str | None:
        """The host a component stands for: `default-host` for the default queue's worker and triggerer,
        `<queue>-host` for a DB host's; None for the central components (api-server, scheduler, dag-processor)."""
        if component in ("worker", "triggerer"):
            return "default-host"
        if component.startswith(("dbhost-worker:", "dbhost-triggerer:")):
            return f"{component.split(':', 1)[1]}-host"
        return None

    def lab_args(self, component: str, port: int) -> list[str]:
        host = self.host_of(component)
        if host and "worker" in component:
            return ["--celery-hostname", f"celery@{host}"]
        return super().lab_args(component, port)

    def component_env(self, component: str, env: dict[str, str]) -> dict[str, str]:
        host = self.host_of(component)
        if host:
            env[HOSTNAME_ENV] = host
        return env

    def kill_host(self, component: str) -> list[int]:
        """SIGKILL a component and every process under it, as if its host died; returns the pids killed."""
        st = self.load()
        if st is None:
            raise StackError("Airflow is not running")
        root = st["pids"][component]
        pids = [root, *descendants(root)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            stop_pid(pid, timeout_s=5, sig=signal.SIGKILL)  # reaps our own child
        return pids

    def restart(self, component: str) -> int:
        """Start a component again (after kill_host), with the stack's environment."""
        st = self.load()
        if st is None:
            raise StackError("Airflow is not running")
        pid = self._start(st, component, self.env(st["port"]))
        self.state_file.write_text(json.dumps(st, indent=2))
        return pid


def descendants(pid: int) -> list[int]:
    """Every live process below pid (through /proc's parent links), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
