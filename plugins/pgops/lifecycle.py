"""Bucket lifecycle rules against the retention policy: can S3 delete WAL or backups still needed?

Input is the boto3 shape of get_bucket_lifecycle_configuration()["Rules"]. Retention belongs to
barman-cloud-backup-delete; a lifecycle rule is only a safety net, so it must never expire
objects younger than the retention needs, and never the write-once .history and backup.info files.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from pgops import findings as F

DEFAULT_MARGIN_DAYS = 7
ABORT_MULTIPART_DAYS = 7
DEFAULT_WAL_TAG = ("pgops-expire", "wal")  # archive with barman-cloud-wal-archive --tag pgops-expire,wal
_DAYS_PER_UNIT = {"DAY": 1, "WEEK": 7, "MONTH": 31}  # barman counts a month as 31 days
_RETENTION_RE = re.compile(r"^\s*(?:RECOVERY\s+WINDOW\s+OF\s+(\d+)\s+(DAY|WEEK|MONTH)S?|REDUNDANCY\s+(\d+))\s*$",
                           re.IGNORECASE)
_HEX = set("0123456789ABCDEF")

WAL = "wal"
HISTORY = "history"
BASE = "base"
BACKUP_METADATA = "backup_metadata"


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    window_days: int | None = None
    redundancy: int | None = None

    def __str__(self) -> str:
        if self.redundancy is not None:
            return f"REDUNDANCY {self.redundancy}"
        return f"RECOVERY WINDOW OF {self.window_days} DAYS"


def parse_retention_policy(text: str) -> RetentionPolicy:
    """barman syntax: 'RECOVERY WINDOW OF 7 DAYS|WEEKS|MONTHS' or 'REDUNDANCY 3'."""
    match = _RETENTION_RE.match(text) if isinstance(text, str) else None
    if match is None or (match.group(3) is not None and int(match.group(3)) < 1) or (
            match.group(1) is not None and int(match.group(1)) < 1):
        raise ValueError(f"retention policy {text!r} is not 'RECOVERY WINDOW OF <n> DAYS|WEEKS|MONTHS' or "
                         f"'REDUNDANCY <n>' with n >= 1 (barman syntax)")
    if match.group(3) is not None:
        return RetentionPolicy(redundancy=int(match.group(3)))
    return RetentionPolicy(window_days=int(match.group(1)) * _DAYS_PER_UNIT[match.group(2).upper()])


def required_days(policy: RetentionPolicy, *, backup_interval_days: float,
                  oldest_needed_backup_age_days: float | None = None, margin_days: int = DEFAULT_MARGIN_DAYS) -> int:
    """Youngest age at which expiring WAL and base objects is safe.

    The oldest needed backup keeps ageing for one backup interval before a newer one replaces it.
    """
    if policy.redundancy is not None:
        policy_days = policy.redundancy * backup_interval_days
    else:
        policy_days = policy.window_days + backup_interval_days
    if oldest_needed_backup_age_days is not None:
        policy_days = max(policy_days, oldest_needed_backup_age_days + backup_interval_days)
    return math.ceil(policy_days + margin_days)


@dataclass(frozen=True, kw_only=True)
class RuleScope:
    """Which of the cluster's object classes a rule can reach (ignoring age)."""

    rule_id: str
    classes: frozenset[str]
    broader_than_cluster: bool
    tags: dict[str, str]


@dataclass(kw_only=True)
class LifecycleAssessment:
    required_days: int
    findings: list[F.Finding] = field(default_factory=list)
    recommended: dict[str, Any] = field(default_factory=dict)  # boto3 LifecycleConfiguration
    days_until_last_backup_expires: float | None = None

    @property
    def status(self) -> str:
        return F.overall_status(self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "required_days": self.required_days,
                "days_until_last_backup_expires": self.days_until_last_backup_expires,
                "findings": [f.to_dict() for f in self.findings], "recommended": self.recommended}


def _could_start(rest: str, template: str) -> bool:
    """Could a key remainder matching template ('H' = upper hex, else literal) start with rest?"""
    for char, want in zip(rest, template, strict=False):
        if want == "H":
            if char not in _HEX:
                return False
        elif char != want:
            return False
    return True


def _rule_prefix_and_tags(rule: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    filt = rule.get("Filter")
    if filt is None:
        return rule.get("Prefix", ""), {}
    if "And" in filt:
        inner = filt["And"]
        return inner.get("Prefix", ""), {t["Key"]: t["Value"] for t in inner.get("Tags", [])}
    if "Tag" in filt:
        return "", {filt["Tag"]["Key"]: filt["Tag"]["Value"]}
    return filt.get("Prefix", ""), {}


def rule_scope(rule: Mapping[str, Any], *, cluster_prefix: str,
               object_tags: Mapping[str, Mapping[str, str]] | None = None) -> RuleScope:
    """The cluster's object classes (WAL, HISTORY, BASE, BACKUP_METADATA) a rule's filter matches.

    object_tags: the tags each class is written with (barman-cloud --tag / --history-tag / --tags);
    a tag filter matches a class only when the class carries all of the rule's tags.
    """
    object_tags = object_tags or {}
    base_prefix = cluster_prefix.strip("/") + "/"
    prefix, tags = _rule_prefix_and_tags(rule)
    classes: set[str] = set()
    if base_prefix.startswith(prefix):
        classes = {WAL, HISTORY, BASE, BACKUP_METADATA}
    elif prefix.startswith(base_prefix):
        rest = prefix[len(base_prefix):]
        if _could_start(rest, "wals/"):
            tail = rest[len("wals/"):]
            if _could_start(tail, "HHHHHHHHHHHHHHHH/") and not tail[:1] == ".":
                classes.add(WAL)
            if _could_start(tail, "HHHHHHHH.history"):
                classes.add(HISTORY)
        if _could_start(rest, "base/"):
            tail = rest[len("base/"):]
            if "/" not in tail:
                classes |= {BASE, BACKUP_METADATA}
            else:
                file_part = tail.split("/", 1)[1]
                if "/" not in file_part and "backup.info".startswith(file_part):
                    classes.add(BACKUP_METADATA)
                if file_part != "backup.info":
                    classes.add(BASE)
    if tags:
        classes = {c for c in classes if all(object_tags.get(c, {}).get(k) == v for k, v in tags.items())}
    return RuleScope(rule_id=rule.get("ID", "(no id)"), classes=frozenset(classes),
                     broader_than_cluster=base_prefix.startswith(prefix) and prefix != base_prefix, tags=tags)


def _expiry_days(rule: Mapping[str, Any], today: date) -> float | None:
    expiration = rule.get("Expiration") or {}
    if "Days" in expiration:
        return float(expiration["Days"])
    if "Date" in expiration:
        when = expiration["Date"]
        when = when.date() if isinstance(when, datetime) else date.fromisoformat(str(when)[:10])
        return float((when - today).days)
    return None


def evaluate_lifecycle(
    rules: list[Mapping[str, Any]] | None,
    *,
    cluster_prefix: str,
    retention_policy: str | RetentionPolicy,
    backup_interval_days: float,
    oldest_needed_backup_age_days: float | None = None,
    newest_backup_age_days: float | None = None,
    object_tags: Mapping[str, Mapping[str, str]] | None = None,
    margin_days: int = DEFAULT_MARGIN_DAYS,
    now: datetime | None = None,
    wal_tag: tuple[str, str] = DEFAULT_WAL_TAG,
) -> LifecycleAssessment:
    """Findings for the bucket's lifecycle rules and a corrected configuration.

    rules: the "Rules" list, or None/[] when the bucket has no lifecycle configuration.
    newest_backup_age_days: age of the newest finished backup, to tell when backups have stopped.
    """
    policy = retention_policy if isinstance(retention_policy, RetentionPolicy) else parse_retention_policy(
        retention_policy)
    today = (now or datetime.now(UTC)).date()
    needed = required_days(policy, backup_interval_days=backup_interval_days,
                           oldest_needed_backup_age_days=oldest_needed_backup_age_days, margin_days=margin_days)
    assessment = LifecycleAssessment(required_days=needed)
    out = assessment.findings
    rules = list(rules or [])
    base_expiry: list[float] = []
    if not rules:
        out.append(F.Finding(
            id=F.LIFECYCLE_ABSENT, severity=F.OK,
            message=f"bucket has no lifecycle configuration: retention of {cluster_prefix} relies on "
                    f"barman-cloud-backup-delete ({policy}) alone",
            evidence={"cluster_prefix": cluster_prefix},
            fix="optionally add the recommended safety-net rules (tagged WAL expiry after "
                f"{needed} days, abort incomplete multipart uploads)",
        ))
    for rule in rules:
        if rule.get("Status") != "Enabled":
            continue
        scope = rule_scope(rule, cluster_prefix=cluster_prefix, object_tags=object_tags)
        _, tags = _rule_prefix_and_tags(rule)
        days = _expiry_days(rule, today)
        evidence = {"rule_id": scope.rule_id, "expiration_days": days, "required_days": needed,
                    "retention_policy": str(policy), "classes": sorted(scope.classes), "rule_tags": tags}
        if tags:
            affected = "affects" if scope.classes else "does not affect"
            out.append(F.Finding(
                id=F.LIFECYCLE_TAGGED_OBJECTS, severity=F.OK,
                message=f"lifecycle rule {scope.rule_id} filters on tags {tags}: it {affected} the cluster's "
                        f"objects as tagged ({sorted(scope.classes) or 'none'})",
                evidence=evidence,
            ))
        if days is None:
            if rule.get("Transitions") and scope.classes:
                out.append(F.Finding(
                    id=F.LIFECYCLE_TRANSITION_ONLY, severity=F.OK,
                    message=f"lifecycle rule {scope.rule_id} only transitions objects to other storage classes; "
                            f"nothing is expired (archive classes make restores slower)",
                    evidence=evidence,
                ))
            continue
        if not scope.classes:
            continue
        if "Date" in (rule.get("Expiration") or {}):
            out.append(F.Finding(
                id=F.LIFECYCLE_EXPIRATION_DATE, severity=F.CRITICAL,
                message=f"lifecycle rule {scope.rule_id} expires every matching object of {cluster_prefix} on "
                        f"{rule['Expiration']['Date']} ({days:.0f} days from today), whatever its age",
                evidence=evidence,
                fix=f"replace the Date with Days >= {needed} or delete the rule",
            ))
        short = days < needed
        if short and WAL in scope.classes:
            out.append(F.Finding(
                id=F.LIFECYCLE_EXPIRES_NEEDED_WAL, severity=F.CRITICAL,
                message=f"lifecycle rule {scope.rule_id} expires WAL of {cluster_prefix} after {days:.0f} days; "
                        f"retention {policy} with a {backup_interval_days:g}-day backup interval needs {needed}",
                evidence=evidence,
                fix=f"raise the rule's Expiration Days to at least {needed} (see the recommended configuration)",
            ))
        if short and BASE in scope.classes:
            out.append(F.Finding(
                id=F.LIFECYCLE_EXPIRES_NEEDED_BASE, severity=F.CRITICAL,
                message=f"lifecycle rule {scope.rule_id} expires base backups of {cluster_prefix} after {days:.0f} "
                        f"days; retention {policy} needs {needed}",
                evidence=evidence,
                fix="remove expiration from base/ (barman-cloud-backup-delete owns retention) or raise it to "
                    f"at least {needed} days",
            ))
        if HISTORY in scope.classes:
            out.append(F.Finding(
                id=F.LIFECYCLE_EXPIRES_HISTORY, severity=F.WARNING,
                message=f"lifecycle rule {scope.rule_id} expires .history files under {cluster_prefix}/wals after "
                        f"{days:.0f} days; they are written once and recovery across a timeline switch needs them",
                evidence=evidence,
                fix=f"limit the rule to tagged WAL (archive with --tag {wal_tag[0]},{wal_tag[1]} and filter on "
                    f"that tag) so .history files are never expired",
            ))
        if BACKUP_METADATA in scope.classes:
            out.append(F.Finding(
                id=F.LIFECYCLE_EXPIRES_BACKUP_METADATA, severity=F.WARNING,
                message=f"lifecycle rule {scope.rule_id} expires backup.info files under {cluster_prefix}/base "
                        f"after {days:.0f} days; barman-cloud then no longer sees the backup and cannot "
                        f"delete its data",
                evidence=evidence,
                fix="remove expiration from base/; barman-cloud-backup-delete deletes backups with their metadata",
            ))
        if BASE in scope.classes:
            base_expiry.append(days)
    if newest_backup_age_days is not None and newest_backup_age_days > 2 * backup_interval_days:
        left = min(base_expiry) - newest_backup_age_days if base_expiry else None
        assessment.days_until_last_backup_expires = left
        countdown = (f"the last recoverable backup expires in {left:.1f} days by lifecycle"
                     if left is not None else "no lifecycle rule expires it")
        out.append(F.Finding(
            id=F.BACKUPS_STOPPED, severity=F.CRITICAL if left is not None and left <= margin_days else F.WARNING,
            message=f"newest backup of {cluster_prefix} is {newest_backup_age_days:.1f} days old (interval "
                    f"{backup_interval_days:g} days): backups have stopped; {countdown}",
            evidence={"newest_backup_age_days": newest_backup_age_days, "backup_interval_days": backup_interval_days,
                      "days_until_last_backup_expires": left},
            fix="run the backup DAG now and check its recent failures; disable expiring rules until a new "
                "backup exists",
        ))
    if rules and not any(f.severity != F.OK for f in out):
        out.append(F.Finding(
            id=F.LIFECYCLE_OK, severity=F.OK,
            message=f"no enabled lifecycle rule expires objects of {cluster_prefix} younger than {needed} days",
            evidence={"required_days": needed, "rule_ids": [r.get("ID") for r in rules]},
        ))
    assessment.recommended = recommend_configuration(rules, cluster_prefix=cluster_prefix, required=needed,
                                                     object_tags=object_tags, wal_tag=wal_tag, today=today)
    return assessment


def recommend_configuration(
    rules: list[Mapping[str, Any]],
    *,
    cluster_prefix: str,
    required: int,
    object_tags: Mapping[str, Mapping[str, str]] | None = None,
    wal_tag: tuple[str, str] = DEFAULT_WAL_TAG,
    today: date | None = None,
) -> dict[str, Any]:
    """A full LifecycleConfiguration: others' rules kept, ours safe, plus pgops' safety-net rules.

    Rules scoped inside the cluster prefix lose their expiration (replaced by the tagged WAL rule);
    broader rules cannot exclude a prefix, so their expiration is only raised to the required days.
    """
    today = today or datetime.now(UTC).date()
    base_prefix = cluster_prefix.strip("/") + "/"
    slug = re.sub(r"[^A-Za-z0-9-]+", "-", cluster_prefix.strip("/")) or "root"
    out: list[dict[str, Any]] = []
    has_abort = has_wal_rule = False
    for rule in rules:
        fixed = copy.deepcopy(dict(rule))
        scope = rule_scope(rule, cluster_prefix=cluster_prefix, object_tags=object_tags)
        enabled = rule.get("Status") == "Enabled"
        covers_all = base_prefix.startswith(_rule_prefix_and_tags(rule)[0])
        if enabled and covers_all and "AbortIncompleteMultipartUpload" in fixed:
            has_abort = True
        days = _expiry_days(rule, today)
        safe = (days is None or not scope.classes
                or (scope.classes == {WAL} and "Days" in rule["Expiration"] and days >= required))
        if enabled and days is not None and WAL in scope.classes and safe:
            has_wal_rule = True
        if enabled and not safe:
            if scope.broader_than_cluster:
                fixed["Expiration"] = {"Days": max(math.ceil(days) if "Days" in rule["Expiration"] else 0, required)}
            else:
                fixed.pop("Expiration")
                if not any(k in fixed for k in ("Transitions", "NoncurrentVersionExpiration",
                                                 "NoncurrentVersionTransitions", "AbortIncompleteMultipartUpload")):
                    continue
        out.append(fixed)
    if not has_wal_rule:
        out.append({
            "ID": f"pgops-{slug}-wal-expiry"[:255],
            "Status": "Enabled",
            "Filter": {"And": {"Prefix": f"{base_prefix}wals/", "Tags": [{"Key": wal_tag[0], "Value": wal_tag[1]}]}},
            "Expiration": {"Days": required},
        })
    if not has_abort:
        out.append({
            "ID": f"pgops-{slug}-abort-multipart"[:255],
            "Status": "Enabled",
            "Filter": {"Prefix": base_prefix},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_MULTIPART_DAYS},
        })
    return {"Rules": out}
