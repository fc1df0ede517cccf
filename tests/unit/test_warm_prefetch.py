"""The restore step's WAL prefetcher warm start is only a head start: DB-host tools that predate it (exit 2) or a
prefetcher that does not start leave a warning and the restore going on; a restore_command without a prefetcher
gets no call at all."""

from types import SimpleNamespace

import pytest

from pgops.airflow.operators.restore import BarmanCloudRestoreOperator
from pgops.inventory import load_inventory

PLAN = {"spool_dir": "/var/tmp/scratch/spool", "backup_begin_wal": "000000010000000000000007"}


@pytest.fixture
def op(monkeypatch):
    op = BarmanCloudRestoreOperator(task_id="restore", cluster_name="main", plan=PLAN)
    calls, warnings = [], []
    op.answer = 0
    monkeypatch.setattr(op, "host", lambda cluster, argv, **kw: calls.append((argv, kw)) or SimpleNamespace(
        returncode=op.answer))
    monkeypatch.setattr(type(op), "log", SimpleNamespace(warning=lambda *a: warnings.append(a[0] % a[1:])),
                        raising=False)
    return op, calls, warnings


def test_a_failed_warm_start_warns_and_the_restore_goes_on(op):
    op, calls, warnings = op
    op.answer = 2  # argparse's exit for an unknown --start
    op._warm_prefetcher(load_inventory().get("main"), PLAN, endpoint="https://s3", parallel=2, env={"A": "b"})
    (argv, kw), = calls
    assert "--start" in argv and argv[argv.index("--start") + 1] == PLAN["backup_begin_wal"]
    assert kw["check"] is False and kw["env"] == {"A": "b"}
    assert warnings and "did not start ahead of recovery (exit 2)" in warnings[0]


def test_no_call_without_a_prefetcher_or_a_first_segment(op):
    op, calls, warnings = op
    cluster = load_inventory().get("main")
    op._warm_prefetcher(cluster, PLAN, endpoint=None, parallel=0, env={})
    op._warm_prefetcher(cluster, {**PLAN, "backup_begin_wal": None}, endpoint=None, parallel=2, env={})
    assert calls == [] and warnings == []
