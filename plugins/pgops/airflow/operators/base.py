"""What pgops' operators share: PgopsOperator (the base of every one: hooks kept for the task's life, errors
classed as fail-fast or retryable), ClusterOperator (one inventory cluster, its engine, runner and DB-host access
point), stopping a proven postmaster, and small helpers for templated values and run-time param checks."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from pgops.airflow.hooks import aws_child_env, pg_target, s3_endpoint_url
from pgops.core.params import ParamRefused
from pgops.dbhost.engines import barman_cloud
from pgops.dbhost.runners import get_runner
from pgops.inventory import Cluster, InventoryError, ReplicaNode, load_inventory

if TYPE_CHECKING:
    from pgops.airflow.hooks import PgopsS3Hook
    from pgops.dbhost.host import DbHost

# Errors a retry cannot mend: the task fails at once (AirflowFailException) instead of retrying them.
FAIL_FAST_ERRORS: tuple[type[Exception], ...] = (InventoryError, ParamRefused)


class PgopsOperator(BaseOperator):
    """The base of every pgops operator.

    Hooks: ``s3_hook(conn_id)`` keeps one PgopsS3Hook (one boto3 client) per AWS connection for the task's life.

    Errors are classed by what a retry can do. What it cannot mend fails the task at once with
    AirflowFailException, naming the value and the fix: a refusal (a target not proven to be the one meant, a
    hostile param), an inventory or param error (``FAIL_FAST_ERRORS``, turned into one by ``fail_fast``), a missing
    bucket, a backup that is not DONE. Anything else (a connection refused, a timeout, an S3 5xx, a DB-host command
    that failed) is raised as it is and left to the task's retries.
    """

    def s3_hook(self, aws_conn_id: str | None) -> PgopsS3Hook:
        """The PgopsS3Hook of ``aws_conn_id``: one per connection (and client) for this task's life."""
        hooks = self.__dict__.setdefault("_s3_hooks", {})
        if aws_conn_id not in hooks:
            from pgops.airflow.hooks import PgopsS3Hook

            hooks[aws_conn_id] = PgopsS3Hook(aws_conn_id=aws_conn_id)
        return hooks[aws_conn_id]

    @staticmethod
    def fail_fast(call, *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)``; an error of ``FAIL_FAST_ERRORS`` fails the task at once with its message."""
        try:
            return call(*args, **kwargs)
        except FAIL_FAST_ERRORS as exc:
            raise AirflowFailException(str(exc)) from None


class ClusterOperator(PgopsOperator):
    """An operator acting on one inventory cluster (read at execute time, never at parse time).

    :param cluster_name: the inventory cluster (templated); one not in the inventory fails the task at once
    """

    template_fields: Sequence[str] = ("cluster_name",)

    def __init__(self, *, cluster_name: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.cluster_name = cluster_name
        self._runner = None

    @property
    def cluster(self) -> Cluster:
        return self.fail_fast(lambda: load_inventory().get(self.cluster_name))

    @property
    def s3(self) -> PgopsS3Hook:
        """The cluster's S3 hook (its aws_conn_id), kept for the task's life."""
        return self.s3_hook(self.cluster.aws_conn_id)

    def dbhost(self, cluster: Cluster, node: ReplicaNode | None = None) -> DbHost:
        """The DB-host access point of ``node``, or of the restore host (the cluster's runner) when None.

        A local runner acts on the machine this task runs on, so the task's queue must be the node's own: anything
        else fails at once, before a command runs on the wrong machine.
        """
        from pgops.dbhost.host import DbHost, node_runner

        spec = node_runner(cluster, node)
        if spec.kind == "local" and spec.queue != self.queue:
            raise AirflowFailException(
                f"cluster {cluster.name!r}: task {self.task_id} runs on worker queue {self.queue!r}, but "
                f"{'node ' + node.name if node else 'the restore host'}'s commands run on the worker of queue "
                f"{spec.queue!r}; running them here would act on the wrong machine. Fix: give the node an ssh "
                "runner in the inventory, or the same queue as the cluster's runner")
        host = DbHost.for_node(cluster, node, on_line=self.log.info)
        self._runner = host.runner  # on_kill reaches whatever it runs
        return host

    def engine_env(self, cluster: Cluster) -> dict[str, str]:
        return {**aws_child_env(cluster.engine_aws_conn_id), **pg_target(cluster.postgres_conn_id).child_env()}

    def run_engine(self, cluster: Cluster, argv: list[str], *, capture: bool = False, check: bool = True,
                   timeout_s: float | None = None, env: dict[str, str] | None = None,
                   on_line: Callable[[str], None] | None = None):
        """Run an engine command on the cluster's runner; ``env``: engine_env(cluster), when already made;
        ``on_line``: where its output lines go (the task log when None)."""
        self._runner = get_runner(cluster)
        try:
            return self._runner.run(argv, env=self.engine_env(cluster) if env is None else env, capture=capture, check=check,
                                    timeout_s=timeout_s or cluster.engine.timeout_s, on_line=on_line or self.log.info)
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
