"""The WAL archive is exact (include/dbhost/pgops_wal_archive.py through the engine's archive_command, on the real
lab): a moved archive_command is obeyed at once, even with the pusher busy; the pusher stops with PostgreSQL when
pg_wal is a symlink; an archived file is never overwritten (other content fails, the same content is one upload);
an orphan .ready does not stall archiving; the spool is not in a base backup, and one others can write is not
trusted; the pusher's log is capped. With wal_archive_parallel 1 (no pusher) and for timeline history files the
overwrite check is the same, and PostgreSQL sees the refusal as an archive failure.

Scratch PostgreSQL clusters (1 MiB WAL segments, pg_wal a symlink to its own directory) archive under server
names of their own; stand-in data directories go to a versioned bucket, so S3 itself counts the uploads."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers import pid_in, wait_for

pytestmark = [pytest.mark.lab]

SEGMENT_BYTES = 1 << 20  # the scratch clusters' --wal-segsize
SEGMENTS = [f"0000000100000000000000{n:02X}" for n in range(0xA0, 0xA4)]
BUCKET = f"pgops-walx-{os.getpid()}"  # versioned: every upload is a version
_names = itertools.count(1)


def _server(what: str) -> str:
    return f"walx-{what}-{os.getpid()}-{next(_names)}"


def _cluster(lab, server: str, *, bucket: str | None = None, parallel: int = 2, compression: str | None = None):
    c = lab.cluster
    engine = dataclasses.replace(c.engine, wal_archive_parallel=parallel,
                                 wal_compression=compression or c.engine.wal_compression)
    storage = dataclasses.replace(c.storage, server_name=server, bucket=bucket or c.storage.bucket)
    return dataclasses.replace(c, storage=storage, engine=engine)


def _archive_command(lab, cluster) -> str:
    from pgops.dbhost.engines import barman_cloud

    return shlex.join(barman_cloud.archive_command_argv(cluster, endpoint_url=lab.load().s3_endpoint)) + " %p"


def _keys(lab, server: str, bucket: str | None = None) -> dict[str, str]:
    """WAL file name -> key, under a server's wals/."""
    st = lab.load()
    out = {}
    for page in lab.s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket or st.bucket, Prefix=f"{st.prefix}/{server}/wals/"):
        for o in page.get("Contents", []):
            base = o["Key"].rsplit("/", 1)[-1]
            out[base.split(".")[0] if len(base.split(".")[0]) == 24 else base] = o["Key"]
    return out


def _versions(lab, bucket: str, server: str) -> dict[str, list[dict]]:
    st = lab.load()
    out: dict[str, list[dict]] = {}
    for page in lab.s3_client().get_paginator("list_object_versions").paginate(
            Bucket=bucket, Prefix=f"{st.prefix}/{server}/wals/"):
        for v in page.get("Versions", []):
            out.setdefault(v["Key"], []).append(v)
    return out


def _versions_of(lab, bucket: str, server: str, name: str) -> dict[str, list[dict]]:
    """The versions of one WAL file's keys (its name, any compression suffix)."""
    return {k: v for k, v in _versions(lab, bucket, server).items()
            if k.rsplit("/", 1)[-1] == name or k.rsplit("/", 1)[-1].startswith(name + ".")}


def _peer_archive(lab, server: str, bucket: str, path: Path, *, compression: str | None = None) -> None:
    """Archive a file with the bare barman-cloud-wal-archive (a peer, e.g. another primary)."""
    from pgops.dbhost.engines import barman_cloud
    from pgops.lab.local import as_db_user

    st = lab.load()
    argv = barman_cloud.wal_archive_argv(_cluster(lab, server, bucket=bucket, compression=compression),
                                         endpoint_url=st.s3_endpoint)
    subprocess.run(as_db_user([*argv, str(path)], env=lab.db_env(st)), check=True, capture_output=True)


def _spool(data: Path) -> Path:
    from pgops.dbhost.engines import barman_cloud

    return Path(barman_cloud.wal_archive_spool_dir(str(data)))


def _stop_pusher(data: Path) -> None:
    from pgops.dbhost.procs import stop_pid

    pid = pid_in(_spool(data) / ".pusher.pid")
    if pid:
        stop_pid(pid, timeout_s=15)


# -- scratch PostgreSQL ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class ScratchPg:
    lab: object
    root: Path
    port: int
    pid: int | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    def psql(self, sql: str) -> str:
        from pgops.lab.local import PG_BIN, as_db_user

        res = subprocess.run(as_db_user([str(PG_BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                                         "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres",
                                         "-d", "postgres", "-f", "-"]), input=sql, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def set_archive_command(self, command: str) -> None:
        self.psql("ALTER SYSTEM SET archive_command = '" + command.replace("'", "''") + "'")
        self.psql("SELECT pg_reload_conf()")

    def start(self) -> None:
        from pgops.lab.local import PG_BIN, as_db_user

        subprocess.run(as_db_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "pg.log"),
                                   "-w", "-t", "60", "start"], env=self.lab.db_env(self.lab.load())),
                       check=True, capture_output=True)
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        from pgops.dbhost.procs import pid_alive, stop_pid
        from pgops.lab.local import PG_BIN, as_db_user

        if pid_alive(self.pid):
            subprocess.run(as_db_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30",
                                       "stop"]), capture_output=True)
            stop_pid(self.pid, timeout_s=10)
        self.pid = None

    def switch(self, n: int) -> None:
        """n segments made ready at once: each loop writes WAL, then switches (one transaction, whose commit lands
        in the next segment: switched by itself last)."""
        self.psql("CREATE TABLE IF NOT EXISTS fill (x int)")
        self.psql(f"DO $$ BEGIN FOR i IN 1..{n - 1} LOOP INSERT INTO fill SELECT generate_series(1, 200); "
                  "PERFORM pg_switch_wal(); END LOOP; END $$")
        self.psql("SELECT pg_switch_wal()")

    def wait_archived(self, last: str, timeout_s: float = 120) -> str:
        def reached() -> bool:
            return self.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")[:24] >= last
        assert wait_for(reached, timeout_s), self.psql("SELECT * FROM pg_stat_archiver")
        return self.psql("SELECT last_archived_wal FROM pg_stat_archiver")

    def last_switched(self) -> str:
        return self.psql("SELECT pg_walfile_name(pg_current_wal_lsn() - 1)")


@pytest.fixture
def scratch_pg(lab):
    """A PostgreSQL 15 cluster whose pg_wal is a symlink to its own directory, archiving through the wrapper."""
    from pgops.lab.local import PG_BIN, _chown_db_user, as_db_user, free_port

    made: list[ScratchPg] = []

    def make(cluster) -> ScratchPg:
        root = Path(tempfile.mkdtemp(prefix="pgops-walx-", dir="/var/tmp"))
        os.chmod(root, 0o755)
        pg = ScratchPg(lab=lab, root=root, port=free_port())
        made.append(pg)
        pg.socket_dir.mkdir()
        _chown_db_user(root)
        subprocess.run(as_db_user([str(PG_BIN / "initdb"), "-D", str(pg.data), "--waldir", str(root / "walvol"),
                                   "--wal-segsize", "1", "-U", "postgres", "--auth-local=trust", "-E", "UTF8",
                                   "--locale=C.UTF-8"]), check=True, capture_output=True)
        conf = {"listen_addresses": "", "port": str(pg.port), "unix_socket_directories": str(pg.socket_dir),
                "wal_level": "replica", "archive_mode": "on", "archive_command": _archive_command(lab, cluster),
                "shared_buffers": "16MB", "max_wal_size": "64MB", "min_wal_size": "8MB", "logging_collector": "off"}
        with open(pg.data / "postgresql.auto.conf", "a") as fh:
            fh.write("".join(f"{k} = '{v.replace(chr(39), chr(39) * 2)}'\n" for k, v in conf.items()))
        pg.start()
        return pg

    yield make
    for pg in made:
        pg.stop()
        _stop_pusher(pg.data)
        shutil.rmtree(pg.root, ignore_errors=True)


def test_moved_archive_command_is_obeyed_while_the_pusher_is_busy(lab, scratch_pg):
    from pgops.core import wal
    from pgops.dbhost.procs import pid_alive

    old, new = _server("old"), _server("new")
    pg = scratch_pg(_cluster(lab, old, parallel=2))
    pg.switch(2)
    pg.wait_archived(pg.last_switched())
    old_pusher = pid_in(_spool(pg.data) / ".pusher.pid")
    assert old_pusher and pid_alive(old_pusher)

    pg.switch(60)  # a backlog: the pusher is busy uploading to the old destination
    ready = [n for n in os.listdir(pg.data / "pg_wal" / "archive_status") if n.endswith(".ready")]
    assert len(ready) > 10, ready
    pg.set_archive_command(_archive_command(lab, _cluster(lab, new, parallel=2)))
    first = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")  # switched after the reload
    pg.switch(10)
    last = pg.last_switched()

    # whenever PostgreSQL has heard "archived", the segments switched after the reload are at the new destination
    deadline = time.monotonic() + 180
    while True:
        archived = pg.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")[:24]
        at_new = _keys(lab, new)
        if archived >= first:
            told = list(wal.segment_range(first, archived, SEGMENT_BYTES))
            assert [n for n in told if n not in at_new] == [], f"PostgreSQL was told {archived} is archived"
        if archived >= last or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert archived >= last
    wanted = list(wal.segment_range(first, last, SEGMENT_BYTES))
    assert len(wanted) >= 10 and all(n in _keys(lab, new) for n in wanted)
    assert wait_for(lambda: not pid_alive(old_pusher), 10)  # the old pusher stopped
    assert pid_in(_spool(pg.data) / ".pusher.pid") not in (None, old_pusher)
    assert pg.psql("SELECT failed_count FROM pg_stat_archiver") == "0"


def test_pusher_stops_with_postgres_when_pg_wal_is_a_symlink(lab, scratch_pg):
    from pgops.dbhost.procs import pid_alive

    pg = scratch_pg(_cluster(lab, _server("symlink")))
    assert (pg.data / "pg_wal").is_symlink()
    pg.switch(3)
    pg.wait_archived(pg.last_switched())
    pusher = pid_in(_spool(pg.data) / ".pusher.pid")
    assert pusher and pid_alive(pusher)
    pg.stop()
    # well before the pusher's idle timeout (60 s): it watches the data directory's postmaster.pid
    assert wait_for(lambda: not pid_alive(pusher), 15), (_spool(pg.data) / ".pusher.log").read_text()
    assert "PostgreSQL stopped" in (_spool(pg.data) / ".pusher.log").read_text()


def test_spool_is_not_in_a_base_backup(lab, scratch_pg, db_tmp_path):
    from pgops.dbhost.engines import barman_cloud
    from pgops.lab.local import as_db_user

    server = _server("backup")
    cluster = _cluster(lab, server)
    pg = scratch_pg(cluster)
    legacy = pg.data / "pgops_wal_spool"  # where the spool used to be: in the data directory
    legacy.mkdir()
    (legacy / "000000010000000000000001.archived").write_text("1 2 3\n")
    subprocess.run(["chown", "-R", "postgres:postgres", str(legacy)], check=True)
    pg.switch(3)
    pg.wait_archived(pg.last_switched())
    spool = _spool(pg.data)
    assert spool.parent == pg.data.parent and (spool / ".pusher.log").exists() and (spool / ".called").exists()
    assert not legacy.exists()  # dropped by the wrapper (no pusher worked in it)

    st = lab.load()
    env = lab.db_env(st)
    argv = barman_cloud.backup_argv(cluster, endpoint_url=st.s3_endpoint, backup_name="spool-proof",
                                    pg_host=str(pg.socket_dir), pg_port=pg.port, pg_user="postgres")
    res = subprocess.run(as_db_user(argv, env=env), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    target = db_tmp_path / "restored"
    subprocess.run(["chown", "postgres:postgres", str(db_tmp_path)], check=True)
    argv = barman_cloud.restore_argv(cluster, endpoint_url=st.s3_endpoint, backup_id="spool-proof",
                                     destination_dir=str(target))
    subprocess.run(as_db_user(argv, env=env), check=True, capture_output=True, timeout=300)
    restored = [str(p.relative_to(target)) for p in target.rglob("*")]
    assert "PG_VERSION" in restored and "global/pg_control" in restored
    assert not [p for p in restored if "pgops" in p or p.endswith((".archived", ".pusher.log"))], restored


def test_parallel_1_refuses_other_content_and_postgres_sees_the_failure(lab, scratch_pg, versioned_bucket):
    server = _server("p1")
    pg = scratch_pg(_cluster(lab, server, bucket=versioned_bucket, parallel=1))
    command = pg.psql("SHOW archive_command")
    assert "pgops-wal-archive" in command and "--in-process" in command and "--background" not in command
    pg.psql("CREATE TABLE fill (x int)")
    pg.psql("INSERT INTO fill SELECT generate_series(1, 200)")
    seg = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")  # the next switch makes it ready
    peer = pg.root / "peer"
    peer.mkdir()
    (peer / seg).write_bytes(b"another history " * (SEGMENT_BYTES // 16))  # a split brain's segment of that name
    subprocess.run(["chown", "-R", "postgres:postgres", str(peer)], check=True)
    _peer_archive(lab, server, versioned_bucket, peer / seg)
    before = _versions_of(lab, versioned_bucket, server, seg)
    assert len(before) == 1

    pg.psql("SELECT pg_switch_wal()")
    # PostgreSQL tries three times in a row: all refused, no upload
    assert wait_for(lambda: int(pg.psql("SELECT failed_count FROM pg_stat_archiver")) >= 3, 60), \
        pg.psql("SELECT * FROM pg_stat_archiver")
    assert pg.psql("SELECT last_failed_wal FROM pg_stat_archiver") == seg
    assert pg.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")[:24] < seg
    assert (pg.data / "pg_wal" / "archive_status" / f"{seg}.ready").exists()
    assert _versions_of(lab, versioned_bucket, server, seg) == before
    log = (pg.root / "pg.log").read_text()
    line = next(x for x in log.splitlines() if "refusing to overwrite" in x)
    assert seg in line and next(iter(before)) in line and "Fix:" in line
    assert f"archive command failed for WAL segment {seg}" in log
    assert not (_spool(pg.data) / ".pusher.pid").exists()  # no pusher at parallel 1

    # The fix: the other copy is moved aside, and this segment's own bytes were archived meanwhile (e.g. by a
    # call that died before PostgreSQL heard of it): PostgreSQL's next call succeeds without another upload.
    s3 = lab.s3_client()
    s3.delete_object(Bucket=versioned_bucket, Key=next(iter(before)))
    shutil.copyfile(pg.data / "pg_wal" / seg, peer / seg)
    subprocess.run(["chown", "postgres:postgres", str(peer / seg)], check=True)
    _peer_archive(lab, server, versioned_bucket, peer / seg)
    archived_once = _versions_of(lab, versioned_bucket, server, seg)
    pg.psql("INSERT INTO fill SELECT generate_series(1, 200)")
    pg.psql("SELECT pg_switch_wal()")  # wakes the archiver
    pg.wait_archived(pg.last_switched())
    assert _versions_of(lab, versioned_bucket, server, seg) == archived_once
    assert f"{seg} is already archived with the same content" in (pg.root / "pg.log").read_text()


# -- stand-in data directories --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def versioned_bucket(lab):
    s3 = lab.s3_client()
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return BUCKET


@dataclasses.dataclass
class StandIn:
    lab: object
    data: Path
    bucket: str

    def run(self, server: str, segment: str, *, background: bool, env=None, compression: str | None = None,
            parallel: int = 2) -> subprocess.CompletedProcess:
        """The engine's archive_command for ``segment``; background=False without its pusher (parallel 1 has
        none anyway)."""
        from pgops.dbhost.engines import barman_cloud
        from pgops.lab.local import as_db_user

        st = self.lab.load()
        argv = barman_cloud.archive_command_argv(_cluster(self.lab, server, bucket=self.bucket, parallel=parallel,
                                                          compression=compression), endpoint_url=st.s3_endpoint)
        assert ("--background" in argv) == (parallel > 1)
        if not background and "--background" in argv:
            argv.remove("--background")
        cmd = f"cd {shlex.quote(str(self.data))} && {shlex.join(argv)} pg_wal/{segment}"
        return subprocess.run(as_db_user(["sh", "-c", cmd], env=env or self.lab.db_env(st)), capture_output=True,
                              text=True, timeout=300)

    def peer_archive(self, server: str, path: Path, *, compression: str | None = None) -> None:
        _peer_archive(self.lab, server, self.bucket, path, compression=compression)


@pytest.fixture
def stand_in(lab, versioned_bucket):
    """A data directory stand-in: pg_wal with four ready segments (copies of a real segment's bytes)."""
    st = lab.load()
    root = Path(tempfile.mkdtemp(prefix="pgops-walx-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    data = root / "data"
    (data / "pg_wal" / "archive_status").mkdir(parents=True)
    real = sorted(n for n in os.listdir(Path(st.pg_data) / "pg_wal") if len(n) == 24)[0]
    for name in SEGMENTS:
        shutil.copyfile(Path(st.pg_data) / "pg_wal" / real, data / "pg_wal" / name)
        (data / "pg_wal" / "archive_status" / f"{name}.ready").touch()
    (root / "peer").mkdir()  # another server's files of the same names
    subprocess.run(["chown", "-R", "postgres:postgres", str(root)], check=True)
    yield StandIn(lab=lab, data=data, bucket=versioned_bucket)
    _stop_pusher(data)
    shutil.rmtree(root, ignore_errors=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# (wal_archive_parallel, pusher): the engine's parallel-1 command, a call archiving a batch itself, the pusher
MODES = [pytest.param(1, False, id="parallel-1"), pytest.param(2, False, id="batch"),
         pytest.param(2, True, id="pusher")]


@pytest.mark.parametrize(("parallel", "background"), MODES)
def test_different_content_is_never_overwritten(lab, stand_in, parallel, background):
    server = _server("conflict")
    seg = SEGMENTS[0]
    other = stand_in.data.parent / "peer" / seg
    shutil.copyfile(stand_in.data / "pg_wal" / seg, other)
    with open(other, "r+b") as fh:  # a split brain: the other primary's segment of that name differs
        fh.seek(4096)
        fh.write(b"another history")
    # the peer archived it gzip-compressed; this server's command uses lz4: a conflict across suffixes too
    stand_in.peer_archive(server, other, compression="gzip")
    def of_seg() -> dict:
        return {k: v for k, v in _versions(lab, stand_in.bucket, server).items() if seg in k}

    before = of_seg()
    assert len(before) == 1
    res = stand_in.run(server, seg, background=background, parallel=parallel)
    assert res.returncode != 0
    line = next(x for x in res.stderr.splitlines() if "refusing to overwrite" in x)
    assert _sha256(other) in line and _sha256(stand_in.data / "pg_wal" / seg) in line
    assert f"{seg}.gz" in line and "Fix:" in line
    assert of_seg() == before  # unchanged: no upload, no second key (.lz4)
    assert not list(_spool(stand_in.data).glob(f"{seg}.archived"))
    if background:  # the pusher found it first and logged it the same way
        assert wait_for(lambda: "refusing to overwrite" in (_spool(stand_in.data) / ".pusher.log").read_text(), 10)
    if parallel == 1:  # the call archived its own segment only, without a pusher
        assert not (_spool(stand_in.data) / ".pusher.pid").exists()
        assert {n for n in _keys(lab, server, stand_in.bucket) if n in SEGMENTS} == {seg}


@pytest.mark.parametrize(("parallel", "background"), MODES)
def test_the_same_content_is_success_with_one_upload(lab, stand_in, parallel, background):
    server = _server("same")
    seg = SEGMENTS[0]
    stand_in.peer_archive(server, stand_in.data / "pg_wal" / seg, compression="lz4")  # e.g. archived before a crash
    res = stand_in.run(server, seg, background=background, parallel=parallel)
    assert res.returncode == 0, res.stderr
    versions = _versions(lab, stand_in.bucket, server)
    key = next(k for k in versions if k.endswith(f"{seg}.lz4"))
    assert len(versions[key]) == 1  # one upload only
    said = res.stderr if not background else (_spool(stand_in.data) / ".pusher.log").read_text()
    assert f"{seg} is already archived with the same content" in said


HISTORY = "00000002.history"


@pytest.mark.parametrize(("parallel", "background"), [MODES[0], MODES[2]])
@pytest.mark.parametrize("same", [False, True], ids=["other-content", "same-content"])
def test_a_timeline_history_file_is_never_overwritten(lab, stand_in, parallel, background, same):
    """A history file (never a pusher's: the call archives it itself) takes the same check as a segment: after a
    split brain both primaries may have chosen timeline 2, with histories that differ."""
    server = _server("history")
    ours = stand_in.data / "pg_wal" / HISTORY
    ours.write_text("1\t0/3000000\tno recovery target specified\n")
    peer = stand_in.data.parent / "peer" / HISTORY
    peer.write_text(ours.read_text() if same else "1\t0/5000000\tno recovery target specified\n")
    subprocess.run(["chown", "postgres:postgres", str(ours), str(peer)], check=True)
    stand_in.peer_archive(server, peer)
    before = _versions_of(lab, stand_in.bucket, server, HISTORY)
    assert len(before) == 1 and len(next(iter(before.values()))) == 1
    key = next(iter(before))

    res = stand_in.run(server, HISTORY, background=background, parallel=parallel)
    assert _versions_of(lab, stand_in.bucket, server, HISTORY) == before  # no upload either way (same version, ETag)
    if same:
        assert res.returncode == 0, res.stderr
        assert f"{HISTORY} is already archived with the same content" in res.stderr
    else:
        assert res.returncode != 0
        line = next(x for x in res.stderr.splitlines() if "refusing to overwrite" in x)
        assert HISTORY in line and key in line and "Fix:" in line
        assert _sha256(peer) in line and _sha256(ours) in line
        assert f"archive command failed for WAL segment {HISTORY}" in res.stderr


@pytest.mark.parametrize("background", [False, True])
def test_an_orphan_ready_does_not_stop_archiving(lab, stand_in, background):
    server = _server("orphan")
    status = stand_in.data / "pg_wal" / "archive_status"
    (status / "0000000100000000000000A1.ready").unlink()
    (stand_in.data / "pg_wal" / "0000000100000000000000A1").unlink()
    (status / "0000000100000000000000A1.ready").touch()  # a .ready without its segment, between the others
    (status / "0000000100000000000000A9.ready").touch()  # and one newer than all of them
    for seg in (SEGMENTS[0], SEGMENTS[2]):
        res = stand_in.run(server, seg, background=background)
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr
    spool = _spool(stand_in.data)
    assert wait_for(lambda: (spool / f"{SEGMENTS[3]}.archived").exists(), 15), sorted(os.listdir(spool))
    assert {SEGMENTS[0], SEGMENTS[2], SEGMENTS[3]} <= set(_keys(lab, server, stand_in.bucket))
    # the orphan's own call fails (nothing to archive) and costs nothing else
    assert stand_in.run(server, "0000000100000000000000A1", background=background).returncode != 0


def test_markers_of_another_destination_are_not_trusted(lab, stand_in):
    first, second = _server("first"), _server("second")
    assert stand_in.run(first, SEGMENTS[0], background=False).returncode == 0  # archives the next ones ahead
    assert (_spool(stand_in.data) / f"{SEGMENTS[1]}.archived").exists()
    res = stand_in.run(second, SEGMENTS[1], background=False)
    assert res.returncode == 0, res.stderr
    assert SEGMENTS[1] in _keys(lab, second, stand_in.bucket)


def test_a_pusher_for_another_destination_stops_at_once_and_its_log_is_capped(lab, stand_in):
    from pgops.dbhost.procs import pid_alive

    first, second = _server("first"), _server("second")
    spool = _spool(stand_in.data)
    assert stand_in.run(first, SEGMENTS[0], background=True).returncode == 0
    pusher = pid_in(spool / ".pusher.pid")
    assert pusher and pid_alive(pusher)
    with open(spool / ".pusher.log", "ab") as fh:  # as if it had logged for weeks
        fh.write(b"x" * (2 << 20))
    assert wait_for(lambda: (spool / ".pusher.log.1").exists() and (spool / ".pusher.log").stat().st_size < 1 << 20, 10)

    started = time.monotonic()
    res = stand_in.run(second, SEGMENTS[1], background=True)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - started < 10
    assert SEGMENTS[1] in _keys(lab, second, stand_in.bucket)
    assert wait_for(lambda: not pid_alive(pusher), 10)
    assert "archive_command now archives to another destination" in (spool / ".pusher.log").read_text()
    assert pid_in(spool / ".pusher.pid") not in (None, pusher)


def test_a_spool_others_can_write_is_not_trusted(lab, stand_in):
    server = _server("spool")
    spool = _spool(stand_in.data)
    assert stand_in.run(server, SEGMENTS[0], background=False).returncode == 0  # archives the next ones ahead
    assert (spool / f"{SEGMENTS[1]}.archived").exists()
    lab.s3_client().delete_object(Bucket=stand_in.bucket, Key=_keys(lab, server, stand_in.bucket)[SEGMENTS[1]])
    assert SEGMENTS[1] not in _keys(lab, server, stand_in.bucket)
    os.chmod(spool, 0o777)  # anyone could have written that marker now
    res = stand_in.run(server, SEGMENTS[1], background=False)
    assert res.returncode == 0, res.stderr
    assert "others could forge its markers" in res.stderr
    assert SEGMENTS[1] in _keys(lab, server, stand_in.bucket)  # archived again, not taken from the marker


def test_a_backup_is_done_only_once_its_last_wal_is_archived(lab, scratch_pg):
    """pgops-backup stops the backup without PostgreSQL's 1-s wait and waits for the end WAL itself
    (include/dbhost/pgops_backup.py): while archive_command fails, the backup does not end and the catalog holds
    no DONE backup for it; once archiving works again it ends DONE, with its end segment in the bucket. 1 MiB
    segments and pg_wal through a symlink: the file names and the status directory are PostgreSQL's own."""
    from pgops.dbhost.engines import barman_cloud
    from pgops.lab.local import as_db_user

    server = _server("endwal")
    cluster = _cluster(lab, server)
    pg = scratch_pg(cluster)
    pg.switch(2)
    pg.wait_archived(pg.last_switched())
    block = pg.root / "archive-blocked"
    block.touch()
    pg.set_archive_command(f"test ! -e {shlex.quote(str(block))} && {_archive_command(lab, cluster)}")
    st = lab.load()
    env = lab.db_env(st)
    argv = barman_cloud.backup_argv(cluster, endpoint_url=st.s3_endpoint, backup_name="endwal-proof",
                                    pg_host=str(pg.socket_dir), pg_port=pg.port, pg_user="postgres")
    assert argv[0].endswith("/pgops-backup")

    def catalog() -> dict:
        res = subprocess.run(as_db_user(barman_cloud.backup_list_argv(cluster, endpoint_url=st.s3_endpoint),
                                        env=env), capture_output=True, text=True, check=True)
        return {b.backup_name: b for b in barman_cloud.parse_backup_list(res.stdout)}

    status = pg.data / "pg_wal" / "archive_status"
    proc = subprocess.Popen(as_db_user(argv, env=env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # pg_backup_stop has run once the backup history file is ready to archive; archiving fails meanwhile
        assert wait_for(lambda: any(n.endswith(".backup.ready") for n in os.listdir(status)), 120), \
            sorted(os.listdir(status))
        assert wait_for(lambda: int(pg.psql("SELECT failed_count FROM pg_stat_archiver")) >= 1, 30)
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()[0]
        entry = catalog().get("endwal-proof")  # a backup not DONE is listed without its name, or not at all
        assert entry is None or entry.status != "DONE", entry
        block.unlink()
        pg.switch(1)  # a new ready segment wakes the archiver (it waits up to a minute after failures)
        out = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    backup = catalog()["endwal-proof"]
    assert backup.status == "DONE" and backup.end_wal, backup
    assert backup.end_wal in _keys(lab, server)
    line = next(x for x in out.splitlines() if "are archived (waited" in x)
    assert backup.end_wal in line and ".backup" in line
    assert not [n for n in os.listdir(status) if n.endswith(".backup.ready")]


def test_a_backup_killed_while_it_waits_for_its_last_wal_is_never_done(lab, scratch_pg):
    """The task killed during pgops-backup's wait (kill -9 of its process group, as a lost worker): the backup is
    not DONE in the catalog, before or after archiving works again."""
    import signal

    from pgops.dbhost.engines import barman_cloud
    from pgops.lab.local import as_db_user

    server = _server("endwal-kill")
    cluster = _cluster(lab, server)
    pg = scratch_pg(cluster)
    block = pg.root / "archive-blocked"
    block.touch()
    pg.set_archive_command(f"test ! -e {shlex.quote(str(block))} && {_archive_command(lab, cluster)}")
    st = lab.load()
    env = lab.db_env(st)
    argv = barman_cloud.backup_argv(cluster, endpoint_url=st.s3_endpoint, backup_name="endwal-killed",
                                    pg_host=str(pg.socket_dir), pg_port=pg.port, pg_user="postgres")
    status = pg.data / "pg_wal" / "archive_status"
    tmp_before = set(Path("/tmp").glob("barman-cloud-backup-*"))
    proc = subprocess.Popen(as_db_user(argv, env=env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        assert wait_for(lambda: any(n.endswith(".backup.ready") for n in os.listdir(status)), 120)
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the test's child and nothing else
        proc.wait(timeout=30)
        for path in set(Path("/tmp").glob("barman-cloud-backup-*")) - tmp_before:  # the killed barman's own
            shutil.rmtree(path)
    block.unlink()
    pg.switch(1)
    pg.wait_archived(pg.last_switched())
    res = subprocess.run(as_db_user(barman_cloud.backup_list_argv(cluster, endpoint_url=st.s3_endpoint), env=env),
                         capture_output=True, text=True, check=True)
    done = [b for b in barman_cloud.parse_backup_list(res.stdout) if b.status == "DONE"]
    assert done == [], done
