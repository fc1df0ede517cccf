"""Shared fixtures: a temp AIRFLOW_HOME (migrated once), the real lab, and a dag.test() runner.

Airflow reads its configuration at import time, so AIRFLOW_HOME is set here, before any test module
imports airflow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["aws_calls"]

from helpers import REPO, without_deadlines  # noqa: E402

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="pgops-airflow-"))
os.environ.update({
    "AIRFLOW_HOME": str(_AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__CORE__DAGBAG_IMPORT_ERROR_TRACEBACKS": "False",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    "PGOPS_INVENTORY": str(REPO / "include" / "clusters.example.yaml"),
})
os.environ.pop("AIRFLOW_CONN_PGOPS_MAIN_AWS", None)
# The restore's default scratch root (a DB host keeps it); made by a test run only where none was there before.
_SCRATCH_ROOT = Path("/var/tmp/pgops-restore")
_SCRATCH_ROOT_WAS_THERE = _SCRATCH_ROOT.exists()


def pytest_unconfigure(config):
    """A test session leaves nothing behind: its AIRFLOW_HOME (metadata DB, task logs) goes, and the default
    restore scratch root too if this session made it and every run's directory in it is gone (rmdir: only when
    empty, so nothing a run left can be lost unnoticed)."""
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)
    if not _SCRATCH_ROOT_WAS_THERE:
        try:
            _SCRATCH_ROOT.rmdir()
        except OSError:
            pass


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated Airflow metadata DB (SQLite in the temp AIRFLOW_HOME)."""
    res = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed: {res.stderr[-2000:]}")
    return _AIRFLOW_HOME


@pytest.fixture(scope="session")
def lab():
    """The real lab (SeaweedFS, moto, PostgreSQL 15) for the whole session; stopped by pid at the end."""
    from pgops.lab.local import Lab

    # Not under pytest's basetemp (0700): the postgres OS user must reach its data dir.
    state_dir = Path(os.environ.get("PGOPS_TEST_LAB_DIR") or tempfile.mkdtemp(prefix="pgops-lab-"))
    os.chmod(state_dir, 0o755)
    the_lab = Lab(state_dir)
    st = the_lab.up()
    saved = dict(os.environ)
    os.environ.update(the_lab.env(st))
    try:
        yield the_lab
    finally:
        os.environ.clear()
        os.environ.update(saved)
        the_lab.down()
        if not os.environ.get("PGOPS_TEST_LAB_DIR"):
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def moto(lab):
    """A fresh moto state (the alert topic the DAGs notify is made again)."""
    import urllib.request

    st = lab.load()
    urllib.request.urlopen(urllib.request.Request(f"{st.moto_endpoint}/moto-api/reset", method="POST"), timeout=10)
    lab.aws_client("sns", st).create_topic(Name=lab.cluster.alerts.sns_topic_arn.rsplit(":", 1)[-1])
    return lab


@pytest.fixture
def db_tmp_path():
    """A temp dir the postgres OS user can reach (pytest's own tmp_path sits under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="pgops-dbtmp-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def run_dag(airflow_db):
    """Run a DAG through dag.test() with retries off (a test must not sleep through backoff)."""

    def _run(dag, conf: dict | None = None):
        for task in dag.tasks:
            task.retries = 0
        without_deadlines(dag)
        return dag.test(run_conf=conf)

    return _run
