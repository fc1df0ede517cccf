"""The lab harness itself: a second `up` is harmless, status and env describe what runs, archiving is proven at
`up`, and a clone the postgres OS user cannot read still gets a working lab."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from pgops.inventory import REPO_ROOT
from pgops.lab.local import Lab, LabError, as_db_user, dbhost_venv, is_root, pid_alive

pytestmark = pytest.mark.lab


def test_second_up_is_harmless_and_status_reports_pids(lab):
    before = lab.load()
    again = Lab(lab.state_dir).up()
    assert again.pids == before.pids and again.ports == before.ports
    status = json.loads(subprocess.run([sys.executable, "-m", "pgops.cli", "lab", "status", "--state-dir",
                                        str(lab.state_dir)], capture_output=True, text=True, check=True).stdout)
    assert status["running"] is True
    assert {k: v["pid"] for k, v in status["processes"].items()} == before.pids
    assert all(pid_alive(p) for p in before.pids.values())


def test_env_exports_connections_and_binds_loopback(lab):
    out = subprocess.run([sys.executable, "-m", "pgops.cli", "lab", "env", "--state-dir", str(lab.state_dir)],
                         capture_output=True, text=True, check=True).stdout
    assert "export AIRFLOW_CONN_PGOPS_MAIN_AWS=" in out and "export AIRFLOW_CONN_PGOPS_MAIN_PG=" in out
    st = lab.load()
    assert lab.psql("SHOW listen_addresses") == "127.0.0.1"
    assert lab.psql("SHOW archive_mode") == "on"
    assert "barman-cloud-wal-archive" in lab.psql("SHOW archive_command")
    # PostgreSQL runs as the postgres OS user, never as root.
    owner = subprocess.run(["ps", "-o", "user=", "-p", str(st.pids["pg"])], capture_output=True, text=True).stdout.strip()
    assert owner == "postgres" or owner == subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    ours = [line for line in listening.splitlines()
            if any(f"pid={pid}," in line for pid in st.pids.values())]
    assert ours and all(line.split()[3].startswith("127.0.0.1:") for line in ours), ours


def test_archiving_is_proven_and_a_failing_archive_command_is_named(lab):
    """`up` switches a segment and waits for it to be archived; a broken archive_command fails that wait within its
    bound, naming the segment and what PostgreSQL said, instead of leaving a backup to wait for WAL forever."""
    st = lab.load()
    segment = lab.prove_archiving(st)
    keys = [o["Key"] for page in lab.s3_client(st).get_paginator("list_objects_v2").paginate(
        Bucket=st.bucket, Prefix=f"{st.prefix}/{st.server_name}/wals/") for o in page.get("Contents", [])]
    assert any(k.rsplit("/", 1)[-1].startswith(segment) for k in keys), (segment, keys[-5:])
    lab.psql("ALTER SYSTEM SET archive_command = '/bin/false %p'")
    lab.psql("SELECT pg_reload_conf()")
    try:
        with pytest.raises(LabError) as err:
            lab.prove_archiving(st, timeout_s=5)
        text = str(err.value)
        assert "was not archived within 5 s" in text and "/bin/false" in text
        assert "archive command failed" in text  # PostgreSQL's own words, from its log
    finally:
        lab.psql("ALTER SYSTEM RESET archive_command")
        lab.psql("SELECT pg_reload_conf()")
    assert lab.prove_archiving(st) > segment  # the archiver retried and caught up


def test_postgresql_runs_nothing_from_the_checkout_and_gets_a_minimal_environment(lab, monkeypatch):
    command = lab.psql("SHOW archive_command")
    assert str(REPO_ROOT) not in command and "include/dbhost" not in command
    assert command.split()[0] == str(dbhost_venv() / "bin" / "pgops-wal-archive")
    monkeypatch.setenv("AIRFLOW_CONN_SECRET_PROBE", "postgres://u:p@h/db")
    out = subprocess.run(as_db_user(["env"], env={"PGOPS_PROBE": "1"}), capture_output=True, text=True,
                         check=True).stdout
    names = {line.split("=", 1)[0] for line in out.splitlines()}
    assert "AIRFLOW_CONN_SECRET_PROBE" not in names and "PGOPS_PROBE" in names
    assert names <= {"PATH", "LANG", "LANGUAGE", "TZ", "HOME", "USER", "LOGNAME", "PGOPS_PROBE"} | {
        n for n in names if n.startswith("LC_")}


def test_a_clone_the_postgres_user_cannot_read_still_gets_a_working_lab(tmp_path):
    """A clone in a 0700 directory (root's home is one): the lab's state goes where PostgreSQL can reach it, and
    its archive_command (proven by `up`) comes from the DB-host tools venv, not from the clone."""
    if not is_root():
        pytest.skip("needs root: the postgres OS user must be another user than the test's")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    clone = private / "pgops"
    # The checkout as it is (tracked files, with their working-tree content), as a clone would lay it out.
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True,
                             timeout=60).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        if (REPO_ROOT / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, clone / rel)
    env = {k: v for k, v in os.environ.items() if k != "PGOPS_LAB_DIR"}
    env["PYTHONPATH"] = str(clone / "plugins")
    cli = [sys.executable, "-m", "pgops.cli", "lab"]
    where = subprocess.run([sys.executable, "-c", "import pgops.lab.local as L; print(L.__file__); print(L.default_state_dir())"],
                           env=env, capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert where[0].startswith(str(clone)) and where[1].startswith("/var/tmp/pgops-lab-"), where
    try:
        up = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stderr[-2000:]
        status = json.loads(subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, check=True,
                                           timeout=60).stdout)
        assert status["running"] and status["state_dir"] == where[1]
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(where[1], ignore_errors=True)
