"""The ssh runner against a real sshd (Debian openssh-server) on a loopback port, logging in as postgres.

The test starts its own sshd with a host key and a client key it generates, and stops it by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, task_states
from sshd_lab import SSHD, _keygen, start_sshd

from pgops.lab.local import pid_alive

CONN_ID = "pgops_main_ssh"
pytestmark = [pytest.mark.skipif(not SSHD.exists(), reason="openssh-server is not installed (make setup installs it)"),
              pytest.mark.skipif(os.geteuid() != 0, reason="sshd must start as root to log in as the postgres user")]


@pytest.fixture(scope="module")
def sshd():
    with start_sshd() as server:
        yield server


@pytest.fixture
def ssh_conn(sshd, monkeypatch):
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", sshd.conn())
    return CONN_ID


def _runner(**kw):
    from pgops.dbhost.runners import SshRunner

    return SshRunner(ssh_conn_id=CONN_ID, cluster_name="main", **kw)


def _pgid_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_runs_as_postgres_with_quoting_env_and_streaming(ssh_conn):
    lines: list[str] = []
    secret = "s3cr3t 'quoted' $HOME; rm -rf /nope"
    res = _runner().run(["sh", "-c", 'id -un; printf "%s\\n" "$1"; printf "%s\\n" "$PGOPS_T"; pwd; echo err >&2',
                         "x", "a b; $(touch /tmp/pgops-should-not-exist)"],
                        env={"PGOPS_T": secret}, timeout_s=30, on_line=lines.append)
    assert res.returncode == 0
    assert lines == ["postgres", "a b; $(touch /tmp/pgops-should-not-exist)", secret, "/", "err"]
    assert not Path("/tmp/pgops-should-not-exist").exists()

    # The environment travels on stdin: no process on the host shows the secret in its argv.
    ps = _runner().run(["ps", "-eo", "args"], env={"PGOPS_T": secret}, capture=True, timeout_s=30)
    assert "ps -eo args" in ps.stdout and secret not in ps.stdout

    captured = _runner().run(["sh", "-c", "echo out; echo warn >&2"], capture=True, timeout_s=30,
                             on_line=lines.append)
    assert captured.stdout == "out\n" and lines[-1] == "warn"


def test_exact_env_reaches_the_remote_command_unchanged(ssh_conn, monkeypatch):
    """The stop-writes restart over a real sshd: a command run with exact_env (the environment the server ran with)
    gets exactly that environment: nothing of the login session (sshd's SSH_*, the login shell's PATH, HOME,
    MAIL, PWD) and nothing of the worker's (locale, TZ, secrets)."""
    server_env = {"PATH": "/usr/bin:/bin", "HOME": "/srv/pg-home", "PGDATA": "/srv/pg/15/main",
                  "PGOPS_MARK": "old env; $(touch /tmp/pgops-should-not-exist)"}
    for key, value in {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "Pacific/Chatham",
                       "DB_ADMIN_PASSWORD": "sentinel-worker-secret"}.items():
        monkeypatch.setenv(key, value)

    def environ(res) -> dict[str, str]:
        return dict(item.split("=", 1) for item in res.stdout.split("\0") if item)

    exact = _runner().run(["/usr/bin/env", "-0"], env=server_env, exact_env=True, capture=True, timeout_s=30)
    assert environ(exact) == server_env
    assert not Path("/tmp/pgops-should-not-exist").exists()
    # the contrast: any other command runs in the login session (its SSH_* variables), plus what it is given
    other = environ(_runner().run(["/usr/bin/env", "-0"], env={"PGOPS_MARK": "x"}, capture=True, timeout_s=30))
    assert other["PGOPS_MARK"] == "x" and any(k.startswith("SSH_") for k in other), sorted(other)
    assert "DB_ADMIN_PASSWORD" not in other


def test_failure_carries_exit_code_and_output(ssh_conn):
    from pgops.dbhost.runners import CommandFailed

    with pytest.raises(CommandFailed, match=r"failed on postgres@127\.0\.0\.1:\d+ .* exit code 3: boom") as err:
        _runner().run(["sh", "-c", "echo boom; exit 3"], timeout_s=30)
    assert err.value.returncode == 3
    assert _runner().run(["false"], check=False, timeout_s=30).returncode == 1


def test_timeout_kills_the_remote_process_tree(ssh_conn):
    from pgops.dbhost.runners import CommandTimeout

    runner = _runner()
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match="timed out after 2 s and was killed"):
        runner.run(["sh", "-c", "sleep 300 & sleep 301 & echo started; wait"], timeout_s=2)
    assert time.monotonic() - started < 20
    assert runner.remote_pid and not pid_alive(runner.remote_pid)
    assert _pgid_members(runner.remote_pid) == []  # the background children are gone too


def test_kill_from_another_thread_stops_the_remote_command(ssh_conn):
    import threading

    from pgops.dbhost.runners import CommandFailed

    runner = _runner()
    lines: list[str] = []
    threading.Timer(3, runner.kill).start()
    started = time.monotonic()
    with pytest.raises(CommandFailed):
        runner.run(["sh", "-c", "echo started; sleep 300"], timeout_s=600, on_line=lines.append)
    assert time.monotonic() - started < 30 and lines == ["started"]
    assert _pgid_members(runner.remote_pid) == []


def test_host_key_mismatch_is_a_clear_error(sshd, monkeypatch, tmp_path):
    from pgops.dbhost.runners import RunnerAccessDenied

    _keygen(tmp_path / "other_host")
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}",
                       sshd.conn(host_key=(tmp_path / "other_host.pub").read_text().strip()))
    with pytest.raises(RunnerAccessDenied, match=r"host key mismatch for postgres@127\.0\.0\.1:\d+.*the server "
                                                 r"presented ssh-ed25519 SHA256:.*man in the middle.*host_key"):
        _runner().run(["true"], timeout_s=30)


def test_unknown_host_key_is_refused_unless_the_connection_allows_it(sshd, monkeypatch):
    from pgops.dbhost.runners import RunnerAccessDenied

    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", sshd.conn(host_key=None))
    with pytest.raises(RunnerAccessDenied, match="host key of postgres@127.0.0.1.* is unknown.*ssh-keyscan"):
        _runner().run(["true"], timeout_s=30)
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", sshd.conn(host_key=None, no_host_key_check=True))
    assert _runner().run(["true"], timeout_s=30).returncode == 0


def test_auth_failure_is_a_clear_error(sshd, monkeypatch, tmp_path):
    from pgops.dbhost.runners import RunnerAccessDenied

    _keygen(tmp_path / "stranger")
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", sshd.conn(private_key=(tmp_path / "stranger").read_text()))
    started = time.monotonic()
    with pytest.raises(RunnerAccessDenied, match=r"SSH authentication as postgres@127\.0\.0\.1:\d+ failed.*"
                                                 r"authorized_keys"):
        _runner().run(["true"], timeout_s=30)
    assert time.monotonic() - started < 10  # refused once, not retried


def test_run_as_other_than_the_login_is_refused(ssh_conn):
    from pgops.dbhost.runners import RunnerAccessDenied

    with pytest.raises(RunnerAccessDenied, match="run_as is 'barman' but SSH connection"):
        _runner(run_as="barman").run(["true"], timeout_s=30)


def _ssh_inventory(tmp_path: Path) -> Path:
    data = yaml.safe_load((REPO / "include" / "clusters.example.yaml").read_text())
    data["clusters"][0]["runner"] = {"kind": "ssh", "ssh_conn_id": CONN_ID}
    path = tmp_path / "clusters.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.lab
@pytest.mark.airflow
def test_base_backup_dag_through_ssh(lab, run_dag, sshd, ssh_conn, tmp_path, monkeypatch):
    from pgops.airflow.dags.base_backup import build_base_backup_dag
    from pgops.dbhost.runners import SshRunner, get_runner
    from pgops.inventory import load_inventory

    monkeypatch.setenv("PGOPS_INVENTORY", str(_ssh_inventory(tmp_path)))
    cluster = load_inventory().get("main")
    assert isinstance(get_runner(cluster), SshRunner)
    logins_before = sshd.log.read_text().count("Accepted publickey for postgres")
    dr = run_dag(build_base_backup_dag(cluster))
    assert task_states(dr) == {"preflight": "success", "backup": "success", "verify": "success",
                               "retention": "success"}, task_states(dr)
    summary = dr.get_task_instance("verify").xcom_pull(task_ids="verify")
    assert summary["status"] == "DONE" and summary["stored_bytes"] > 0
    # backup, show, catalog, delete, catalog (and preflight): every engine call went through sshd
    assert sshd.log.read_text().count("Accepted publickey for postgres") - logins_before >= 5
    st = lab.load()
    keys = [o["Key"] for o in lab.s3_client().list_objects_v2(
        Bucket=st.bucket, Prefix=f"{st.prefix}/{st.server_name}/base/{summary['backup_id']}/").get("Contents", [])]
    assert any(k.endswith("backup.info") for k in keys), keys


@pytest.mark.lab
@pytest.mark.airflow
def test_restore_verification_dag_through_ssh(lab, run_dag, sshd, ssh_conn, tmp_path, monkeypatch):
    """Every restore-host command (mkdir, barman-cloud-restore, pg_ctl, pg_amcheck, rm) runs through sshd."""
    from pgops.airflow.dags.restore_verify import build_restore_verify_dag
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator
    from pgops.airflow.operators.restore import scratch_paths
    from pgops.inventory import load_inventory

    monkeypatch.setenv("PGOPS_INVENTORY", str(_ssh_inventory(tmp_path)))
    cluster = load_inventory().get("main")
    lab.psql("CREATE TABLE IF NOT EXISTS ssh_rv (id int PRIMARY KEY); "
             "INSERT INTO ssh_rv SELECT g FROM generate_series(1, 1000) g ON CONFLICT DO NOTHING;")
    backup_id = BarmanCloudBackupOperator(task_id="backup", cluster_name="main").execute(
        {"run_id": f"ssh-restore-{os.getpid()}"})
    scratch_root = f"/var/tmp/pgops-restore-ssh-{os.getpid()}"
    logins_before = sshd.log.read_text().count("Accepted publickey for postgres")
    try:
        dag = build_restore_verify_dag(cluster)
        dr = run_dag(dag, {"scratch_root": scratch_root, "backup_id": backup_id, "heapallindexed": False})
        states = task_states(dr)
        assert set(states.values()) == {"success"}, states
        st = lab.load()
        key = f"{st.prefix}/{st.server_name}/pgops/reports/restore-verify/latest.json"
        report = json.loads(lab.s3_client().get_object(Bucket=st.bucket, Key=key)["Body"].read())
        assert report["run_id"] == dr.run_id and report["status"] in ("ok", "warning"), report
        assert report["body"]["backup_id"] == backup_id and report["body"]["checks"]["canary"]["ok"]
        assert report["body"]["restore_host"]["runner"] == "ssh"
        assert sshd.log.read_text().count("Accepted publickey for postgres") - logins_before >= 5
        assert not os.path.exists(scratch_paths(scratch_root, dag.dag_id, dr.run_id)["scratch_dir"])
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)


def test_remote_command_quotes_every_word_and_refuses_unsafe_environment():
    import shlex

    from pgops.dbhost.runners import REMOTE_SCRIPT, SshRunner, _env_block

    argv = ["/opt/x/barman-cloud-backup", "--name", "a b'c", "$(reboot)", "s3://b/p"]
    words = shlex.split(SshRunner(ssh_conn_id=CONN_ID).remote_command(argv, timeout_s=90.4))
    assert words == ["sh", "-c", REMOTE_SCRIPT, "pgops-runner", "90s", *argv]
    assert _env_block({"A": "x y"}) == b"A=x y\n\n"
    with pytest.raises(ValueError, match="newline"):
        _env_block({"PGPASSWORD": "a\nb"})
    with pytest.raises(ValueError, match="not valid"):
        _env_block({"A;rm": "x"})


def _unshare_works() -> bool:
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return res.returncode == 0


@pytest.mark.lab
@pytest.mark.airflow
@pytest.mark.skipif(not shutil.which("unshare"), reason="util-linux unshare is missing")
def test_restore_verification_with_a_restore_root_the_worker_cannot_see(lab, run_dag, tmp_path, monkeypatch):
    """The restore root is a private tmpfs of the ssh host (its own mount namespace, 0700, owned by postgres): the
    worker sees an empty directory there. Setup, restore, the wait (postmaster proof, recovery state, server log),
    the checks (SQL over the host's own socket) and teardown all pass, so none of them reads the worker's files."""
    from pgops.airflow.dags.restore_verify import build_restore_verify_dag
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator
    from pgops.airflow.operators.restore import scratch_paths
    from pgops.inventory import load_inventory

    if not _unshare_works():
        pytest.fail("unshare --mount failed: the private restore root needs CAP_SYS_ADMIN (run the suite as root)")
    root = Path(f"/var/tmp/pgops-private-{os.getpid()}")
    with start_sshd(private_root=root) as server:
        monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", server.conn())
        monkeypatch.setenv("PGOPS_INVENTORY", str(_ssh_inventory(tmp_path)))
        cluster = load_inventory().get("main")
        from pgops.dbhost.host import DbHost

        host = DbHost.for_node(cluster)
        host.run(["touch", f"{root}/only-on-the-host"])
        assert host.exists(f"{root}/only-on-the-host") and not (root / "only-on-the-host").exists()
        assert host.run(["stat", "-c", "%a %U", str(root)], capture=True).stdout.split() == ["700", "postgres"]
        lab.psql("CREATE TABLE IF NOT EXISTS ssh_private (id int PRIMARY KEY); "
                 "INSERT INTO ssh_private SELECT g FROM generate_series(1, 500) g ON CONFLICT DO NOTHING;")
        backup_id = BarmanCloudBackupOperator(task_id="backup", cluster_name="main").execute(
            {"run_id": f"ssh-private-{os.getpid()}"})
        dag = build_restore_verify_dag(cluster)
        dr = run_dag(dag, {"scratch_root": str(root), "backup_id": backup_id, "heapallindexed": False})
        states = task_states(dr)
        assert set(states.values()) == {"success"}, states
        checks = dr.get_task_instance("checks").xcom_pull(task_ids="checks")
        assert checks["checks"]["canary"]["ok"] and checks["checks"]["system_identifier"]["ok"], checks
        assert checks["database_size_bytes"] > 0
        wait = dr.get_task_instance("wait_recovery").xcom_pull(task_ids="wait_recovery")
        assert wait["rto_s"] > 0 and wait["segments_replayed"] >= 1, wait
        scratch = scratch_paths(str(root), dag.dag_id, dr.run_id)["scratch_dir"]
        assert not host.exists(scratch)  # torn down on the host
        assert host.exists(f"{root}/only-on-the-host")  # and nothing else removed
