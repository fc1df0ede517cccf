"""pgops next to its peers on one lab, in one run: backup, WAL archiving, restore, DAG parse time.

Starts its own lab (SeaweedFS S3, PostgreSQL 15) in a temp state dir, fills a pgbench database of --scale,
and measures every tool with the same parallelism (--jobs: barman-cloud --jobs, pgops' pusher, prefetcher
and restore, pgBackRest process-max), the same compression (lz4 at its fast level; pgBackRest compress-type=lz4,
compress-level=1) and the same transport (TLS to the lab's HTTPS S3 listener: pgBackRest cannot speak plain
HTTP; --transport http measures pgops without TLS). Each compared figure is taken --repeats times (backups
--backup-repeats, WAL archiving --wal-repeats), the tools interleaved (the order rotates every repeat), and
reported as the median with min-max; ratios are taken within one repeat and then summarised. Each tool's best
setting (2 x --jobs) is measured once beside them.
  backup   a pg_basebackup -Ft -D - > /dev/null (read floor)   b the bare barman-cloud-backup CLI (pgops' options)
           c the base-backup DAG (dag.test: backup task and whole run; barman-cloud-backup through pgops-backup,
           which waits for the backup's end WAL itself)   d pgBackRest full backup
  WAL      after a warm-up load, pgbench write load (200-row UPDATEs, synchronous_commit off, no autovacuum) for
           --load-s from a checkpoint, with each archive_command: pgBackRest async archive-push, the pgops
           wrapper; once: bare barman-cloud-wal-archive and each tool's best setting; one --long-load-s run of
           the pgops wrapper (does its lag grow?); lag sampled every second
  restore  the restore-verification DAG's RTO (download + replay), pgBackRest restore + replay (async
           archive-get); replay of one restored copy with the pgops prefetcher and from a local WAL copy; once:
           barman-cloud-restore, replay without prefetch and with barman's --parallel prefetch
  parse    DagBag fill of dags/ with a generated 50-cluster inventory, under a no-network/no-database guard
  goals    every goal of the benchmark (the EBS chain's from bench_ebs_chain's simulator) as {value, goal, ok}
Results: bench/results/peers.json (or --out) and one table in the log. Stops everything it started.
Run: .venv/bin/python bench/bench_peers.py [--scale 100] [--repeats 3] [--load-s 40]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "plugins"))

import peers_lib as pl  # noqa: E402

from pgops.core import restore as core  # noqa: E402
from pgops.dbhost.engines import barman_cloud  # noqa: E402
from pgops.inventory import load_inventory  # noqa: E402
from pgops.lab.local import Lab, as_db_user  # noqa: E402

INVENTORY = REPO / "include" / "clusters.example.yaml"
MARK = "PGOPS_BENCH_RESULT "
PGOPS, PGBR = "pgops wrapper", "pgBackRest async"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=100, help="pgbench scale (100 = ~1.5 GiB)")
    p.add_argument("--repeats", type=int, default=3, help="samples of every compared figure (medians)")
    p.add_argument("--backup-repeats", type=int, default=5, help="samples of each backup (the shortest figures, "
                                                                 "so the noisiest)")
    p.add_argument("--wal-repeats", type=int, default=6, help="samples of each WAL archiving figure (a write "
                                                             "load's WAL varies more than a restore's time; even: "
                                                             "each tool goes first as often)")
    p.add_argument("--load-s", type=float, default=40, help="seconds of write load per WAL archiving sample")
    p.add_argument("--long-load-s", type=float, default=120, help="seconds of the one long load (lag growth)")
    p.add_argument("--replay-load-s", type=float, default=30, help="seconds of write load replayed by restores")
    p.add_argument("--jobs", type=int, default=2, help="parallelism of every tool (backup jobs, WAL pusher and "
                                                       "prefetcher, restore jobs, pgBackRest process-max)")
    p.add_argument("--transport", choices=("https", "http"), default="https",
                   help="how pgops reaches S3 (pgBackRest always uses TLS)")
    p.add_argument("--drain-timeout-s", type=float, default=900, help="longest wait for an archive to catch up")
    p.add_argument("--clusters", type=int, default=50, help="clusters in the generated inventory for parse time")
    p.add_argument("--out", default=str(HERE / "results" / "peers.json"))
    p.add_argument("--state-dir", default=None, help="lab state dir (default: a new temp dir under /var/tmp)")
    p.add_argument("--keep-state", action="store_true", help="do not delete the state dir at the end")
    return p.parse_args(argv)


def summary(values: list[float | None]) -> dict:
    """Median with min-max of the samples that exist."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0, "samples": []}
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "n": len(xs), "samples": list(values)}


def goal(name: str, stat: dict, goal_text: str, ok, **extra) -> dict:
    value = stat["median"] if isinstance(stat, dict) else stat
    row = {"name": name, "value": None if value is None else round(value, 3), "goal": goal_text,
           "ok": bool(value is not None and ok(value))}
    if isinstance(stat, dict):
        row.update(min=stat["min"] if stat["min"] is None else round(stat["min"], 3),
                   max=stat["max"] if stat["max"] is None else round(stat["max"], 3), n=stat["n"])
    row.update(extra)
    return row


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.state = Path(args.state_dir or tempfile.mkdtemp(prefix="pgops-bench-", dir="/var/tmp"))
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o755)
        base = load_inventory(INVENTORY).clusters[0]
        self.cluster = dataclasses.replace(base, engine=dataclasses.replace(
            base.engine, jobs=args.jobs, wal_archive_parallel=args.jobs))
        self.lab = Lab(self.state / "lab", cluster=self.cluster)
        self.r: dict = {"started_at": datetime.now(UTC).isoformat(), "params": {k: v for k, v in vars(args).items()
                                                                              if k not in ("state_dir",)}}
        self.airflow_home = self.state / "airflow"

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.st = st = self.lab.up()
        https = self.args.transport == "https"
        self.s3 = st.s3_https_endpoint if https else st.s3_endpoint
        self.tls_env = {"AWS_CA_BUNDLE": st.tls_cert} if https else {}
        self.env = {**self.lab.db_env(st), **self.tls_env}
        self.r["machine"] = pl.machine()
        self.r["versions"] = pl.versions(self.lab)
        self.r["transport"] = {"pgops": self.s3.split(":")[0], "pgbackrest": "https"}
        self.work = self.state / "work"
        self.work.mkdir(exist_ok=True)
        os.chmod(self.work, 0o755)
        self.log(f"pgbench -i -s {self.args.scale}")
        init_s, _ = pl.timed(pl.pgbench, st, "-i", "-q", "-s", str(self.args.scale))
        self.lab.psql("VACUUM ANALYZE", st=st)
        self.lab.psql("CHECKPOINT", st=st)
        size = int(self.lab.psql("SELECT pg_database_size('postgres')", st=st))
        cluster_size = int(self.lab.psql("SELECT sum(pg_database_size(datname)) FROM pg_database", st=st))
        self.r["database"] = {"scale": self.args.scale, "pgbench_db_bytes": size, "cluster_bytes": cluster_size,
                              "init_s": init_s}
        self.log(f"database: scale {self.args.scale}, {size / 2**20:.0f} MiB (cluster {cluster_size / 2**20:.0f} MiB)")
        jobs = self.args.jobs
        self.pgbr = pl.PgBackRest(self.lab, st, self.work / "pgbackrest", process_max=jobs)
        self.pgbr_best = pl.PgBackRest(self.lab, st, self.work / "pgbackrest-best", process_max=2 * jobs)
        self.pgbr.run("stanza-create")
        self.commands = {
            "barman-cloud-wal-archive": self._ours(1, bare=True),
            PGOPS: self._ours(jobs),
            PGBR: self.pgbr.archive_command(asynchronous=True),
            f"{PGOPS}, best ({2 * jobs} uploads)": self._ours(2 * jobs),
            f"{PGBR}, best (process-max {2 * jobs})": self.pgbr_best.archive_command(asynchronous=True),
        }

    def _cluster(self, **engine) -> object:
        return dataclasses.replace(self.cluster, engine=dataclasses.replace(self.cluster.engine, **engine))

    def _ours(self, parallel: int, *, bare: bool = False) -> str:
        """pgops' archive_command at ``parallel``; bare: barman-cloud-wal-archive alone (the peer baseline)."""
        cluster = self._cluster(wal_archive_parallel=parallel)
        argv = (barman_cloud.wal_archive_argv if bare else barman_cloud.archive_command_argv)(cluster, endpoint_url=self.s3)
        prefix = ["env", *(f"{k}={v}" for k, v in self.tls_env.items())] if self.tls_env else []
        return shlex.join([*prefix, *argv]) + " %p"

    def airflow_env(self) -> dict[str, str]:
        env = {**os.environ, **self.lab.env(self.st),
               "AIRFLOW_HOME": str(self.airflow_home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
               "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__UNIT_TEST_MODE": "False", "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
               "PGOPS_INVENTORY": str(INVENTORY), "PYTHONPATH": str(REPO / "plugins")}
        key = f"AIRFLOW_CONN_{self.cluster.aws_conn_id.upper()}"
        conn = json.loads(env[key])  # the DAGs reach S3 as the CLIs do (the lab's CA, if over TLS)
        conn["extra"]["service_config"]["s3"]["endpoint_url"] = self.s3
        if self.tls_env:
            conn["extra"]["verify"] = self.tls_env["AWS_CA_BUNDLE"]
        env[key] = json.dumps(conn)
        return env

    def migrate_airflow(self) -> None:
        self.airflow_home.mkdir(exist_ok=True)
        res = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=self.airflow_env(),
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise pl.BenchError(f"airflow db migrate failed: {res.stderr[-1500:]}")

    def run_dag(self, dag_id: str, conf: dict) -> dict:
        started = time.perf_counter()
        res = subprocess.run([sys.executable, str(HERE / "peers_dag_run.py"), dag_id, json.dumps(conf)],
                             env=self.airflow_env(), capture_output=True, text=True, timeout=7200)
        wall_s = time.perf_counter() - started
        lines = [line for line in res.stdout.splitlines() if line.startswith(MARK)]
        if not lines:
            raise pl.BenchError(f"{dag_id} run printed no result (exit {res.returncode}): {res.stderr[-2000:]}")
        out = json.loads(lines[-1][len(MARK):])
        out["process_wall_s"] = wall_s
        if not out["state"].endswith("success"):
            raise pl.BenchError(f"{dag_id} run {out['state']}: tasks {out['tasks']}; {res.stderr[-1500:]}")
        return out

    @staticmethod
    def order(names: list[str], rep: int) -> list[str]:
        """The tools in a rotated order: each is first, middle and last in turn."""
        k = rep % len(names)
        return names[k:] + names[:k]

    # -- 2. WAL archiving ----------------------------------------------------------------------------------
    def wal_phase(self, name: str, load_s: float) -> dict:
        lab, st = self.lab, self.st
        pl.set_archive_command(lab, self.commands[name])
        # Every sample starts right after a checkpoint: the WAL a write load makes depends on how long ago the last
        # one was (full-page images), so without it the samples' loads differ by up to a quarter.
        lab.psql("CHECKPOINT", st=st)
        pl.switch_and_wait(lab, st)
        drained, _ = pl.wait_drained(lab, st, self.args.drain_timeout_s)
        if not drained:
            raise pl.BenchError(f"{name}: the archive did not catch up before the load started")
        start = pl.archiver_row(lab, st)
        sampler = pl.Sampler(lab, st)
        sampler.start()
        self.log(f"WAL archiving with {name}: {load_s:.0f} s of write load")
        took_s, load = pl.timed(pl.write_load, st, self.work, load_s, self.args.jobs)
        end = pl.archiver_row(lab, st)
        drained, drain_s = pl.wait_drained(lab, st, self.args.drain_timeout_s)
        after = pl.archiver_row(lab, st)
        samples = sampler.stop()
        wal_bytes = end["lsn"] - start["lsn"]
        produced = wal_bytes / pl.SEGMENT_BYTES
        archived_in_load = end["archived_count"] - start["archived_count"]
        archived_total = after["archived_count"] - start["archived_count"]
        load_samples = [s for s in samples if s["t_s"] <= took_s]
        out = {
            "archive_command": self.commands[name].split(" --endpoint-url")[0],
            "load_s": took_s, "tps": load["tps"], "wal_bytes": wal_bytes, "wal_mib_s": wal_bytes / 2**20 / took_s,
            "produced_segments_s": produced / took_s, "archived_segments_during_load": archived_in_load,
            "archived_segments_s_during_load": archived_in_load / took_s,
            "sustained_segments_s": archived_total / (took_s + drain_s) if drained else archived_in_load / took_s,
            "lag_segments_at_load_end": pl.lag_of(end, None)[0] if not load_samples else load_samples[-1]["lag_segments"],
            "lag_bytes_at_load_end": pl.lag_of(end, None)[1],
            "max_lag_segments": max((s["lag_segments"] for s in samples), default=None),
            "max_lag_bytes": max((s["lag_bytes"] for s in samples), default=None),
            "drain_s": drain_s, "drained": drained, "failed_archive_calls": after["failed_count"] - start["failed_count"],
            "lag_series": [[s["t_s"], s["lag_segments"], s["lag_bytes"]] for s in samples],
        }
        # lag growth: the largest backlog of the load's last third against that of its first two thirds
        first = [s["lag_segments"] for s in load_samples if s["t_s"] <= 2 * took_s / 3]
        last = [s["lag_segments"] for s in load_samples if s["t_s"] > 2 * took_s / 3]
        out["lag_growth_segments"] = (max(last) - max(first)) if first and last else None
        self.log(f"  {name}: WAL {out['wal_mib_s']:.1f} MiB/s ({out['produced_segments_s']:.2f} seg/s), archived "
                 f"{out['archived_segments_s_during_load']:.2f} seg/s during load, lag at end "
                 f"{out['lag_segments_at_load_end']} seg (max {out['max_lag_segments']}), drained in {drain_s:.1f} s")
        return out

    def wal(self) -> dict:
        load_s, runs = self.args.load_s, []
        # The same table for every sample: no autovacuum landing in one of them at random (it took up to a tenth
        # of a sample's WAL), and one load first that is not counted: a freshly loaded table makes more WAL per
        # update than one updated for a while (no free space in its pages for HOT updates yet). The table then
        # ages evenly; each tool goes first in every other repeat, so an even number of repeats cancels that.
        self.lab.psql("ALTER TABLE pgbench_accounts SET (autovacuum_enabled = off)", st=self.st)
        try:
            self.log(f"WAL archiving: a {load_s:.0f}-s warm-up load, not counted")
            self.wal_phase(PGOPS, load_s)
            for rep in range(self.args.wal_repeats):
                for name in self.order([PGBR, PGOPS], rep):
                    runs.append({"rep": rep, "name": name, **self.wal_phase(name, load_s)})
            once = {name: self.wal_phase(name, load_s) for name in self.commands if name not in (PGOPS, PGBR)}
            self.log(f"WAL archiving, long load: {self.args.long_load_s:.0f} s with the {PGOPS}")
            long = self.wal_phase(PGOPS, self.args.long_load_s)
        finally:
            self.lab.psql("ALTER TABLE pgbench_accounts RESET (autovacuum_enabled)", st=self.st)

        def of(name: str, key: str) -> list:
            return [r[key] for r in runs if r["name"] == name]

        reps = range(self.args.wal_repeats)
        pair = [{r["name"]: r for r in runs if r["rep"] == rep} for rep in reps]
        out = {"runs": runs, "once": once, "long": long, "stats": {}}
        for name in (PGOPS, PGBR):
            out["stats"][name] = {k: summary(of(name, k)) for k in (
                "archived_segments_s_during_load", "produced_segments_s", "lag_segments_at_load_end",
                "max_lag_segments", "drain_s", "tps")}
        out["stats"]["rate_ratio"] = summary([p[PGOPS]["archived_segments_s_during_load"]
                                              / p[PGBR]["archived_segments_s_during_load"] for p in pair])
        out["stats"]["lag_difference"] = summary([p[PGOPS]["lag_segments_at_load_end"]
                                                  - p[PGBR]["lag_segments_at_load_end"] for p in pair])
        return out

    # -- 1. backup -------------------------------------------------------------------------------------------
    def backup_once(self, tool: str, rep: int) -> dict:
        st = self.st
        if tool == "a":
            self.log("backup a: pg_basebackup -Ft -D - > /dev/null")
            argv = [str(pl.PG_BIN / "pg_basebackup"), "-h", st.pg_socket_dir, "-p", str(st.pg_port), "-U",
                    "postgres", "-Ft", "-D", "-", "-X", "none", "--checkpoint=fast", "--no-manifest"]
            with open(os.devnull, "wb") as null:
                secs, _ = pl.timed(lambda: subprocess.run(as_db_user(argv), stdout=null, check=True))
            return {"s": secs}
        if tool == "b":
            self.log("backup b: barman-cloud-backup CLI")
            argv = barman_cloud.backup_argv(self.cluster, endpoint_url=self.s3, backup_name=f"bench-cli-{rep}",
                                            pg_host=st.pg_socket_dir, pg_port=st.pg_port, pg_user="postgres",
                                            cluster_size_bytes=self.r["database"]["cluster_bytes"])
            argv[0] = self.cluster.engine.bin("barman-cloud-backup")  # the bare CLI (pgops runs it as pgops-backup)
            before = self._base_bytes()
            secs, _ = pl.timed(pl.run_db, argv, env=self.env)
            return {"s": secs, "stored_bytes": self._base_bytes() - before,
                    "argv": " ".join(a for a in argv if a != self.s3)}
        if tool == "c":
            self.log("backup c: the base-backup DAG (dag.test)")
            dag = self.run_dag("pgops_base_backup__main", {})
            return {"s": dag["tasks"]["backup"]["duration_s"], "run_s": dag["run_s"],
                    "tasks_s": {k: v["duration_s"] for k, v in dag["tasks"].items()},
                    "backup": dag["xcom"].get("verify") or {}}
        pgbr = self.pgbr if tool == "d" else self.pgbr_best
        self.log(f"backup {tool}: pgBackRest full (process-max {pgbr.process_max})")
        secs, _ = pl.timed(pgbr.run, "backup", "--type=full")
        info = json.loads(pgbr.run("info", "--output=json"))[0]["backup"][-1]
        return {"s": secs, "label": info.get("label"),
                "repo_bytes": info.get("info", {}).get("repository", {}).get("delta"),
                "db_bytes": info.get("info", {}).get("size")}

    def backups(self) -> dict:
        lab, st = self.lab, self.st
        both = self.commands[PGOPS] + " && " + self.pgbr.archive_command(asynchronous=False)
        pl.set_archive_command(lab, both)  # both repositories get every segment from here on (restores need them)
        # The WAL loads left dead rows in pgbench_accounts: vacuum them now, so that no autovacuum of that table
        # runs through some of the backups and not others.
        self.log("VACUUM of the table the WAL loads updated (not timed)")
        lab.psql("VACUUM pgbench_accounts", st=st, timeout_s=1800)
        lab.psql("CHECKPOINT", st=st)
        pl.switch_and_wait(lab, st)
        runs, repeats = [], self.args.backup_repeats
        for rep in range(repeats):
            for tool in self.order(["a", "b", "c", "d"], rep):
                runs.append({"rep": rep, "tool": tool, **self.backup_once(tool, rep)})
        best = self.backup_once("d_best", repeats)
        by = [{r["tool"]: r["s"] for r in runs if r["rep"] == rep} for rep in range(repeats)]
        out = {"runs": runs, "pgbackrest_best": best,
               "stats": {t: summary([p[t] for p in by]) for t in "abcd"}}
        out["stats"]["c_run_s"] = summary([r["run_s"] for r in runs if r["tool"] == "c"])
        out["stats"]["c_over_b"] = summary([p["c"] / p["b"] for p in by])
        out["stats"]["c_over_d"] = summary([p["c"] / p["d"] for p in by])
        out["stats"]["a_over_c"] = summary([p["a"] / p["c"] for p in by])
        return out

    def _base_bytes(self) -> int:
        """Bytes of every object under the cluster's base/ prefix (a backup's size: the difference)."""
        st, total = self.st, 0
        for page in self.lab.s3_client(st).get_paginator("list_objects_v2").paginate(
                Bucket=st.bucket, Prefix=f"{st.prefix}/{st.server_name}/base/"):
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total

    # -- 3. restore ---------------------------------------------------------------------------------------------
    def restores(self) -> dict:
        lab, st, out, args = self.lab, self.st, {}, self.args
        self.log(f"write load replayed by the restores: {args.replay_load_s:.0f} s")
        before = pl.archiver_row(lab, st)
        pl.write_load(st, self.work, args.replay_load_s, args.jobs)
        pl.switch_and_wait(lab, st, timeout_s=args.drain_timeout_s)
        out["replayed_wal_bytes"] = pl.archiver_row(lab, st)["lsn"] - before["lsn"]

        backups = barman_cloud.parse_backup_list(pl.run_db(
            barman_cloud.backup_list_argv(self.cluster, endpoint_url=self.s3), env=self.env).stdout)
        newest = [b for b in backups if b.done][-1]
        out["barman_backup"] = newest.backup_id
        scratch = self.state / "restore"
        scratch.mkdir(exist_ok=True)
        os.chmod(scratch, 0o755)
        pl.chown_db(scratch)
        pristine = scratch / "pristine"
        self.log(f"restore (once): barman-cloud-restore {newest.backup_id}")
        argv = barman_cloud.restore_argv(self.cluster, endpoint_url=self.s3, backup_id=newest.backup_id,
                                         destination_dir=str(pristine))
        out["barman_restore_s"], _ = pl.timed(pl.run_db, argv, env=self.env)

        local = scratch / "walcopy"
        out["local_copy_segments"] = pl.download_wal_copy(lab, st, local, newest.begin_wal or "")
        spools = {n: scratch / f"spool-{n}" for n in ("bare", "pgops")}
        variants = {
            "barman_no_prefetch": shlex.join(barman_cloud.wal_restore_argv(self.cluster, endpoint_url=self.s3))
            + " %f %p",
            "barman_prefetch": shlex.join(barman_cloud.wal_restore_argv(
                self.cluster, endpoint_url=self.s3, parallel=args.jobs, spool_dir=str(spools["bare"]), bare=True))
            + " %f %p",
            "pgops_prefetch": core.restore_command(barman_cloud.wal_restore_argv(
                self.cluster, endpoint_url=self.s3, parallel=args.jobs, spool_dir=str(spools["pgops"]))),
            "local_copy": f"cp {shlex.quote(str(local))}/%f %p",
        }

        def replay(name: str) -> dict:
            for d in spools.values():  # a spool of its own each time: nothing fetched by an earlier replay
                pl.remove_tree(d)
                d.mkdir(mode=0o700)
                pl.chown_db(d)
            target = scratch / name
            pl.copy_tree_as_db(pristine, target)
            self.log(f"replay: {name}")
            try:
                return pl.replay(target, restore_command=variants[name], env={**self.env})
            finally:
                pl.remove_tree(target)

        out["replay_once"] = {name: replay(name) for name in ("barman_no_prefetch", "barman_prefetch")}
        runs = []
        for rep in range(args.repeats):
            for tool in self.order(["dag", "pgbackrest", "pgops_prefetch", "local_copy", "pgops_restore"], rep):
                runs.append({"rep": rep, "tool": tool, **self.restore_once(tool, newest.backup_id, scratch, replay)})
        for d in spools.values():
            pl.remove_tree(d)  # the pgops prefetcher stops when its spool is gone
        pl.remove_tree(pristine)
        out["runs"] = runs
        by = [{r["tool"]: r for r in runs if r["rep"] == rep} for rep in range(args.repeats)]
        stats = {
            "dag_rto_s": summary([p["dag"]["rto_s"] for p in by]),
            "dag_download_s": summary([p["dag"]["download_s"] for p in by]),
            "dag_replay_s": summary([p["dag"]["replay_s"] for p in by]),
            "pgbackrest_total_s": summary([p["pgbackrest"]["total_s"] for p in by]),
            "pgbackrest_restore_s": summary([p["pgbackrest"]["restore_s"] for p in by]),
            "pgbackrest_replay_s": summary([p["pgbackrest"]["replay_s"] for p in by]),
            "pgops_restore_s": summary([p["pgops_restore"]["s"] for p in by]),
            "replay_pgops_prefetch_s": summary([p["pgops_prefetch"]["replay_s"] for p in by]),
            "replay_local_copy_s": summary([p["local_copy"]["replay_s"] for p in by]),
            "dag_rto_over_pgbackrest": summary([p["dag"]["rto_s"] / p["pgbackrest"]["total_s"] for p in by]),
            "replay_prefetch_over_local": summary([p["pgops_prefetch"]["replay_s"] / p["local_copy"]["replay_s"]
                                                   for p in by]),
        }
        out["stats"] = stats
        return out

    def restore_once(self, tool: str, backup_id: str, scratch: Path, replay) -> dict:
        if tool in ("pgops_prefetch", "local_copy"):
            return replay(tool)
        if tool == "pgops_restore":
            self.log(f"restore: pgops-restore --jobs {self.args.jobs} {backup_id}")
            argv = barman_cloud.parallel_restore_argv(self.cluster, endpoint_url=self.s3, backup_id=backup_id,
                                                      destination_dir=str(scratch / "ours"))
            secs, res = pl.timed(pl.run_db, argv, env=self.env)
            pl.remove_tree(scratch / "ours")
            return {"s": secs, **barman_cloud.parse_restore_summary(res.stdout.splitlines())}
        if tool == "dag":
            self.log("restore: the restore-verification DAG (dag.test)")
            dag = self.run_dag("pgops_restore_verify__main", {
                "scratch_root": str(scratch / "dag"), "checks": ["canary", "system_identifier"],
                "heapallindexed": False, "target": "canary"})
            wait = dag["xcom"].get("wait_recovery") or {}
            started = dag["xcom"].get("restore") or {}
            return {"rto_s": wait.get("rto_s"), "replay_s": wait.get("replay_s"),
                    "download_s": started.get("download_s"), "segments_replayed": wait.get("segments_replayed"),
                    "restorer": started.get("restorer"), "restore_parts": started.get("parts"),
                    "run_s": dag["run_s"], "tasks_s": {k: v["duration_s"] for k, v in dag["tasks"].items()}}
        self.log(f"restore: pgBackRest restore + replay (process-max {self.pgbr.process_max})")
        target = scratch / "pgbackrest"
        get = shlex.join(self.pgbr.argv(f"--pg1-path={target}", "archive-get")) + ' %f "%p"'
        restore_s, _ = pl.timed(self.pgbr.run, "restore", f"--pg1-path={target}",
                                f"--recovery-option=restore_command={get}")
        try:
            rp = pl.replay(target, restore_command=get, env={})
        finally:
            pl.remove_tree(target)
        return {"restore_s": restore_s, "replay_s": rp["replay_s"], "total_s": restore_s + rp["replay_s"],
                "segments_restored": rp["segments_restored"]}

    # -- 4. parse time ----------------------------------------------------------------------------------------
    def parse_time(self) -> dict:
        data = yaml.safe_load(INVENTORY.read_text())
        base, clusters = data["clusters"][0], []
        for i in range(self.args.clusters):
            c = copy.deepcopy(base)
            name = f"c{i:03d}"
            c.update(name=name, postgres_conn_id=f"pgops_{name}_pg", aws_conn_id=f"pgops_{name}_aws")
            c["storage"]["server_name"] = name
            c["runner"]["queue"] = f"dbhost_{name}"
            clusters.append(c)
        path = self.state / "clusters-parse.yaml"
        path.write_text(yaml.safe_dump({"clusters": clusters}))
        home = self.state / "airflow-parse"
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "PGOPS_LAB"))}
        env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                    "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                    "AIRFLOW__CORE__UNIT_TEST_MODE": "False", "PGOPS_INVENTORY": str(path),
                    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING"})
        # A dag-processor parses with the bytecode its first parse (or the image build) wrote; this shell may forbid
        # writing it (PYTHONDONTWRITEBYTECODE), so it is written here once, as a deployment would.
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "plugins"), str(REPO / "dags")],
                       check=True, capture_output=True, timeout=300)
        runs = []
        for _ in range(self.args.repeats):
            res = subprocess.run([sys.executable, str(HERE / "peers_parse_time.py")], env=env, capture_output=True,
                                 text=True, timeout=600)
            lines = [line for line in res.stdout.splitlines() if line.startswith(MARK)]
            if not lines:
                raise pl.BenchError(f"parse time printed no result: {res.stderr[-1500:]}")
            one = json.loads(lines[-1][len(MARK):])
            if one["guarded_calls"] or one["import_errors"]:
                raise pl.BenchError(f"DAG parse made a network/database call or failed: {one['guarded_calls']} "
                                    f"{one['import_errors']}")
            runs.append(one)
        return {"runs": runs, "clusters": self.args.clusters, "dags": runs[-1]["dags"],
                "fill_s": summary([r["fill_s"] for r in runs]), "goal_s": 1.0}

    # -- goals -------------------------------------------------------------------------------------------------
    def goals(self) -> list[dict]:
        import bench_ebs_chain

        b, w, x, p = self.r["backup"]["stats"], self.r["wal"]["stats"], self.r["restore"]["stats"], self.r["parse"]
        lag_ours, lag_theirs = w[PGOPS]["lag_segments_at_load_end"], w[PGBR]["lag_segments_at_load_end"]
        long = self.r["wal"]["long"]
        rows = [
            goal("restore-verification DAG RTO / pgBackRest restore + replay", x["dag_rto_over_pgbackrest"], "<= 1.0",
                 lambda v: v <= 1.0),
            goal("WAL archived during load, pgops / pgBackRest async (same parallelism)", w["rate_ratio"], ">= 1.0",
                 lambda v: v >= 1.0),
            goal("WAL lag at the end of the load, pgops (segments)", lag_ours,
                 f"<= pgBackRest's median {lag_theirs['median']}", lambda v: v <= lag_theirs["median"]),
            goal(f"WAL lag growth over a {long['load_s']:.0f}-s load, pgops (segments, last third - first two)",
                 long["lag_growth_segments"], "<= 2", lambda v: v <= 2),
            goal("backup c/b: DAG backup task / bare barman-cloud-backup", b["c_over_b"], "<= 1.05",
                 lambda v: v <= 1.05),
            goal("backup c/d: DAG backup task / pgBackRest full", b["c_over_d"], "<= 1.0", lambda v: v <= 1.0),
            goal("replay with the pgops prefetcher / from a local copy", x["replay_prefetch_over_local"], "<= 1.15",
                 lambda v: v <= 1.15),
            goal(f"DagBag fill, {p['clusters']} clusters (s)", p["fill_s"], "<= 1.0", lambda v: v <= 1.0),
        ]
        return rows + bench_ebs_chain.goal_rows()

    # -- all -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        try:
            self.setup()
            self.migrate_airflow()
            self.r["parse"] = self.parse_time()
            self.r["wal"] = self.wal()
            self.r["backup"] = self.backups()
            self.r["restore"] = self.restores()
            self.r["goals"] = self.goals()
        finally:
            self.r["bench_wall_s"] = time.perf_counter() - t0
            self.r["finished_at"] = datetime.now(UTC).isoformat()
            self.lab.down()
            if not self.args.keep_state:
                shutil.rmtree(self.state, ignore_errors=True)
        return self.r


def _mm(stat: dict, unit: str = "", fmt: str = ".2f") -> str:
    if not stat or stat.get("median") is None:
        return "-"
    if stat["n"] == 1:
        return f"{stat['median']:{fmt}}{unit}"
    return f"{stat['median']:{fmt}}{unit} [{stat['min']:{fmt}}-{stat['max']:{fmt}}]"


def table(r: dict, *, markdown: bool = False) -> str:
    """The README's table: medians [min-max] of the repeats (as text, or as Markdown for the README)."""
    db, m, n = r["database"], r["machine"], r["params"]["repeats"]
    nb = r["params"]["backup_repeats"]
    nw = r["params"].get("wal_repeats", n)
    b, w, x = r["backup"]["stats"], r["wal"]["stats"], r["restore"]["stats"]
    rows: list[tuple[str, str, str]] = [
        ("database", f"pgbench scale {db['scale']}, {db['pgbench_db_bytes'] / 2**30:.1f} GiB",
         f"{m.get('cpus')} cpus, {m.get('memory_gib')} GiB; medians [min-max] of {n} ({nb} for backups, {nw} for WAL), tools interleaved"),
        ("backup a: pg_basebackup -Ft to /dev/null", _mm(b["a"], " s", ".1f"), "read floor"),
        ("backup b: bare barman-cloud-backup (lz4)", _mm(b["b"], " s", ".1f"), ""),
        ("backup c: base-backup DAG, backup task / whole run", _mm(b["c"], " s", ".1f"), f"run {_mm(b['c_run_s'], ' s', '.1f')}"),
        ("backup d: pgBackRest full", _mm(b["d"], " s", ".1f"),
         f"best (process-max {r['params']['jobs'] * 2}): {r['backup']['pgbackrest_best']['s']:.1f} s"),
        ("  c/b (goal <= 1.05)", _mm(b["c_over_b"]), ""),
        ("  c/d (goal <= 1.0)", _mm(b["c_over_d"]), ""),
    ]
    for name in (PGBR, PGOPS):
        s = w[name]
        rows.append((f"WAL {name}", f"{_mm(s['archived_segments_s_during_load'])} seg/s",
                     f"of {_mm(s['produced_segments_s'])} produced; lag at end {_mm(s['lag_segments_at_load_end'], '', '.0f')}"
                     f" seg, max {_mm(s['max_lag_segments'], '', '.0f')}"))
    rows.append(("  pgops / pgBackRest archived (goal >= 1.0)", _mm(w["rate_ratio"]), ""))
    for name, one in r["wal"]["once"].items():
        rows.append((f"WAL {name} (once)", f"{one['archived_segments_s_during_load']:.2f} seg/s",
                     f"of {one['produced_segments_s']:.2f}; lag at end {one['lag_segments_at_load_end']} seg"))
    long = r["wal"]["long"]
    rows.append((f"WAL {PGOPS}, {long['load_s']:.0f}-s load", f"{long['archived_segments_s_during_load']:.2f} seg/s",
                 f"of {long['produced_segments_s']:.2f}; lag growth {long['lag_growth_segments']} seg, max "
                 f"{long['max_lag_segments']}"))
    once = r["restore"]["replay_once"]
    rows += [
        ("restore: barman-cloud-restore (once)", f"{r['restore']['barman_restore_s']:.1f} s", "one stream"),
        ("restore: pgops-restore", _mm(x["pgops_restore_s"], " s", ".1f"), f"--jobs {r['params']['jobs']}"),
        ("replay: pgops prefetcher / local copy", f"{_mm(x['replay_pgops_prefetch_s'], ' s', '.1f')}",
         f"local {_mm(x['replay_local_copy_s'], ' s', '.1f')}; no prefetch {once['barman_no_prefetch']['replay_s']:.1f} s, "
         f"barman --parallel {once['barman_prefetch']['replay_s']:.1f} s (once)"),
        ("  prefetch / local (goal <= 1.15)", _mm(x["replay_prefetch_over_local"]), ""),
        ("restore-verification DAG RTO", _mm(x["dag_rto_s"], " s", ".1f"),
         f"download {_mm(x['dag_download_s'], ' s', '.1f')} + replay {_mm(x['dag_replay_s'], ' s', '.1f')}"),
        ("pgBackRest restore + replay", _mm(x["pgbackrest_total_s"], " s", ".1f"),
         f"{_mm(x['pgbackrest_restore_s'], ' s', '.1f')} + {_mm(x['pgbackrest_replay_s'], ' s', '.1f')}"),
        ("  DAG RTO / pgBackRest (goal <= 1.0)", _mm(x["dag_rto_over_pgbackrest"]), ""),
        (f"parse: DagBag fill, {r['parse']['clusters']} clusters", _mm(r["parse"]["fill_s"], " s"), "goal <= 1 s"),
    ]
    if markdown:
        lines = ["| | measured | |", "|---|---|---|"]
        lines += [f"| {a.strip()} | {b_} | {c} |" for a, b_, c in rows]
        lines += ["", "| goal | median [min-max] | goal | |", "|---|---|---|---|"]
        lines += [f"| {g['name']} | {g['value']}" + (f" [{g['min']}-{g['max']}]" if g.get("n", 1) > 1 else "")
                  + f" | {g['goal']} | {'ok' if g['ok'] else 'MISS'} |" for g in r.get("goals", [])]
        return "\n".join(lines)
    w1 = max(len(a) for a, _, _ in rows)
    w2 = max(len(b_) for _, b_, _ in rows)
    lines = [f"{a:<{w1}}  {b_:>{w2}}  {c}" for a, b_, c in rows]
    lines += ["", "goals:"] + [f"  {'ok  ' if g['ok'] else 'MISS'} {g['name']}: {g['value']} ({g['goal']})"
                               for g in r.get("goals", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    try:
        r = bench.run()
    except Exception:
        pl.dump(Path(args.out).with_suffix(".failed.json"), bench.r)
        raise
    pl.dump(Path(args.out), r)
    Path(args.out).with_suffix(".md").write_text(table(r, markdown=True) + "\n")
    print("\n" + table(r), flush=True)
    print(f"\nwrote {args.out} and {Path(args.out).with_suffix('.md')} (the README's table)", flush=True)
    missed = [g["name"] for g in r["goals"] if not g["ok"]]
    if missed:
        print(f"goals missed: {len(missed)} of {len(r['goals'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
