"""Real Airflow components for the demo and the scheduler test: scheduler, triggerer, dag-processor and
api-server as separate processes in one process group, stopped by that group's id (never by name)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pgops.inventory import REPO_ROOT
from pgops.procs import free_port, pid_alive, stop_pid

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
ADMIN_USER = "admin"


class StackError(RuntimeError):
    pass


class AirflowStack:
    def __init__(self, home: str | Path, extra_env: dict[str, str] | None = None):
        self.home = Path(home).resolve()
        self.state_file = self.home / "stack.json"
        self.extra_env = extra_env or {}
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
        return {
            **os.environ, **self.extra_env,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
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
        airflow = [sys.executable, "-m", "airflow"]
        res = subprocess.run([*airflow, "db", "migrate"], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise StackError(f"airflow db migrate failed: {res.stderr[-1500:]}")
        logs = self.home / "logs"
        logs.mkdir(exist_ok=True)
        pids: dict[str, int] = {}
        pgid = 0
        for comp in COMPONENTS:
            argv = [*airflow, comp] + (["--host", "127.0.0.1", "--port", str(port)] if comp == "api-server" else [])
            with open(logs / f"{comp}.out", "ab") as out:
                proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        process_group=pgid)
            pgid = pgid or proc.pid
            pids[comp] = proc.pid
        st = {"port": port, "pgid": pgid, "pids": pids, "url": f"http://127.0.0.1:{port}"}
        self.state_file.write_text(json.dumps(st, indent=2))
        self._wait_healthy(st, timeout_s)
        return st

    def _wait_healthy(self, st: dict[str, Any], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [c for c, p in st["pids"].items() if not pid_alive(p)]
            if dead:
                raise StackError(f"airflow {dead[0]} exited during start-up; see {self.home / 'logs' / (dead[0] + '.out')}")
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
            return
        import signal

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

    # -- REST API ----------------------------------------------------------------------------------------------
    def password(self) -> str:
        return json.loads((self.home / "passwords.json").read_text())[ADMIN_USER]

    def _request(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        st = self.load()
        if st is None:
            raise StackError("Airflow is not running")
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{st['url']}{path}", data=data, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise StackError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from None
        return json.loads(raw) if raw else None

    def token(self) -> str:
        if self._token is None:
            self._token = self._request("POST", "/auth/token",
                                        {"username": ADMIN_USER, "password": self.password()}, auth=False)["access_token"]
        return self._token

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
