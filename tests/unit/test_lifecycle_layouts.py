"""Lifecycle rules against pgBackRest, WAL-G and WAL-E keys (and barman-cloud's, for comparison)."""

from datetime import UTC, datetime

import pytest

from pgops.core import findings as F
from pgops.core import layouts
from pgops.core import lifecycle as L

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
ROOT = "pg/main"
PGBR_LABEL = "20261120-010000F"
WALG_BACKUP = "base_000000010000000000000002"
WALE_BACKUP = "base_000000010000000000000002_00000028"

# per layout, a rule prefix (relative to the cluster root) that reaches only ...
CASES = {
    layouts.BARMAN_CLOUD: {
        "wal": "wals/0000000100000000/",
        "history": "wals/00000002.history",
        "base": "base/20261120T010000/data",
        "metadata": "base/20261120T010000/backup.info",
    },
    layouts.PGBACKREST: {
        "wal": "archive/main/15-1/0000000100000000/",
        "history": "archive/main/15-1/00000002.history",
        "base": f"backup/main/{PGBR_LABEL}/pg_data/",
        "metadata": "backup/main/backup.info",
    },
    layouts.WAL_G: {
        "wal": "wal_005/0000000100000000",
        "history": "wal_005/00000002.history",
        "base": f"basebackups_005/{WALG_BACKUP}/tar_partitions/",
        "metadata": f"basebackups_005/{WALG_BACKUP}_backup_stop_sentinel.json",
    },
    layouts.WAL_E: {
        "wal": "wal_005/0000000100000000",
        "history": "wal_005/00000002.history",
        "base": f"basebackups_005/{WALE_BACKUP}/tar_partitions/",
        "metadata": f"basebackups_005/{WALE_BACKUP}_backup_stop_sentinel.json",
    },
}
ALL_LAYOUTS = sorted(CASES)


def evaluate(rules, layout, **kwargs):
    args = {"cluster_prefix": ROOT, "retention_policy": "RECOVERY WINDOW OF 7 DAYS", "backup_interval_days": 1,
            "now": NOW, "layout": layout}
    args.update(kwargs)
    return L.evaluate_lifecycle(rules, **args)


def rule(prefix, days, rule_id="r"):
    return {"ID": rule_id, "Status": "Enabled", "Filter": {"Prefix": f"{ROOT}/{prefix}"}, "Expiration": {"Days": days}}


def ids(assessment):
    return sorted(f.id for f in assessment.findings)


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
@pytest.mark.parametrize(("case", "classes"), [
    ("wal", {L.WAL}), ("history", {L.HISTORY}), ("base", {L.BASE}), ("metadata", {L.BACKUP_METADATA})])
def test_each_class_has_a_prefix_reaching_only_it(layout, case, classes):
    assert L.classes_reached(CASES[layout][case], layout) == classes


@pytest.mark.parametrize(("layout", "rest", "classes"), [
    (layouts.PGBACKREST, "archive/", {L.WAL, L.HISTORY, L.BACKUP_METADATA}),  # archive.info too
    (layouts.PGBACKREST, "archive/main/15-1/", {L.WAL, L.HISTORY}),
    (layouts.PGBACKREST, "archive/main/15-1/0", {L.WAL, L.HISTORY}),
    (layouts.PGBACKREST, "archive/main/archive.info", {L.BACKUP_METADATA}),
    (layouts.PGBACKREST, "archive/main/9.6-2/000000010000000A/", {L.WAL}),
    (layouts.PGBACKREST, "backup/", {L.BASE, L.BACKUP_METADATA}),
    (layouts.PGBACKREST, f"backup/main/{PGBR_LABEL}/", {L.BASE, L.BACKUP_METADATA}),  # backup.manifest inside
    (layouts.PGBACKREST, f"backup/main/{PGBR_LABEL}/backup.manifest", {L.BACKUP_METADATA}),
    (layouts.PGBACKREST, "backup/main/backup.history/", set()),  # history of manifests, not needed to restore
    (layouts.WAL_G, "wal_005/", {L.WAL, L.HISTORY}),
    (layouts.WAL_G, "wal_005/0000000", {L.WAL, L.HISTORY}),
    (layouts.WAL_G, "basebackups_005/", {L.BASE, L.BACKUP_METADATA}),
    (layouts.WAL_G, f"basebackups_005/{WALG_BACKUP}", {L.BASE, L.BACKUP_METADATA}),
    (layouts.WAL_G, f"basebackups_005/{WALG_BACKUP}/metadata.json", {L.BACKUP_METADATA}),
    (layouts.WAL_G, f"basebackups_005/{WALG_BACKUP}_D_000000010000000000000001/", {L.BASE, L.BACKUP_METADATA}),
    (layouts.WAL_E, f"basebackups_005/{WALE_BACKUP}/", {L.BASE}),
    (layouts.BARMAN_CLOUD, "wals/", {L.WAL, L.HISTORY}),
    (layouts.BARMAN_CLOUD, "base/", {L.BASE, L.BACKUP_METADATA}),
    # the other layouts' directories, and pgops' own reports, hold nothing of the cluster's archive
    (layouts.BARMAN_CLOUD, "wal_005/", set()),
    (layouts.BARMAN_CLOUD, "archive/", set()),
    (layouts.WAL_G, "wals/", set()),
    (layouts.WAL_G, "archive/", set()),
    (layouts.PGBACKREST, "wal_005/", set()),
    (layouts.PGBACKREST, "base/", set()),
    (layouts.WAL_E, "pgops/reports/", set()),
])
def test_classes_reached(layout, rest, classes):
    assert L.classes_reached(rest, layout) == classes


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_wal_only_rule_shorter_than_retention_is_critical(layout):
    result = evaluate([rule(CASES[layout]["wal"], 5, "wal-5d")], layout)
    assert ids(result) == [F.LIFECYCLE_EXPIRES_NEEDED_WAL] and result.status == F.CRITICAL
    finding = result.findings[0]
    assert finding.evidence["classes"] == [L.WAL] and finding.evidence["layout"] == layout
    assert "wal-5d" in finding.message and finding.evidence["required_days"] == 15
    # long enough and WAL only: safe, kept as it is
    long_rule = rule(CASES[layout]["wal"], 30, "wal-30d")
    again = evaluate([long_rule], layout)
    assert ids(again) == [F.LIFECYCLE_OK]
    assert long_rule in again.recommended["Rules"]


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_rule_covering_history_is_a_warning(layout):
    result = evaluate([rule(CASES[layout]["history"], 90)], layout)
    assert ids(result) == [F.LIFECYCLE_EXPIRES_HISTORY] and result.status == F.WARNING
    assert L.LAYOUT_PATHS[layout].history in result.findings[0].message


@pytest.mark.parametrize(("layout", "wal_root"), [
    (layouts.BARMAN_CLOUD, "wals/"), (layouts.PGBACKREST, "archive/main/15-1/"), (layouts.WAL_G, "wal_005/"),
    (layouts.WAL_E, "wal_005/")])
def test_short_rule_on_the_wal_directory_is_critical_and_expires_history(layout, wal_root):
    result = evaluate([rule(wal_root, 3)], layout)
    assert ids(result) == [F.LIFECYCLE_EXPIRES_HISTORY, F.LIFECYCLE_EXPIRES_NEEDED_WAL]


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_rule_on_base_data_is_critical(layout):
    result = evaluate([rule(CASES[layout]["base"], 5)], layout)
    assert ids(result) == [F.LIFECYCLE_EXPIRES_NEEDED_BASE] and result.status == F.CRITICAL
    assert L.LAYOUT_PATHS[layout].retention in result.findings[0].fix


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_rule_on_backup_metadata_is_a_warning(layout):
    result = evaluate([rule(CASES[layout]["metadata"], 60)], layout)
    assert ids(result) == [F.LIFECYCLE_EXPIRES_BACKUP_METADATA] and result.status == F.WARNING
    assert L.LAYOUT_PATHS[layout].tool in result.findings[0].message


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
@pytest.mark.parametrize("rest", ["pgops/reports/", "logs/", "tmp"])
def test_rule_on_unrelated_prefix_has_no_finding(layout, rest):
    result = evaluate([rule(rest, 1)], layout)
    assert ids(result) == [F.LIFECYCLE_OK]


@pytest.mark.parametrize("layout", [layouts.PGBACKREST, layouts.WAL_G, layouts.WAL_E])
def test_recommendation_has_no_tagged_wal_rule_where_the_tool_cannot_tag(layout):
    rules = [rule(CASES[layout]["wal"][:8], 3, "short"),  # archive/ or wal_005/: WAL and history
             {"ID": "logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 1}}]
    result = evaluate(rules, layout)
    assert result.status == F.CRITICAL
    recommended = result.recommended["Rules"]
    assert not any("And" in r.get("Filter", {}) or "Tag" in r.get("Filter", {}) for r in recommended)
    assert "short" not in [r["ID"] for r in recommended] and rules[1] in recommended
    tool = L.LAYOUT_PATHS[layout].tool.lower()
    (abort,) = [r for r in recommended if "AbortIncompleteMultipartUpload" in r]
    assert abort["ID"] == f"pgops-pg-main-abort-multipart-no-wal-expiry-{tool}-cannot-tag-wal"
    assert abort["Filter"] == {"Prefix": f"{ROOT}/"}
    (note,) = result.recommended_notes
    assert "no WAL expiry rule" in note and L.LAYOUT_PATHS[layout].retention in note
    assert result.to_dict()["recommended_notes"] == [note]
    history = next(f for f in result.findings if f.id == F.LIFECYCLE_EXPIRES_HISTORY)
    assert "--tag" not in history.fix and L.LAYOUT_PATHS[layout].retention in history.fix
    # the recommendation itself passes
    assert evaluate(recommended, layout).status == F.OK
    absent = evaluate(None, layout)
    assert "tagged WAL" not in absent.findings[0].fix and L.LAYOUT_PATHS[layout].retention in absent.findings[0].message


def test_barman_recommendation_keeps_the_tagged_wal_rule():
    result = evaluate([rule("wals/", 3, "short")], layouts.BARMAN_CLOUD)
    rule_ids = [r["ID"] for r in result.recommended["Rules"]]
    assert rule_ids == ["pgops-pg-main-wal-expiry", "pgops-pg-main-abort-multipart"]
    assert result.recommended_notes == []


def test_bucket_wide_rule_on_pgbackrest_is_raised():
    result = evaluate([{"ID": "all", "Status": "Enabled", "Filter": {}, "Expiration": {"Days": 10}}],
                      layouts.PGBACKREST)
    assert {F.LIFECYCLE_EXPIRES_NEEDED_WAL, F.LIFECYCLE_EXPIRES_NEEDED_BASE, F.LIFECYCLE_EXPIRES_HISTORY,
            F.LIFECYCLE_EXPIRES_BACKUP_METADATA} <= set(ids(result))
    (broad,) = [r for r in result.recommended["Rules"] if r["ID"] == "all"]
    assert broad["Expiration"] == {"Days": 15}


def test_stopped_backups_count_down_on_the_layouts_base_prefix():
    result = evaluate([rule("basebackups_005/", 30)], layouts.WAL_G, newest_backup_age_days=26)
    assert result.days_until_last_backup_expires == pytest.approx(4)
    # a WAL-only rule breaks the backup too: its begin..end WAL goes first (every rule kind counts)
    wal_only = evaluate([rule("wal_005/", 30)], layouts.WAL_G, newest_backup_age_days=26)
    assert wal_only.days_until_last_backup_expires == pytest.approx(4)
    assert wal_only.countdown[0].expires == ("begin..end WAL",)
    # a rule on another layout's paths reaches nothing of it
    assert evaluate([rule("wals/", 30)], layouts.WAL_G,
                    newest_backup_age_days=26).days_until_last_backup_expires is None


def test_unknown_layout_counts_every_key_but_pgops_reports():
    result = evaluate([rule("anything/", 3)], None)
    assert {F.LIFECYCLE_EXPIRES_NEEDED_WAL, F.LIFECYCLE_EXPIRES_NEEDED_BASE} <= set(ids(result))
    assert ids(evaluate([rule("pgops/reports/", 3)], None)) == [F.LIFECYCLE_OK]
    abort = [r for r in result.recommended["Rules"] if "AbortIncompleteMultipartUpload" in r]
    assert abort[0]["ID"].endswith("-no-wal-expiry-layout-unknown")
    with pytest.raises(ValueError, match="layout"):
        evaluate(None, "borg")
