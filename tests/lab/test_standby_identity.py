"""The standby rebuild proves whose data it replaces, and fails closed: a target directory holding another cluster's
PostgreSQL, or one whose system identifier cannot be read, is refused through the real DAG, force or not, and left
file for file as it was (path, size, mtime). Only a directory without a cluster in it (empty, or an earlier
rebuild's partial restore without pg_control) is replaced."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import load_dag, task_states

from pgops.dbhost.procs import PG_BIN
from pgops.lab.local import as_db_user

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

DAG_ID = "pgops_standby_rebuild__repl"


def _files(root: str) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def stopped_standby(replicated_pair):
    """A base backup of pg1 (so the preflight gets as far as the target's contents), then pg2 stopped with its
    directory kept aside; each test puts what it needs at pg2's data_directory. pg2 is put back afterwards."""
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator

    pair = replicated_pair
    BarmanCloudBackupOperator(task_id="backup", cluster_name=pair.cluster_name).execute(
        {"run_id": f"identity-{os.getpid()}"})
    pair.rl.stop(pair.standby)
    data = Path(pair.standby.data_dir)
    kept = data.with_name(data.name + ".kept")
    data.rename(kept)
    yield pair
    if data.exists():
        shutil.rmtree(data)
    kept.rename(data)
    pair.rl.start(pair.standby)


def _another_cluster(path: Path) -> str:
    """initdb a new cluster at path (a new system identifier); its identifier."""
    subprocess.run(as_db_user([str(PG_BIN / "initdb"), "-D", str(path), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True, timeout=120)
    out = subprocess.run(as_db_user([str(PG_BIN / "pg_controldata"), str(path)]), check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                if line.startswith("Database system identifier"))


def _refused(run_dag, pair) -> str:
    dr = run_dag(load_dag(DAG_ID), {"target": "pg2", "force": True, "socket_dir": pair.standby.socket_dir})
    states = task_states(dr)
    assert states["preflight"] == "failed" and states["restore"] == "upstream_failed", states
    return dr.get_task_instance("preflight").xcom_pull(task_ids="preflight", key="error")


def test_another_clusters_data_is_refused_even_with_force(stopped_standby, run_dag):
    pair = stopped_standby
    data = Path(pair.standby.data_dir)
    theirs = _another_cluster(data)
    ours = pair.rl.psql(pair.primary, "SELECT system_identifier FROM pg_control_system()")
    assert theirs != ours
    before = _files(str(data))
    try:
        error = _refused(run_dag, pair)
        assert error.startswith("REFUSED: ") and theirs in error and ours in error, error
        assert "another cluster's data" in error and "Fix:" in error, error
        assert _files(str(data)) == before
    finally:
        shutil.rmtree(data)


def test_a_cluster_whose_identifier_cannot_be_read_is_refused_even_with_force(stopped_standby, run_dag):
    pair = stopped_standby
    data = Path(pair.standby.data_dir)
    _another_cluster(data)
    control = data / "global" / "pg_control"
    control.write_bytes(b"\0" * 16)  # pg_controldata gives no identifier for it
    before = _files(str(data))
    try:
        error = _refused(run_dag, pair)
        assert error.startswith("REFUSED: ") and "could not be read" in error and "Fix:" in error, error
        assert _files(str(data)) == before
    finally:
        shutil.rmtree(data)
