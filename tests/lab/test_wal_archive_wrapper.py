"""include/dbhost/pgops_wal_archive.py on the real lab: segments archived ahead are in the bucket before
PostgreSQL is told so, a marker that does not match the file is not trusted, a failure records nothing;
the background pusher archives what is ready and stops when its spool goes or PostgreSQL stops."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import pid_in, wait_for

pytestmark = [pytest.mark.lab]

SEGMENTS = [f"0000000100000000000000{n:02X}" for n in range(0xA0, 0xA6)]
# The stand-in segments go under their own server name: in the lab primary's prefix they would be a gap.
FAKE_SERVER = f"walwrap-{os.getpid()}"


def _cluster(lab, parallel: int, server: str | None = None):
    c = lab.cluster
    storage = dataclasses.replace(c.storage, server_name=server) if server else c.storage
    return dataclasses.replace(c, storage=storage, engine=dataclasses.replace(c.engine, wal_archive_parallel=parallel))


def _wal_keys(lab, server: str | None = None) -> set[str]:
    st = lab.load()
    keys = set()
    for page in lab.s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=st.bucket, Prefix=f"{st.prefix}/{server or st.server_name}/wals/"):
        keys |= {o["Key"].rsplit("/", 1)[-1].split(".")[0] for o in page.get("Contents", [])}
    return keys


@pytest.fixture
def fake_pg_wal(lab, tmp_path):
    """A data directory stand-in: pg_wal with six ready segments (a copy of a real segment's bytes)."""
    from pgops.lab import as_db_user

    st = lab.load()
    data = Path("/var/tmp") / f"pgops-walwrap-{os.getpid()}"
    (data / "pg_wal" / "archive_status").mkdir(parents=True)
    real = sorted(n for n in os.listdir(Path(st.pg_data) / "pg_wal") if len(n) == 24)[0]
    for name in SEGMENTS:
        shutil.copyfile(Path(st.pg_data) / "pg_wal" / real, data / "pg_wal" / name)
        (data / "pg_wal" / "archive_status" / f"{name}.ready").touch()
    subprocess.run(["chown", "-R", "postgres:postgres", str(data)], check=False)
    os.chmod(data, 0o755)

    def run(parallel: int, segment: str, *, endpoint=None, env=None, background=False) -> subprocess.CompletedProcess:
        from pgops.engines import barman_cloud

        argv = barman_cloud.archive_command_argv(_cluster(lab, parallel, FAKE_SERVER),
                                                 endpoint_url=endpoint or st.s3_endpoint)
        if not background:
            argv.remove("--background")  # one batch per call: what the call archived is done when it returns
        return subprocess.run(as_db_user(["sh", "-c", f"cd {shlex.quote(str(data))} && {shlex.join(argv)} pg_wal/{segment}"],
                                         env=env or lab.db_env(st)), capture_output=True, text=True, timeout=300)

    yield data, run
    pid = _pusher_pid(data / "pgops_wal_spool")
    shutil.rmtree(data, ignore_errors=True)
    if pid:
        from pgops.procs import stop_pid

        stop_pid(pid, timeout_s=10)


def _pusher_pid(spool: Path) -> int | None:
    return pid_in(spool / ".pusher.pid")


def test_background_pusher_archives_what_is_ready(lab, fake_pg_wal):
    from pgops.procs import pid_alive

    data, run = fake_pg_wal
    spool = data / "pgops_wal_spool"
    status = data / "pg_wal" / "archive_status"
    res = run(2, SEGMENTS[0], background=True)
    assert res.returncode == 0, res.stderr
    assert SEGMENTS[0] in _wal_keys(lab, FAKE_SERVER)  # in the bucket when PostgreSQL is told so
    pid = _pusher_pid(spool)
    assert pid and pid_alive(pid)
    # every ready segment gets archived without another call, each marker only after its upload
    assert wait_for(lambda: all((spool / f"{n}.archived").exists() for n in SEGMENTS)), sorted(os.listdir(spool))
    assert set(SEGMENTS) <= _wal_keys(lab, FAKE_SERVER)
    # PostgreSQL's calls return at once, even with the bucket unreachable (the segment is already there)
    dead = f"http://127.0.0.1:{_free_port()}"
    for n in SEGMENTS:
        assert run(2, n, background=True, endpoint=dead).returncode == 0
        (status / f"{n}.ready").rename(status / f"{n}.done")  # what PostgreSQL does after a success
    # markers of done segments are dropped by the pusher, nothing is archived twice
    assert wait_for(lambda: not list(spool.glob("*.archived"))), sorted(os.listdir(spool))
    # a segment that becomes ready later is archived without a call
    extra = "0000000100000000000000A6"
    shutil.copyfile(data / "pg_wal" / SEGMENTS[0], data / "pg_wal" / extra)
    (status / f"{extra}.ready").touch()
    assert wait_for(lambda: (spool / f"{extra}.archived").exists())
    # removing the spool stops the pusher
    shutil.rmtree(spool)
    assert wait_for(lambda: not pid_alive(pid), 15)


def _free_port() -> int:
    from pgops.lab import free_port

    return free_port()


def test_archives_ahead_and_trusts_only_matching_markers(lab, fake_pg_wal):
    data, run = fake_pg_wal
    spool = data / "pgops_wal_spool"
    res = run(3, SEGMENTS[0])  # batch = 2 x parallel: this segment and the next five ready ones
    assert res.returncode == 0, res.stderr
    assert set(SEGMENTS) <= _wal_keys(lab, FAKE_SERVER)
    assert sorted(p.name for p in spool.iterdir()) == [f"{n}.archived" for n in SEGMENTS[1:]]

    # PostgreSQL's own call for a segment archived ahead returns at once and consumes the marker.
    assert run(3, SEGMENTS[1]).returncode == 0
    assert not (spool / f"{SEGMENTS[1]}.archived").exists()

    # The file changed after it was archived ahead (e.g. a restored copy): the marker is not trusted.
    st = lab.load()
    key = next(k for k in _keys_for(lab, SEGMENTS[2], FAKE_SERVER))
    lab.s3_client().delete_object(Bucket=st.bucket, Key=key)
    os.utime(data / "pg_wal" / SEGMENTS[2], ns=(1, 1))
    for n in SEGMENTS[3:]:
        (data / "pg_wal" / "archive_status" / f"{n}.ready").unlink()
    assert run(2, SEGMENTS[2]).returncode == 0
    assert SEGMENTS[2] in _wal_keys(lab, FAKE_SERVER), "a stale marker was trusted: the segment is not in the bucket"


@pytest.mark.parametrize("background", [False, True])
def test_a_failure_records_nothing(lab, fake_pg_wal, background):
    data, run = fake_pg_wal
    from pgops.lab import free_port

    # nothing listens there; with the pusher, its failed upload sends the call to archive for itself, and fail
    res = run(3, SEGMENTS[0], endpoint=f"http://127.0.0.1:{free_port()}", background=background)
    assert res.returncode != 0
    assert "archive command failed for WAL segment" in res.stderr or "exception" in res.stderr.lower()
    assert not list((data / "pgops_wal_spool").glob("*.archived"))


def test_primary_archives_through_the_wrapper(lab):
    from pgops.engines import barman_cloud

    st = lab.load()
    command = shlex.join(barman_cloud.archive_command_argv(_cluster(lab, 4), endpoint_url=st.s3_endpoint)) + " %p"
    lab.psql("ALTER SYSTEM SET archive_command = '" + command.replace("'", "''") + "'")
    lab.psql("SELECT pg_reload_conf()")
    try:
        lab.psql("CREATE TABLE IF NOT EXISTS wrapfill (x int)")
        failed_before = lab.psql("SELECT failed_count FROM pg_stat_archiver")  # earlier tests break it on purpose
        first = lab.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
        for _ in range(6):
            lab.psql("INSERT INTO wrapfill SELECT generate_series(1, 1000)")
            lab.psql("SELECT pg_switch_wal()")
        last = lab.psql("SELECT pg_walfile_name(pg_current_wal_lsn() - 1)")
        deadline = time.time() + 120
        while time.time() < deadline and lab.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") < last:
            time.sleep(0.5)
        archived = lab.psql("SELECT last_archived_wal FROM pg_stat_archiver")
        assert archived >= last
        keys = _wal_keys(lab)
        wanted = [n for n in sorted(os.listdir(Path(st.pg_data) / "pg_wal")) if len(n) == 24 and first <= n <= archived]
        # Everything PostgreSQL was told is archived is in the bucket (recycled files are checked by range).
        assert all(n in keys for n in wanted)
        assert lab.psql("SELECT failed_count FROM pg_stat_archiver") == failed_before
    finally:
        lab.psql("ALTER SYSTEM RESET archive_command")
        lab.psql("SELECT pg_reload_conf()")


def _keys_for(lab, segment: str, server: str | None = None) -> list[str]:
    st = lab.load()
    resp = lab.s3_client().list_objects_v2(Bucket=st.bucket,
                                           Prefix=f"{st.prefix}/{server or st.server_name}/wals/{segment[:16]}/")
    return [o["Key"] for o in resp.get("Contents", []) if segment in o["Key"]]
