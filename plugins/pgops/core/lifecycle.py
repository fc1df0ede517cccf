"""Bucket lifecycle rules against the retention policy: can S3 delete WAL or backups still needed?

Input is the boto3 shape of get_bucket_lifecycle_configuration()["Rules"]. Retention belongs to the
archiver (barman-cloud-backup-delete, pgbackrest expire, wal-g/wal-e delete); a lifecycle rule is
only a safety net, so it must never expire objects younger than the retention needs, and never the
write-once .history files and backup metadata. Where each kind of object lives under the cluster
root is one table per bucket layout (LAYOUT_PATHS).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from pgops.core import findings as F
from pgops.core import layouts

DEFAULT_MARGIN_DAYS = 7
ABORT_MULTIPART_DAYS = 7
DEFAULT_WAL_TAG = ("pgops-expire", "wal")  # archive with barman-cloud-wal-archive --tag pgops-expire,wal
_DAYS_PER_UNIT = {"DAY": 1, "WEEK": 7, "MONTH": 31}  # barman counts a month as 31 days
_RETENTION_RE = re.compile(r"^\s*(?:RECOVERY\s+WINDOW\s+OF\s+(\d+)\s+(DAY|WEEK|MONTH)S?|REDUNDANCY\s+(\d+))\s*$",
                           re.IGNORECASE)

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


@dataclass(frozen=True, kw_only=True)
class Need:
    """Objects the newest recoverable backup needs to be restored, and the age of the oldest of them.

    key: a key or key prefix relative to the cluster root (a rule whose prefix lies inside the class's
    directory reaches it only when the prefixes overlap); None: anywhere in its class.
    """

    cls: str  # WAL, HISTORY, BASE, BACKUP_METADATA
    what: str  # for messages: "base files (base/<id>/)", "begin..end WAL 0000...", "00000002.history"
    age_days: float
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.cls, "what": self.what, "age_days": self.age_days, "key": self.key}


def default_needs(age_days: float) -> list[Need]:
    """What any backup of this age needs when nothing more is known: its base files, metadata and begin..end WAL."""
    return [Need(cls=BASE, what="base files", age_days=age_days),
            Need(cls=BACKUP_METADATA, what="backup metadata", age_days=age_days),
            Need(cls=WAL, what="begin..end WAL", age_days=age_days)]


@dataclass(frozen=True, kw_only=True)
class LossCountdown:
    """When one lifecycle rule deletes something the newest recoverable backup needs."""

    rule_id: str
    days_until_loss: float  # 0: already due (S3 expires asynchronously, within about a day)
    expires: tuple[str, ...]  # what it deletes first (Need.what)
    expiration_days: float | None = None  # the rule's Expiration Days
    expiration_date: str | None = None  # or its Expiration Date
    oldest_age_days: float | None = None  # age of what it deletes first

    def to_dict(self) -> dict[str, Any]:
        return {"rule_id": self.rule_id, "days_until_loss": self.days_until_loss, "expires": list(self.expires),
                "expiration_days": self.expiration_days, "expiration_date": self.expiration_date,
                "oldest_age_days": self.oldest_age_days}

    def describe(self) -> str:
        if self.expiration_date is not None:
            return (f"lifecycle rule {self.rule_id} expires {' and '.join(self.expires)} on {self.expiration_date}, "
                    f"in {self.days_until_loss:.1f} days")
        return (f"lifecycle rule {self.rule_id} expires {' and '.join(self.expires)} "
                f"({self.oldest_age_days:.1f} days old, the rule expires after {self.expiration_days:g} days) "
                + ("now" if self.days_until_loss <= 0 else f"in {self.days_until_loss:.1f} days"))


@dataclass(kw_only=True)
class LifecycleAssessment:
    required_days: int
    findings: list[F.Finding] = field(default_factory=list)
    recommended: dict[str, Any] = field(default_factory=dict)  # boto3 LifecycleConfiguration
    days_until_last_backup_expires: float | None = None  # the newest recoverable backup: days until a rule breaks it
    layout: str | None = layouts.BARMAN_CLOUD
    recommended_notes: list[str] = field(default_factory=list)  # why the recommendation looks as it does
    newest_backup_id: str | None = None
    needs: list[Need] = field(default_factory=list)
    countdown: list[LossCountdown] = field(default_factory=list)  # soonest first

    @property
    def status(self) -> str:
        return F.overall_status(self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "required_days": self.required_days,
                "days_until_last_backup_expires": self.days_until_last_backup_expires,
                "days_until_loss": {"backup_id": self.newest_backup_id, "days": self.days_until_last_backup_expires,
                                    "rules": [c.to_dict() for c in self.countdown],
                                    "needs": [n.to_dict() for n in self.needs]},
                "layout": self.layout, "findings": [f.to_dict() for f in self.findings],
                "recommended": self.recommended, "recommended_notes": self.recommended_notes}


# --- where each object class lives, per bucket layout -----------------------------------------------
#
# Key templates are relative to the cluster root (the barman-cloud server prefix, the pgBackRest
# repo path, the WAL-G/WAL-E prefix). A {token} stands for a run of characters of one kind; the
# rest is literal. The names the tools generate (backup ids, labels, archive ids) have their own
# character sets so that, say, backup/<stanza>/backup.info is not mistaken for a backup directory.

_UPPER_HEX = frozenset("0123456789ABCDEF")
_DIGITS = frozenset("0123456789")
_ANY = frozenset()  # as a charset: any character, "/" included
_TOKENS: dict[str, tuple[frozenset[str] | None, int, int | None]] = {  # charset (None: any but "/"), min, max
    "h8": (_UPPER_HEX, 8, 8),
    "h16": (_UPPER_HEX, 16, 16),
    "seg": (_UPPER_HEX, 24, 24),
    "name": (None, 1, None),
    "int": (_DIGITS, 1, None),
    "barman_id": (_DIGITS | {"T"}, 1, None),  # 20261125T120000
    "pg_version": (_DIGITS | {"."}, 1, None),  # archive id <pg_version>-<int>: 15-1, 9.6-2
    "pgbr_label": (_DIGITS | set("-_FDI"), 1, None),  # 20261125-120000F[_20261126-120000D|I]
    "xlog_name": (_UPPER_HEX | {"_", "D"}, 1, None),  # base_<seg>[_D_<seg>] (WAL-G), base_<seg>_<offset> (WAL-E)
    "*": (_ANY, 0, None),
}
_TOKEN_RE = re.compile(r"\{([^}]+)\}")


def _compile(template: str) -> tuple[str | tuple[frozenset[str] | None, int, int | None], ...]:
    parts = _TOKEN_RE.split(template)
    return tuple(_TOKENS[part] if i % 2 else part for i, part in enumerate(parts) if part)


def _reaches(prefix: str, tokens: tuple, *, full: bool = False, i: int = 0, t: int = 0) -> bool:
    """Can a key of the template start with prefix (full: be exactly prefix)?"""
    if i == len(prefix):
        return not full or all(not isinstance(tok, str) and tok[1] == 0 for tok in tokens[t:])
    if t == len(tokens):
        return False
    tok = tokens[t]
    if isinstance(tok, str):
        n = min(len(tok), len(prefix) - i)
        if prefix[i:i + n] != tok[:n]:
            return False
        if n < len(tok):
            return not full
        return _reaches(prefix, tokens, full=full, i=i + n, t=t + 1)
    chars, low, high = tok
    k = 0
    while True:
        if k >= low and _reaches(prefix, tokens, full=full, i=i + k, t=t + 1):
            return True
        if i + k == len(prefix):
            return not full
        char = prefix[i + k]
        if k == high or (char == "/" if chars is None else chars is not _ANY and char not in chars):
            return False
        k += 1


@dataclass(frozen=True, kw_only=True)
class LayoutPaths:
    """Where a layout keeps each object class, and who owns its retention."""

    tool: str
    retention: str  # the command that expires backups and WAL together
    reach: dict[str, tuple[str, ...]]  # class -> key templates
    # class -> templates of keys that are not of that class although its templates reach them: a rule
    # prefix that is itself such a key (e.g. <backup dir>/backup.info) does not reach the class
    not_reach: dict[str, tuple[str, ...]] = field(default_factory=dict)
    history: str  # where .history files are, for messages
    metadata: str  # which metadata files, for messages
    base: str  # where base backup data is, for messages
    # WAL alone can be tagged (barman-cloud-wal-archive --tag, not --history-tag): the prefix of the
    # tag-filtered WAL rule the recommendation adds; None when the tool cannot tag WAL apart
    tagged_wal_prefix: str | None = None
    no_wal_rule: str = ""  # why the recommendation has no WAL rule (when tagged_wal_prefix is None)

    def compiled(self, table: str) -> dict[str, tuple[tuple, ...]]:
        return {cls: tuple(_compile(t) for t in templates)
                for cls, templates in getattr(self, table).items()}


def _xlog_layout_paths(tool: str, *, history_ext: str, metadata: str, backup_files: tuple[str, ...] = ()) -> LayoutPaths:
    """WAL-G and WAL-E: wal_005/ and basebackups_005/; backup_files are metadata inside a backup's directory."""
    sentinel = "basebackups_005/base_{xlog_name}_backup_stop_sentinel.json"
    return LayoutPaths(
        tool=tool, retention=f"{tool.lower()} delete retain",
        reach={WAL: ("wal_005/{seg}{*}",), HISTORY: ("wal_005/{h8}.history{*}",),
               BASE: ("basebackups_005/base_{xlog_name}/{*}",), BACKUP_METADATA: (sentinel, *backup_files)},
        not_reach={BASE: backup_files} if backup_files else {},
        history=f"wal_005/<timeline>.history.{history_ext}",
        metadata=metadata,
        base="basebackups_005/<backup>/",
        no_wal_rule=f"{tool} cannot tag objects and keeps .history files in wal_005/ with the WAL, so no "
                    "lifecycle filter selects WAL alone",
    )


UNKNOWN_LAYOUT = None
LAYOUT_PATHS: dict[str | None, LayoutPaths] = {
    layouts.BARMAN_CLOUD: LayoutPaths(
        tool="barman-cloud", retention="barman-cloud-backup-delete",
        reach={WAL: ("wals/{h16}/{*}",), HISTORY: ("wals/{h8}.history{*}",),
               BASE: ("base/{barman_id}/{*}",), BACKUP_METADATA: ("base/{barman_id}/backup.info",)},
        not_reach={BASE: ("base/{barman_id}/backup.info",)},
        history="wals/<timeline>.history", metadata="base/<backup id>/backup.info", base="base/<backup id>/",
        tagged_wal_prefix="wals/",
    ),
    layouts.PGBACKREST: LayoutPaths(
        tool="pgBackRest", retention="pgbackrest expire (repo1-retention-full / repo1-retention-archive)",
        reach={WAL: ("archive/{name}/{pg_version}-{int}/{h16}/{*}",),
               HISTORY: ("archive/{name}/{pg_version}-{int}/{h8}.history{*}",),
               BASE: ("backup/{name}/{pgbr_label}/{*}",),
               BACKUP_METADATA: ("archive/{name}/archive.info{*}", "backup/{name}/backup.info{*}",
                                 "backup/{name}/{pgbr_label}/backup.manifest{*}")},
        not_reach={BASE: ("backup/{name}/{pgbr_label}/backup.manifest{*}",)},
        history="archive/<stanza>/<pg version>-<id>/<timeline>.history",
        metadata="backup/<stanza>/backup.info, backup/<stanza>/<label>/backup.manifest and "
                 "archive/<stanza>/archive.info",
        base="backup/<stanza>/<label>/",
        no_wal_rule="pgBackRest cannot tag WAL apart from its other objects and keeps .history files next to "
                    "the WAL directories, so no lifecycle filter selects WAL alone",
    ),
    layouts.WAL_G: _xlog_layout_paths(
        "WAL-G", history_ext="<ext>", backup_files=("basebackups_005/base_{xlog_name}/metadata.json",),
        metadata="basebackups_005/<backup>_backup_stop_sentinel.json and <backup>/metadata.json"),
    layouts.WAL_E: _xlog_layout_paths(
        "WAL-E", history_ext="lzo", metadata="basebackups_005/<backup>_backup_stop_sentinel.json"),
    # not recognised: any key under the root may be anything (but pgops' own reports)
    UNKNOWN_LAYOUT: LayoutPaths(
        tool="the archiver", retention="the archiver's own retention",
        reach={WAL: ("{*}",), HISTORY: ("{*}",), BASE: ("{*}",), BACKUP_METADATA: ("{*}",)},
        not_reach={cls: ("pgops/{*}",) for cls in (WAL, HISTORY, BASE, BACKUP_METADATA)},
        history=".history files", metadata="backup metadata", base="base backups",
        no_wal_rule="the bucket layout is not recognised, so where WAL lives is unknown",
    ),
}
_COMPILED = {name: (paths.compiled("reach"), paths.compiled("not_reach")) for name, paths in LAYOUT_PATHS.items()}


def layout_paths(layout: str | None) -> LayoutPaths:
    if layout not in LAYOUT_PATHS:
        raise ValueError(f"layout {layout!r} is not one of {layouts.LAYOUTS} (or None: not recognised)")
    return LAYOUT_PATHS[layout]


def classes_reached(rest: str, layout: str | None) -> set[str]:
    """The object classes with a key (relative to the cluster root) that starts with rest."""
    layout_paths(layout)
    reach, not_reach = _COMPILED[layout]
    return {cls for cls, templates in reach.items()
            if any(_reaches(rest, tokens) for tokens in templates)
            and not any(_reaches(rest, tokens, full=True) for tokens in not_reach.get(cls, ()))}


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
               object_tags: Mapping[str, Mapping[str, str]] | None = None,
               layout: str | None = layouts.BARMAN_CLOUD) -> RuleScope:
    """The cluster's object classes (WAL, HISTORY, BASE, BACKUP_METADATA) a rule's filter matches.

    layout: the bucket layout under cluster_prefix (layouts.BARMAN_CLOUD, PGBACKREST, WAL_G, WAL_E;
    None when not recognised: then any key under it counts as every class).
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
        classes = classes_reached(prefix[len(base_prefix):], layout)
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


def _reaches_key(rule: Mapping[str, Any], key: str | None, cluster_prefix: str) -> bool:
    """Does the rule's prefix overlap the key (or key prefix) relative to the cluster root? (class reach aside)"""
    base_prefix = cluster_prefix.strip("/") + "/"
    prefix, _ = _rule_prefix_and_tags(rule)
    if key is None or base_prefix.startswith(prefix):
        return True
    if not prefix.startswith(base_prefix):
        return False
    rest = prefix[len(base_prefix):]
    return key.startswith(rest) or rest.startswith(key)


def loss_countdown(
    rules: list[Mapping[str, Any]] | None,
    needs: Sequence[Need],
    *,
    cluster_prefix: str,
    object_tags: Mapping[str, Mapping[str, str]] | None = None,
    layout: str | None = layouts.BARMAN_CLOUD,
    today: date,
) -> list[LossCountdown]:
    """For each enabled expiring rule that reaches something in needs: the days until it deletes the first of it.

    Every rule kind counts: a prefix or tag filter on WAL, base files, metadata or .history files, a bucket-wide
    rule, Days or Date. Soonest first.
    """
    out: list[LossCountdown] = []
    for rule in rules or []:
        if rule.get("Status") != "Enabled":
            continue
        days = _expiry_days(rule, today)
        if days is None:
            continue
        scope = rule_scope(rule, cluster_prefix=cluster_prefix, object_tags=object_tags, layout=layout)
        dated = "Date" in (rule.get("Expiration") or {})
        hits = [(days if dated else days - need.age_days, need) for need in needs
                if need.cls in scope.classes and _reaches_key(rule, need.key, cluster_prefix)]
        if not hits:
            continue
        left = min(h[0] for h in hits)
        first = [need for h, need in hits if h == left]
        out.append(LossCountdown(
            rule_id=scope.rule_id, days_until_loss=max(left, 0.0), expires=tuple(n.what for n in first),
            expiration_days=None if dated else days,
            expiration_date=str(rule["Expiration"]["Date"])[:10] if dated else None,
            oldest_age_days=None if dated else first[0].age_days))
    return sorted(out, key=lambda c: (c.days_until_loss, c.rule_id))


def _class_expiry_findings(scope: RuleScope, *, days: float, needed: int, evidence: dict[str, Any],
                           paths: LayoutPaths, cluster_prefix: str, policy: RetentionPolicy,
                           backup_interval_days: float, history_fix: str) -> list[F.Finding]:
    """One finding for each object class an expiring rule reaches that must outlive it."""
    short = days < needed
    rule_id = scope.rule_id
    expiring = (  # (applies, id, severity, message, fix)
        (short and WAL in scope.classes, F.LIFECYCLE_EXPIRES_NEEDED_WAL, F.CRITICAL,
         f"lifecycle rule {rule_id} expires WAL of {cluster_prefix} after {days:.0f} days; "
         f"retention {policy} with a {backup_interval_days:g}-day backup interval needs {needed}",
         f"raise the rule's Expiration Days to at least {needed} (see the recommended configuration)"),
        (short and BASE in scope.classes, F.LIFECYCLE_EXPIRES_NEEDED_BASE, F.CRITICAL,
         f"lifecycle rule {rule_id} expires base backups of {cluster_prefix} after {days:.0f} "
         f"days; retention {policy} needs {needed}",
         f"remove expiration from {paths.base} ({paths.retention} owns retention) or raise it to "
         f"at least {needed} days"),
        (HISTORY in scope.classes, F.LIFECYCLE_EXPIRES_HISTORY, F.WARNING,
         f"lifecycle rule {rule_id} expires .history files ({cluster_prefix}/{paths.history}) "
         f"after {days:.0f} days; they are written once and recovery across a timeline switch "
         f"needs them",
         history_fix),
        (BACKUP_METADATA in scope.classes, F.LIFECYCLE_EXPIRES_BACKUP_METADATA, F.WARNING,
         f"lifecycle rule {rule_id} expires backup metadata ({paths.metadata} under "
         f"{cluster_prefix}) after {days:.0f} days; {paths.tool} then no longer knows the backup: "
         f"it can neither restore it nor delete its data",
         f"remove that expiration; {paths.retention} deletes backups with their metadata"),
    )
    return [F.Finding(id=finding_id, severity=severity, message=message, evidence=evidence, fix=fix)
            for applies, finding_id, severity, message, fix in expiring if applies]


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
    layout: str | None = layouts.BARMAN_CLOUD,
    newest_backup_id: str | None = None,
    newest_backup_needs: Sequence[Need] | None = None,
) -> LifecycleAssessment:
    """Findings for the bucket's lifecycle rules and a corrected configuration.

    rules: the "Rules" list, or None/[] when the bucket has no lifecycle configuration.
    layout: the bucket layout under cluster_prefix (None: not recognised, every key counts).
    newest_backup_age_days: age of the newest finished backup, to tell when backups have stopped.
    newest_backup_id, newest_backup_needs: the newest recoverable backup and what it needs (its base files,
    metadata, begin..end WAL, .history files of later timelines, each with its age and key): the countdown
    to its loss counts every rule that reaches one of them. [] with no id: no backup is recoverable. None:
    its needs follow from newest_backup_age_days (default_needs).
    """
    policy = retention_policy if isinstance(retention_policy, RetentionPolicy) else parse_retention_policy(
        retention_policy)
    today = (now or datetime.now(UTC)).date()
    needed = required_days(policy, backup_interval_days=backup_interval_days,
                           oldest_needed_backup_age_days=oldest_needed_backup_age_days, margin_days=margin_days)
    paths = layout_paths(layout)
    assessment = LifecycleAssessment(required_days=needed, layout=layout)
    out = assessment.findings
    if paths.tagged_wal_prefix is not None:
        wal_fix = f"tagged WAL expiry after {needed} days, "
        history_fix = (f"limit the rule to tagged WAL (archive with --tag {wal_tag[0]},{wal_tag[1]} and filter on "
                       f"that tag) so .history files are never expired")
    else:
        wal_fix = ""
        history_fix = f"remove the rule's expiration and let {paths.retention} expire WAL: {paths.no_wal_rule}"
    rules = list(rules or [])
    if newest_backup_needs is None and newest_backup_age_days is not None:
        newest_backup_needs = default_needs(newest_backup_age_days)
    assessment.newest_backup_id = newest_backup_id
    assessment.needs = list(newest_backup_needs or [])
    assessment.countdown = loss_countdown(rules, assessment.needs, cluster_prefix=cluster_prefix,
                                          object_tags=object_tags, layout=layout, today=today)
    soonest = assessment.countdown[0] if assessment.countdown else None
    assessment.days_until_last_backup_expires = soonest.days_until_loss if soonest else None
    if not rules:
        out.append(F.Finding(
            id=F.LIFECYCLE_ABSENT, severity=F.OK,
            message=f"bucket has no lifecycle configuration: retention of {cluster_prefix} relies on "
                    f"{paths.retention} ({policy}) alone",
            evidence={"cluster_prefix": cluster_prefix, "layout": layout},
            fix=f"optionally add the recommended safety-net rules ({wal_fix}abort incomplete multipart uploads)",
        ))
    for rule in rules:
        if rule.get("Status") != "Enabled":
            continue
        scope = rule_scope(rule, cluster_prefix=cluster_prefix, object_tags=object_tags, layout=layout)
        _, tags = _rule_prefix_and_tags(rule)
        days = _expiry_days(rule, today)
        evidence = {"rule_id": scope.rule_id, "expiration_days": days, "required_days": needed,
                    "retention_policy": str(policy), "classes": sorted(scope.classes), "rule_tags": tags,
                    "layout": layout}
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
        out.extend(_class_expiry_findings(scope, days=days, needed=needed, evidence=evidence, paths=paths,
                                          cluster_prefix=cluster_prefix, policy=policy,
                                          backup_interval_days=backup_interval_days, history_fix=history_fix))
    left = assessment.days_until_last_backup_expires
    backup = f"the newest recoverable backup{f' {newest_backup_id}' if newest_backup_id else ''}"
    if soonest is not None:
        others = [c for c in assessment.countdown[1:]]
        countdown = (f"{backup} becomes unrecoverable in {left:.1f} days: {soonest.describe()}"
                     + (f"; also {'; '.join(c.describe() for c in others[:3])}" if others else ""))
    elif newest_backup_needs is not None and not newest_backup_needs and newest_backup_id is None:
        countdown = "no backup is recoverable now"
    else:
        countdown = (f"no lifecycle rule expires what {backup} needs (its base files, metadata, begin..end WAL "
                     f"and .history files)")
    overdue = newest_backup_age_days is not None and newest_backup_age_days > 1.25 * backup_interval_days
    loss_evidence = {"backup_id": newest_backup_id, "days_until_last_backup_expires": left,
                     "rules": [c.to_dict() for c in assessment.countdown],
                     "needs": [n.to_dict() for n in assessment.needs], "newest_backup_age_days": newest_backup_age_days,
                     "backup_interval_days": backup_interval_days}
    if soonest is not None:
        severity = (F.CRITICAL if overdue and left <= margin_days
                    else F.WARNING if overdue or left <= backup_interval_days else F.OK)
        out.append(F.Finding(
            id=F.LIFECYCLE_DAYS_UNTIL_LOSS, severity=severity,
            message=f"without a newer backup, {countdown}",
            evidence=loss_evidence,
            fix=(f"run the backup DAG now (a new backup restarts the countdown); until it has run, disable rule "
                 f"{soonest.rule_id} or raise its Expiration Days to at least {needed}") if severity != F.OK else "",
        ))
    if newest_backup_age_days is not None and newest_backup_age_days > 2 * backup_interval_days:
        out.append(F.Finding(
            id=F.BACKUPS_STOPPED, severity=F.CRITICAL if left is not None and left <= margin_days else F.WARNING,
            message=f"newest backup of {cluster_prefix} is {newest_backup_age_days:.1f} days old (interval "
                    f"{backup_interval_days:g} days): backups have stopped; {countdown}",
            evidence=loss_evidence,
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
                                                     object_tags=object_tags, wal_tag=wal_tag, today=today,
                                                     layout=layout, notes=assessment.recommended_notes)
    return assessment


def recommend_configuration(
    rules: list[Mapping[str, Any]],
    *,
    cluster_prefix: str,
    required: int,
    object_tags: Mapping[str, Mapping[str, str]] | None = None,
    wal_tag: tuple[str, str] = DEFAULT_WAL_TAG,
    today: date | None = None,
    layout: str | None = layouts.BARMAN_CLOUD,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """A full LifecycleConfiguration: others' rules kept, ours safe, plus pgops' safety-net rules.

    Rules scoped inside the cluster prefix lose their expiration (replaced by the tagged WAL rule
    where the layout's tool can tag WAL apart from .history files: barman-cloud only); broader
    rules cannot exclude a prefix, so their expiration is only raised to the required days.
    notes: when given, receives why the configuration has no WAL rule (S3 rules carry no comment;
    the ID of pgops' abort-multipart rule says it too).
    """
    paths = layout_paths(layout)
    today = today or datetime.now(UTC).date()
    base_prefix = cluster_prefix.strip("/") + "/"
    slug = re.sub(r"[^A-Za-z0-9-]+", "-", cluster_prefix.strip("/")) or "root"
    out: list[dict[str, Any]] = []
    has_abort = has_wal_rule = False
    for rule in rules:
        fixed = copy.deepcopy(dict(rule))
        scope = rule_scope(rule, cluster_prefix=cluster_prefix, object_tags=object_tags, layout=layout)
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
    abort_id = f"pgops-{slug}-abort-multipart"
    if not has_wal_rule and paths.tagged_wal_prefix is not None:
        out.append({
            "ID": f"pgops-{slug}-wal-expiry"[:255],
            "Status": "Enabled",
            "Filter": {"And": {"Prefix": f"{base_prefix}{paths.tagged_wal_prefix}",
                               "Tags": [{"Key": wal_tag[0], "Value": wal_tag[1]}]}},
            "Expiration": {"Days": required},
        })
    elif not has_wal_rule:
        tool = re.sub(r"[^a-z0-9]+", "-", paths.tool.lower()).strip("-")
        abort_id += f"-no-wal-expiry-{tool}-cannot-tag-wal" if layout is not None else "-no-wal-expiry-layout-unknown"
        if notes is not None:
            notes.append(f"no WAL expiry rule: {paths.no_wal_rule}; {paths.retention} owns the expiry of WAL "
                         f"and backups (a rule would need at least {required} days)")
    if not has_abort:
        out.append({
            "ID": abort_id[:255],
            "Status": "Enabled",
            "Filter": {"Prefix": base_prefix},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_MULTIPART_DAYS},
        })
    return {"Rules": out}
