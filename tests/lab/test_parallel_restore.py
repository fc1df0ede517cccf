"""pgops-restore on the real lab: a base backup in parts (with a tablespace) restored both ways, by
barman-cloud-restore and by pgops-restore, gives the same files with the same checksums; a one-part backup still
restores; a missing, corrupt or truncated part fails naming it and leaves the target marked; a non-empty target is
refused untouched. Then the restore-verification DAG and the standby rebuild DAG restore through it.

The restorer run is this checkout's include/dbhost/pgops_restore.py, as the DB-host venv's console script would
run it (a postgres-readable copy behind a pgops-restore launcher in a bin directory next to the venv's own tools).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, load_dag, task_states, tree

from pgops.dbhost.engines import barman_cloud
from pgops.lab.local import as_db_user, dbhost_venv

pytestmark = [pytest.mark.lab]

SERVER = f"prl-{os.getpid()}"
PART_BYTES = 2 * 1024 * 1024  # small parts, so a few MB of data make several
TABLESPACE = "prl_ts"


def _chown_db(path: Path) -> None:
    subprocess.run(["chown", "-R", "postgres:postgres", str(path)], check=True)


@pytest.fixture(scope="module")
def tools():
    """A bin directory: the DB-host venv's tools, plus pgops-restore running this checkout's module."""
    root = Path(tempfile.mkdtemp(prefix="pgops-prl-tools-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    lib, bin_dir = root / "lib", root / "bin"
    lib.mkdir()
    bin_dir.mkdir()
    shutil.copy(REPO / "include" / "dbhost" / "pgops_restore.py", lib / "pgops_restore.py")
    venv_bin = dbhost_venv() / "bin"
    for entry in venv_bin.iterdir():
        if entry.name != barman_cloud.PARALLEL_RESTORE_TOOL:
            (bin_dir / entry.name).symlink_to(entry)
    launcher = bin_dir / barman_cloud.PARALLEL_RESTORE_TOOL
    launcher.write_text(f"#!{venv_bin / 'python3'}\nimport sys\nsys.path.insert(0, {str(lib)!r})\n"
                        "from pgops_restore import main\nsys.exit(main())\n")
    for p in (lib, bin_dir, lib / "pgops_restore.py", launcher):
        os.chmod(p, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def area():
    """A scratch directory the postgres OS user owns, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="pgops-prl-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    _chown_db(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _cluster(lab, tools: Path, server: str = SERVER, **engine):
    c = lab.cluster
    return dataclasses.replace(c, storage=dataclasses.replace(c.storage, server_name=server),
                               engine=dataclasses.replace(c.engine, bin_dir=str(tools / "bin"), **engine))


def _run(lab, argv: list[str], timeout_s: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    res = subprocess.run(as_db_user(argv, env=lab.db_env(lab.load())), capture_output=True, text=True,
                         timeout=timeout_s)
    return res, time.monotonic() - started


def _backup(lab, cluster, name: str) -> str:
    st = lab.load()
    argv = barman_cloud.backup_argv(cluster, endpoint_url=st.s3_endpoint, backup_name=name, pg_host=st.pg_socket_dir,
                                    pg_port=st.pg_port, pg_user="postgres")
    res, _ = _run(lab, argv)
    assert res.returncode == 0, res.stderr[-2000:]
    backups = barman_cloud.parse_backup_list(_run(lab, barman_cloud.backup_list_argv(
        cluster, endpoint_url=st.s3_endpoint))[0].stdout)
    return next(b.backup_id for b in backups if b.backup_name == name and b.done)


def _objects(lab, prefix: str) -> dict[str, int]:
    st = lab.load()
    out = {}
    for page in lab.s3_client().get_paginator("list_objects_v2").paginate(Bucket=st.bucket, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def _base(lab, server: str, backup_id: str) -> str:
    st = lab.load()
    return f"{st.prefix}/{server}/base/{backup_id}/"


def _restore(lab, cluster, backup_id: str, dest: Path, *, barman: bool = False, jobs: int = 3,
             tablespace: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    st = lab.load()
    if barman:
        argv = barman_cloud.restore_argv(cluster, endpoint_url=st.s3_endpoint, backup_id=backup_id,
                                         destination_dir=str(dest))
    else:
        argv = barman_cloud.parallel_restore_argv(cluster, endpoint_url=st.s3_endpoint, backup_id=backup_id,
                                                  destination_dir=str(dest), jobs=jobs)
    if tablespace is not None:
        argv += ["--tablespace", f"{TABLESPACE}:{tablespace}"]
    return _run(lab, argv)


@pytest.fixture(scope="class")
def backups(lab, tools):
    """Data in the default tablespace and in one of its own, then two backups under this module's server name:
    one in 2 MiB parts, one in a single part. The tablespace is dropped again after the class's tests, before the
    DAG tests below (their backups must not carry it)."""
    ts_dir = Path(tempfile.mkdtemp(prefix="pgops-prl-ts-", dir="/var/tmp"))
    os.chmod(ts_dir, 0o755)
    _chown_db(ts_dir)
    lab.psql(f"CREATE TABLESPACE {TABLESPACE} LOCATION '{ts_dir}'")
    try:
        for n in range(1, 5):  # files of a few MB each: a part closes between files
            lab.psql(f"CREATE TABLE prl_big{n} AS SELECT g AS id, md5(g::text) || md5((g * {n})::text) AS pad "
                     "FROM generate_series(1, 40000) g")
        for name in ("prl_ts_rows", "prl_ts_rows2"):  # two files of ~4 MB: the tablespace makes two parts too
            lab.psql(f"CREATE TABLE {name} TABLESPACE {TABLESPACE} AS SELECT g AS id, md5(g::text) AS pad "
                     "FROM generate_series(1, 60000) g")
        lab.psql("CHECKPOINT")
        parted = _backup(lab, _cluster(lab, tools, extra_args=("--max-archive-size", str(PART_BYTES))), "prl-parts")
        single = _backup(lab, _cluster(lab, tools), "prl-single")
        yield {"parts": parted, "single": single, "ts_dir": ts_dir}
    finally:
        lab.psql("DROP TABLE IF EXISTS prl_big1, prl_big2, prl_big3, prl_big4, prl_ts_rows, prl_ts_rows2")
        lab.psql(f"DROP TABLESPACE IF EXISTS {TABLESPACE}")
        shutil.rmtree(ts_dir, ignore_errors=True)
        st = lab.load()
        s3 = lab.s3_client()
        for key in _objects(lab, f"{st.prefix}/{SERVER}/"):
            s3.delete_object(Bucket=st.bucket, Key=key)


def _assert_same(ours: Path, theirs: Path, ours_ts: Path, theirs_ts: Path) -> None:
    a, b = tree(ours, owners=True), tree(theirs, owners=True)
    links = [k for k in a if k.startswith("pg_tblspc/")]
    assert len(links) == 1, links
    assert a.pop(links[0])[1] == str(ours_ts) and b.pop(links[0])[1] == str(theirs_ts)
    dirs_a = {k: v for k, v in a.items() if v[0] == "dir"}
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert tree(ours_ts, owners=True) == tree(theirs_ts, owners=True)
    assert len(a) > 900 and len(dirs_a) > 10 and "backup_label" in a and "global/pg_control" in a
    assert not (ours / "pgops_restore.incomplete").exists()


def _assert_failed_and_marked(res, dest: Path, *names: str) -> None:
    assert res.returncode == 1, (res.stdout[-1500:], res.stderr[-1500:])
    for name in names:
        assert name in res.stderr, res.stderr[-1500:]
    marker = dest / "pgops_restore.incomplete"
    assert marker.exists() and "FAILED" in marker.read_text(), "the failed restore is not marked"
    assert not (dest / "global" / "pg_control").exists(), "PostgreSQL could start a failed restore"


class TestBothWays:
    """Backups with a tablespace, restored by barman-cloud-restore and by pgops-restore."""

    def test_parts_restore_the_same_files_as_barman_cloud_restore(self, lab, tools, backups, area):
        cluster = _cluster(lab, tools)
        objects = _objects(lab, _base(lab, SERVER, backups["parts"]))
        data_parts = [k for k in objects if k.rsplit("/", 1)[1].startswith("data")]
        ts_parts = [k for k in objects if k.rsplit("/", 1)[1][0].isdigit()]
        assert len(data_parts) >= 4 and len(ts_parts) >= 2, sorted(objects)

        res, barman_s = _restore(lab, cluster, backups["parts"], area / "barman", barman=True, tablespace=area / "ts-b")
        assert res.returncode == 0, res.stderr[-2000:]
        res, ours_s = _restore(lab, cluster, backups["parts"], area / "ours", jobs=3, tablespace=area / "ts-o")
        assert res.returncode == 0, res.stderr[-2000:]
        summary = barman_cloud.parse_restore_summary(res.stdout.splitlines())
        assert summary["parts"] == len(data_parts) + len(ts_parts) and summary["jobs"] == 3, summary
        assert summary["downloaded_bytes"] == sum(objects[k] for k in data_parts + ts_parts)
        print(f"\nrestore of {len(data_parts) + len(ts_parts)} parts: barman-cloud-restore {barman_s:.2f} s, "
              f"pgops-restore --jobs 3 {ours_s:.2f} s")
        _assert_same(area / "ours", area / "barman", area / "ts-o", area / "ts-b")


    def test_a_one_part_backup_restores_the_same(self, lab, tools, backups, area):
        cluster = _cluster(lab, tools)
        names = sorted(k.rsplit("/", 1)[1] for k in _objects(lab, _base(lab, SERVER, backups["single"])))
        assert len(names) == 3 and names[-2:] == ["backup.info", "data.tar.lz4"] and names[0].endswith(".tar.lz4"), names
        res, _ = _restore(lab, cluster, backups["single"], area / "barman", barman=True, tablespace=area / "ts-b")
        assert res.returncode == 0, res.stderr[-2000:]
        res, _ = _restore(lab, cluster, backups["single"], area / "ours", jobs=4, tablespace=area / "ts-o")
        assert res.returncode == 0, res.stderr[-2000:]
        assert barman_cloud.parse_restore_summary(res.stdout.splitlines())["parts"] == 2  # data and the tablespace
        _assert_same(area / "ours", area / "barman", area / "ts-o", area / "ts-b")


    @pytest.fixture
    def broken(self, lab, tools, backups):
        """A copy of the parted backup under another server name, to break."""
        st = lab.load()
        server = f"{SERVER}-broken"
        s3 = lab.s3_client()
        src = _base(lab, SERVER, backups["parts"])
        dst = _base(lab, server, backups["parts"])
        for key in _objects(lab, src):
            s3.copy_object(Bucket=st.bucket, Key=dst + key[len(src):], CopySource={"Bucket": st.bucket, "Key": key})
        yield _cluster(lab, tools, server), dst
        for key in _objects(lab, f"{st.prefix}/{server}/"):
            s3.delete_object(Bucket=st.bucket, Key=key)


    def test_a_missing_part_fails_naming_it(self, lab, backups, broken, area):
        cluster, prefix = broken
        st = lab.load()
        lab.s3_client().delete_object(Bucket=st.bucket, Key=prefix + "data_0001.tar.lz4")  # not the last one
        res, _ = _restore(lab, cluster, backups["parts"], area / "d", tablespace=area / "ts")
        assert res.returncode == 1 and "data_0001.tar.lz4" in res.stderr and "missing" in res.stderr, res.stderr[-1500:]
        assert not (area / "d").exists(), "the plan failed: nothing may be written"


    def test_a_lost_last_part_fails(self, lab, backups, broken, area):
        cluster, prefix = broken
        st = lab.load()
        last = max(k for k in _objects(lab, prefix) if k.rsplit("/", 1)[1].startswith("data"))
        lab.s3_client().delete_object(Bucket=st.bucket, Key=last)
        res, _ = _restore(lab, cluster, backups["parts"], area / "d", tablespace=area / "ts")
        before_last = sorted(k for k in _objects(lab, prefix) if k.rsplit("/", 1)[1].startswith("data"))[-1]
        _assert_failed_and_marked(res, area / "d", "backup_label", before_last.rsplit("/", 1)[1])


    @pytest.mark.parametrize("how", ["flipped", "corrupt", "truncated"])
    def test_a_broken_part_fails_naming_it(self, lab, backups, broken, area, how):
        cluster, prefix = broken
        st = lab.load()
        s3 = lab.s3_client()
        key = prefix + "data_0002.tar.lz4"
        body = bytearray(s3.get_object(Bucket=st.bucket, Key=key)["Body"].read())
        assert body[:4] == b"\x04\x22\x4d\x18" and body[4] & 0x10, "pgops-backup writes lz4 block checksums"
        if how == "flipped":
            # bytes flipped in the middle of the compressed data: the block's checksum no longer matches (barman's
            # own frames, without checksums, let such damage through whenever it still decompresses to a tar stream)
            at = len(body) // 2
            body[at:at + 64] = bytes(b ^ 0x5A for b in body[at:at + 64])
        elif how == "corrupt":
            # a member header in the middle of the part no longer matches its tar checksum (compressed again)
            import io
            import tarfile

            import lz4.frame

            raw = bytearray(lz4.frame.decompress(bytes(body)))
            with tarfile.open(fileobj=io.BytesIO(bytes(raw)), mode="r:") as tf:
                offsets = [m.offset for m in tf.getmembers()]
            assert len(offsets) >= 3, offsets
            at = offsets[len(offsets) // 2]
            raw[at:at + 16] = bytes(b ^ 0x5A for b in raw[at:at + 16])  # the member's name, under its checksum
            body = bytearray(lz4.frame.compress(bytes(raw)))
        else:
            body = body[: len(body) // 2]
        s3.put_object(Bucket=st.bucket, Key=key, Body=bytes(body))
        res, _ = _restore(lab, cluster, backups["parts"], area / "d", tablespace=area / "ts")
        _assert_failed_and_marked(res, area / "d", "data_0002.tar.lz4")


    def test_a_non_empty_target_is_refused_untouched(self, lab, tools, backups, area):
        dest = area / "d"
        dest.mkdir()
        (dest / "PG_VERSION").write_text("15\n")
        _chown_db(dest)
        res, _ = _restore(lab, _cluster(lab, tools), backups["single"], dest, tablespace=area / "ts")
        assert res.returncode == 1 and "not empty: nothing was changed" in res.stderr, res.stderr[-1500:]
        assert sorted(os.listdir(dest)) == ["PG_VERSION"]


# -- the DAGs restore through it ------------------------------------------------------------------------------
def _inventory_in_parts(source: Path, dest_dir: Path, monkeypatch) -> None:
    """The inventory with small backup parts (engine.extra_args), and the tools above as the DB-host venv."""
    data = yaml.safe_load(source.read_text())
    for c in data["clusters"]:
        c["engine"]["extra_args"] = ["--max-archive-size", str(PART_BYTES)]
    path = dest_dir / "clusters.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("PGOPS_INVENTORY", str(path))


def test_restore_verification_uses_the_parallel_restorer(lab, tools, run_dag, monkeypatch, tmp_path):
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator

    assert lab.psql("SELECT count(*) FROM pg_tablespace") == "2", "a tablespace is left over"
    _inventory_in_parts(REPO / "include" / "clusters.example.yaml", tmp_path, monkeypatch)
    monkeypatch.setenv("PGOPS_DBHOST_VENV", str(tools))
    lab.psql("CREATE TABLE IF NOT EXISTS prl_rv AS SELECT g AS id, md5(g::text) AS pad FROM generate_series(1, 80000) g")
    backup_id = BarmanCloudBackupOperator(task_id="backup", cluster_name="main").execute(
        {"run_id": f"prl-rv-{os.getpid()}"})
    scratch = f"/var/tmp/pgops-prl-rv-{os.getpid()}"
    try:
        dr = run_dag(load_dag("pgops_restore_verify__main"),
                     {"scratch_root": scratch, "checks": ["canary", "system_identifier"], "heapallindexed": False})
        states = task_states(dr)
        assert set(states.values()) == {"success"}, states
        restore = dr.get_task_instance("restore").xcom_pull(task_ids="restore")
        plan = dr.get_task_instance("setup").xcom_pull(task_ids="setup")
        assert plan["backup_id"] == backup_id
        assert restore["restorer"] == "pgops-restore" and restore["parts"] >= 3, restore
        assert restore["jobs"] == min(lab.cluster.engine.jobs, restore["parts"])
        assert not os.path.exists(plan["scratch_dir"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        lab.psql("DROP TABLE IF EXISTS prl_rv")


def test_standby_rebuild_uses_the_parallel_restorer(replicated_pair, tools, run_dag, monkeypatch, tmp_path):
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator

    pair = replicated_pair
    rl, pg1, pg2 = pair.rl, pair.primary, pair.standby
    _inventory_in_parts(pair.inventory, tmp_path, monkeypatch)
    monkeypatch.setenv("PGOPS_DBHOST_VENV", str(tools))
    rl.psql(pg1, "CREATE TABLE IF NOT EXISTS prl_sb AS SELECT g AS id, md5(g::text) AS pad "
                 "FROM generate_series(1, 80000) g")
    backup_id = BarmanCloudBackupOperator(task_id="backup", cluster_name=pair.cluster_name).execute(
        {"run_id": f"prl-standby-{os.getpid()}"})
    rl.stop(pg2)  # its slot free: the rebuild replaces its contents (force)
    dr = run_dag(load_dag("pgops_standby_rebuild__repl"), {"target": "pg2", "force": True,
                                                           "socket_dir": pg2.socket_dir, "skip_approval": True})
    states = task_states(dr)
    assert set(states.values()) == {"success"}, states
    assert dr.get_task_instance("preflight").xcom_pull(task_ids="preflight")["backup_id"] == backup_id
    restore = dr.get_task_instance("restore").xcom_pull(task_ids="restore")
    assert restore["restorer"] == "pgops-restore" and restore["parts"] >= 3, restore
    rl.refresh(pg2)
    assert rl.psql(pg2, "SELECT pg_is_in_recovery()") == "t"
    assert rl.psql(pg2, "SELECT count(*) FROM prl_sb") == "80000"
