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
                          "--long-load-s", "4", "--replay-load-s", "3", "--repeats", "2", "--backup-repeats", "2",
                          "--wal-repeats", "2", "--clusters", "3",
                          "--out", str(out), "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["database"]["scale"] == 1 and r["database"]["pgbench_db_bytes"] > 0
    assert r["machine"]["cpus"] and "pgBackRest" in r["versions"]["pgbackrest"]
    assert r["transport"] == {"pgops": "https", "pgbackrest": "https"}  # the same transport for both
    b = r["backup"]
    assert sorted((x["rep"], x["tool"]) for x in b["runs"]) == [(rep, t) for rep in (0, 1) for t in "abcd"]
    assert [x["tool"] for x in b["runs"]][:4] != [x["tool"] for x in b["runs"]][4:], "the order is not interleaved"
    for key in ("a", "b", "c", "d", "c_over_b", "c_over_d"):
        assert b["stats"][key]["n"] == 2 and b["stats"][key]["min"] <= b["stats"][key]["median"] <= b["stats"][key]["max"]
    w = r["wal"]
    assert [x["name"] for x in w["runs"]] == ["pgBackRest async", "pgops wrapper", "pgops wrapper", "pgBackRest async"]
    assert "barman-cloud-wal-archive" in w["once"] and len(w["once"]) == 3
    for run in [*w["runs"], *w["once"].values(), w["long"]]:
        assert run["wal_bytes"] > 0 and run["drained"] and run["failed_archive_calls"] == 0, run["archive_command"]
    assert "--parallel 2 " in next(x for x in w["runs"] if x["name"] == "pgops wrapper")["archive_command"]
    x = r["restore"]
    assert x["stats"]["dag_rto_s"]["n"] == 2 and x["stats"]["pgbackrest_total_s"]["n"] == 2
    for run in x["runs"]:
        if run["tool"] in ("pgops_prefetch", "local_copy"):
            assert run["segments_restored"] > 0, run
        if run["tool"] in ("pgops_prefetch", "local_copy", "pgbackrest"):
            # a start and a replay take time: ~0 s is a finished earlier replay's log read again
            assert run["replay_s"] > 0.2, run
    assert all(v["segments_restored"] > 0 for v in x["replay_once"].values())
    assert r["parse"]["dags"] == 3 * 4 and all(p["guarded_calls"] == [] for p in r["parse"]["runs"])
    names = [g["name"] for g in r["goals"]]
    assert any("RTO" in n for n in names) and any("EBS" in n for n in names) and len(names) >= 9
    assert all(set(g) >= {"name", "value", "goal", "ok"} for g in r["goals"])
    for line in ("backup c: base-backup DAG", "WAL pgops wrapper", "restore-verification DAG RTO", "parse: DagBag",
                 "goals:"):
        assert line in res.stdout
    assert not state.exists(), "the benchmark left its state dir behind"
    # Every process it started is gone: nothing runs from its state dir.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(state) not in ps
