"""include/dbhost/pgops_restore.py without a bucket: barman-style tar parts on local disk, restored in parallel and
compared with barman's own way (each part extracted in order with tarfile); broken parts fail naming the part
and leave the target marked; unsafe members are refused; the engine's argv and part sizing."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import stat
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import lz4.frame
import pytest
from helpers import REPO, tree

sys.path.insert(0, str(REPO / "include" / "dbhost"))
import pgops_restore as pr  # noqa: E402

sys.path.remove(str(REPO / "include" / "dbhost"))

BACKUP_ID = "20260101T000000"
LABEL = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nBACKUP METHOD: streamed\n"
PREFIX = f"clusters/main/base/{BACKUP_ID}"


# -- a fake backup: members per part, as barman-cloud-backup orders them ---------------------------------------
def _dir(name: str, mode: int = 0o700) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type, t.mode, t.mtime = tarfile.DIRTYPE, mode, 1_700_000_000
    return t


def _file(name: str, data: bytes, mode: int = 0o600, mtime: int = 1_700_000_100) -> tuple[tarfile.TarInfo, bytes]:
    t = tarfile.TarInfo(name)
    t.size, t.mode, t.mtime = len(data), mode, mtime
    return t, data


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type, t.linkname, t.mode = tarfile.SYMTYPE, target, 0o777
    return t


def _tar(members: list, *, end_marker: bool = True) -> bytes:
    buf = io.BytesIO()
    tf = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT)
    for m in members:
        if isinstance(m, tuple):
            tf.addfile(m[0], io.BytesIO(m[1]))
        else:
            tf.addfile(m)
    if end_marker:
        tf.close()
        return buf.getvalue()
    tf.fileobj = io.BytesIO()  # drop the end-of-archive blocks close() would write
    return buf.getvalue()


def _compress(data: bytes, compression: str | None) -> bytes:
    if compression == "lz4":
        return lz4.frame.compress(data)
    if compression == "gzip":
        return gzip.compress(data)
    return data


def _blob(seed: str, size: int) -> bytes:
    out, i = bytearray(), 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}{i}".encode()).digest() * 4
        i += 1
    return bytes(out[:size])


def pgdata_parts() -> list[list]:
    """Four parts of a data directory: the walk split between files, pg_control and backup_label last."""
    return [
        [_dir("."), _dir("base"), _dir("base/1"), _dir("global"), _dir("pg_wal"), _dir("pg_tblspc"),
         _file("./PG_VERSION", b"15\n", 0o600), _file("base/1/1259", _blob("a", 300_000))],
        [_file("base/1/2608", _blob("b", 500_000)), _dir("base/5"), _file("base/5/16384", _blob("c", 200_000))],
        [_file("base/5/16384.1", _blob("d", 400_000)), _file("global/1262", _blob("e", 8192)),
         _symlink("base/5/alias", "16384")],
        [_file("global/pg_control", _blob("ctl", 8192)), _file("backup_label", LABEL.encode(), 0o644, 0)],
    ]


@dataclasses.dataclass
class FakeBucket:
    """Objects on local disk; open_object answers as barman's remote_open (None: no such key)."""

    root: Path

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def keys(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def open_object(self, key: str):
        path = self.root / key
        return open(path, "rb") if path.exists() else None

    def sizes(self) -> dict[str, int]:
        return {k: (self.root / k).stat().st_size for k in self.keys()}


def make_backup(tmp_path: Path, parts: list[list], *, compression: str | None = "lz4", label: str = "data",
                bucket: FakeBucket | None = None) -> FakeBucket:
    bucket = bucket or FakeBucket(tmp_path / "bucket")
    for n, members in enumerate(parts):
        bucket.put(f"{PREFIX}/{pr.part_name(label, n, compression)}", _compress(_tar(members), compression))
    return bucket


def catalog(bucket: FakeBucket, *, tablespaces=(), backup_label: str | None = LABEL, status: str = "DONE"):
    """backup.info and get_backup_files as barman's CloudBackupCatalog gives them, from the bucket listing."""
    files: dict = {}
    for key in bucket.keys():
        parsed = pr.parse_part_name(os.path.basename(key))
        if not parsed:
            continue
        label, number, compression = parsed
        oid = None if label == "data" else int(label)
        info = files.setdefault(oid, SimpleNamespace(path=None, compression=None, additional_files=[]))
        if number == 0:
            info.path, info.compression = key, compression
        else:
            info.additional_files.append(SimpleNamespace(path=key, compression=compression, additional_files=[]))
    files.setdefault(None, SimpleNamespace(path=None, compression=None, additional_files=[]))
    info = SimpleNamespace(backup_id=BACKUP_ID, status=status, tablespaces=list(tablespaces), backup_label=backup_label,
                           snapshots_info=None, wal_directory=lambda: "pg_wal")
    return info, files


def run_restore(bucket: FakeBucket, dest: Path, *, jobs: int = 2, sizes: dict | None = None, **kw):
    info, files = catalog(bucket, **kw)
    plan = pr.make_plan(backup_info=info, backup_files=files, destination=str(dest),
                        sizes=bucket.sizes() if sizes is None else sizes)
    return pr.restore(plan, jobs=jobs, opener=lambda: bucket.open_object)


def barman_way(bucket: FakeBucket, dest: Path, *, tablespaces=()) -> None:
    """What barman-cloud-restore does: each part in listing order, tarfile.extractall, then links and pg_wal."""
    info, files = catalog(bucket, tablespaces=tablespaces)
    for oid, fi in files.items():
        target = dest if oid is None else Path(next(t.location for t in tablespaces if t.oid == oid))
        for f in [fi, *sorted(fi.additional_files, key=lambda a: a.path)]:
            with bucket.open_object(f.path) as raw:
                data = raw.read()
            data = lz4.frame.decompress(data) if f.path.endswith(".lz4") else \
                gzip.decompress(data) if f.path.endswith(".gz") else data
            with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
                tf.extractall(path=target)
    for ts in tablespaces:
        os.symlink(ts.location, dest / "pg_tblspc" / str(ts.oid))
    (dest / "pg_wal").mkdir(exist_ok=True)


# -- the same data directory as barman's way -------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["lz4", "gzip", None])
@pytest.mark.parametrize("jobs", [1, 3])
def test_parallel_restore_equals_barman_way(tmp_path, compression, jobs):
    bucket = make_backup(tmp_path, pgdata_parts(), compression=compression)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    summary = run_restore(bucket, ours, jobs=jobs)
    barman_way(bucket, theirs)
    assert tree(ours, with_root=True) == tree(theirs, with_root=True)
    assert summary["parts"] == 4 and summary["jobs"] == min(jobs, 4)
    assert summary["extracted_bytes"] > summary["downloaded_bytes"] or compression is None
    assert (ours / "global" / "pg_control").read_bytes() == _blob("ctl", 8192)
    assert os.readlink(ours / "base" / "5" / "alias") == "16384"
    assert not (ours / pr.INCOMPLETE).exists()
    assert stat.S_IMODE(ours.stat().st_mode) == 0o700


def test_one_part_backup_restores(tmp_path):
    one = [sum(pgdata_parts(), [])]
    bucket = make_backup(tmp_path, one)
    assert [k.rsplit("/", 1)[1] for k in bucket.keys()] == ["data.tar.lz4"]
    summary = run_restore(bucket, tmp_path / "ours", jobs=4)
    barman_way(bucket, tmp_path / "theirs")
    assert tree(tmp_path / "ours", with_root=True) == tree(tmp_path / "theirs", with_root=True)
    assert summary["parts"] == 1


def test_tablespaces_are_extracted_and_linked_as_barman_does(tmp_path):
    bucket = make_backup(tmp_path, pgdata_parts())
    ts_parts = [[_dir("."), _dir("PG_15_202209061"), _dir("PG_15_202209061/5"),
                 _file("PG_15_202209061/5/16400", _blob("t1", 100_000))],
                [_file("PG_15_202209061/5/16401", _blob("t2", 50_000))]]
    make_backup(tmp_path, ts_parts, label="16399", bucket=bucket)
    ours_ts, theirs_ts = tmp_path / "ts-ours", tmp_path / "ts-theirs"
    info, files = catalog(bucket, tablespaces=[SimpleNamespace(name="tbs", oid=16399, location=str(ours_ts))])
    plan = pr.make_plan(backup_info=info, backup_files=files, destination=str(tmp_path / "ours"), sizes=bucket.sizes())
    assert {p.name for p in plan.parts} >= {"16399.tar.lz4", "16399_0001.tar.lz4"}
    assert plan.links == [(str(tmp_path / "ours" / "pg_tblspc" / "16399"), str(ours_ts))]
    pr.restore(plan, jobs=3, opener=lambda: bucket.open_object)
    barman_way(bucket, tmp_path / "theirs",
               tablespaces=[SimpleNamespace(name="tbs", oid=16399, location=str(theirs_ts))])
    assert tree(ours_ts, with_root=True) == tree(theirs_ts, with_root=True)
    ours, theirs = tree(tmp_path / "ours", with_root=True), tree(tmp_path / "theirs", with_root=True)
    assert ours.pop("pg_tblspc/16399") == ("link", str(ours_ts))
    assert theirs.pop("pg_tblspc/16399") == ("link", str(theirs_ts))
    assert ours == theirs


def test_tablespace_relocation_rule(tmp_path):
    bucket = make_backup(tmp_path, pgdata_parts())
    make_backup(tmp_path, [[_dir("."), _file("x", b"x")]], label="16399", bucket=bucket)
    info, files = catalog(bucket, tablespaces=[SimpleNamespace(name="tbs", oid=16399, location="/nonexistent/ts")])
    moved = tmp_path / "moved"
    plan = pr.make_plan(backup_info=info, backup_files=files, destination=str(tmp_path / "d"),
                        relocations=pr.parse_relocations([f"tbs:{moved}"]))
    assert [p.root for p in plan.parts if p.label == "16399"] == [str(moved)]
    with pytest.raises(pr.RestoreError, match="NAME:LOCATION"):
        pr.parse_relocations(["tbs"])


def test_a_path_in_two_parts_is_the_later_parts(tmp_path):
    parts = pgdata_parts()
    parts[1].append(_file("postgresql.conf", b"old = 1\n"))
    parts[3].insert(0, _file("postgresql.conf", b"new = 2\n"))  # an external config file, added after the walk
    bucket = make_backup(tmp_path, parts)
    run_restore(bucket, tmp_path / "ours", jobs=4)
    barman_way(bucket, tmp_path / "theirs")
    assert (tmp_path / "ours" / "postgresql.conf").read_bytes() == b"new = 2\n"
    assert tree(tmp_path / "ours", with_root=True) == tree(tmp_path / "theirs", with_root=True)


# -- broken parts fail naming the part; the target stays marked -----------------------------------------------
def _assert_marked(dest: Path, reason: str) -> None:
    marker = dest / pr.INCOMPLETE
    assert marker.exists(), "the failed restore is not marked"
    assert reason in marker.read_text()
    assert not (dest / "global" / "pg_control").exists(), "PostgreSQL could start a failed restore"


def test_missing_middle_part_fails_naming_it(tmp_path):
    bucket = make_backup(tmp_path, pgdata_parts())
    (bucket.root / PREFIX / "data_0002.tar.lz4").unlink()
    with pytest.raises(pr.RestoreError, match=r"data_0002\.tar\.lz4 of backup .* missing"):
        run_restore(bucket, tmp_path / "d")
    assert not (tmp_path / "d").exists(), "a plan that cannot work must not touch the target"


def test_missing_first_part_fails_naming_it(tmp_path):
    bucket = make_backup(tmp_path, pgdata_parts())
    (bucket.root / PREFIX / "data.tar.lz4").unlink()
    with pytest.raises(pr.RestoreError, match=r"part\(s\) data\.tar\.lz4 of backup"):
        run_restore(bucket, tmp_path / "d")


def test_missing_last_part_is_caught_by_backup_label(tmp_path):
    bucket = make_backup(tmp_path, pgdata_parts())
    (bucket.root / PREFIX / "data_0003.tar.lz4").unlink()
    with pytest.raises(pr.RestoreError, match=r"backup_label is in no part .* after data_0002\.tar\.lz4 is missing"):
        run_restore(bucket, tmp_path / "d")
    _assert_marked(tmp_path / "d", "backup_label is in no part")


def test_part_gone_after_listing_fails_naming_it(tmp_path):
    bucket = make_backup(tmp_path, pgdata_parts())
    info, files = catalog(bucket)
    plan = pr.make_plan(backup_info=info, backup_files=files, destination=str(tmp_path / "d"), sizes=bucket.sizes())
    (bucket.root / PREFIX / "data_0001.tar.lz4").unlink()
    with pytest.raises(pr.RestoreError, match=r"part data_0001\.tar\.lz4 .*not in the bucket"):
        pr.restore(plan, jobs=2, opener=lambda: bucket.open_object)
    _assert_marked(tmp_path / "d", "data_0001.tar.lz4")


@pytest.mark.parametrize("jobs", [1, 2])
def test_corrupt_compressed_part_fails_naming_it(tmp_path, jobs):
    bucket = make_backup(tmp_path, pgdata_parts())
    path = bucket.root / PREFIX / "data_0001.tar.lz4"
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(pr.RestoreError, match=r"part data_0001\.tar\.lz4 .*(corrupt|truncated|checksum)"):
        run_restore(bucket, tmp_path / "d", jobs=jobs)
    _assert_marked(tmp_path / "d", "data_0001.tar.lz4")


@pytest.mark.parametrize("compression", ["lz4", "gzip"])
def test_truncated_compressed_part_fails_naming_it(tmp_path, compression):
    bucket = make_backup(tmp_path, pgdata_parts(), compression=compression)
    name = pr.part_name("data", 2, compression)
    path = bucket.root / PREFIX / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(pr.RestoreError, match=rf"part {name.replace('.', chr(92) + '.')} "):
        run_restore(bucket, tmp_path / "d")
    _assert_marked(tmp_path / "d", name)


def test_tar_without_its_end_marker_fails(tmp_path):
    """Cut at a member boundary: tarfile alone would take it for the end of the archive."""
    bucket = make_backup(tmp_path, pgdata_parts(), compression=None)
    path = bucket.root / PREFIX / "data_0001.tar"
    path.write_bytes(_tar(pgdata_parts()[1], end_marker=False))
    with pytest.raises(pr.RestoreError, match=r"part data_0001\.tar .*without the end-of-archive marker"):
        run_restore(bucket, tmp_path / "d")


def test_corrupt_tar_header_fails(tmp_path):
    """A header with a bad checksum past the first member: tarfile alone would stop there, silently."""
    tar = bytearray(_tar(pgdata_parts()[1]))
    with tarfile.open(fileobj=io.BytesIO(bytes(tar))) as tf:
        second = tf.getmembers()[1].offset
    tar[second + 100] ^= 0xFF  # its mode field: the header checksum no longer matches
    bucket = make_backup(tmp_path, pgdata_parts(), compression=None)
    (bucket.root / PREFIX / "data_0001.tar").write_bytes(bytes(tar))
    with pytest.raises(pr.RestoreError, match=r"part data_0001\.tar .*(corrupt|truncated)"):
        run_restore(bucket, tmp_path / "d")


def test_size_mismatch_with_listing_fails(tmp_path):
    bucket = make_backup(tmp_path, pgdata_parts())
    sizes = bucket.sizes()
    sizes[f"{PREFIX}/data_0002.tar.lz4"] += 10
    with pytest.raises(pr.RestoreError, match=r"part data_0002\.tar\.lz4 .*size mismatch"):
        run_restore(bucket, tmp_path / "d", sizes=sizes)


def test_backup_label_of_another_backup_fails(tmp_path):
    bucket = make_backup(tmp_path, pgdata_parts())
    with pytest.raises(pr.RestoreError, match="differs from backup.info"):
        run_restore(bucket, tmp_path / "d", backup_label="START WAL LOCATION: 0/9000028\n")
    _assert_marked(tmp_path / "d", "differs from backup.info")


def test_a_failed_part_stops_the_others(tmp_path):
    """One part is missing at download time while another streams slowly: the restore fails at once, naming the
    missing part, and the slow one stops at its next read instead of running to its end."""
    bucket = make_backup(tmp_path, pgdata_parts())
    info, files = catalog(bucket)
    plan = pr.make_plan(backup_info=info, backup_files=files, destination=str(tmp_path / "d"), sizes=bucket.sizes())
    (bucket.root / PREFIX / "data_0002.tar.lz4").unlink()
    reads = []

    class Slow(io.RawIOBase):
        def __init__(self, raw):
            self.raw = raw

        def read(self, n=-1):
            time.sleep(0.2)
            reads.append(1)
            return self.raw.read(min(n, 4096))

    def opener():
        def open_object(key):
            raw = bucket.open_object(key)
            return Slow(raw) if raw is not None and key.endswith("data_0001.tar.lz4") else raw
        return open_object

    started = time.monotonic()
    with pytest.raises(pr.RestoreError, match=r"part data_0002\.tar\.lz4 .*not in the bucket"):
        pr.restore(plan, jobs=2, opener=opener)
    full = (tmp_path / "bucket" / PREFIX / "data_0001.tar.lz4").stat().st_size // 4096  # reads to its end: ~10 s
    assert time.monotonic() - started < full * 0.2 / 2
    assert len(reads) < full / 2
    _assert_marked(tmp_path / "d", "data_0002.tar.lz4")


# -- refusals ------------------------------------------------------------------------------------------------
def test_non_empty_target_is_refused_and_untouched(tmp_path):
    bucket = make_backup(tmp_path, pgdata_parts())
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "precious").write_text("keep me")
    with pytest.raises(pr.RestoreError, match="already exists and is not empty: nothing was changed"):
        run_restore(bucket, dest)
    assert sorted(os.listdir(dest)) == ["precious"]


def test_empty_existing_target_is_used(tmp_path):
    bucket = make_backup(tmp_path, pgdata_parts())
    dest = tmp_path / "d"
    dest.mkdir(mode=0o755)
    run_restore(bucket, dest)
    assert (dest / "backup_label").read_text() == LABEL
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700  # the archive's "." member


@pytest.mark.parametrize(("member", "why"), [
    (_file("../escape", b"x"), "'..' component"),
    (_file("base/../../escape", b"x"), "'..' component"),
    (_file("/etc/escape", b"x"), "absolute path"),
    (_symlink("evil", "/etc"), "symlink to an absolute path"),
    (_symlink("base/evil", "../../outside"), "leads outside the restore target"),
])
def test_unsafe_member_is_refused(tmp_path, member, why):
    parts = pgdata_parts()
    parts[1].append(member)
    bucket = make_backup(tmp_path, parts)
    with pytest.raises(pr.RestoreError, match=rf"part data_0001\.tar\.lz4 .*{why}"):
        run_restore(bucket, tmp_path / "sub" / "d")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "sub" / "escape").exists()
    assert not (tmp_path / "outside").exists()
    _assert_marked(tmp_path / "sub" / "d", "refused")


def test_special_files_and_hard_links_outside_are_refused():
    fifo = tarfile.TarInfo("pg_notify/fifo")
    fifo.type = tarfile.FIFOTYPE
    dev = tarfile.TarInfo("dev")
    dev.type = tarfile.BLKTYPE
    hard = tarfile.TarInfo("x")
    hard.type, hard.linkname = tarfile.LNKTYPE, "../../etc/passwd"
    assert "FIFO" in pr.member_problem(fifo)
    assert "block device" in pr.member_problem(dev)
    assert "hard link" in pr.member_problem(hard)
    inside = tarfile.TarInfo("base/5/a")
    inside.type, inside.linkname = tarfile.SYMTYPE, "../1/b"
    assert pr.member_problem(inside) is None


def test_symlink_through_a_symlink_is_refused(tmp_path):
    """A symlink whose path goes through another symlink could point anywhere once both exist: refused."""
    parts = pgdata_parts()
    parts[1] += [_symlink("lnk", "base"), _symlink("lnk/deeper", "1")]
    bucket = make_backup(tmp_path, parts)
    with pytest.raises(pr.RestoreError, match="a symlink is on its path"):
        run_restore(bucket, tmp_path / "d")


def test_plan_refuses_what_cannot_be_restored(tmp_path):
    bucket = make_backup(tmp_path, pgdata_parts())
    with pytest.raises(pr.RestoreError, match="status FAILED, not DONE"):
        run_restore(bucket, tmp_path / "d", status="FAILED")
    mixed = make_backup(tmp_path / "m", pgdata_parts()[:2], compression="gzip")
    mixed.put(f"{PREFIX}/data_0002.tar.lz4", _compress(_tar(pgdata_parts()[2]), "lz4"))
    with pytest.raises(pr.RestoreError, match="mix compressions"):
        run_restore(mixed, tmp_path / "d2")


def test_part_names_are_barmans():
    assert pr.parse_part_name("data.tar.lz4") == ("data", 0, "lz4")
    assert pr.parse_part_name("data_0012.tar.gz") == ("data", 12, "gzip")
    assert pr.parse_part_name("16399_0001.tar") == ("16399", 1, None)
    assert pr.parse_part_name("backup.info") is None
    assert pr.part_name("data", 3, "bzip2") == "data_0003.tar.bz2"
    assert pr.part_name("16399", 0, None) == "16399.tar"


# -- the engine side --------------------------------------------------------------------------------------
def test_max_archive_size_gives_parts_for_every_job():
    from pgops.dbhost.engines import barman_cloud as bc

    gib, mib = 1024 ** 3, 1024 ** 2
    assert bc.max_archive_size_bytes(None, jobs=2, compression="lz4") is None
    # 1 TiB, 4 jobs, lz4: 1 TiB x 0.1 / 32 = 3.2 GiB parts: 32 parts at 10x compression, 8 (2 x jobs) at 40x
    size = bc.max_archive_size_bytes(1024 * gib, jobs=4, compression="lz4")
    assert size == int(1024 * gib * 0.1 / 32)
    assert (1024 * gib / 40) / size >= 2 * 4
    # no compression: the size itself; capped at barman's default
    assert bc.max_archive_size_bytes(2000 * gib, jobs=2, compression="none") == 100 * gib
    assert bc.max_archive_size_bytes(40 * gib, jobs=2, compression="none") == int(2.5 * gib)
    # the bench's 3 GiB database, 2 jobs: 19.7 MB parts, well under one compressed 1 GiB segment (66.5 MB)
    assert bc.max_archive_size_bytes(3_159_145_681, jobs=2, compression="lz4") == 19_744_660
    # small databases: the floor
    assert bc.max_archive_size_bytes(100 * mib, jobs=8, compression="gzip") == bc.MIN_PART_BYTES == 16 * mib


def test_backup_and_restore_argv():
    from pgops.dbhost.engines import barman_cloud as bc
    from pgops.inventory import load_inventory

    cluster = load_inventory(REPO / "include" / "clusters.example.yaml").clusters[0]
    argv = bc.backup_argv(cluster, endpoint_url=None, backup_name="n", cluster_size_bytes=200 * 1024 ** 3)
    i = argv.index("--max-archive-size")
    assert int(argv[i + 1]) == bc.max_archive_size_bytes(200 * 1024 ** 3, jobs=cluster.engine.jobs,
                                                         compression=cluster.engine.compression)
    assert "--max-archive-size" not in bc.backup_argv(cluster, endpoint_url=None, backup_name="n")
    custom = dataclasses.replace(cluster, engine=dataclasses.replace(cluster.engine,
                                                                     extra_args=("--max-archive-size", "1GB")))
    argv = bc.backup_argv(custom, endpoint_url=None, backup_name="n", cluster_size_bytes=200 * 1024 ** 3)
    assert argv[-4:-2] == ["--max-archive-size", "1GB"]  # the inventory's own choice comes last and wins
    r = bc.parallel_restore_argv(cluster, endpoint_url="http://s3", backup_id="B", destination_dir="/d")
    assert r[0] == f"{cluster.engine.bin_dir}/pgops-restore"
    assert r[1:3] == ["--jobs", str(cluster.engine.jobs)]
    assert r[-4:] == [cluster.storage.destination_url, cluster.storage.server_name, "B", "/d"]
    # the same arguments as barman-cloud-restore, plus --jobs
    assert bc.restore_argv(cluster, endpoint_url="http://s3", backup_id="B", destination_dir="/d")[1:] == r[3:]
    assert not any("secret" in a.lower() or "key" in a.lower() for a in r)


def test_restore_summary_is_read_from_the_output():
    from pgops.dbhost.engines import barman_cloud as bc

    lines = ["pgops-restore: part 1/2 ...", 'pgops-restore summary: {"parts": 5, "jobs": 2}', ""]
    assert bc.parse_restore_summary(lines) == {"parts": 5, "jobs": 2}
    assert bc.parse_restore_summary(["nothing"]) == {}
    assert bc.parse_restore_summary(["pgops-restore summary: {broken"]) == {}


def test_summary_prefix_is_the_tools():
    from pgops.dbhost.engines import barman_cloud as bc

    assert bc.RESTORE_SUMMARY_PREFIX == pr.SUMMARY
    assert bc.PARALLEL_RESTORE_TOOL == pr.PROG


# -- the operators' restore step ----------------------------------------------------------------------------
class FakeHost:
    """A DB host: which paths exist, and the argv of every command run (a failure for argv[0] when asked)."""

    where = "the test host"

    def __init__(self, *, has: set[str], fail: str | None = None, output: list[str] | None = None):
        self.has, self.fail, self.output, self.ran = has, fail, output or [], []

    def exists(self, path: str) -> bool:
        return path in self.has

    def run(self, argv, *, env=None, timeout_s=300, capture=False, check=True, quiet=False):
        from pgops.dbhost.runners import CommandFailed, CommandResult

        self.ran.append((list(argv), dict(env or {})))
        if self.fail and argv[0].endswith(self.fail):
            raise CommandFailed(f"{self.fail} failed with exit code 1", returncode=1, output_tail="")
        return CommandResult(argv=list(argv), returncode=0, stdout="", duration_s=0.1, output_tail=self.output)


class Log:
    def __init__(self):
        self.warnings = []

    def warning(self, msg, *args):
        self.warnings.append(msg % args)


@pytest.fixture
def cluster(monkeypatch):
    from pgops.inventory import load_inventory

    monkeypatch.setattr("pgops.airflow.operators.restore.s3_endpoint_url", lambda conn_id: "http://s3.test")
    return load_inventory(REPO / "include" / "clusters.example.yaml").clusters[0]


def test_restore_step_runs_pgops_restore_and_records_its_summary(cluster):
    from pgops.airflow.operators.restore import restore_base_backup

    tool = f"{cluster.engine.bin_dir}/pgops-restore"
    host = FakeHost(has={tool}, output=["pgops-restore: part 1/6 ...",
                                        'pgops-restore summary: {"parts": 6, "jobs": 2, "downloaded_bytes": 10, '
                                        '"extracted_bytes": 90, "seconds": 1.0}'])
    log = Log()
    got = restore_base_backup(host, cluster, backup_id="B", data_dir="/scratch/data", env={"AWS_ACCESS_KEY_ID": "k"},
                              log=log)
    assert got == {"restorer": "pgops-restore", "parts": 6, "jobs": 2, "downloaded_bytes": 10, "extracted_bytes": 90}
    (argv, env), = host.ran
    assert argv[0] == tool and argv[-2:] == ["B", "/scratch/data"] and "k" not in argv
    assert env == {"AWS_ACCESS_KEY_ID": "k"}  # credentials through the environment only
    assert log.warnings == []


def test_restore_step_falls_back_to_barman_where_the_tools_predate_it(cluster):
    from pgops.airflow.operators.restore import restore_base_backup

    host, log = FakeHost(has=set()), Log()
    got = restore_base_backup(host, cluster, backup_id="B", data_dir="/scratch/data", env={}, log=log)
    assert got == {"restorer": "barman-cloud-restore"}
    assert host.ran[0][0][0] == f"{cluster.engine.bin_dir}/barman-cloud-restore"
    assert "pgops-restore is not on the test host" in log.warnings[0] and "Fix:" in log.warnings[0]


@pytest.mark.parametrize(("installed", "tool"), [(True, "pgops-restore"), (False, "barman-cloud-restore")])
def test_a_failed_restore_names_its_tool(cluster, installed, tool):
    from pgops.airflow.operators.restore import restore_base_backup
    from pgops.dbhost.runners import CommandFailed

    host = FakeHost(has={f"{cluster.engine.bin_dir}/pgops-restore"} if installed else set(), fail=tool)
    with pytest.raises(CommandFailed) as caught:
        restore_base_backup(host, cluster, backup_id="B", data_dir="/d", env={}, log=Log())
    assert caught.value.restorer == tool
