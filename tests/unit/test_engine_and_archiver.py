"""barman-cloud argv building and catalog parsing; archiver health from pg_stat_archiver rows."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from pgops.airflow.operators.backup import backup_name_for_run
from pgops.core.archiver import archiver_health
from pgops.dbhost.engines import barman_cloud
from pgops.inventory import REPO_ROOT as REPO
from pgops.inventory import load_inventory


@pytest.fixture
def cluster():
    return load_inventory().get("main")


def test_backup_argv_is_a_list_without_secrets(cluster):
    argv = barman_cloud.backup_argv(cluster, endpoint_url="http://127.0.0.1:9000", backup_name="pgops-run",
                                    pg_host="127.0.0.1", pg_port=5433, pg_user="postgres", pg_dbname="postgres")
    assert argv[0].endswith("/pgops-backup")  # barman-cloud-backup's main, with pgops' wait for the end WAL
    assert argv[-2:] == ["s3://pgops-lab/clusters", "main"]
    assert ["--endpoint-url", "http://127.0.0.1:9000"] == argv[argv.index("--endpoint-url"):argv.index("--endpoint-url") + 2]
    assert "--lz4" in argv and "--immediate-checkpoint" in argv and argv[argv.index("--jobs") + 1] == "2"
    assert not any("password" in a.lower() or "secret" in a.lower() for a in argv)


def test_delete_argv_carries_policy(cluster):
    argv = barman_cloud.backup_delete_argv(cluster, endpoint_url=None, dry_run=True)
    assert argv[argv.index("--retention-policy") + 1] == "RECOVERY WINDOW OF 7 DAYS"
    assert argv[argv.index("--minimum-redundancy") + 1] == "2" and "--dry-run" in argv
    assert "--endpoint-url" not in argv


def test_show_output_nests_under_cloud():
    out = json.dumps({"cloud": {"backup_id": "20260101T000000", "status": "DONE", "begin_wal": "000000010000000000000003",
                                "end_wal": "000000010000000000000004", "cluster_size": 123, "timeline": 1,
                                "begin_time_iso": "2026-01-01T00:00:00+00:00"}})
    info = barman_cloud.parse_backup_show(out)
    assert info.done and info.cluster_size_bytes == 123 and info.begin_time == "2026-01-01T00:00:00+00:00"
    failed = barman_cloud.parse_backup_show(json.dumps({"cloud": {"backup_id": "x", "status": "FAILED", "error": "boom"}}))
    assert not failed.done and failed.error == "boom"
    with pytest.raises(ValueError, match="unexpected barman-cloud-backup-show output"):
        barman_cloud.parse_backup_show("{}")


def test_backup_name_is_stable_per_run():
    name = backup_name_for_run("scheduled__2026-11-25T02:00:00+00:00")
    assert name == backup_name_for_run("scheduled__2026-11-25T02:00:00+00:00")
    assert name.startswith("pgops-") and ":" not in name and "+" not in name


def _row(**kw):
    base = {"archive_mode": "on", "archive_command": "barman-cloud-wal-archive ... %p", "archived_count": 3,
            "last_archived_wal": "000000010000000000000003", "last_archived_time": datetime(2026, 1, 1, tzinfo=UTC),
            "failed_count": 0, "last_failed_wal": None, "last_failed_time": None}
    base.update(kw)
    return base


def test_archiver_health():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    assert archiver_health(_row()).healthy
    failing = archiver_health(_row(failed_count=4, last_failed_wal="000000010000000000000004",
                                   last_failed_time=t0 + timedelta(minutes=1)))
    assert not failing.healthy and failing.failing_wal == "000000010000000000000004"
    assert "archive_command failed for WAL segment 000000010000000000000004" in failing.message
    recovered = archiver_health(_row(failed_count=4, last_failed_wal="000000010000000000000002",
                                     last_failed_time=t0 - timedelta(minutes=1)))
    assert recovered.healthy
    assert "archive_mode is 'off'" in archiver_health(_row(archive_mode="off")).message
    assert not archiver_health(_row(archive_command="")).healthy


def test_wal_restore_argv_puts_the_prefetcher_in_front_of_barman(cluster):
    plain = barman_cloud.wal_restore_argv(cluster, endpoint_url=None)
    assert plain[0].endswith("barman-cloud-wal-restore") and plain[-2:] == ["s3://pgops-lab/clusters", "main"]
    ours = barman_cloud.wal_restore_argv(cluster, endpoint_url=None, parallel=4, spool_dir="/s/spool")
    cut = ours.index("--")
    assert ours[0] == f"{cluster.engine.bin_dir}/pgops-wal-restore"  # the DB-host venv's console script
    assert ours[1:cut] == ["--parallel", "4", "--spool-dir", "/s/spool"]
    assert ours[cut + 1:] == plain  # barman answers, with its own arguments, whatever the prefetcher cannot
    bare = barman_cloud.wal_restore_argv(cluster, endpoint_url=None, parallel=4, spool_dir="/s/spool", bare=True)
    assert bare[0] == plain[0] and bare[bare.index("--parallel") + 1] == "4"
    from pgops.core import restore as core

    command = core.restore_command(ours)
    assert command.startswith("[ -f /s/spool/%f ] && mv -f /s/spool/%f %p || ") and command.endswith(" main %f %p")


def test_wal_prefetch_start_argv_starts_the_same_prefetcher_the_restore_command_uses(cluster):
    ours = barman_cloud.wal_restore_argv(cluster, endpoint_url="https://s3", parallel=2, spool_dir="/s/spool")
    start = barman_cloud.wal_prefetch_start_argv(cluster, endpoint_url="https://s3", parallel=2, spool_dir="/s/spool",
                                                 start_segment="000000010000000000000007")
    cut = start.index("--")
    assert start[:cut] == [*ours[:ours.index("--")], "--start", "000000010000000000000007"]
    assert start[cut:] == ours[ours.index("--"):]  # same spool, same barman arguments: the same prefetcher
    assert barman_cloud.wal_prefetch_start_argv(cluster, endpoint_url=None, parallel=0, spool_dir="/s/spool",
                                                start_segment="000000010000000000000007") is None
    assert barman_cloud.wal_prefetch_start_argv(cluster, endpoint_url=None, parallel=2, spool_dir="/s/spool",
                                                start_segment="") is None


def test_cli_prints_the_archive_settings(capsys):
    import shlex

    from pgops.cli import main

    assert main(["archive-command", "main", "--endpoint-url", "http://127.0.0.1:9000"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(" = ", 1) for line in out.splitlines() if " = " in line and not line.startswith("#"))
    assert lines["archive_mode"] == "'on'" and lines["wal_level"] == "'replica'" and lines["archive_timeout"] == "'60s'"
    argv = shlex.split(lines["archive_command"].strip("'").replace("''", "'"))
    # the DB-host venv's console script, never a path inside this checkout (the postgres OS user may not read it)
    assert argv[0].endswith("/bin/pgops-wal-archive") and "--background" in argv and argv[-1] == "%p"
    assert not any(str(REPO) in a for a in argv)
    assert argv[argv.index("--endpoint-url") + 1] == "http://127.0.0.1:9000" and "--lz4" in argv
    assert main(["archive-command", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_wal_compression_level_defaults_to_barmans_low_and_is_validated(cluster):
    import dataclasses

    from pgops.inventory import InventoryError, parse_inventory

    argv = barman_cloud.wal_archive_argv(cluster, endpoint_url=None)
    # barman's own default ("medium") is LZ4HC: the archive must not pay it per segment unless asked to
    assert argv[argv.index("--compression-level") + 1] == "low" and "--lz4" in argv
    snappy = dataclasses.replace(cluster, engine=dataclasses.replace(cluster.engine, wal_compression="snappy"))
    assert "--compression-level" not in barman_cloud.wal_archive_argv(snappy, endpoint_url=None)  # no levels
    doc = {"clusters": [{"name": "x", "primary": {"host": "127.0.0.1"}, "storage": {"bucket": "pgops-b"},
                         "engine": {"wal_compression_level": "fastest"}}]}
    with pytest.raises(InventoryError, match=r"wal_compression_level.*low.*medium.*high"):
        parse_inventory(doc, "inventory.yaml")
