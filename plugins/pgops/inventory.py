"""Cluster inventory: the YAML file that says which PostgreSQL clusters pgops manages.

Parsed at DAG-parse time, so it does no network or database I/O. Every error names the cluster,
the field, the bad value and the fix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_INVENTORY = REPO_ROOT / "include" / "clusters.example.yaml"
INVENTORY_ENV = "PGOPS_INVENTORY"

# barman-cloud-backup and barman-cloud-wal-archive accept different compressors.
BACKUP_COMPRESSIONS = ("gzip", "bzip2", "lz4", "snappy", "none")
WAL_COMPRESSIONS = ("gzip", "bzip2", "xz", "lz4", "zstd", "snappy", "none")
WAL_COMPRESSION_LEVELS = ("low", "medium", "high")  # barman-cloud-wal-archive --compression-level
RUNNER_KINDS = ("local", "ssh")
STORAGE_LAYOUTS = ("auto", "barman-cloud", "pgbackrest", "wal-g", "wal-e")  # "auto": detected from the keys
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
CONN_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
QUEUE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
RETENTION_RE = re.compile(r"^(RECOVERY\s+WINDOW\s+OF\s+(\d+)\s+(DAY|DAYS|WEEK|WEEKS|MONTH|MONTHS)|REDUNDANCY\s+(\d+))$",
                          re.IGNORECASE)
SNS_ARN_RE = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}$")
CRON_FIELD_RE = re.compile(r"^[\d*/,\-A-Za-z?LW#]+$")
PRESETS = ("@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@once")


# An absolute path of plain parts: no '.', '..', '//', spaces or control characters (it reaches argv and config files).
PLAIN_PATH_RE = re.compile(r"^(?!.*/\.{1,2}(/|$))(/[A-Za-z0-9._+@=,-]+)+/?$")
PREFIX_RE = re.compile(r"^(?!(.*/)?\.{1,2}(/|$))(?!(.*/)?-)[A-Za-z0-9_.=+-]+(/[A-Za-z0-9_.=+-]+)*$")
MAX_SECONDS = 7 * 86400  # durations a DAG turns into timedeltas and timeouts


class InventoryError(ValueError):
    """A bad inventory: the message names the cluster, the field, the value and the fix."""


@dataclass(frozen=True, kw_only=True)
class Storage:
    bucket: str
    prefix: str
    server_name: str
    layout: str = "auto"

    @property
    def destination_url(self) -> str:
        """barman-cloud's destination: objects go under <url>/<server_name>/."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def server_prefix(self) -> str:
        return f"{self.prefix}/{self.server_name}" if self.prefix else self.server_name

    def report_key(self, kind: str, name: str) -> str:
        return f"{self.server_prefix}/pgops/reports/{kind}/{name}"


@dataclass(frozen=True, kw_only=True)
class Engine:
    kind: str = "barman-cloud"
    compression: str = "lz4"
    wal_compression: str = "lz4"
    # barman's named level for the WAL compression: "low" (lz4 fast mode, gzip -1, the level pgBackRest and
    # WAL-G use for WAL); barman's own default, "medium", is LZ4HC: three times the CPU per segment
    wal_compression_level: str = "low"
    jobs: int = 2
    # >1: a pusher (include/dbhost/pgops_wal_archive.py) archives ready segments in the background, N at a time
    # (bench_peers: 3x the bare CLI under a write load)
    wal_archive_parallel: int = 4
    immediate_checkpoint: bool = True
    bin_dir: str = ""
    timeout_s: int = 6 * 3600
    extra_args: tuple[str, ...] = ()

    def bin(self, name: str) -> str:
        return str(Path(self.bin_dir) / name) if self.bin_dir else name


@dataclass(frozen=True, kw_only=True)
class Runner:
    kind: str = "local"
    queue: str = "default"
    run_as: str | None = None
    ssh_conn_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class Schedule:
    backup: str = "0 2 * * *"
    audit: str = "@hourly"
    restore_verify: str = "0 6 * * *"
    timezone: str = "UTC"


@dataclass(frozen=True, kw_only=True)
class Retention:
    policy: str = "RECOVERY WINDOW OF 7 DAYS"
    minimum_redundancy: int = 1


@dataclass(frozen=True, kw_only=True)
class Targets:
    rpo_s: int = 300
    rto_s: int = 3600
    backup_deadline_s: int = 21600  # an SNS alert when a scheduled base backup has not finished this long after its time
    restore_deadline_s: int = 3600  # the same for a restore verification run (default: rto_s)


@dataclass(frozen=True, kw_only=True)
class Alerts:
    sns_topic_arn: str | None = None
    aws_conn_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class ReplicaNode:
    """One PostgreSQL node of a cluster: how pgops reaches it and how the others stream from it."""

    name: str
    postgres_conn_id: str
    host: str | None = None  # for primary_conninfo on the other nodes (None: the connection's host)
    port: int | None = None
    slot: str | None = None  # physical replication slot this node streams through
    data_directory: str | None = None
    repmgr_conf: str | None = None
    # where commands on this node's host run; None: the cluster's runner (the same host as the primary's)
    runner: Runner | None = None
    instance_id: str | None = None  # its EC2 instance: where the cluster's endpoint must point when it is the primary


@dataclass(frozen=True, kw_only=True)
class Replication:
    primary: ReplicaNode
    standbys: tuple[ReplicaNode, ...] = ()
    repmgr: bool = False
    replication_user: str = "postgres"
    passfile: str | None = None  # libpq passfile on the DB hosts, named in primary_conninfo (no password in it)
    max_lag_bytes: int = 16 * 1024 * 1024
    max_lag_s: int = 60
    slot_warning_bytes: int = 1024**3
    slot_critical_bytes: int = 8 * 1024**3

    @property
    def nodes(self) -> tuple[ReplicaNode, ...]:
        return (self.primary, *self.standbys)

    def node(self, name: str) -> ReplicaNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise InventoryError(f"replication node {name!r} is not in the inventory "
                             f"(nodes: {', '.join(n.name for n in self.nodes)})")


ENDPOINT_KINDS = ("elastic_ip", "dns")


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """The address clients write to: an Elastic IP or a Route 53 record that must follow the primary."""

    kind: str  # one of ENDPOINT_KINDS
    allocation_id: str | None = None  # elastic_ip: eipalloc-..., or
    public_ip: str | None = None  # elastic_ip: the address itself
    hosted_zone_id: str | None = None  # dns
    record_name: str | None = None  # dns: fully qualified, without the trailing dot
    region: str | None = None  # the instances' and the Elastic IP's region (None: the AWS connection's)

    @property
    def label(self) -> str:
        if self.kind == "dns":
            return f"DNS record {self.record_name} (zone {self.hosted_zone_id})"
        return f"Elastic IP {self.public_ip or self.allocation_id}"


@dataclass(frozen=True, kw_only=True)
class Cluster:
    name: str
    postgres_conn_id: str
    aws_conn_id: str
    storage: Storage
    engine: Engine = field(default_factory=Engine)
    runner: Runner = field(default_factory=Runner)
    schedule: Schedule = field(default_factory=Schedule)
    retention: Retention = field(default_factory=Retention)
    targets: Targets = field(default_factory=Targets)
    alerts: Alerts = field(default_factory=Alerts)
    tags: tuple[str, ...] = ()
    replication: Replication | None = None
    # AWS identity whose keys DB-host processes get (barman-cloud, restore_command); None: aws_conn_id's. Give the DB
    # hosts one that may write WAL and backups but not pgops/reports/ (include/iam/pgops-dbhost-policy.json).
    dbhost_aws_conn_id: str | None = None
    endpoint: Endpoint | None = None  # checked by the hourly audit with the replication (needs replication)

    @property
    def pool(self) -> str:
        return f"pgops_{self.name}"

    @property
    def engine_aws_conn_id(self) -> str:
        """The AWS connection of DB-host processes (dbhost_aws_conn_id, else aws_conn_id)."""
        return self.dbhost_aws_conn_id or self.aws_conn_id

    @property
    def alerts_conn_id(self) -> str:
        return self.alerts.aws_conn_id or self.aws_conn_id


@dataclass(frozen=True)
class Inventory:
    path: Path
    clusters: tuple[Cluster, ...]

    def get(self, name: str) -> Cluster:
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        known = ", ".join(c.name for c in self.clusters) or "none"
        raise InventoryError(f"cluster {name!r} is not in the inventory {self.path} (clusters: {known})")


class _Fields:
    """Reads one mapping of the YAML, remembering where it is for error messages."""

    def __init__(self, data: Any, where: str, path: Path):
        if not isinstance(data, dict):
            raise InventoryError(f"{path}: {where} must be a mapping, got {type(data).__name__}")
        self.data, self.where, self.path = data, where, path
        self.used: set[str] = set()

    def fail(self, key: str, value: Any, problem: str, fix: str) -> InventoryError:
        return InventoryError(f"{self.path}: {self.where}: field '{key}' = {value!r} {problem}. Fix: {fix}")

    def get(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise InventoryError(f"{self.path}: {self.where}: field '{key}' is missing. Fix: add '{key}:'")
            return default
        return self.data[key]

    def string(self, key: str, default: str | None = None, *, required: bool = False,
               pattern: re.Pattern | None = None, fix: str = "") -> str | None:
        value = self.get(key, default, required=required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(key, value, "is not a string", fix or "quote the value")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(key, value, "is not valid", fix or f"use a value matching {pattern.pattern}")
        return value

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, value, "is not an integer", f"write a whole number >= {minimum}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise self.fail(key, value, "is out of range", f"use a number {bound}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, value, "is not a boolean", "write true or false")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, default)
        if value not in choices:
            raise self.fail(key, value, "is not a known value", f"use one of {', '.join(choices)}")
        return value

    def sub(self, key: str) -> _Fields:
        return _Fields(self.get(key, {}) or {}, f"{self.where}.{key}", self.path)

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise InventoryError(
                f"{self.path}: {self.where}: unknown field(s) {', '.join(unknown)}. "
                f"Fix: remove them or correct the spelling (known: {', '.join(sorted(self.used))})"
            )


def _check_cron(fields: _Fields, key: str, default: str) -> str:
    value = fields.string(key, default)
    assert value is not None
    if value in PRESETS:
        return value
    parts = value.split()
    if len(parts) != 5 or not all(CRON_FIELD_RE.match(p) for p in parts):
        raise fields.fail(key, value, "is not a cron expression",
                          "use five cron fields like '0 2 * * *' or a preset such as @daily")
    return " ".join(parts)


def _parse_cluster(raw: Any, index: int, path: Path) -> Cluster:
    top = _Fields(raw, f"clusters[{index}]", path)
    name = top.string("name", required=True, pattern=NAME_RE,
                      fix="use lower-case letters, digits and underscores, starting with a letter (it becomes part of DAG ids)")
    top.where = f"cluster {name!r}"

    storage_f = top.sub("storage")
    storage_f.where = f"cluster {name!r}: storage"
    bucket = storage_f.string("bucket", required=True, pattern=BUCKET_RE,
                              fix="use an S3 bucket name: 3-63 lower-case letters, digits, dots and hyphens")
    prefix = (storage_f.string("prefix", "") or "").strip("/")
    if prefix.startswith("s3://"):
        raise storage_f.fail("prefix", prefix, "is a URL", "give only the key prefix; the bucket goes in 'bucket'")
    if prefix and not PREFIX_RE.fullmatch(prefix):
        raise storage_f.fail("prefix", prefix, "is not a plain key prefix",
                             "use letters, digits, '.', '_', '=', '+' and '-' in '/'-separated parts, no '.' or '..'")
    server_name = storage_f.string("server_name", name, pattern=re.compile(r"^(?!\.{1,2}$)(?!-)[A-Za-z0-9_.-]{1,200}$"),
                                   fix="use letters, digits, '.', '_' and '-' only (not '.' or '..')")
    layout = storage_f.choice("layout", "auto", STORAGE_LAYOUTS)
    storage_f.reject_unknown()

    engine_f = top.sub("engine")
    engine_f.where = f"cluster {name!r}: engine"
    engine = Engine(
        kind=engine_f.choice("kind", "barman-cloud", ("barman-cloud",)),
        compression=engine_f.choice("compression", "lz4", BACKUP_COMPRESSIONS),
        wal_compression=engine_f.choice("wal_compression", "lz4", WAL_COMPRESSIONS),
        wal_compression_level=engine_f.choice("wal_compression_level", "low", WAL_COMPRESSION_LEVELS),
        jobs=engine_f.integer("jobs", 2, minimum=1, maximum=64),
        wal_archive_parallel=engine_f.integer("wal_archive_parallel", 4, minimum=1, maximum=32),
        immediate_checkpoint=engine_f.boolean("immediate_checkpoint", True),
        bin_dir=_plain_path(engine_f, "bin_dir", expand_env(engine_f.string("bin_dir", "") or "")),
        timeout_s=engine_f.integer("timeout_s", 6 * 3600, minimum=60, maximum=MAX_SECONDS),
        extra_args=tuple(_string_list(engine_f, "extra_args")),
    )
    engine_f.reject_unknown()

    runner_f = top.sub("runner")
    runner_f.where = f"cluster {name!r}: runner"
    runner = _parse_runner(runner_f)

    sched_f = top.sub("schedule")
    sched_f.where = f"cluster {name!r}: schedule"
    schedule = Schedule(
        backup=_check_cron(sched_f, "backup", "0 2 * * *"),
        audit=_check_cron(sched_f, "audit", "@hourly"),
        restore_verify=_check_cron(sched_f, "restore_verify", "0 6 * * *"),
        timezone=sched_f.string("timezone", "UTC") or "UTC",
    )
    _check_timezone(sched_f, schedule.timezone)
    sched_f.reject_unknown()

    ret_f = top.sub("retention")
    ret_f.where = f"cluster {name!r}: retention"
    policy = ret_f.string("policy", "RECOVERY WINDOW OF 7 DAYS") or ""
    if not RETENTION_RE.match(policy.strip()):
        raise ret_f.fail("policy", policy, "is not a barman retention policy",
                         "write 'RECOVERY WINDOW OF 7 DAYS' (DAYS, WEEKS or MONTHS) or 'REDUNDANCY 3'")
    retention = Retention(policy=" ".join(policy.upper().split()),
                          minimum_redundancy=ret_f.integer("minimum_redundancy", 1, minimum=0, maximum=1000))
    ret_f.reject_unknown()

    tgt_f = top.sub("targets")
    tgt_f.where = f"cluster {name!r}: targets"
    targets = Targets(rpo_s=tgt_f.integer("rpo_s", 300, minimum=1, maximum=MAX_SECONDS),
                      rto_s=tgt_f.integer("rto_s", 3600, minimum=1, maximum=MAX_SECONDS),
                      backup_deadline_s=tgt_f.integer("backup_deadline_s", 21600, minimum=1, maximum=MAX_SECONDS),
                      restore_deadline_s=tgt_f.integer("restore_deadline_s", tgt_f.get("rto_s", 3600), minimum=1,
                                                       maximum=MAX_SECONDS))
    tgt_f.reject_unknown()

    al_f = top.sub("alerts")
    al_f.where = f"cluster {name!r}: alerts"
    alerts = Alerts(
        sns_topic_arn=al_f.string("sns_topic_arn", None, pattern=SNS_ARN_RE,
                                  fix="use an SNS topic ARN like arn:aws:sns:us-east-1:123456789012:pgops-alerts"),
        aws_conn_id=al_f.string("aws_conn_id", None, pattern=CONN_ID_RE),
    )
    al_f.reject_unknown()

    postgres_conn_id = top.string("postgres_conn_id", required=True, pattern=CONN_ID_RE,
                                  fix="name an Airflow connection id (letters, digits, '_', '.', '-')")
    replication = None
    if top.data.get("replication") is not None:
        replication = _parse_replication(top, name, primary_conn_id=postgres_conn_id or "", runner=runner)

    cluster = Cluster(
        name=name,
        postgres_conn_id=postgres_conn_id,
        aws_conn_id=top.string("aws_conn_id", required=True, pattern=CONN_ID_RE,
                               fix="name an Airflow connection id (letters, digits, '_', '.', '-')"),
        storage=Storage(bucket=bucket, prefix=prefix, server_name=server_name, layout=layout),
        engine=engine,
        runner=runner,
        schedule=schedule,
        retention=retention,
        targets=targets,
        alerts=alerts,
        tags=tuple(_string_list(top, "tags")),
        dbhost_aws_conn_id=top.string("dbhost_aws_conn_id", None, pattern=CONN_ID_RE,
                                      fix="name the Airflow AWS connection of the DB hosts' identity, or remove it"),
        replication=replication,
        endpoint=_parse_endpoint(top, name, replication) if top.get("endpoint") is not None else None,
    )
    top.reject_unknown()
    return cluster


def _parse_runner(runner_f: _Fields, default: Runner | None = None) -> Runner:
    """A runner section: where a host's commands run (a worker queue on that host, or an ssh connection)."""
    base = default or Runner()
    runner_kind = runner_f.choice("kind", base.kind, RUNNER_KINDS)
    runner = Runner(
        kind=runner_kind,
        queue=runner_f.string("queue", base.queue, pattern=QUEUE_RE,
                              fix="use letters, digits, '.', '_' and '-'") or base.queue,
        run_as=runner_f.string("run_as", base.run_as, pattern=re.compile(r"^[a-z_][a-z0-9_-]*$"),
                               fix="give an OS user name such as postgres"),
        ssh_conn_id=runner_f.string("ssh_conn_id", base.ssh_conn_id if runner_kind == "ssh" else None,
                                    pattern=CONN_ID_RE),
    )
    if runner_kind == "ssh" and not runner.ssh_conn_id:
        raise runner_f.fail("ssh_conn_id", None, "is required when kind is ssh", "name the Airflow SSH connection id")
    runner_f.reject_unknown()
    return runner


SLOT_RE = re.compile(r"^[a-z0-9_]{1,63}$")
# a name, an address or a unix socket directory (no '..' part, no '//')
HOST_RE = re.compile(r"^(?!(.*/)?\.\.(/|$))(?!.*//)(?!-)[A-Za-z0-9_.:/\[\]-]{1,255}$")
PATH_RE = PLAIN_PATH_RE


def _parse_node(f: _Fields, *, conn_id: str | None = None, runner: Runner | None = None) -> ReplicaNode:
    node = ReplicaNode(
        name=f.string("name", required=True, pattern=NAME_RE,
                      fix="use lower-case letters, digits and underscores, starting with a letter") or "",
        postgres_conn_id=conn_id or f.string("postgres_conn_id", required=True, pattern=CONN_ID_RE,
                                             fix="name the Airflow connection to this node") or "",
        host=f.string("host", None, pattern=HOST_RE, fix="give a host name, an IP address or a socket directory"),
        port=f.integer("port", 5432, minimum=1, maximum=65535) if f.get("port") is not None else None,
        slot=f.string("slot", None, pattern=SLOT_RE,
                      fix="use lower-case letters, digits and underscores (PostgreSQL slot names), at most 63"),
        data_directory=f.string("data_directory", None, pattern=PATH_RE, fix="give an absolute path"),
        repmgr_conf=f.string("repmgr_conf", None, pattern=PATH_RE, fix="give the absolute path of repmgr.conf"),
        runner=_node_runner(f, runner),
        instance_id=f.string("instance_id", None, pattern=INSTANCE_ID_RE,
                             fix="give the node's EC2 instance id, like i-0123456789abcdef0"),
    )
    f.reject_unknown()
    return node


# \Z, not $: "$" also matches before a trailing newline
INSTANCE_ID_RE = re.compile(r"^i-[0-9a-f]{8,17}\Z")
ALLOCATION_ID_RE = re.compile(r"^eipalloc-[0-9a-f]{8,17}\Z")
IPV4_RE = re.compile(r"^(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\Z")
HOSTED_ZONE_RE = re.compile(r"^[A-Z0-9]{1,32}\Z")  # AWS's start with Z
# a DNS name of letters, digits and hyphens (a leading '*.' for a wildcard record), at most 253 characters
RECORD_NAME_RE = re.compile(r"^(?=.{1,253}\.?\Z)(\*\.)?([A-Za-z0-9_](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                            r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?\Z")
REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}\Z")


def _parse_endpoint(top: _Fields, name: str, replication: Replication | None) -> Endpoint:
    """endpoint: exactly one of elastic_ip {allocation_id | public_ip} or dns {hosted_zone_id, record_name}."""
    if not isinstance(top.get("endpoint"), dict):
        raise top.fail("endpoint", top.get("endpoint"), "is not a mapping",
                       "write 'endpoint:' with either 'elastic_ip:' or 'dns:' under it")
    ef = top.sub("endpoint")
    ef.where = f"cluster {name!r}: endpoint"
    region = ef.string("region", None, pattern=REGION_RE, fix="give an AWS region such as us-east-1, or remove it")
    given = [k for k in ENDPOINT_KINDS if ef.data.get(k) is not None]
    if len(given) != 1:
        ef.used.update(ENDPOINT_KINDS)
        raise ef.fail(" or ".join(ENDPOINT_KINDS), given or None, "must name exactly one kind of endpoint",
                      "give either 'elastic_ip: {allocation_id: eipalloc-...}' (or public_ip) or "
                      "'dns: {hosted_zone_id: Z..., record_name: db.example.com}'")
    kind = given[0]
    if not isinstance(ef.get(kind), dict):
        raise ef.fail(kind, ef.get(kind), "is not a mapping",
                      "write 'elastic_ip: {allocation_id: eipalloc-...}' or 'dns: {hosted_zone_id: Z..., "
                      "record_name: db.example.com}'")
    sub = ef.sub(kind)
    sub.where = f"cluster {name!r}: endpoint.{kind}"
    if kind == "elastic_ip":
        allocation_id = sub.string("allocation_id", None, pattern=ALLOCATION_ID_RE,
                                   fix="give the Elastic IP's allocation id, like eipalloc-0123456789abcdef0")
        public_ip = sub.string("public_ip", None, pattern=IPV4_RE,
                               fix="give the Elastic IP as a dotted IPv4 address, like 203.0.113.10")
        if (allocation_id is None) == (public_ip is None):
            both = allocation_id is not None
            raise sub.fail("allocation_id or public_ip", [allocation_id, public_ip] if both else None,
                           "are both given" if both else "is missing",
                           "name the Elastic IP by exactly one of allocation_id (preferred) or public_ip")
        sub.reject_unknown()
        endpoint = Endpoint(kind=kind, allocation_id=allocation_id, public_ip=public_ip, region=region)
    else:
        zone = sub.string("hosted_zone_id", required=True, pattern=HOSTED_ZONE_RE,
                          fix="give the Route 53 hosted zone id, like Z0123456789ABCDEFGHIJ (without /hostedzone/)")
        record = sub.string("record_name", required=True, pattern=RECORD_NAME_RE,
                            fix="give the record's fully qualified name, like db.example.com")
        sub.reject_unknown()
        endpoint = Endpoint(kind=kind, hosted_zone_id=zone, record_name=(record or "").rstrip(".").lower(),
                            region=region)
    ef.reject_unknown()
    if replication is None or not replication.standbys:
        raise ef.fail(kind, endpoint.label, "needs a replication section with standbys",
                      "the endpoint is checked against the current primary: add 'replication:' with the primary "
                      "and its standbys (each with its instance_id), or remove 'endpoint:'")
    missing = [n.name for n in replication.nodes if not n.instance_id]
    if missing:
        raise InventoryError(
            f"{top.path}: cluster {name!r}: replication: field 'instance_id' is missing on node(s) "
            f"{', '.join(missing)}, and the cluster has an endpoint. Fix: add 'instance_id: i-...' (the node's EC2 "
            "instance) to every node under replication, so the audit can tell which node the endpoint reaches")
    ids = [n.instance_id for n in replication.nodes]
    if len(ids) != len(set(ids)):
        raise InventoryError(
            f"{top.path}: cluster {name!r}: replication: field 'instance_id' = {ids!r} names an instance twice. "
            "Fix: give every node its own EC2 instance id")
    return endpoint


def _node_runner(f: _Fields, default: Runner | None) -> Runner | None:
    if f.get("runner") is None:
        return None
    rf = f.sub("runner")
    rf.where = f"{f.where}.runner"
    return _parse_runner(rf, default)


def _parse_replication(top: _Fields, name: str, *, primary_conn_id: str, runner: Runner) -> Replication:
    rf = top.sub("replication")
    rf.where = f"cluster {name!r}: replication"
    pf = rf.sub("primary")
    pf.where = f"cluster {name!r}: replication.primary"
    if "postgres_conn_id" in pf.data:
        raise pf.fail("postgres_conn_id", pf.data["postgres_conn_id"], "is not allowed here",
                      "the primary is the cluster's own postgres_conn_id; remove it")
    primary = _parse_node(pf, conn_id=primary_conn_id, runner=runner)
    raw = rf.get("standbys", [])
    if not isinstance(raw, list):
        raise rf.fail("standbys", raw, "is not a list", "write each standby as '- name: ...'")
    standbys = []
    for i, item in enumerate(raw):
        sf = _Fields(item, f"cluster {name!r}: replication.standbys[{i}]", rf.path)
        standbys.append(_parse_node(sf, runner=runner))
    seen: set[str] = set()
    for node in (primary, *standbys):
        if node.name in seen:
            raise rf.fail("standbys", node.name, "names a node twice", "give every node its own name")
        seen.add(node.name)
    slots = [n.slot for n in (primary, *standbys) if n.slot]
    if len(slots) != len(set(slots)):
        raise rf.fail("standbys", slots, "uses a slot name twice", "give every node its own slot")
    repl = Replication(
        primary=primary, standbys=tuple(standbys), repmgr=rf.boolean("repmgr", False),
        replication_user=rf.string("replication_user", "postgres", pattern=re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$"),
                                   fix="give a PostgreSQL role name") or "postgres",
        passfile=rf.string("passfile", None, pattern=PATH_RE, fix="give an absolute path"),
        max_lag_bytes=rf.integer("max_lag_bytes", 16 * 1024 * 1024, minimum=0),
        max_lag_s=rf.integer("max_lag_s", 60, minimum=0),
        slot_warning_bytes=rf.integer("slot_warning_bytes", 1024**3, minimum=0),
        slot_critical_bytes=rf.integer("slot_critical_bytes", 8 * 1024**3, minimum=1),
    )
    if repl.slot_warning_bytes > repl.slot_critical_bytes:
        raise rf.fail("slot_warning_bytes", repl.slot_warning_bytes, f"is above slot_critical_bytes "
                      f"({repl.slot_critical_bytes})", "make the warning threshold the smaller one")
    rf.reject_unknown()
    return repl


_ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str) -> str:
    """Expand ${VAR} and ${VAR:-default} the way a shell or Compose does (environment only, no I/O)."""
    return _ENV_REF_RE.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)


_LIST_ITEM_RE = re.compile(r"^[A-Za-z0-9_.:=+@/,-]{1,100}$")


def _string_list(fields: _Fields, key: str) -> list[str]:
    value = fields.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fields.fail(key, value, "is not a list of strings", f"write {key}: [\"a\", \"b\"]")
    for item in value:  # DAG tags and command-line arguments: one plain word each
        if not _LIST_ITEM_RE.fullmatch(item) or ".." in item.split("/") or "//" in item or (
                key == "tags" and item.startswith("-")):
            raise fields.fail(key, item, "is not a plain word", "use letters, digits and . _ : = + @ / , - "
                              "(at most 100; no spaces, control characters or '..')")
    return value


def _plain_path(fields: _Fields, key: str, value: str) -> str:
    if value and not PLAIN_PATH_RE.fullmatch(value):
        raise fields.fail(key, value, "is not a plain absolute path",
                          "give an absolute path without '..', '//', spaces or control characters")
    return value


def _check_timezone(fields: _Fields, tz: str) -> None:
    import pendulum

    try:
        pendulum.timezone(tz)
    except Exception as exc:  # pendulum raises several types for unknown zones
        raise fields.fail("timezone", tz, "is not a known time zone",
                          "use an IANA name such as UTC or Europe/Paris") from exc


def parse_inventory(data: Any, path: Path) -> Inventory:
    if not isinstance(data, dict) or "clusters" not in data:
        raise InventoryError(f"{path}: the top level must be a mapping with a 'clusters:' list. Fix: start the file with 'clusters:'")
    allowed = {"clusters"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InventoryError(f"{path}: unknown top-level field(s) {', '.join(unknown)}. Fix: only 'clusters:' is allowed")
    raw_clusters = data["clusters"]
    if not isinstance(raw_clusters, list):
        raise InventoryError(f"{path}: 'clusters' must be a list of clusters. Fix: write each cluster as '- name: ...'")
    clusters = [_parse_cluster(raw, i, path) for i, raw in enumerate(raw_clusters)]
    seen: dict[str, int] = {}
    for i, cluster in enumerate(clusters):
        if cluster.name in seen:
            raise InventoryError(f"{path}: cluster {cluster.name!r}: field 'name' is used twice (clusters[{seen[cluster.name]}] "
                                 f"and clusters[{i}]). Fix: give every cluster its own name")
        seen[cluster.name] = i
    locations: dict[tuple[str, str], str] = {}
    for cluster in clusters:
        loc = (cluster.storage.bucket, cluster.storage.server_prefix)
        if loc in locations:
            raise InventoryError(f"{path}: cluster {cluster.name!r}: storage s3://{loc[0]}/{loc[1]} is also used by cluster "
                                 f"{locations[loc]!r}. Fix: give each cluster its own prefix or server_name")
        locations[loc] = cluster.name
    return Inventory(path=path, clusters=tuple(clusters))


def inventory_path() -> Path:
    return Path(os.environ.get(INVENTORY_ENV) or DEFAULT_INVENTORY)


def load_inventory(path: str | Path | None = None) -> Inventory:
    """Read and validate the inventory (``$PGOPS_INVENTORY`` or the example file)."""
    path = Path(path) if path else inventory_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InventoryError(f"inventory file {path} does not exist. Fix: set {INVENTORY_ENV} to your clusters.yaml") from None
    return parse_inventory(_parse_yaml(text, path), path)


_YAML_CACHE: dict[str, Any] = {}


def _parse_yaml(text: str, path: Path) -> Any:
    """The inventory text as data; the last text parsed is cached (parse_inventory never mutates it).

    Every DAG file loads the inventory: in one DagBag fill the five files parse it once, and the environment
    variables are still expanded, and everything validated, on every load.
    """
    if text in _YAML_CACHE:
        return _YAML_CACHE[text]
    try:
        # libyaml's loader when built in: ~10x faster than pure Python.
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        raise InventoryError(f"{path}: not valid YAML ({exc}). Fix: check indentation and quoting") from None
    _YAML_CACHE.clear()
    _YAML_CACHE[text] = data
    return data
