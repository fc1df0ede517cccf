"""Restore verification core: targets, recovery settings, server log, disk check, backup choice, RTO trend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pgops.core import restore as core
from pgops.dbhost.engines.barman_cloud import parse_backup_info


def _backup(backup_id: str, end: str, status: str = "DONE", size: int = 10**9):
    return parse_backup_info({"backup_id": backup_id, "status": status, "end_time_iso": end, "cluster_size": size})


@pytest.mark.parametrize("text,expected", [
    ("latest", ("latest", None)), ("Canary", ("canary", None)), (None, ("latest", None)),
    ("0/3000060", ("lsn", "0/3000060")), ("a/ff", ("lsn", "A/FF")),
    ("2024-05-01T13:45:00Z", ("time", "2024-05-01T13:45:00+00:00")),
    ("2024-05-01 13:45:00.123456+02:00", ("time", "2024-05-01T13:45:00.123456+02:00")),
])
def test_parse_target(text, expected):
    assert core.parse_target(text) == expected


@pytest.mark.parametrize("text,match", [("yesterday", "is not 'latest'"), ("2024-05-01T13:45:00", "no time zone")])
def test_parse_target_rejects(text, match):
    with pytest.raises(core.RestorePlanError, match=match):
        core.parse_target(text)


def test_canary_target_is_its_xid_or_time():
    canary = {"id": 7, "xid": "1234", "committed_at": "2024-05-01T13:45:00+00:00"}
    assert core.resolve_target("canary", None, canary=canary) == core.RecoveryTarget(kind="xid", value="1234")
    t = core.resolve_target("canary", None, canary=canary, canary_mode="time")
    assert t.settings() == {"recovery_target_time": "2024-05-01T13:45:00+00:00", "recovery_target_inclusive": "on"}
    assert core.target_time(core.RecoveryTarget(kind="xid", value="1234"), canary) == datetime(2024, 5, 1, 13, 45,
                                                                                              tzinfo=UTC)
    with pytest.raises(core.RestorePlanError, match="canary task"):
        core.resolve_target("canary", None, canary=None)


def test_recovery_settings_and_rendering():
    cmd = core.restore_command(["/v/bin/barman-cloud-wal-restore", "--cloud-provider", "aws-s3", "--parallel", "4",
                                "--spool-dir", "/s/spool", "s3://b/p", "main"])
    assert cmd.endswith("--parallel 4 --spool-dir /s/spool s3://b/p main %f %p")
    s = core.recovery_settings(restore_command=cmd, target=core.RecoveryTarget(kind="lsn", value="0/3000060"),
                               port=54999, socket_dir="/s/run", hba_file="/s/data/pg_hba.conf")
    assert s["recovery_target_lsn"] == "0/3000060" and s["recovery_target_action"] == "promote"
    assert s["archive_mode"] == "off" and s["listen_addresses"] == "127.0.0.1" and s["port"] == "54999"
    assert s["unix_socket_directories"] == "/s/run"
    latest = core.recovery_settings(restore_command=cmd, target=core.RecoveryTarget(kind="latest"), port=1,
                                    socket_dir="/r", hba_file="/h")
    assert not any(k.startswith("recovery_target_") and k != "recovery_target_action" for k in latest)
    text = core.render_conf({"restore_command": "a 'b' %f %p", "archive_mode": "off"})
    assert "restore_command = 'a ''b'' %f %p'\n" in text and "archive_mode = 'off'\n" in text


LOG_MISSING = """\
2024-05-01 10:00:00.100 UTC [100] LOG:  starting PostgreSQL 15.8 on x86_64-pc-linux-gnu
2024-05-01 10:00:00.200 UTC [101] LOG:  starting point-in-time recovery to XID 1234
2024-05-01 10:00:00.900 UTC [101] LOG:  restored log file "000000010000000000000003" from archive
2024-05-01 10:00:01.000 UTC [150] FATAL:  the database system is starting up
2024-05-01 10:00:01.500 UTC [101] LOG:  restored log file "000000010000000000000004" from archive
2024-05-01 10:00:01.600 UTC [101] LOG:  consistent recovery state reached at 0/4000100
ERROR: WAL file 00000002.history for server main does not exist
ERROR: WAL file 000000010000000000000005 for server main does not exist
2024-05-01 10:00:02.300 UTC [101] FATAL:  recovery ended before configured recovery target was reached
2024-05-01 10:00:02.310 UTC [100] LOG:  startup process (PID 101) exited with exit code 1
"""

LOG_OK = """\
2024-05-01 10:00:00.100 UTC [100] LOG:  starting PostgreSQL 15.8
2024-05-01 10:00:00.900 UTC [101] LOG:  restored log file "000000010000000000000003" from archive
2024-05-01 10:00:01.400 UTC [101] LOG:  database system is ready to accept read-only connections
2024-05-01 10:00:01.500 UTC [101] LOG:  restored log file "000000010000000000000004" from archive
2024-05-01 10:00:02.000 UTC [101] LOG:  recovery stopping after commit of transaction 1234, time 2024-05-01 09:59:58
2024-05-01 10:00:02.100 UTC [101] LOG:  archive recovery complete
2024-05-01 10:00:02.600 UTC [100] LOG:  database system is ready to accept connections
"""


def test_server_log_names_the_missing_segment():
    parsed = core.parse_server_log(LOG_MISSING)
    assert parsed.failed and parsed.target_not_reached
    assert parsed.restored_segments == ["000000010000000000000003", "000000010000000000000004"]
    assert parsed.missing_needed() == "000000010000000000000005"
    msg = parsed.failure_message()
    assert "FATAL: recovery ended before configured recovery target was reached" in msg
    assert "WAL segment 000000010000000000000005 is missing" in msg and "last segment restored: " \
           "000000010000000000000004" in msg
    assert "starting up" not in msg  # our own polling's FATAL is not the server failing


def test_server_log_success_and_timing():
    parsed = core.parse_server_log(LOG_OK)
    assert not parsed.failed and parsed.archive_recovery_complete
    assert parsed.recovery_stop.startswith("after commit of transaction 1234")
    assert len(parsed.restored_segments) == 2
    replay = core.log_timestamp(parsed.ready_at) - core.log_timestamp(parsed.started_at)
    assert replay == timedelta(seconds=2.5)
    assert core.log_timestamp("2024-05-01 10:00:00 CEST [1] LOG: x") is None  # no guessed offsets


def test_disk_check_names_both_numbers():
    assert core.parse_df_avail("   Avail\n123456789\n") == 123456789
    assert core.disk_shortfall(avail_bytes=10, needed_bytes=10, path="/s", backup_id="b") is None
    msg = core.disk_shortfall(avail_bytes=5 * 2**30, needed_bytes=12 * 2**30, path="/scratch", backup_id="20240501T")
    assert "5.0 GiB (5368709120 bytes) free in /scratch" in msg and "needs 12.0 GiB (12884901888 bytes)" in msg
    assert core.required_bytes(10 * 2**30) > 11 * 2**30


def test_choose_backup():
    catalog = [_backup("20240501T020000", "2024-05-01T02:10:00+00:00"),
               _backup("20240502T020000", "2024-05-02T02:10:00+00:00"),
               _backup("20240503T020000", "2024-05-03T02:10:00+00:00", status="FAILED")]
    assert core.choose_backup(catalog, "latest").backup_id == "20240502T020000"
    before = datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert core.choose_backup(catalog, "latest", before=before).backup_id == "20240501T020000"
    assert core.choose_backup(catalog, "20240501T020000").backup_id == "20240501T020000"
    with pytest.raises(core.RestorePlanError, match="status FAILED"):
        core.choose_backup(catalog, "20240503T020000")
    with pytest.raises(core.RestorePlanError, match="not in the catalog"):
        core.choose_backup(catalog, "nope")
    with pytest.raises(core.RestorePlanError, match="no DONE backup ended before"):
        core.choose_backup(catalog, "latest", before=datetime(2024, 4, 1, tzinfo=UTC))


def test_rto_trend_warns_before_the_target_is_crossed():
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    gib = 2**30
    # 100 GiB growing 10 GiB/day; RTO = 60 s + 30 s/GiB: 6060 s at 200 GiB, target 9060 s reached at 300 GiB (day 10).
    history = [{"at": t0 + timedelta(days=d), "size_bytes": (100 + 10 * d) * gib, "rto_s": 60 + 30 * (100 + 10 * d)}
               for d in range(0, 11)]
    trend = core.rto_trend(history, target_s=9060, horizon_days=30)
    assert trend.status == "ok" and trend.points == 11 and trend.seconds_per_gib == pytest.approx(30)
    assert trend.intercept_s == pytest.approx(60) and trend.growth_bytes_per_day == pytest.approx(10 * gib)
    assert trend.days_until_target == pytest.approx(10, abs=0.01)
    assert trend.projected_rto_s == pytest.approx(60 + 30 * 500)
    assert (trend.size_min_bytes, trend.size_max_bytes) == (100 * gib, 200 * gib)
    assert trend.warning and "within 30 days" in trend.warning and "in about 10 days" in trend.warning
    assert core.rto_trend(history, target_s=9060, horizon_days=5).warning is None
    assert core.rto_trend(history[:2], target_s=9060, horizon_days=30).points == 2  # too little history: no fit


def test_rto_trend_needs_three_restores_of_different_sizes():
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    mb = 2**20
    # the field report: restores of about 41 MB, 4 s each; a fit on them read 7,542 s per GiB
    same = [{"at": t0 + timedelta(days=d), "size_bytes": int((41 + 0.1 * d) * mb), "rto_s": 4.0 + 0.8 * d}
            for d in range(5)]
    trend = core.rto_trend(same, target_s=3600, horizon_days=90)
    assert trend.status == core.NOT_ENOUGH_DATA and trend.distinct_sizes == 1
    assert trend.seconds_per_gib is None and trend.projected_rto_s is None and trend.warning is None
    assert "5 verified restore(s) of 1 different size(s)" in trend.reason
    one = core.rto_trend(same[:1], target_s=3600, horizon_days=90)
    assert one.status == core.NOT_ENOUGH_DATA and one.projected_rto_s is None
    # two sizes are still not three
    two = same[:3] + [{"at": t0 + timedelta(days=9), "size_bytes": 400 * mb, "rto_s": 30.0}]
    assert core.rto_trend(two, target_s=3600, horizon_days=90).distinct_sizes == 2
    # three sizes, but bigger is not slower: no per-GiB cost to forecast with
    noise = [{"at": t0 + timedelta(days=d), "size_bytes": s * mb, "rto_s": r}
             for d, (s, r) in enumerate(((100, 50.0), (200, 40.0), (400, 30.0)))]
    flat = core.rto_trend(noise, target_s=3600, horizon_days=90)
    assert flat.status == core.NOT_ENOUGH_DATA and "do not take longer" in flat.reason
    # a negative fixed cost is fitted again through the origin
    steep = [{"at": t0 + timedelta(days=d), "size_bytes": s * 2**30, "rto_s": r}
             for d, (s, r) in enumerate(((1, 5.0), (2, 30.0), (4, 80.0)))]
    through = core.rto_trend(steep, target_s=3600, horizon_days=90)
    assert through.status == "ok" and through.intercept_s == 0.0 and through.seconds_per_gib == pytest.approx(
        (1 * 5 + 2 * 30 + 4 * 80) / (1 + 4 + 16))


def test_report_status_and_history():
    assert core.report_status(failed=True, rto_s=None, rto_target_s=10, trend_warning=None) == "failed"
    assert core.report_status(failed=False, rto_s=11, rto_target_s=10, trend_warning=None) == "critical"
    assert core.report_status(failed=False, rto_s=9, rto_target_s=10, trend_warning="x") == "warning"
    assert core.report_status(failed=False, rto_s=9, rto_target_s=10, trend_warning=None) == "ok"
    reports = [{"status": "ok", "finished_at": "2024-05-01T10:00:00+00:00",
                "body": {"measurements": {"database_size_bytes": 5, "rto_s": 2.0}}},
               {"status": "failed", "finished_at": "2024-05-02T10:00:00+00:00",
                "body": {"measurements": {"database_size_bytes": 5, "rto_s": None}}}]
    assert core.history_points(reports) == [{"at": datetime(2024, 5, 1, 10, tzinfo=UTC), "size_bytes": 5, "rto_s": 2.0}]


def test_scratch_name_is_stable_and_safe():
    name = core.scratch_name("pgops_restore_verify__main", "manual__2024-05-01T10:00:00+00:00")
    assert name == core.scratch_name("pgops_restore_verify__main", "manual__2024-05-01T10:00:00+00:00")
    assert "/" not in name and ":" not in name and "+" not in name
    assert name != core.scratch_name("pgops_restore_verify__main", "manual__2024-05-02T10:00:00+00:00")
    assert core.socket_path_problem(f"/var/tmp/pgops-restore/{name}/run") is None
    assert "107-byte" in core.socket_path_problem("/" + "x" * 100 + "/run")


def test_server_log_names_the_replay_position_before_sql_answers():
    text = ("2024-05-01 10:00:00.000 UTC [7] LOG:  starting point-in-time recovery to XID 1579\n"
            "2024-05-01 10:00:00.100 UTC [7] LOG:  redo starts at 0/2000028\n"
            "2024-05-01 10:00:01.100 UTC [9] FATAL:  the database system is not yet accepting connections\n")
    assert core.parse_server_log(text).replay_lsn == "0/2000028"
    later = text + ("2024-05-01 10:00:10.100 UTC [7] LOG:  redo in progress, elapsed time: 10.00 s, "
                    "current LSN: 1A/3F0000D8\n")
    assert core.parse_server_log(later).replay_lsn == "1A/3F0000D8"
    assert core.parse_server_log("2024-05-01 10:00:00 UTC [7] LOG:  database system is ready\n").replay_lsn is None
