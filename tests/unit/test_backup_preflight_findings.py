"""The backup task takes the preflight's catalog read only where no attempt of the run can have made a backup."""

from __future__ import annotations

import pytest

from pgops.airflow.operators.backup import PREFLIGHT_SQL, preflight_findings

RUN = "scheduled__2026-11-29T02:00:00+00:00"
PRE = {"run_id": RUN, "backup_name": "pgops-x", "cluster_size_bytes": 123456,
       "run_backups": [{"backup_id": "20261129T020001", "backup_name": "pgops-x", "status": "FAILED"}]}


def test_first_attempt_takes_the_preflight_read():
    got = preflight_findings(PRE, run_id=RUN, try_number=1)
    assert got == {"run_backups": PRE["run_backups"], "cluster_size_bytes": 123456}


@pytest.mark.parametrize("try_number", [2, 3, None, 0])
def test_a_retry_or_a_cleared_task_reads_the_catalog_again(try_number):
    # the preflight's list is from before the first attempt, which may have made a backup since
    assert preflight_findings(PRE, run_id=RUN, try_number=try_number) is None


def test_another_runs_preflight_is_not_taken():
    assert preflight_findings({**PRE, "run_id": "manual__other"}, run_id=RUN, try_number=1) is None
    assert preflight_findings({k: v for k, v in PRE.items() if k != "run_id"}, run_id=RUN, try_number=1) is None


@pytest.mark.parametrize("backups", [None, "[]", [{"status": "DONE"}], ["20261129T020001"]])
def test_a_missing_or_malformed_list_means_a_look_up(backups):
    assert preflight_findings({**PRE, "run_backups": backups}, run_id=RUN, try_number=1) is None


def test_no_preflight_means_a_look_up():
    assert preflight_findings(None, run_id=RUN, try_number=1) is None
    assert preflight_findings({}, run_id=RUN, try_number=1) is None


@pytest.mark.parametrize("size", [None, 0, -5, "123", 1.5])
def test_an_unusable_size_is_none(size):
    assert preflight_findings({**PRE, "cluster_size_bytes": size}, run_id=RUN, try_number=1)["cluster_size_bytes"] is None


def test_one_query_reads_the_archiver_and_the_size():
    assert "pg_stat_archiver" in PREFLIGHT_SQL and "pg_database_size" in PREFLIGHT_SQL
