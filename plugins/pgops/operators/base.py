"""What the cluster operators share: ClusterOperator (one inventory cluster, its engine and runner) and small helpers
for templated values and run-time param checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from pgops.engines import barman_cloud
from pgops.hooks import aws_child_env, pg_target, s3_endpoint_url
from pgops.inventory import Cluster, load_inventory
from pgops.params import ParamRefused
from pgops.runners import get_runner


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
                   timeout_s: float | None = None):
        self._runner = get_runner(cluster)
        try:
            return self._runner.run(argv, env=self.engine_env(cluster), capture=capture, check=check,
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


def truthy(value: Any) -> bool:
    """A templated flag (a bool, or the text a template or a param renders) as a bool."""
    return str(value).strip().lower() in ("true", "1", "yes", "on")


def param_checked(check, *args: Any, **kwargs: Any) -> Any:
    """A pgops.params check at run time; its refusal (it names the param, the value and the fix) fails the task."""
    try:
        return check(*args, **kwargs)
    except ParamRefused as exc:
        raise AirflowFailException(str(exc)) from None


def pg_bin(name: str) -> str:
    from pgops.procs import PG_BIN

    return str(PG_BIN / name)
