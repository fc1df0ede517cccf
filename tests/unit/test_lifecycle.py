from datetime import UTC, datetime

import pytest

from pgops.core import findings as F
from pgops.core import lifecycle as L

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
PREFIX = "pg/main"


def evaluate(rules, **kwargs):
    args = {"cluster_prefix": PREFIX, "retention_policy": "RECOVERY WINDOW OF 7 DAYS", "backup_interval_days": 1,
            "now": NOW}
    args.update(kwargs)
    return L.evaluate_lifecycle(rules, **args)


def ids(assessment):
    return sorted(f.id for f in assessment.findings)


@pytest.mark.parametrize(("text", "window", "redundancy"), [
    ("RECOVERY WINDOW OF 7 DAYS", 7, None), ("recovery window of 2 weeks", 14, None),
    ("RECOVERY WINDOW OF 1 MONTH", 31, None), ("REDUNDANCY 3", None, 3)])
def test_parse_retention_policy(text, window, redundancy):
    policy = L.parse_retention_policy(text)
    assert (policy.window_days, policy.redundancy) == (window, redundancy)


@pytest.mark.parametrize("bad", ["7 DAYS", "RECOVERY WINDOW OF 7 YEARS", "REDUNDANCY 0", "", None])
def test_parse_retention_policy_rejects(bad):
    with pytest.raises(ValueError, match="retention policy"):
        L.parse_retention_policy(bad)


def test_required_days():
    assert L.required_days(L.parse_retention_policy("RECOVERY WINDOW OF 7 DAYS"), backup_interval_days=1) == 15
    assert L.required_days(L.parse_retention_policy("REDUNDANCY 3"), backup_interval_days=7,
                           oldest_needed_backup_age_days=20, margin_days=2) == 29


def test_absent_configuration_is_info_with_recommendation():
    result = evaluate(None)
    assert ids(result) == [F.LIFECYCLE_ABSENT] and result.status == F.OK
    rule_ids = [r["ID"] for r in result.recommended["Rules"]]
    assert rule_ids == ["pgops-pg-main-wal-expiry", "pgops-pg-main-abort-multipart"]


def test_rule_shorter_than_retention_is_critical_with_corrected_rule():
    rules = [{"ID": "expire-wal", "Status": "Enabled", "Filter": {"Prefix": "pg/main/wals/0000000"},
              "Expiration": {"Days": 5}},
             {"ID": "logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 1}}]
    result = evaluate(rules)
    assert result.status == F.CRITICAL
    assert ids(result) == [F.LIFECYCLE_EXPIRES_HISTORY, F.LIFECYCLE_EXPIRES_NEEDED_WAL]
    wal_finding = next(f for f in result.findings if f.id == F.LIFECYCLE_EXPIRES_NEEDED_WAL)
    assert wal_finding.evidence["required_days"] == 15 and "expire-wal" in wal_finding.message
    recommended = {r["ID"]: r for r in result.recommended["Rules"]}
    assert "expire-wal" not in recommended
    assert recommended["logs"] == rules[1]
    assert recommended["pgops-pg-main-wal-expiry"] == {
        "ID": "pgops-pg-main-wal-expiry", "Status": "Enabled",
        "Filter": {"And": {"Prefix": "pg/main/wals/", "Tags": [{"Key": "pgops-expire", "Value": "wal"}]}},
        "Expiration": {"Days": 15}}
    # the recommendation itself passes, with WAL tagged as recommended
    again = evaluate(result.recommended["Rules"], object_tags={"wal": {"pgops-expire": "wal"}})
    assert again.status == F.OK


def test_bucket_wide_rule_is_raised_not_dropped():
    rules = [{"ID": "all", "Status": "Enabled", "Filter": {}, "Expiration": {"Days": 10}}]
    result = evaluate(rules)
    assert F.LIFECYCLE_EXPIRES_NEEDED_BASE in ids(result)
    assert F.LIFECYCLE_EXPIRES_BACKUP_METADATA in ids(result)
    (broad,) = [r for r in result.recommended["Rules"] if r["ID"] == "all"]
    assert broad["Expiration"] == {"Days": 15}


def test_history_under_long_rule_is_warning_only():
    rules = [{"ID": "wal-90", "Status": "Enabled", "Prefix": "pg/main/wals/", "Expiration": {"Days": 90}}]
    result = evaluate(rules)
    assert ids(result) == [F.LIFECYCLE_EXPIRES_HISTORY]
    assert result.status == F.WARNING
    assert "00000002" not in result.findings[0].message and ".history" in result.findings[0].message


def test_rule_on_segment_directories_does_not_touch_history():
    rules = [{"ID": "seg", "Status": "Enabled", "Filter": {"Prefix": "pg/main/wals/0000000100000000/"},
              "Expiration": {"Days": 30}}]
    assert evaluate(rules).status == F.OK
    assert ids(evaluate(rules)) == [F.LIFECYCLE_OK]


def test_disabled_and_transition_only_rules_are_ok():
    rules = [{"ID": "off", "Status": "Disabled", "Filter": {"Prefix": ""}, "Expiration": {"Days": 1}},
             {"ID": "glacier", "Status": "Enabled", "Filter": {"Prefix": "pg/"},
              "Transitions": [{"Days": 30, "StorageClass": "GLACIER"}]}]
    result = evaluate(rules)
    assert result.status == F.OK
    assert F.LIFECYCLE_TRANSITION_ONLY in ids(result)


def test_tag_filter_affects_only_tagged_classes():
    rules = [{"ID": "tagged", "Status": "Enabled",
              "Filter": {"And": {"Prefix": "pg/main/", "Tags": [{"Key": "expire", "Value": "yes"}]}},
              "Expiration": {"Days": 3}}]
    untagged = evaluate(rules)
    assert untagged.status == F.OK
    assert "does not affect" in next(f for f in untagged.findings if f.id == F.LIFECYCLE_TAGGED_OBJECTS).message
    tagged = evaluate(rules, object_tags={"wal": {"expire": "yes"}, "history": {"expire": "yes"}})
    assert ids(tagged) == [F.LIFECYCLE_EXPIRES_HISTORY, F.LIFECYCLE_EXPIRES_NEEDED_WAL, F.LIFECYCLE_TAGGED_OBJECTS]


def test_expiration_date_is_critical():
    rules = [{"ID": "date", "Status": "Enabled", "Filter": {"Prefix": "pg/main/base/"},
              "Expiration": {"Date": datetime(2026, 12, 1, tzinfo=UTC)}}]
    result = evaluate(rules)
    assert F.LIFECYCLE_EXPIRATION_DATE in ids(result) and result.status == F.CRITICAL


def test_redundancy_uses_age_of_oldest_needed_backup():
    rules = [{"ID": "base", "Status": "Enabled", "Filter": {"Prefix": "pg/main/base/"}, "Expiration": {"Days": 25}}]
    assert F.LIFECYCLE_EXPIRES_NEEDED_BASE in ids(evaluate(rules, retention_policy="REDUNDANCY 3",
                                                           backup_interval_days=1, oldest_needed_backup_age_days=20))


def test_stopped_backups_count_days_until_loss():
    rules = [{"ID": "all", "Status": "Enabled", "Filter": {"Prefix": "pg/main/"}, "Expiration": {"Days": 30}}]
    result = evaluate(rules, newest_backup_age_days=26)
    assert result.days_until_last_backup_expires == pytest.approx(4)
    stopped = next(f for f in result.findings if f.id == F.BACKUPS_STOPPED)
    assert stopped.severity == F.CRITICAL and "4.0 days" in stopped.message
    no_rule = evaluate(None, newest_backup_age_days=5)
    assert no_rule.days_until_last_backup_expires is None
    assert next(f for f in no_rule.findings if f.id == F.BACKUPS_STOPPED).severity == F.WARNING
