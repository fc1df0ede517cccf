"""WalArchiveAuditOperator: audit the WAL archive and the bucket of one cluster, write the report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from pgops.airflow import audit
from pgops.airflow.operators.base import ClusterOperator


class WalArchiveAuditOperator(ClusterOperator):
    """Run the audit, write the report to the bucket, log a summary; fail on a critical finding only.

    The report (kind "wal-audit") goes to ``<prefix>/<server>/pgops/reports/wal-audit/``; the task returns its
    summary (also pushed under XCom key "summary", there when the task fails).

    :param cluster_name: the inventory cluster (templated)
    :param apply_lifecycle: put the recommended bucket lifecycle configuration (templated: a bool, or the text a
        param renders)
    """

    template_fields: Sequence[str] = ("cluster_name", "apply_lifecycle")

    def __init__(self, *, apply_lifecycle: bool | str = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.apply_lifecycle = apply_lifecycle

    def execute(self, context) -> dict[str, Any]:
        cluster = self.cluster
        apply = str(self.apply_lifecycle).strip().lower() in ("true", "1", "yes")

        s3 = self.s3_hook(cluster.aws_conn_id)
        try:
            report = audit.audit_cluster(cluster, s3=s3.conn, run_id=context["run_id"], apply_lifecycle=apply)
        except audit.AuditError as exc:
            raise AirflowFailException(str(exc)) from None
        key = s3.write_report(cluster, report)
        for line in audit.summary(report).splitlines():
            self.log.info("%s", line)
        self.log.info("report: s3://%s/%s", cluster.storage.bucket, key)
        result = audit.xcom_summary(report, key)
        context["ti"].xcom_push(key="summary", value=result)  # also there when the task fails
        if report["status"] == "critical":
            critical = [f for f in report["body"]["findings"] if f["severity"] == "critical"]
            raise AirflowFailException(
                f"cluster {cluster.name!r}: WAL audit found {len(critical)} critical problem(s): "
                + "; ".join(f"{f['id']}: {f['message']}" for f in critical[:5])
                + f" (report s3://{cluster.storage.bucket}/{key})")
        return result
