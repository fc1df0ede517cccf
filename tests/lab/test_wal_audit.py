"""The WAL archive audit on the real lab: barman-cloud WAL from PostgreSQL 15, a pgBackRest repository
written by real pgBackRest, synthetic WAL-G/WAL-E/barman buckets on SeaweedFS, lifecycle and hardening
on moto S3 (SeaweedFS lacks public access block, and encryption there breaks uploads)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pwd
import secrets
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from helpers import REPO, load_dag, task_states

pytestmark = [pytest.mark.lab]

DAG_ID = "pgops_wal_audit__main"
NOW = datetime.now(UTC)


def _ids(report, severity=None):
    return [f["id"] for f in report["body"]["findings"] if severity is None or f["severity"] == severity]


def _finding(report, id_):
    found = [f for f in report["body"]["findings"] if f["id"] == id_]
    assert found, (id_, _ids(report))
    return found[0]


def _cluster(lab, *, bucket, prefix, server="main", layout="auto", **changes):
    from pgops.inventory import Storage

    base = lab.cluster
    return dataclasses.replace(base, storage=Storage(bucket=bucket, prefix=prefix, server_name=server, layout=layout),
                               **changes)


def _archive_some_wal(lab, rounds: int = 3) -> str:
    """Write, switch WAL and wait until each switched segment is archived; return the last one."""
    lab.psql("CREATE TABLE IF NOT EXISTS audit_canary (id serial primary key, at timestamptz default now())")
    seg = ""
    for _ in range(rounds):
        lab.psql("INSERT INTO audit_canary DEFAULT VALUES")
        seg = lab.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
        lab.psql("SELECT pg_switch_wal()")
        deadline = time.time() + 60
        while time.time() < deadline:
            if lab.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") >= seg:
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"segment {seg} was not archived within 60 s")
    return seg


def _put(s3, bucket, key, body=b"x"):
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def _barman_info(backup_id, begin, end, end_time, timeline=1, size=16 * 1024 * 1024):
    return (f"backup_id={backup_id}\nstatus=DONE\ntimeline={timeline}\nbegin_wal={begin}\nend_wal={end}\n"
            f"begin_xlog={int(begin[8:16], 16):X}/{int(begin[16:], 16) * size + 0x28:X}\n"
            f"end_xlog={int(end[8:16], 16):X}/{int(end[16:], 16) * size + 0x100:X}\n"
            f"begin_time={(end_time - timedelta(minutes=5)).isoformat()}\nend_time={end_time.isoformat()}\n"
            f"xlog_segment_size={size}\n").encode()


def _barman_bucket(s3, bucket, root, *, segments, backup_age=timedelta(hours=1), history=None):
    _put(s3, bucket, f"{root}/base/20260101T000000/backup.info",
         _barman_info("20260101T000000", segments[0], segments[0], NOW - backup_age))
    _put(s3, bucket, f"{root}/base/20260101T000000/data.tar.gz")
    for seg in segments:
        _put(s3, bucket, f"{root}/wals/{seg[:16]}/{seg}.gz", gzip.compress(b"wal"))
    for tli, text in (history or {}).items():
        _put(s3, bucket, f"{root}/wals/{tli:08X}.history.gz", gzip.compress(text.encode()))


@pytest.fixture(scope="module")
def synth(lab):
    """A fresh bucket on SeaweedFS for synthetic layouts."""
    s3 = lab.s3_client()
    bucket = f"pgops-synth-{secrets.token_hex(3)}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket


@pytest.fixture
def moto_bucket(lab):
    s3 = lab.aws_client("s3")
    bucket = f"pgops-moto-{secrets.token_hex(4)}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket


# --- the real lab: barman-cloud + PostgreSQL 15 ----------------------------------------------------------


def test_lab_archive_is_clean_then_a_deleted_segment_is_critical(lab, run_dag):
    from pgops.airflow.audit import audit_cluster
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator

    backup_id = BarmanCloudBackupOperator(task_id="b", cluster_name="main").execute({"run_id": "audit-fixture"})
    _archive_some_wal(lab, rounds=4)
    report = audit_cluster(lab.cluster, run_id="t")
    assert report["kind"] == "wal-audit" and report["body"]["layout"] == "barman-cloud"
    assert report["status"] != "critical", _ids(report, "critical")
    assert "WAL_CONTINUOUS" in _ids(report) and "ARCHIVER_OK" in _ids(report)
    assert backup_id in report["body"]["continuity"]["complete_backup_ids"]
    assert report["body"]["recoverable_window"]["latest_segment"] == report["body"]["continuity"]["newest_segment"]
    assert report["body"]["primary"]["lag_segments"] == 0
    assert report["body"]["hardening"]["public_access_block"] == "unknown"  # SeaweedFS: 501, not a crash

    # delete one archived segment that recovery from the backup needs
    st = lab.load()
    s3 = lab.s3_client()
    newest = report["body"]["continuity"]["newest_segment"]
    from pgops.core import wal

    victim = wal.segno_to_segment(1, wal.segment_to_segno(newest)[1] - 1)
    listed = s3.list_objects_v2(Bucket=st.bucket, Prefix=f"{st.prefix}/{st.server_name}/wals/{victim[:16]}/{victim}")
    key = next(o["Key"] for o in listed["Contents"] if o["Key"].rsplit("/", 1)[-1].split(".")[0] == victim)
    saved = s3.get_object(Bucket=st.bucket, Key=key)["Body"].read()
    s3.delete_object(Bucket=st.bucket, Key=key)
    try:
        broken = audit_cluster(lab.cluster, run_id="t2")
        assert broken["status"] == "critical"
        gap = _finding(broken, "WAL_GAP")
        assert gap["evidence"]["first_segment"] == victim == gap["evidence"]["last_segment"]
        assert backup_id in gap["evidence"]["backup_ids"] and victim in gap["message"]

        dr = run_dag(load_dag(DAG_ID))
        assert task_states(dr) == {"audit": "failed"}
        latest = json.loads(s3.get_object(Bucket=st.bucket, Key=lab.cluster.storage.report_key(
            "wal-audit", "latest.json"))["Body"].read())
        assert latest["status"] == "critical" and "WAL_GAP" in _ids(latest)
    finally:
        s3.put_object(Bucket=st.bucket, Key=key, Body=saved)
    assert audit_cluster(lab.cluster, run_id="t3")["status"] != "critical"


def test_dag_run_succeeds_and_writes_report(lab, run_dag):
    _archive_some_wal(lab, rounds=1)
    dr = run_dag(load_dag(DAG_ID))
    assert task_states(dr) == {"audit": "success"}
    summary = dr.get_task_instance("audit").xcom_pull(task_ids="audit")
    assert summary["status"] in ("ok", "warning") and summary["report_key"].endswith(".json")
    st = lab.load()
    keys = [o["Key"] for o in lab.s3_client().list_objects_v2(
        Bucket=st.bucket, Prefix=lab.cluster.storage.report_key("wal-audit", "")).get("Contents", [])]
    assert summary["report_key"] in keys


# --- pgBackRest: a repository written by real pgBackRest ------------------------------------------------


@pytest.mark.skipif(not shutil.which("pgbackrest"), reason="pgbackrest is not installed (include/dbhost/apt-packages.txt)")
def test_pgbackrest_repository(lab, db_tmp_path):
    from pgops.airflow.audit import audit_cluster
    from pgops.lab.local import as_db_user, is_root

    st = lab.load()
    work = db_tmp_path / "pgbr"
    (work / "log").mkdir(parents=True)
    (work / "lock").mkdir()
    repo_prefix = f"pgbackrest-{secrets.token_hex(3)}"
    conf = work / "pgbackrest.conf"
    conf.write_text("\n".join([
        "[global]", "repo1-type=s3", "repo1-s3-endpoint=127.0.0.1", "repo1-s3-uri-style=path",
        f"repo1-storage-port={st.ports['s3_https']}", "repo1-storage-verify-tls=n", f"repo1-s3-bucket={st.bucket}",
        f"repo1-s3-key={st.access_key}", f"repo1-s3-key-secret={st.secret_key}", "repo1-s3-region=us-east-1",
        f"repo1-path=/{repo_prefix}/main", f"log-path={work / 'log'}", f"lock-path={work / 'lock'}",
        "log-level-console=warn", "log-level-file=off", "start-fast=y", "compress-type=gz",
        "[main]", f"pg1-path={st.pg_data}", f"pg1-port={st.pg_port}", f"pg1-socket-path={st.pg_socket_dir}",
        "pg1-user=postgres", ""]))
    os.chmod(conf, 0o600)
    for p in [db_tmp_path, work]:
        os.chmod(p, 0o755)
    if is_root():
        pw = pwd.getpwnam("postgres")
        for p in [work, *work.rglob("*")]:
            os.chown(p, pw.pw_uid, pw.pw_gid)

    def pgbackrest(*args: str) -> str:
        res = subprocess.run(as_db_user(["pgbackrest", f"--config={conf}", "--stanza=main", *args]),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"pgbackrest {args[0]} failed: {res.stderr[-2000:]} {res.stdout[-2000:]}"
        return res.stdout

    pgbackrest("stanza-create")
    pgbackrest("backup", "--type=full", "--archive-check=n")
    info = json.loads(pgbackrest("info", "--output=json"))[0]
    start = info["backup"][-1]["archive"]["start"]
    last = _archive_some_wal(lab, rounds=2)  # completed segments after the backup, still in pg_wal
    wal_dir = Path(st.pg_data) / "pg_wal"
    pushed = sorted(n for n in os.listdir(wal_dir) if len(n) == 24 and start <= n <= last)
    assert pushed and pushed[0] == start
    for name in pushed:
        pgbackrest("archive-push", str(wal_dir / name))

    cluster = _cluster(lab, bucket=st.bucket, prefix=repo_prefix)
    report = audit_cluster(cluster, run_id="pgbr", check_live_primary=False)
    body = report["body"]
    assert body["layout"] == "pgbackrest" and body["listing"]["names"] == ["main"]
    assert [b["backup_id"] for b in body["backups"]] == [info["backup"][-1]["label"]]
    assert body["backups"][0]["status"] == "DONE"
    assert body["listing"]["segment_count"] == len(pushed)
    assert "WAL_GAP" not in _ids(report) and "WAL_CONTINUOUS" in _ids(report)
    assert body["continuity"]["newest_segment"] == pushed[-1]
    assert report["status"] != "critical", _ids(report, "critical")


# --- synthetic layouts on SeaweedFS -----------------------------------------------------------------------


def test_walg_layout_and_gap(lab, synth):
    from pgops.airflow.audit import audit_cluster

    s3, bucket = synth
    root = "walg/main"
    sentinel = {"LSN": 0x2000028, "FinishLSN": 0x2000100, "StartTime": (NOW - timedelta(hours=1)).isoformat(),
                "FinishTime": (NOW - timedelta(minutes=55)).isoformat()}
    _put(s3, bucket, f"{root}/basebackups_005/base_000000010000000000000002_backup_stop_sentinel.json",
         json.dumps(sentinel).encode())
    _put(s3, bucket, f"{root}/basebackups_005/base_000000010000000000000002/tar_partitions/part_1.tar.lz4")
    for n in range(2, 7):
        _put(s3, bucket, f"{root}/wal_005/0000000100000000000000{n:02X}.lz4")
    cluster = _cluster(lab, bucket=bucket, prefix="walg")
    report = audit_cluster(cluster, check_live_primary=False)
    assert report["body"]["layout"] == "wal-g" and "WAL_CONTINUOUS" in _ids(report)
    assert report["status"] != "critical"
    s3.delete_object(Bucket=bucket, Key=f"{root}/wal_005/000000010000000000000004.lz4")
    report = audit_cluster(cluster, check_live_primary=False)
    gap = _finding(report, "WAL_GAP")["evidence"]
    assert (gap["first_segment"], gap["last_segment"]) == ("000000010000000000000004",) * 2
    assert gap["backup_ids"] == ["base_000000010000000000000002"]


def test_wale_layout_configured(lab, synth):
    from pgops.airflow.audit import audit_cluster

    s3, bucket = synth
    root = "wale/main"
    _put(s3, bucket, f"{root}/basebackups_005/base_000000010000000000000002_00000028_backup_stop_sentinel.json",
         b'{"wal_segment_backup_stop": "000000010000000000000002", "expanded_size_bytes": 1000}')
    _put(s3, bucket, f"{root}/basebackups_005/base_000000010000000000000002_00000028/tar_partitions/part_0.tar.lzo")
    for n in range(2, 5):
        _put(s3, bucket, f"{root}/wal_005/0000000100000000000000{n:02X}.lzo")
    report = audit_cluster(_cluster(lab, bucket=bucket, prefix="wale", layout="wal-e"), check_live_primary=False)
    assert report["body"]["layout"] == "wal-e" and "WAL_CONTINUOUS" in _ids(report)
    # WAL-E's sentinel has no times: the backup's age comes from the sentinel object itself
    assert report["body"]["freshness"]["newest_backup_age_s"] < 600


def test_barman_timeline_switch_history_and_big_segments(lab, synth):
    from pgops.airflow.audit import audit_cluster

    s3, bucket = synth
    root = "tli/main"
    segs = ["000000010000000000000002", "000000010000000000000003", "000000020000000000000003",
            "000000020000000000000004"]
    _barman_bucket(s3, bucket, root, segments=segs, history={2: "1\t0/3000100\tno recovery target specified\n"})
    cluster = _cluster(lab, bucket=bucket, prefix="tli")
    report = audit_cluster(cluster, check_live_primary=False)
    assert "WAL_GAP" not in _ids(report) and "HISTORY_MISSING" not in _ids(report), _ids(report)
    assert report["body"]["recoverable_window"]["latest_segment"] == "000000020000000000000004"
    s3.delete_object(Bucket=bucket, Key=f"{root}/wals/00000002.history.gz")
    report = audit_cluster(cluster, check_live_primary=False)
    assert report["status"] == "critical" and _finding(report, "HISTORY_MISSING")["evidence"]["timeline"] == 2

    # 1 GiB segments: seg goes 0..3, so ...0003 is followed by ...0100000000
    root = "big/main"
    size = 1024 ** 3
    _put(s3, bucket, f"{root}/base/b1/backup.info",
         _barman_info("b1", "000000010000000000000003", "000000010000000000000003", NOW, size=size))
    for seg in ("000000010000000000000003", "000000010000000100000000", "000000010000000100000001"):
        _put(s3, bucket, f"{root}/wals/{seg[:16]}/{seg}.gz")
    report = audit_cluster(_cluster(lab, bucket=bucket, prefix="big"), check_live_primary=False,
                           wal_segment_size_bytes=size)
    assert "WAL_CONTINUOUS" in _ids(report) and report["status"] != "critical", _ids(report)


def test_64mib_segments_with_the_primary_unreachable_take_the_size_from_backup_info(lab, synth):
    from pgops.airflow.audit import audit_cluster
    from pgops.core import wal

    s3, bucket = synth
    root = "seg64/main"
    size = 64 * wal.MIB
    # 64 MiB segments: seg goes 00..3F, so ...00003F is followed by ...0100000000 (at 16 MiB: a 192-segment "gap")
    segs = list(wal.segment_range("00000001000000000000003C", "000000010000000100000002", size))
    _put(s3, bucket, f"{root}/base/20260101T000000/backup.info",
         _barman_info("20260101T000000", segs[0], segs[1], NOW - timedelta(hours=1), size=size))
    _put(s3, bucket, f"{root}/base/20260101T000000/data.tar.gz")
    for seg in segs:
        _put(s3, bucket, f"{root}/wals/{seg[:16]}/{seg}.gz", gzip.compress(b"wal"))
    # the primary's connection leads nowhere: the audit cannot ask SHOW wal_segment_size
    cluster = _cluster(lab, bucket=bucket, prefix="seg64", postgres_conn_id="pgops_primary_unreachable",
                       replication=None)
    report = audit_cluster(cluster, s3=s3)
    body = report["body"]
    assert "PRIMARY_UNREACHABLE" in _ids(report, "warning")
    assert body["wal_segment_size_bytes"] == size and "xlog_segment_size=67108864" in body["wal_segment_size_source"]
    assert "WAL_SEGMENT_SIZE_MISMATCH" not in _ids(report) and "WAL_GAP" not in _ids(report), _ids(report)
    assert "WAL_CONTINUOUS" in _ids(report) and report["status"] != "critical"
    assert body["recoverable_window"]["latest_segment"] == "000000010000000100000002"
    # a segment really missing is still a gap, named with 64 MiB arithmetic
    s3.delete_object(Bucket=bucket, Key=f"{root}/wals/0000000100000001/000000010000000100000000.gz")
    report = audit_cluster(cluster, s3=s3)
    gap = _finding(report, "WAL_GAP")["evidence"]
    assert (gap["first_segment"], gap["count"]) == ("000000010000000100000000", 1)


def test_unknown_layout_and_empty_prefix_are_findings(lab, synth):
    from pgops.airflow.audit import audit_cluster

    s3, bucket = synth
    _put(s3, bucket, "photos/main/cat.jpg")
    report = audit_cluster(_cluster(lab, bucket=bucket, prefix="photos"), check_live_primary=False)
    assert report["status"] == "critical" and "UNKNOWN_LAYOUT" in _ids(report)
    report = audit_cluster(_cluster(lab, bucket=bucket, prefix="nothing-here"), check_live_primary=False)
    assert report["status"] == "critical" and "ARCHIVE_EMPTY" in _ids(report)


# --- lifecycle and hardening on moto S3 -------------------------------------------------------------------


SEGS = [f"0000000100000000000000{n:02X}" for n in range(2, 6)]


def test_lifecycle_shorter_than_retention_is_critical_and_fix_applies(lab, moto_bucket):
    from pgops.airflow.audit import audit_cluster

    s3, bucket = moto_bucket
    _barman_bucket(s3, bucket, "pg/main", segments=SEGS)
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [
        {"ID": "expire-3d", "Status": "Enabled", "Filter": {"Prefix": ""}, "Expiration": {"Days": 3}}]})
    cluster = _cluster(lab, bucket=bucket, prefix="pg")
    report = audit_cluster(cluster, s3=s3, check_live_primary=False)
    assert report["status"] == "critical"
    wal_rule = _finding(report, "LIFECYCLE_EXPIRES_NEEDED_WAL")
    required = report["body"]["lifecycle"]["required_days"]
    assert wal_rule["evidence"]["expiration_days"] == 3 and required > 7
    recommended = report["body"]["lifecycle"]["recommended"]["Rules"]
    assert any(r.get("Expiration", {}).get("Days", 0) >= required for r in recommended)

    fixed = audit_cluster(cluster, s3=s3, check_live_primary=False, apply_lifecycle=True)
    assert fixed["body"]["lifecycle"]["applied"] is True and "LIFECYCLE_APPLIED" in _ids(fixed)
    assert not [i for i in _ids(fixed, "critical") if i.startswith("LIFECYCLE")], _ids(fixed, "critical")
    rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert all(r.get("Expiration", {}).get("Days", required) >= required for r in rules)


def test_history_under_expiring_rule_is_warning(lab, moto_bucket):
    from pgops.airflow.audit import audit_cluster

    s3, bucket = moto_bucket
    _barman_bucket(s3, bucket, "pg/main", segments=SEGS)
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [
        {"ID": "wal-60d", "Status": "Enabled", "Filter": {"Prefix": "pg/main/wals/"}, "Expiration": {"Days": 60}}]})
    report = audit_cluster(_cluster(lab, bucket=bucket, prefix="pg"), s3=s3, check_live_primary=False)
    assert "LIFECYCLE_EXPIRES_HISTORY" in _ids(report, "warning")
    assert not [i for i in _ids(report, "critical") if i.startswith("LIFECYCLE")]


def test_lifecycle_on_walg_layout_uses_its_paths(lab, moto_bucket):
    from pgops.airflow.audit import audit_cluster

    s3, bucket = moto_bucket
    root = "walg/main"
    _put(s3, bucket, f"{root}/basebackups_005/base_000000010000000000000002_backup_stop_sentinel.json",
         json.dumps({"LSN": 0x2000028, "FinishLSN": 0x2000100,
                     "FinishTime": (NOW - timedelta(hours=1)).isoformat()}).encode())
    _put(s3, bucket, f"{root}/basebackups_005/base_000000010000000000000002/tar_partitions/part_1.tar.lz4")
    for n in range(2, 5):
        _put(s3, bucket, f"{root}/wal_005/0000000100000000000000{n:02X}.lz4")
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [
        {"ID": "wal-3d", "Status": "Enabled", "Filter": {"Prefix": f"{root}/wal_005/"}, "Expiration": {"Days": 3}},
        {"ID": "old-layout", "Status": "Enabled", "Filter": {"Prefix": f"{root}/wals/"}, "Expiration": {"Days": 1}}]})
    cluster = _cluster(lab, bucket=bucket, prefix="walg")
    report = audit_cluster(cluster, s3=s3, check_live_primary=False)
    lifecycle = report["body"]["lifecycle"]
    assert report["body"]["layout"] == lifecycle["layout"] == "wal-g"
    assert _finding(report, "LIFECYCLE_EXPIRES_NEEDED_WAL")["evidence"]["rule_id"] == "wal-3d"
    assert _finding(report, "LIFECYCLE_EXPIRES_HISTORY")["evidence"]["rule_id"] == "wal-3d"
    assert not [f for f in report["body"]["findings"] if f["evidence"].get("rule_id") == "old-layout"]
    assert not [r for r in lifecycle["recommended"]["Rules"] if "And" in r.get("Filter", {})]
    assert lifecycle["recommended_notes"]

    fixed = audit_cluster(cluster, s3=s3, check_live_primary=False, apply_lifecycle=True)
    assert fixed["body"]["lifecycle"]["applied"] is True
    assert not [i for i in _ids(fixed) if i.startswith("LIFECYCLE_EXPIRES")], _ids(fixed)


def test_backups_stopped_counts_days_until_loss(lab, moto_bucket):
    from pgops.airflow.audit import audit_cluster

    s3, bucket = moto_bucket
    _barman_bucket(s3, bucket, "pg/main", segments=SEGS, backup_age=timedelta(days=20))
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [
        {"ID": "all-25d", "Status": "Enabled", "Filter": {"Prefix": "pg/"}, "Expiration": {"Days": 25}}]})
    report = audit_cluster(_cluster(lab, bucket=bucket, prefix="pg"), s3=s3, check_live_primary=False)
    stopped = _finding(report, "BACKUPS_STOPPED")
    assert stopped["severity"] == "critical"
    assert 4.5 < stopped["evidence"]["days_until_last_backup_expires"] < 5.5
    assert "BACKUP_OVERDUE" in _ids(report)


def test_wal_only_rule_with_stopped_backups_counts_down_to_the_wal_it_deletes(lab, moto_bucket):
    from pgops.airflow.audit import audit_cluster, summary
    from pgops.airflow.ui.summary import fleet_row

    s3, bucket = moto_bucket
    # the case: WAL expires after 3 days, the last backup ended 2 days (and an hour) ago
    _barman_bucket(s3, bucket, "pg/main", segments=SEGS, backup_age=timedelta(days=2, hours=1))
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [
        {"ID": "wal-3d", "Status": "Enabled", "Filter": {"Prefix": "pg/main/wals/"}, "Expiration": {"Days": 3}}]})
    cluster = _cluster(lab, bucket=bucket, prefix="pg")
    report = audit_cluster(cluster, s3=s3, check_live_primary=False)
    loss = report["body"]["lifecycle"]["days_until_loss"]
    assert loss["backup_id"] == "20260101T000000" and 0.9 < loss["days"] < 1.0
    assert loss["rules"][0]["rule_id"] == "wal-3d" and loss["rules"][0]["expires"][0].startswith("begin..end WAL")
    countdown = _finding(report, "LIFECYCLE_DAYS_UNTIL_LOSS")
    assert countdown["severity"] == "critical" and "wal-3d" in countdown["message"]
    assert not [f for f in report["body"]["findings"] if "no lifecycle rule expires" in f["message"]]
    assert "days until loss: 0.9" in summary(report) or "days until loss: 1.0" in summary(report)
    # the fleet table shows the same countdown
    row = fleet_row(cluster.name, now=datetime.now(UTC), audit=report)
    assert 0.9 < row["days_until_loss"] < 1.0

    # a rule on another cluster's WAL reaches nothing this backup needs
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [
        {"ID": "other", "Status": "Enabled", "Filter": {"Prefix": "pg/other/wals/"}, "Expiration": {"Days": 3}}]})
    report = audit_cluster(cluster, s3=s3, check_live_primary=False)
    assert report["body"]["lifecycle"]["days_until_loss"]["days"] is None
    assert "LIFECYCLE_DAYS_UNTIL_LOSS" not in _ids(report)


def test_hardening_on_moto(lab, moto_bucket):
    from pgops.airflow.audit import check_hardening

    s3, bucket = moto_bucket
    state, found = check_hardening(s3, bucket)
    assert state["versioning"] == "disabled" and "BUCKET_VERSIONING_DISABLED" in [f.id for f in found]
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [
        {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True})
    state, found = check_hardening(s3, bucket)
    assert state == {"versioning": "enabled", "encryption": "AES256", "public_access_block": "all",
                     "object_lock": "disabled"}, state
    assert [f.severity for f in found if f.severity != "ok"] == []


# --- the CLI ----------------------------------------------------------------------------------------------


def test_cli_exit_codes(lab, moto_bucket, tmp_path, monkeypatch, capsys):
    from pgops.cli import main

    s3, bucket = moto_bucket
    st = lab.load()
    monkeypatch.setenv("AIRFLOW_CONN_PGOPS_MOTO_AWS", json.dumps({
        "conn_type": "aws", "login": st.access_key, "password": st.secret_key,
        "extra": {"region_name": "us-east-1", "endpoint_url": st.moto_endpoint}}))
    data = yaml.safe_load((REPO / "include" / "clusters.example.yaml").read_text())
    entry = data["clusters"][0]
    entry.update(name="synth", aws_conn_id="pgops_moto_aws",
                 storage={"bucket": bucket, "prefix": "pg", "server_name": "main", "layout": "barman-cloud"})
    inventory = tmp_path / "clusters.yaml"
    inventory.write_text(yaml.safe_dump(data))
    _barman_bucket(s3, bucket, "pg/main", segments=SEGS)
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [
        {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True})

    assert main(["audit", "synth", "--inventory", str(inventory)]) == 1  # versioning off: a warning
    out = capsys.readouterr().out
    assert "WARNING" in out and "BUCKET_VERSIONING_DISABLED" in out and st.secret_key not in out

    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    code = main(["audit", "synth", "--inventory", str(inventory), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, [f for f in report["body"]["findings"] if f["severity"] != "ok"]
    assert report["status"] == "ok" and report["body"]["primary"]["reachable"] is True

    s3.delete_object(Bucket=bucket, Key=f"pg/main/wals/{SEGS[2][:16]}/{SEGS[2]}.gz")
    assert main(["audit", "synth", "--inventory", str(inventory)]) == 2
    assert SEGS[2] in capsys.readouterr().out
    assert main(["audit", "nosuch", "--inventory", str(inventory)]) == 2
