"""The backup task takes the new backup's id from barman-cloud-backup's own "Starting backup" line (-v), so a
backup that needs no progress record makes no S3 client and reads no catalog; without that line (or with two) it
reads the catalog as before, and a run that fails returns nothing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers import REPO

from pgops.airflow.operators import backup as backup_mod
from pgops.airflow.operators.backup import BarmanCloudBackupOperator
from pgops.airflow.operators.base import ClusterOperator
from pgops.dbhost.engines import barman_cloud
from pgops.dbhost.runners import CommandFailed
from pgops.inventory import load_inventory

RUN_ID = "manual__2026-11-29T10:10:10+00:00"
# barman-cloud-backup -v output (barman 3.19.1, cloud.py / aws_s3.py), as the runner hands it over line by line
BARMAN_LINES = [
    "2026-11-29 16:28:49,897 [14556] INFO: Found credentials in environment variables.",
    "2026-11-29 16:28:50,043 [14556] INFO: Starting backup '20261129T162850'",
    "2026-11-29 16:28:50,104 [14556] INFO: Uploading 'clusters/main/base/20261129T162850/backup.info'",
    "2026-11-29 16:28:50,370 [14577] INFO: Upload process started (worker 0)",
    "2026-11-29 16:28:51,001 [14577] INFO: Uploading 'clusters/main/base/20261129T162850/data.tar.lz4', part '1' "
    "(worker 0)",
    "2026-11-29 16:28:51,402 [14579] INFO: Uploading 'clusters/main/base/20261129T162850/data_0001.tar.lz4', part "
    "'2' (worker 1)",
    "2026-11-29 16:28:52,010 [14579] INFO: Completing 'clusters/main/base/20261129T162850/data.tar.lz4' (worker 1)",
    "2026-11-29 16:28:54,032 [14556] INFO: Stopping backup '20261129T162850'",
    "2026-11-29 16:28:55,172 [14556] INFO: Backup completed (start time: 2026-11-29 16:28:50.043362, elapsed time: "
    "5 seconds)",
]


def test_the_id_is_barmans_own_and_the_chunk_lines_are_counted_not_logged():
    logged: list[str] = []
    out = barman_cloud.BackupLog(logged.append)
    for line in BARMAN_LINES:
        out(line)
    assert out.made() == "20261129T162850"
    assert out.chunk_lines == 3
    assert not any("part '" in line or "Completing" in line for line in logged)
    assert any("Starting backup '20261129T162850'" in line for line in logged)
    assert any("Backup completed" in line for line in logged)


@pytest.mark.parametrize("lines", [
    [],  # no -v, or a barman that says nothing
    ["2026-11-29 16:28:50,043 [1] INFO: Starting backup 'latest'"],  # not an id
    ["Starting backup '20261129T162850'"],  # not barman's log format
    ["2026-11-29 16:28:50,043 [1] INFO: psql said: Starting backup '20261129T162850' x"],  # not the whole line
    # inside another message (a server's notice relayed in a WARNING line): not barman's own line
    ["2026-11-29 16:28:50,043 [1] WARNING: 2026-11-29 16:28:50,043 [1] INFO: Starting backup '20261129T162850'"],
    ["x 2026-11-29 16:28:50,043 [1] INFO: Starting backup '20261129T162850'"],
    # two starts in one output: which one this run made is not for the log to say
    ["2026-11-29 16:28:50,043 [1] INFO: Starting backup '20261129T162850'",
     "2026-11-29 16:28:51,043 [1] INFO: Starting backup '20261129T162851'"],
])
def test_no_single_clear_start_line_means_no_id(lines):
    out = barman_cloud.BackupLog(lambda line: None)
    for line in lines:
        out(line)
    assert out.made() is None


def test_only_barmans_own_chunk_lines_are_held_back():
    logged: list[str] = []
    out = barman_cloud.BackupLog(logged.append)
    line = "2026-11-29 16:28:50,043 [1] ERROR: Uploading 'k', part '1' (worker 0) failed: Access Denied"
    out(line)
    out("2026-11-29 16:28:51,001 [2] INFO: Uploading 'k', part '1' (worker 0) and more")
    assert out.chunk_lines == 0 and len(logged) == 2


def test_the_backup_command_asks_barman_for_its_info_lines():
    cluster = load_inventory(REPO / "include" / "clusters.example.yaml").clusters[0]
    argv = barman_cloud.backup_argv(cluster, endpoint_url=None, backup_name="n")
    assert argv[1] == "-v"


@pytest.fixture
def task(monkeypatch):
    """The backup task with the DB host's barman-cloud-backup replaced by ``lines``, and every S3 use recorded."""
    used: list[str] = []
    state = SimpleNamespace(lines=BARMAN_LINES, fail=False, used=used, catalog=[])
    monkeypatch.setattr(backup_mod, "pg_target", lambda conn_id: SimpleNamespace(host="h", port=5432, user="u",
                                                                                 dbname="d"))
    monkeypatch.setattr(backup_mod, "s3_endpoint_url", lambda conn_id: None)

    def run_engine(self, cluster, argv, *, on_line=None, **kwargs):
        used.append("barman")
        for line in state.lines:
            on_line(line)
        if state.fail:
            raise CommandFailed("barman-cloud-backup failed with exit code 1", returncode=1, output_tail="")

    def catalog_by_name(cluster, name, *, s3=None):
        used.append("catalog")
        return state.catalog

    class NoS3:
        def __getattr__(self, name):
            used.append(f"s3.{name}")
            raise AssertionError(f"the S3 hook was used: {name}")

    monkeypatch.setattr(ClusterOperator, "run_engine", run_engine)
    monkeypatch.setattr(backup_mod, "catalog_by_name", catalog_by_name)
    monkeypatch.setattr(ClusterOperator, "s3", property(lambda self: NoS3()))
    return state


def _execute(**pre):
    op = BarmanCloudBackupOperator(task_id="backup", cluster_name="main",
                                   preflight={"run_id": RUN_ID, "run_backups": [], "cluster_size_bytes": 1 << 30,
                                              **pre})
    return op.execute({"run_id": RUN_ID, "ti": SimpleNamespace(try_number=1)})


def test_a_short_backup_returns_barmans_id_without_s3(task):
    assert _execute() == "20261129T162850"
    assert task.used == ["barman"]  # no S3 client, no catalog read, no progress record


def test_without_the_start_line_the_catalog_decides(task):
    task.lines = [line for line in BARMAN_LINES if "Starting backup" not in line]
    name = backup_mod.backup_name_for_run(RUN_ID)
    task.catalog = [("20261129T162850", {"backup_name": name, "status": "DONE"})]
    assert _execute() == "20261129T162850"
    assert task.used == ["barman", "catalog"]


def test_without_the_start_line_and_nothing_in_the_catalog_the_task_fails(task):
    task.lines = []
    with pytest.raises(RuntimeError, match="exited 0 but no backup named"):
        _execute()


def test_a_failed_backup_returns_no_id_even_with_a_start_line(task):
    task.fail = True
    with pytest.raises(RuntimeError, match="barman-cloud-backup failed"):
        _execute()
    assert task.used == ["barman"]


def test_short_work_gets_no_end_record_long_work_does():
    import logging
    import time

    from pgops.airflow import progress

    def ticker(interval_s: float, measured: list, published: list) -> progress.ProgressTicker:
        return progress.ProgressTicker(kind="backup", what="w", run_id="r", log=logging.getLogger("t"),
                                       interval_s=interval_s, skip_end_if_short=True, publish=published.append,
                                       measure=lambda: measured.append(1) or {"done_bytes": 1})

    measured, published = [], []
    with ticker(30, measured, published):
        pass
    assert measured == [] and published == []
    measured, published = [], []
    with ticker(0.2, measured, published):
        time.sleep(0.5)
    states = [r["state"] for r in published]
    assert states[-1] == "done" and "running" in states
