"""The peers benchmark harness at a tiny scale, so it cannot rot (`make bench` runs the full one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = [pytest.mark.lab, pytest.mark.airflow]


def test_bench_peers_smoke(tmp_path):
    out = tmp_path / "peers.json"
    state = Path("/var/tmp") / f"pgops-bench-smoke-{tmp_path.name}"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "bench_peers.py"), "--scale", "1", "--load-s", "3",
                          "--clusters", "3", "--out", str(out), "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["database"]["scale"] == 1 and r["database"]["pgbench_db_bytes"] > 0
    assert r["machine"]["cpus"] and "pgBackRest" in r["versions"]["pgbackrest"]
    b = r["backup"]
    for key in ("a_read_floor_s", "b_barman_cli_s", "c_dag_backup_task_s", "c_dag_run_s", "d_pgbackrest_s"):
        assert b[key] > 0, key
    assert set(b["ratios"]) >= {"c_over_b", "c_over_d", "a_over_c"}
    assert set(r["wal"]) == {"barman-cloud-wal-archive", "pgBackRest async", "pgops wrapper"}
    for name, w in r["wal"].items():
        assert w["wal_bytes"] > 0 and w["drained"] and w["failed_archive_calls"] == 0, name
    x = r["restore"]
    assert x["dag"]["rto_s"] > 0 and x["pgbackrest_total_s"] > 0
    for name in ("barman_no_prefetch", "barman_prefetch", "pgops_prefetch", "local_copy"):
        assert x["replay"][name]["segments_restored"] > 0, name
    assert r["parse"]["dags"] == 3 * 4 and r["parse"]["guarded_calls"] == []
    for line in ("backup c: DAG backup task", "WAL pgops wrapper", "restore b: restore-verify DAG RTO", "parse: DagBag"):
        assert line in res.stdout
    assert not state.exists(), "the benchmark left its state dir behind"
    # Every process it started is gone: nothing runs from its state dir.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(state) not in ps
