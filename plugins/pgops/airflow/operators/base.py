"""What the cluster operators share: ClusterOperator (one inventory cluster, its engine and runner), stopping a
proven postmaster, and small helpers for templated values and run-time param checks."""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from pgops.airflow.hooks import aws_child_env, pg_target, s3_endpoint_url
from pgops.core.params import ParamRefused
from pgops.dbhost.engines import barman_cloud
from pgops.dbhost.runners import get_runner
from pgops.inventory import Cluster, load_inventory

if TYPE_CHECKING:
    from pgops.dbhost.host import DbHost


class ClusterOperator(BaseOperator):
    """An operator acting on one inventory cluster (read at execute time, never at parse time)."""

    template_fields: Sequence[str] = ("cluster_name",)

    def __init__(self, *, cluster_name: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.cluster_name = cluster_name
        self._runner = None

    @property
    def cluster(self) -> Cluster:
        return load_inventory().get(self.cluster_name)

    def engine_env(self, cluster: Cluster) -> dict[str, str]:
        return {**aws_child_env(cluster.engine_aws_conn_id), **pg_target(cluster.postgres_conn_id).child_env()}

    def run_engine(self, cluster: Cluster, argv: list[str], *, capture: bool = False, check: bool = True,
                   timeout_s: float | None = None, env: dict[str, str] | None = None):
        """Run an engine command on the cluster's runner; ``env``: engine_env(cluster), when already made."""
        self._runner = get_runner(cluster)
        try:
            return self._runner.run(argv, env=self.engine_env(cluster) if env is None else env, capture=capture, check=check,
                                    timeout_s=timeout_s or cluster.engine.timeout_s, on_line=self.log.info)
        finally:
            self._runner = None

    def on_kill(self) -> None:
        if self._runner is not None:
            self._runner.kill()

    def catalog(self, cluster: Cluster) -> list[barman_cloud.BackupInfo]:
        res = self.run_engine(cluster, barman_cloud.backup_list_argv(cluster, endpoint_url=s3_endpoint_url(cluster.engine_aws_conn_id)),
                              capture=True, timeout_s=600)
        return barman_cloud.parse_backup_list(res.stdout)


def as_mapping(value: Any, what: str = "value") -> dict[str, Any] | None:
    """A templated mapping as a dict: the object itself (render_template_as_native_obj), or the text a plain
    template renders (JSON or a Python literal); None when it is empty (the task that makes it pushed nothing)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "None", "null"):
            return None
        try:
            return as_mapping(json.loads(text), what)
        except ValueError:
            try:
                return as_mapping(ast.literal_eval(text), what)
            except (ValueError, SyntaxError):
                pass
    raise AirflowFailException(f"{what} {str(value)[:200]!r} is not a mapping. Fix: pass the upstream task's "
                               "return value (pgops.airflow.dags.common.xcom) in a DAG with render_template_as_native_obj")


def truthy(value: Any) -> bool:
    """A templated flag (a bool, or the text a template or a param renders) as a bool."""
    return str(value).strip().lower() in ("true", "1", "yes", "on")


def param_checked(check, *args: Any, **kwargs: Any) -> Any:
    """A pgops.core.params check at run time; its refusal (it names the param, the value and the fix) fails the task."""
    try:
        return check(*args, **kwargs)
    except ParamRefused as exc:
        raise AirflowFailException(str(exc)) from None


def pg_bin(name: str) -> str:
    from pgops.dbhost.procs import PG_BIN

    return str(PG_BIN / name)


def stop_proven_postmaster(host: DbHost, data_dir: str, *, mode: str, fix: str, standby_only: bool = False,
                           timeout_s: float = 60, log=None) -> int | None:
    """Stop data_dir's postmaster (pg_ctl stop -m ``mode``, SIGKILL after timeout_s); the pid stopped, or None.

    Only a postmaster proven on the host is signalled (DbHost: postmaster.pid's pid is alive, its working directory
    is data_dir's realpath, its argv[0] is postgres). A postmaster.pid that names another process is refused,
    nothing signalled; ``fix`` ends that error. With ``standby_only``, a server there that is not in archive
    recovery (a primary) is refused too, before any signal.
    """
    if standby_only:
        pm = host.postmaster(data_dir)
        _refuse_other(host, data_dir, pm, fix)
        if not pm.running:
            return None
        state = host.controldata(data_dir).get("Database cluster state", "")
        if state != "in archive recovery":
            raise AirflowFailException(f"REFUSED: PostgreSQL (pid {pm.pid}) in {data_dir} on {host.where} "
                                       f"runs with cluster state {state!r}, not as a standby; it is not stopped")
        if log is not None:
            log.warning("stopping PostgreSQL (pid %s) in %s on %s", pm.pid, data_dir, host.where)
    pm = host.stop_postmaster(data_dir, mode=mode, timeout_s=timeout_s)
    _refuse_other(host, data_dir, pm, fix)
    return pm.pid if pm.state in ("stopped", "killed") else None


def _refuse_other(host: DbHost, data_dir: str, pm, fix: str) -> None:
    if pm.state == "other":
        raise AirflowFailException(
            f"postmaster.pid of {data_dir} on {host.where} names pid {pm.pid}, which is not a postmaster "
            f"of that directory; nothing was signalled or removed. Fix: check what runs there, then {fix}")
