"""The lab harness itself: a second `up` is harmless, status and env describe what runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pgops.lab import Lab, pid_alive

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
