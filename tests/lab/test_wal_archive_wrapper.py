"""include/dbhost/pgops_wal_archive.py on the real lab: segments archived ahead are in the bucket before
PostgreSQL is told so, a marker that does not match the file is not trusted, a failure records nothing;
the background pusher archives what is ready (each segment uploaded once) and stops when its spool goes.
The stand-in segments go to a versioned bucket of their own, so S3 itself counts the uploads."""

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
FAKE_BUCKET = f"pgops-walwrap-{os.getpid()}"  # versioned: every upload is a version


def _cluster(lab, parallel: int, server: str | None = None, bucket: str | None = None):
    c = lab.cluster
    storage = dataclasses.replace(c.storage, server_name=server or c.storage.server_name,
                                  bucket=bucket or c.storage.bucket)
    return dataclasses.replace(c, storage=storage, engine=dataclasses.replace(c.engine, wal_archive_parallel=parallel))


def _wal_keys(lab, server: str | None = None, bucket: str | None = None) -> set[str]:
    st = lab.load()
    keys = set()
    for page in lab.s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket or st.bucket, Prefix=f"{st.prefix}/{server or st.server_name}/wals/"):
        keys |= {o["Key"].rsplit("/", 1)[-1].split(".")[0] for o in page.get("Contents", [])}
    return keys


def _uploads(lab, bucket: str, server: str) -> dict[str, int]:
    """Versions per WAL key: how many times each was uploaded (the bucket is versioned)."""
    st = lab.load()
    counts: dict[str, int] = {}
    for page in lab.s3_client().get_paginator("list_object_versions").paginate(
            Bucket=bucket, Prefix=f"{st.prefix}/{server}/wals/"):
        for v in page.get("Versions", []):
            counts[v["Key"]] = counts.get(v["Key"], 0) + 1
    return counts


@pytest.fixture(scope="module")
def fake_bucket(lab):
    s3 = lab.s3_client()
    s3.create_bucket(Bucket=FAKE_BUCKET)
    s3.put_bucket_versioning(Bucket=FAKE_BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return FAKE_BUCKET


def _empty(lab, bucket: str, prefix: str) -> None:
    s3 = lab.s3_client()
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
            s3.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])


@pytest.fixture
def fake_pg_wal(lab, fake_bucket):
    """A data directory stand-in: pg_wal with six ready segments (a copy of a real segment's bytes)."""
    from pgops.dbhost.engines import barman_cloud
    from pgops.lab.local import as_db_user

    st = lab.load()
    _empty(lab, fake_bucket, f"{st.prefix}/{FAKE_SERVER}/")  # each test counts its own uploads
    root = Path("/var/tmp") / f"pgops-walwrap-{os.getpid()}"
    data = root / "data"
    (data / "pg_wal" / "archive_status").mkdir(parents=True)
    real = sorted(n for n in os.listdir(Path(st.pg_data) / "pg_wal") if len(n) == 24)[0]
    for name in SEGMENTS:
        shutil.copyfile(Path(st.pg_data) / "pg_wal" / real, data / "pg_wal" / name)
        (data / "pg_wal" / "archive_status" / f"{name}.ready").touch()
    subprocess.run(["chown", "-R", "postgres:postgres", str(root)], check=False)
    os.chmod(root, 0o755)
    os.chmod(data, 0o755)

    def run(parallel: int, segment: str, *, endpoint=None, env=None, background=False) -> subprocess.CompletedProcess:
        argv = barman_cloud.archive_command_argv(_cluster(lab, parallel, FAKE_SERVER, fake_bucket),
                                                 endpoint_url=endpoint or st.s3_endpoint)
        if not background:
            argv.remove("--background")  # one batch per call: what the call archived is done when it returns
        return subprocess.run(as_db_user(["sh", "-c", f"cd {shlex.quote(str(data))} && {shlex.join(argv)} pg_wal/{segment}"],
                                         env=env or lab.db_env(st)), capture_output=True, text=True, timeout=300)

    yield data, run
    pid = _pusher_pid(_spool(data))
    shutil.rmtree(root, ignore_errors=True)
    if pid:
        from pgops.dbhost.procs import stop_pid

        stop_pid(pid, timeout_s=10)


def _spool(data: Path) -> Path:
    """The wrapper's default spool: next to the data directory, not in it."""
    from pgops.dbhost.engines import barman_cloud

    return Path(barman_cloud.wal_archive_spool_dir(str(data)))


def _pusher_pid(spool: Path) -> int | None:
    return pid_in(spool / ".pusher.pid")


def _bad_credentials_env(lab, tmp: Path) -> dict[str, str]:
    """The DB host's environment with keys the bucket refuses: any upload fails."""
    creds = tmp / "bad-credentials"
    creds.write_text("[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n")
    subprocess.run(["chown", "postgres:postgres", str(creds)], check=False)
    os.chmod(creds, 0o600)
    return {**lab.db_env(lab.load()), "AWS_SHARED_CREDENTIALS_FILE": str(creds)}


def test_background_pusher_archives_what_is_ready(lab, fake_pg_wal):
    from pgops.dbhost.procs import pid_alive

    data, run = fake_pg_wal
    spool = _spool(data)
    status = data / "pg_wal" / "archive_status"
    res = run(2, SEGMENTS[0], background=True)
    assert res.returncode == 0, res.stderr
    assert SEGMENTS[0] in _wal_keys(lab, FAKE_SERVER, FAKE_BUCKET)  # in the bucket when PostgreSQL is told so
    assert not (data / "pgops_wal_spool").exists()  # nothing of the wrapper in the data directory
    pid = _pusher_pid(spool)
    assert pid and pid_alive(pid)
    # every ready segment gets archived without another call, each marker only after its upload
    assert wait_for(lambda: all((spool / f"{n}.archived").exists() for n in SEGMENTS)), sorted(os.listdir(spool))
    assert set(SEGMENTS) <= _wal_keys(lab, FAKE_SERVER, FAKE_BUCKET)
    # PostgreSQL's calls return from the markers, even with credentials the bucket refuses (no upload is tried)
    bad = _bad_credentials_env(lab, data.parent)
    for n in SEGMENTS:
        res = run(2, n, background=True, env=bad)
        assert res.returncode == 0, res.stderr
        (status / f"{n}.ready").rename(status / f"{n}.done")  # what PostgreSQL does after a success
    # markers of done segments are dropped by the pusher
    assert wait_for(lambda: not list(spool.glob("*.archived"))), sorted(os.listdir(spool))
    # nothing was archived twice: one version (one upload) per segment
    uploads = _uploads(lab, FAKE_BUCKET, FAKE_SERVER)
    assert {k.rsplit("/", 1)[-1].split(".")[0] for k in uploads} == set(SEGMENTS)
    assert set(uploads.values()) == {1}, uploads
    # a segment that becomes ready later is archived without a call
    extra = "0000000100000000000000A6"
    shutil.copyfile(data / "pg_wal" / SEGMENTS[0], data / "pg_wal" / extra)
    (status / f"{extra}.ready").touch()
    assert wait_for(lambda: (spool / f"{extra}.archived").exists())
    # removing the spool stops the pusher
    shutil.rmtree(spool)
    assert wait_for(lambda: not pid_alive(pid), 15)


def test_archives_ahead_and_trusts_only_matching_markers(lab, fake_pg_wal):
    data, run = fake_pg_wal
    spool = _spool(data)
    res = run(3, SEGMENTS[0])  # batch = 2 x parallel: this segment and the next five ready ones
    assert res.returncode == 0, res.stderr
    assert set(SEGMENTS) <= _wal_keys(lab, FAKE_SERVER, FAKE_BUCKET)
    assert sorted(p.name for p in spool.iterdir()) == [f"{n}.archived" for n in SEGMENTS[1:]]

    # PostgreSQL's own call for a segment archived ahead returns at once and consumes the marker.
    assert run(3, SEGMENTS[1]).returncode == 0
    assert not (spool / f"{SEGMENTS[1]}.archived").exists()

    # The file changed after it was archived ahead (e.g. a restored copy): the marker is not trusted.
    key = next(k for k in _keys_for(lab, SEGMENTS[2], FAKE_SERVER, FAKE_BUCKET))
    lab.s3_client().delete_object(Bucket=FAKE_BUCKET, Key=key)
    os.utime(data / "pg_wal" / SEGMENTS[2], ns=(1, 1))
    for n in SEGMENTS[3:]:
        (data / "pg_wal" / "archive_status" / f"{n}.ready").unlink()
    assert run(2, SEGMENTS[2]).returncode == 0
    assert SEGMENTS[2] in _wal_keys(lab, FAKE_SERVER, FAKE_BUCKET), \
        "a stale marker was trusted: the segment is not in the bucket"


@pytest.mark.parametrize("background", [False, True])
def test_a_failure_records_nothing(lab, fake_pg_wal, background):
    data, run = fake_pg_wal
    from pgops.lab.local import free_port

    # nothing listens there; with the pusher, its failed upload sends the call to archive for itself, and fail
    res = run(3, SEGMENTS[0], endpoint=f"http://127.0.0.1:{free_port()}", background=background)
    assert res.returncode != 0
    assert "archive command failed for WAL segment" in res.stderr or "exception" in res.stderr.lower()
    assert not list(_spool(data).glob("*.archived"))


@pytest.mark.parametrize("parallel", [1, 4])
def test_primary_archives_through_the_wrapper(lab, parallel):
    from pgops.core import wal
    from pgops.dbhost.engines import barman_cloud

    st = lab.load()
    argv = barman_cloud.archive_command_argv(_cluster(lab, parallel), endpoint_url=st.s3_endpoint)
    assert argv[0].endswith("/pgops-wal-archive")  # at parallel 1 too: never the bare CLI, which overwrites
    command = shlex.join(argv) + " %p"
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
        # Everything PostgreSQL was told is archived is in the bucket: every name from first to the last
        # archived (computed, so segments already recycled out of pg_wal are checked too)
        wanted = list(wal.segment_range(first, archived[:24]))
        assert len(wanted) >= 6
        assert [n for n in wanted if n not in keys] == []
        assert lab.psql("SELECT failed_count FROM pg_stat_archiver") == failed_before
    finally:
        lab.psql("ALTER SYSTEM RESET archive_command")
        lab.psql("SELECT pg_reload_conf()")


def _keys_for(lab, segment: str, server: str | None = None, bucket: str | None = None) -> list[str]:
    st = lab.load()
    resp = lab.s3_client().list_objects_v2(Bucket=bucket or st.bucket,
                                           Prefix=f"{st.prefix}/{server or st.server_name}/wals/{segment[:16]}/")
    return [o["Key"] for o in resp.get("Contents", []) if segment in o["Key"]]
