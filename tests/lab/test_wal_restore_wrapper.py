"""include/dbhost/pgops_wal_restore.py on the real lab S3 with barman's own code: segments come out of the
spool ahead of PostgreSQL's calls, whole and in order; whatever the prefetcher cannot deliver (not in the
bucket, a broken object) gets barman-cloud-wal-restore's own answer; timeline history files come from the
prefetcher, a missing one answered from a fresh listing; it stops when its spool goes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import lz4.frame
import pytest
from helpers import pid_in, wait_for

from pgops.core import restore as core
from pgops.dbhost.engines import barman_cloud
from pgops.lab.local import as_db_user, pid_alive, stop_pid

pytestmark = [pytest.mark.lab]

SERVER = f"walrestore-{os.getpid()}"
TL1 = [f"0000000100000000000000{n:02X}" for n in range(0xF8, 0x100)] + \
      [f"0000000100000001000000{n:02X}" for n in range(0x00, 0x04)]  # crosses into the next log file
BROKEN = "000000010000000100000004"  # in the bucket, but not a valid lz4 frame
TL2 = [f"0000000200000001000000{n:02X}" for n in range(0x02, 0x06)]


def _body(name: str) -> bytes:
    return name.encode() * 2048 + os.urandom(1024)


@pytest.fixture(scope="module")
def archive(lab):
    """Stand-in segments under their own server name (lz4, as barman-cloud-wal-archive names them)."""
    st = lab.load()
    s3 = lab.s3_client()
    root = f"{st.prefix}/{SERVER}/wals"
    bodies = {}
    for name in TL1 + TL2:
        bodies[name] = _body(name)
        s3.put_object(Bucket=st.bucket, Key=f"{root}/{name[:16]}/{name}.lz4", Body=lz4.frame.compress(bodies[name]))
    s3.put_object(Bucket=st.bucket, Key=f"{root}/{BROKEN[:16]}/{BROKEN}.lz4", Body=b"\x04\x22\x4d\x18garbage")
    s3.put_object(Bucket=st.bucket, Key=f"{root}/00000002.history.lz4",
                  Body=lz4.frame.compress(b"1\t1/2000000\tno recovery target specified\n"))
    yield bodies
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=st.bucket, Prefix=f"{st.prefix}/{SERVER}/"):
        for o in page.get("Contents", []):
            s3.delete_object(Bucket=st.bucket, Key=o["Key"])


@pytest.fixture
def restore(lab, archive):
    """A scratch pg_wal and spool, and a function running the restore_command as PostgreSQL would."""
    st = lab.load()
    area = Path("/var/tmp") / f"pgops-walrestore-{os.getpid()}"
    (area / "pg_wal").mkdir(parents=True)
    subprocess.run(["chown", "-R", "postgres:postgres", str(area)], check=False)
    os.chmod(area, 0o755)
    spool = area / "spool"
    cluster = dataclasses.replace(lab.cluster, storage=dataclasses.replace(lab.cluster.storage, server_name=SERVER))

    def run(name: str, *, endpoint: str | None = None) -> tuple[subprocess.CompletedProcess, bytes | None]:
        """As PostgreSQL: %p is pg_wal/RECOVERYXLOG, used only when the command exits 0."""
        argv = barman_cloud.wal_restore_argv(cluster, endpoint_url=endpoint or st.s3_endpoint, parallel=2,
                                             spool_dir=str(spool))
        dest = area / "pg_wal" / "RECOVERYXLOG"
        dest.unlink(missing_ok=True)
        command = core.restore_command(argv).replace("%f", name).replace("%p", "pg_wal/RECOVERYXLOG")
        res = subprocess.run(as_db_user(["sh", "-c", f"cd {area} && {command}"], env=lab.db_env(st)),
                             capture_output=True, text=True, timeout=600)
        return res, dest.read_bytes() if res.returncode == 0 else None

    def warm(start: str, *, endpoint: str | None = None) -> subprocess.CompletedProcess:
        """The restore step's call before PostgreSQL starts: the prefetcher begins at the recovery's first segment."""
        argv = barman_cloud.wal_prefetch_start_argv(cluster, endpoint_url=endpoint or st.s3_endpoint, parallel=2,
                                                    spool_dir=str(spool), start_segment=start)
        return subprocess.run(as_db_user(argv, env=lab.db_env(st)), capture_output=True, text=True, timeout=60)

    run.warm = warm
    yield area, spool, run
    pid = _pid(spool)
    shutil.rmtree(area, ignore_errors=True)
    if pid and pid_alive(pid):
        stop_pid(pid, timeout_s=10)


def _pid(spool: Path) -> int | None:
    return pid_in(spool / ".prefetcher.pid")


def test_segments_come_from_the_spool_whole_and_in_order(restore, archive):
    area, spool, run = restore
    first, body = run(TL1[0])
    assert first.returncode == 0, first.stderr
    assert body == archive[TL1[0]]
    pid = _pid(spool)
    assert pid and pid_alive(pid)
    # depth 2 x --parallel: the next four segments wait in the spool, complete (no temporary file left visible)
    assert wait_for(lambda: all((spool / n).exists() for n in TL1[1:5])), sorted(os.listdir(spool))
    assert not (spool / TL1[5]).exists()

    # PostgreSQL's next calls: served by the spool even when the bucket is unreachable for barman
    dead = "http://127.0.0.1:9"
    for name in TL1[1:BROKEN_INDEX]:
        assert wait_for(lambda n=name: (spool / n).exists()), (name, sorted(os.listdir(spool)))
        res, body = run(name, endpoint=dead)
        assert res.returncode == 0, (name, res.stderr)
        assert body == archive[name], name
    assert _pid(spool) == pid  # one prefetcher for the whole recovery

    # a broken object: no partial file in the spool, barman-cloud-wal-restore's own failure reaches PostgreSQL
    res, _ = run(BROKEN)
    assert res.returncode != 0
    assert not (spool / BROKEN).exists()
    assert not any(n.startswith(".tmp-") for n in os.listdir(spool))

    # the end of the archive on this timeline: barman's "does not exist" answer, nothing written
    res, _ = run("000000010000000100000010")
    assert res.returncode != 0 and "does not exist" in res.stderr

    # a history file comes from the prefetcher too (barman's bucket is unreachable for this call)
    res, body = run("00000002.history", endpoint=dead)
    assert res.returncode == 0, res.stderr
    assert body.startswith(b"1\t1/2000000")
    # a history file the archive does not have: exit 1, as barman-cloud-wal-restore's "does not exist" (with the
    # unreachable bucket barman itself would have failed otherwise, with exit 4)
    res, body = run("00000003.history", endpoint=dead)
    assert res.returncode == 1 and "does not exist" in res.stderr and body is None
    assert not (spool / "00000003.history").exists()

    # a new timeline: the prefetcher follows it
    res, body = run(TL2[0])
    assert res.returncode == 0 and body == archive[TL2[0]]
    assert wait_for(lambda: all((spool / n).exists() for n in TL2[1:4])), sorted(os.listdir(spool))
    assert not [n for n in os.listdir(spool) if n.startswith("00000001") and len(n) == 24]  # old timeline: gone

    # removing the spool (the restore's teardown) stops it
    shutil.rmtree(spool)
    assert wait_for(lambda: not pid_alive(pid), 15)


BROKEN_INDEX = TL1.index("000000010000000100000003") + 1


def test_prefetcher_stops_by_pid_and_cleans_up(restore):
    area, spool, run = restore
    assert run(TL1[2])[0].returncode == 0
    pid = _pid(spool)
    assert pid and wait_for(lambda: (spool / TL1[3]).exists())
    stop_pid(pid, timeout_s=10)
    assert not pid_alive(pid)
    # what it fetched and nobody took is gone with it; the next call starts a new one
    assert not any(n.startswith("0000") for n in os.listdir(spool)), sorted(os.listdir(spool))
    assert run(TL1[3])[0].returncode == 0
    assert _pid(spool) not in (None, pid)


def test_warm_start_fills_the_spool_before_the_first_call(restore, archive):
    area, spool, run = restore
    res = run.warm(TL1[1])
    assert res.returncode == 0, res.stderr
    pid = _pid(spool)
    assert pid and pid_alive(pid)
    # the first segment and the ones after it arrive without any restore_command call
    assert wait_for(lambda: all((spool / n).exists() for n in TL1[1:6])), sorted(os.listdir(spool))
    # PostgreSQL's first call is a move out of the spool: it works with barman's bucket unreachable
    res, body = run(TL1[1], endpoint="http://127.0.0.1:9")
    assert res.returncode == 0 and body == archive[TL1[1]]
    assert run.warm(TL1[1]).returncode == 0 and _pid(spool) == pid  # a second warm start: the same prefetcher
    # recovery asking for an earlier segment (a backup that starts sooner) still gets it
    res, body = run(TL1[0])
    assert res.returncode == 0 and body == archive[TL1[0]]


def test_warm_start_refuses_a_name_that_is_not_a_segment(restore):
    area, spool, run = restore
    res = run.warm("../../etc/passwd")
    assert res.returncode != 0 and "is not a WAL segment name" in res.stderr
    assert not spool.exists() or not os.listdir(spool)
