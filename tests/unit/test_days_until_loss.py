"""Days until loss: every lifecycle rule that reaches what the newest recoverable backup needs counts down."""

from datetime import UTC, datetime, timedelta

import pytest

from pgops.airflow import audit
from pgops.core import findings as F
from pgops.core import layouts, wal
from pgops.core import lifecycle as L
from pgops.core.continuity import check_continuity

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
ROOT = "pg/main"


def rule(prefix, days=None, *, tags=None, date=None, rule_id="r"):
    filt = {"And": {"Prefix": f"{ROOT}/{prefix}", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}} \
        if tags else {"Prefix": f"{ROOT}/{prefix}"}
    return {"ID": rule_id, "Status": "Enabled", "Filter": filt,
            "Expiration": {"Date": date} if date else {"Days": days}}


def evaluate(rules, **kwargs):
    args = {"cluster_prefix": ROOT, "retention_policy": "RECOVERY WINDOW OF 7 DAYS", "backup_interval_days": 1,
            "now": NOW}
    args.update(kwargs)
    return L.evaluate_lifecycle(rules, **args)


def finding(assessment, id_):
    found = [f for f in assessment.findings if f.id == id_]
    assert found, [f.id for f in assessment.findings]
    return found[0]


def bucket(backup_days_ago, *, segments=6, history=False):
    """A parsed barman-cloud listing: one backup backup_days_ago, WAL after it, optionally a switch to TL 2."""
    end = NOW - timedelta(days=backup_days_ago)
    segs = [f"0000000100000000000000{n:02X}" for n in range(2, 2 + segments)]
    keys = [(f"{ROOT}/base/20261115T120000/backup.info", 1, end), (f"{ROOT}/base/20261115T120000/data.tar.gz", 1, end)]
    keys += [(f"{ROOT}/wals/{s[:16]}/{s}.gz", 1, end + timedelta(minutes=i)) for i, s in enumerate(segs)]
    if history:
        keys += [(f"{ROOT}/wals/000000020000000000000007.gz", 1, end + timedelta(hours=2)),
                 (f"{ROOT}/wals/00000002.history.gz", 1, end + timedelta(hours=1))]
    listing = layouts.parse_listing(sorted(keys), prefix=ROOT)
    info = (f"backup_id=20261115T120000\nstatus=DONE\ntimeline=1\nbegin_wal={segs[0]}\nend_wal={segs[0]}\nbegin_xlog=0/2000028\n"
            f"end_xlog=0/2000100\nbegin_time={(end - timedelta(minutes=5)).isoformat()}\nend_time={end.isoformat()}\n"
            f"xlog_segment_size={wal.DEFAULT_WAL_SEGMENT_SIZE_BYTES}\n")
    backups, _ = layouts.resolve_backups(listing, {f"{ROOT}/base/20261115T120000/backup.info": info.encode()})
    histories = {2: wal.parse_history(b"1\t0/7000000\tno recovery target specified\n")} if history else {}
    continuity = check_continuity(backups, listing.wal, histories)
    modified = {f"{ROOT}/base/20261115T120000/backup.info": end}
    return audit.newest_backup_needs(backups, continuity, listing.wal, modified, root=ROOT,
                                     layout=layouts.BARMAN_CLOUD, now=NOW)


def test_wal_only_rule_with_stopped_backups_counts_down():
    # the case: WAL expires after 3 days, the newest backup is 2 days old -> its WAL is gone in 1 day
    backup_id, needs = bucket(2)
    result = evaluate([rule("wals/", 3, rule_id="wal-3d")], newest_backup_age_days=2.0, newest_backup_id=backup_id,
                      newest_backup_needs=needs, backup_interval_days=0.5)
    assert result.days_until_last_backup_expires == pytest.approx(1 - 5 / 1440, abs=1e-6)  # begin 5 min earlier
    (countdown,) = result.countdown
    assert countdown.rule_id == "wal-3d" and countdown.expires[0].startswith("begin..end WAL")
    stopped = finding(result, F.BACKUPS_STOPPED)
    assert stopped.severity == F.CRITICAL and "no lifecycle rule" not in stopped.message
    assert "20261115T120000 becomes unrecoverable in 1.0 days" in stopped.message and "wal-3d" in stopped.message
    loss = finding(result, F.LIFECYCLE_DAYS_UNTIL_LOSS)
    assert loss.severity == F.CRITICAL and loss.evidence["rules"][0]["rule_id"] == "wal-3d"
    body = result.to_dict()
    assert body["days_until_loss"]["backup_id"] == "20261115T120000" and body["days_until_loss"]["days"] == pytest.approx(
        result.days_until_last_backup_expires)


def test_every_class_a_backup_needs_counts_and_the_soonest_wins():
    backup_id, needs = bucket(10, history=True)
    classes = {n.cls for n in needs}
    assert classes == {L.BASE, L.WAL, L.BACKUP_METADATA, L.HISTORY}
    history = next(n for n in needs if n.cls == L.HISTORY)
    assert history.key == "wals/00000002.history.gz" and history.age_days == pytest.approx(10 - 1 / 24)
    cases = {
        "base/20261115T120000/data": (L.BASE, 30, 20.0),
        "base/20261115T120000/backup.info": (L.BACKUP_METADATA, 30, 20.0),
        "base/": (L.BASE, 25, 15.0),  # files and metadata together: the files began 5 minutes earlier
        "wals/00000002.history": (L.HISTORY, 12, 12 - 10 + 1 / 24),
        "wals/0000000100000000/": (L.WAL, 14, 4.0),
    }
    for prefix, (cls, days, left) in cases.items():
        result = evaluate([rule(prefix, days)], newest_backup_age_days=10, newest_backup_id=backup_id,
                          newest_backup_needs=needs)
        assert result.days_until_last_backup_expires == pytest.approx(left, abs=0.01), prefix
        assert any(cls == n.cls for n in needs if n.what in result.countdown[0].expires), prefix
    both = evaluate([rule("wals/", 14, rule_id="wal"), rule("base/", 11, rule_id="base")],
                    newest_backup_id=backup_id, newest_backup_needs=needs, newest_backup_age_days=10)
    assert [c.rule_id for c in both.countdown] == ["base", "wal"]
    assert both.days_until_last_backup_expires == pytest.approx(1.0, abs=0.01)


def test_rules_that_reach_nothing_it_needs_do_not_count():
    backup_id, needs = bucket(10)
    for other in (rule("wals/0000000100000001/", 3), rule("base/b0/", 3), rule("pgops/", 3)):
        result = evaluate([other], newest_backup_age_days=10, newest_backup_id=backup_id, newest_backup_needs=needs)
        assert result.countdown == [] and result.days_until_last_backup_expires is None
        stopped = finding(result, F.BACKUPS_STOPPED)
        assert "no lifecycle rule expires what the newest recoverable backup 20261115T120000 needs" in stopped.message


def test_tag_rules_count_when_the_objects_carry_the_tag():
    backup_id, needs = bucket(5)
    tagged = [rule("wals/", 6, tags={"pgops-expire": "wal"})]
    kwargs = {"newest_backup_age_days": 5, "newest_backup_id": backup_id, "newest_backup_needs": needs}
    assert evaluate(tagged, **kwargs).countdown == []
    result = evaluate(tagged, object_tags={L.WAL: {"pgops-expire": "wal"}}, **kwargs)
    assert result.days_until_last_backup_expires == pytest.approx(1.0, abs=0.01)


def test_date_rule_counts_from_today_and_past_due_is_zero():
    backup_id, needs = bucket(1)
    result = evaluate([rule("", date="2026-11-28T00:00:00Z")], newest_backup_id=backup_id, newest_backup_needs=needs,
                      newest_backup_age_days=1)
    assert result.days_until_last_backup_expires == 3 and result.countdown[0].expiration_date == "2026-11-28"
    overdue = evaluate([rule("wals/", 1)], newest_backup_id=backup_id, newest_backup_needs=needs,
                       newest_backup_age_days=1)
    assert overdue.days_until_last_backup_expires == 0.0 and "now" in overdue.countdown[0].describe()


def test_running_backups_show_the_countdown_as_ok_and_no_recoverable_backup_says_so():
    backup_id, needs = bucket(0.5)
    result = evaluate([rule("wals/", 30)], newest_backup_age_days=0.5, newest_backup_id=backup_id,
                      newest_backup_needs=needs)
    loss = finding(result, F.LIFECYCLE_DAYS_UNTIL_LOSS)
    assert loss.severity == F.OK and "in 29.5 days" in loss.message
    assert F.BACKUPS_STOPPED not in [f.id for f in result.findings]
    none = evaluate([rule("wals/", 30)], newest_backup_age_days=5, newest_backup_id=None, newest_backup_needs=[])
    assert "no backup is recoverable now" in finding(none, F.BACKUPS_STOPPED).message


def test_summary_prints_the_countdown():
    backup_id, needs = bucket(2)
    result = evaluate([rule("wals/", 3, rule_id="wal-3d")], newest_backup_age_days=2, newest_backup_id=backup_id,
                      newest_backup_needs=needs)
    report = {"cluster": "main", "status": result.status,
              "body": {"bucket": "b", "prefix": ROOT, "lifecycle": result.to_dict(), "findings": [], "counts": {}}}
    assert "days until loss: 1.0 (newest recoverable backup 20261115T120000: rule wal-3d expires begin..end WAL" in \
        audit.summary(report)
