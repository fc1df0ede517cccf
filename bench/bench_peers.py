"""pgops next to its peers on one lab, in one run: backup, WAL archiving, restore, DAG parse time.

Starts its own lab (SeaweedFS S3 with its HTTPS listener for pgBackRest, PostgreSQL 15) in a temp state
dir, fills a pgbench database of --scale, and measures with the same parallelism (--jobs) and the same
compression (lz4, pgops' default; pgBackRest compress-type=lz4):
  backup   a pg_basebackup -Ft -D - > /dev/null (read floor)   b barman-cloud-backup CLI (our options; and
           with --gzip and without compression, so the default is the fastest measured)
           c the base-backup DAG (dag.test: backup task and whole run)   d pgBackRest full backup
  WAL      pgbench write load (200-row UPDATEs, synchronous_commit off) for --load-s with each archive_command:
           barman-cloud-wal-archive, pgBackRest async archive-push, the pgops wrapper; lag sampled every second;
           the wrapper's "already archived" check (a LIST per segment) timed against its archive rate
  restore  barman-cloud-restore + replay without prefetch, with barman's --parallel prefetch, with the pgops
           prefetcher (include/dbhost/pgops_wal_restore.py), and from a local WAL copy;
           the restore-verification DAG's RTO, pgBackRest restore + replay (async archive-get prefetch)
  parse    DagBag fill of dags/ with a generated 50-cluster inventory, under a no-network/no-database guard
Results: bench/results/peers.json (or --out) and one table in the log. Stops everything it started.
Run: .venv/bin/python bench/bench_peers.py [--scale 50] [--load-s 30]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import shutil
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

from pgops import restore as core  # noqa: E402
from pgops.engines import barman_cloud  # noqa: E402
from pgops.inventory import load_inventory  # noqa: E402
from pgops.lab import Lab, as_db_user  # noqa: E402

INVENTORY = REPO / "include" / "clusters.example.yaml"
MARK = "PGOPS_BENCH_RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=200, help="pgbench scale (200 = ~3 GiB: a backup takes tens of seconds)")
    p.add_argument("--load-s", type=float, default=30, help="seconds of write load per WAL archiving variant")
    p.add_argument("--replay-load-s", type=float, default=0, help="seconds of write load replayed by restores "
                                                                  "(default: --load-s)")
    p.add_argument("--jobs", type=int, default=2, help="parallelism of every tool (backup jobs, process-max)")
    p.add_argument("--wal-parallel", type=int, default=4, help="WAL prefetch / archive-ahead parallelism")
    p.add_argument("--drain-timeout-s", type=float, default=900, help="longest wait for an archive to catch up")
    p.add_argument("--clusters", type=int, default=50, help="clusters in the generated inventory for parse time")
    p.add_argument("--out", default=str(HERE / "results" / "peers.json"))
    p.add_argument("--state-dir", default=None, help="lab state dir (default: a new temp dir under /var/tmp)")
    p.add_argument("--keep-state", action="store_true", help="do not delete the state dir at the end")
    args = p.parse_args(argv)
    args.replay_load_s = args.replay_load_s or args.load_s
    return args


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.state = Path(args.state_dir or tempfile.mkdtemp(prefix="pgops-bench-", dir="/var/tmp"))
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o755)
        base = load_inventory(INVENTORY).clusters[0]
        self.cluster = dataclasses.replace(base, engine=dataclasses.replace(base.engine, jobs=args.jobs))
        self.lab = Lab(self.state / "lab", cluster=self.cluster)
        self.r: dict = {"started_at": datetime.now(UTC).isoformat(), "params": {k: v for k, v in vars(args).items()
                                                                              if k not in ("state_dir",)}}
        self.airflow_home = self.state / "airflow"

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.st = self.lab.up()
        self.env = self.lab.db_env(self.st)
        self.r["machine"] = pl.machine()
        self.r["versions"] = pl.versions(self.lab)
        self.work = self.state / "work"
        self.work.mkdir(exist_ok=True)
        os.chmod(self.work, 0o755)
        self.log(f"pgbench -i -s {self.args.scale}")
        init_s, _ = pl.timed(pl.pgbench, self.st, "-i", "-q", "-s", str(self.args.scale))
        self.lab.psql("VACUUM ANALYZE", st=self.st)
        self.lab.psql("CHECKPOINT", st=self.st)
        size = int(self.lab.psql("SELECT pg_database_size('postgres')", st=self.st))
        cluster_size = int(self.lab.psql("SELECT sum(pg_database_size(datname)) FROM pg_database", st=self.st))
        self.r["database"] = {"scale": self.args.scale, "pgbench_db_bytes": size, "cluster_bytes": cluster_size,
                              "init_s": init_s}
        self.log(f"database: scale {self.args.scale}, {size / 2**20:.0f} MiB (cluster {cluster_size / 2**20:.0f} MiB)")
        self.pgbr = pl.PgBackRest(self.lab, self.st, self.work / "pgbackrest", process_max=self.args.jobs)
        self.pgbr.run("stanza-create")
        self.commands = {
            "barman-cloud-wal-archive": self._ours(1),
            "pgops wrapper": self._ours(self.args.wal_parallel),
            "pgBackRest async": self.pgbr.archive_command(asynchronous=True),
        }

    def _ours(self, parallel: int) -> str:
        c = dataclasses.replace(self.cluster, engine=dataclasses.replace(self.cluster.engine,
                                                                         wal_archive_parallel=parallel))
        return shlex.join(barman_cloud.archive_command_argv(c, endpoint_url=self.st.s3_endpoint)) + " %p"

    def airflow_env(self) -> dict[str, str]:
        env = {**os.environ, **self.lab.env(self.st),
               "AIRFLOW_HOME": str(self.airflow_home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
               "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__UNIT_TEST_MODE": "False", "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
               "PGOPS_INVENTORY": str(INVENTORY), "PYTHONPATH": str(REPO / "plugins")}
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

    # -- 2. WAL archiving ----------------------------------------------------------------------------------
    def wal_phase(self, name: str) -> dict:
        lab, st = self.lab, self.st
        pl.set_archive_command(lab, self.commands[name])
        pl.switch_and_wait(lab, st)
        drained, _ = pl.wait_drained(lab, st, self.args.drain_timeout_s)
        if not drained:
            raise pl.BenchError(f"{name}: the archive did not catch up before the load started")
        start = pl.archiver_row(lab, st)
        sampler = pl.Sampler(lab, st)
        sampler.start()
        self.log(f"WAL archiving with {name}: {self.args.load_s:.0f} s of write load")
        load_s, load = pl.timed(pl.write_load, st, self.work, self.args.load_s, self.args.jobs)
        end = pl.archiver_row(lab, st)
        drained, drain_s = pl.wait_drained(lab, st, self.args.drain_timeout_s)
        after = pl.archiver_row(lab, st)
        samples = sampler.stop()
        wal_bytes = end["lsn"] - start["lsn"]
        produced = wal_bytes / pl.SEGMENT_BYTES
        archived_in_load = end["archived_count"] - start["archived_count"]
        archived_total = after["archived_count"] - start["archived_count"]
        load_samples = [s for s in samples if s["t_s"] <= load_s]
        out = {
            "archive_command": self.commands[name].split(" --endpoint-url")[0],
            "load_s": load_s, "tps": load["tps"], "wal_bytes": wal_bytes, "wal_mib_s": wal_bytes / 2**20 / load_s,
            "produced_segments_s": produced / load_s, "archived_segments_during_load": archived_in_load,
            "archived_segments_s_during_load": archived_in_load / load_s,
            "sustained_segments_s": archived_total / (load_s + drain_s) if drained else archived_in_load / load_s,
            "lag_segments_at_load_end": pl.lag_of(end, None)[0] if not load_samples else load_samples[-1]["lag_segments"],
            "lag_bytes_at_load_end": pl.lag_of(end, None)[1],
            "max_lag_segments": max((s["lag_segments"] for s in samples), default=None),
            "max_lag_bytes": max((s["lag_bytes"] for s in samples), default=None),
            "drain_s": drain_s, "drained": drained, "failed_archive_calls": after["failed_count"] - start["failed_count"],
            "lag_series": [[s["t_s"], s["lag_segments"], s["lag_bytes"]] for s in samples],
        }
        # Keeps up: the backlog at the end of the load is at most two segments (in flight), not a growing queue.
        out["keeps_up"] = out["lag_segments_at_load_end"] <= 2
        if name == "pgops wrapper":
            out["already_archived_check"] = self._check_cost(out)
        self.log(f"  {name}: WAL {out['wal_mib_s']:.1f} MiB/s ({out['produced_segments_s']:.2f} seg/s), archived "
                 f"{out['archived_segments_s_during_load']:.2f} seg/s during load, lag at end "
                 f"{out['lag_segments_at_load_end']} seg, drained in {drain_s:.1f} s; keeps up: {out['keeps_up']}")
        return out

    def _check_cost(self, w: dict) -> dict:
        """The wrapper's "already archived" check (one LIST of a segment's own keys before its upload) timed on the
        segments just archived, against the archive rate measured with it (--wal-parallel uploads at a time)."""
        s3, bucket = self.lab.s3_client(self.st), self.st.bucket
        wals = f"{self.st.prefix}/{self.st.server_name}/wals/"
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=wals)
                for o in page.get("Contents", [])][-200:]
        started = time.perf_counter()
        for key in keys:
            head, base = key.rsplit("/", 1)
            s3.list_objects_v2(Bucket=bucket, Prefix=f"{head}/{base.split('.')[0]}", Delimiter="/")
        check_ms = 1000 * (time.perf_counter() - started) / max(1, len(keys))
        rate = w["archived_segments_s_during_load"]
        segment_ms = 1000 * self.args.wal_parallel / rate if rate else None  # one upload thread's time per segment
        return {"checks": len(keys), "check_ms": check_ms, "rate_seg_s": rate, "parallel": self.args.wal_parallel,
                "segment_ms": segment_ms, "share": check_ms / segment_ms if segment_ms else None}

    # -- 1. backup -------------------------------------------------------------------------------------------
    def backups(self) -> dict:
        lab, st, out = self.lab, self.st, {}
        dual = self.commands["pgops wrapper"] + " && " + self.pgbr.archive_command(asynchronous=False)
        pl.set_archive_command(lab, dual)  # both repositories get every segment from here on (restores need them)
        pl.switch_and_wait(lab, st)

        self.log("backup a: pg_basebackup -Ft -D - > /dev/null")
        argv = [str(pl.PG_BIN / "pg_basebackup"), "-h", st.pg_socket_dir, "-p", str(st.pg_port), "-U", "postgres",
                "-Ft", "-D", "-", "-X", "none", "--checkpoint=fast", "--no-manifest"]
        with open(os.devnull, "wb") as null:
            out["a_read_floor_s"], _ = pl.timed(lambda: subprocess.run(as_db_user(argv), stdout=null, check=True))

        self.log("backup b: barman-cloud-backup CLI")
        size = self.r["database"]["cluster_bytes"]  # the same parts as the DAG's backup (c)
        argv = barman_cloud.backup_argv(self.cluster, endpoint_url=st.s3_endpoint, backup_name="bench-cli",
                                        pg_host=st.pg_socket_dir, pg_port=st.pg_port, pg_user="postgres",
                                        cluster_size_bytes=size)
        before = self._base_bytes()
        out["b_barman_cli_s"], _ = pl.timed(pl.run_db, argv, env=self.env)
        b_stored = self._base_bytes() - before
        out["barman_argv"] = " ".join(a for a in argv if a not in (st.s3_endpoint,))
        out["b_compressions"] = {self.cluster.engine.compression: {"s": out["b_barman_cli_s"], "stored_bytes": b_stored}}
        for comp in ("gzip", "none"):  # the other choices, so the default is the fastest measured
            if comp == self.cluster.engine.compression:
                continue
            self.log(f"backup b, --{comp}: barman-cloud-backup CLI")
            c = dataclasses.replace(self.cluster, engine=dataclasses.replace(self.cluster.engine, compression=comp))
            before = self._base_bytes()
            argv = barman_cloud.backup_argv(c, endpoint_url=st.s3_endpoint, backup_name=f"bench-cli-{comp}",
                                            pg_host=st.pg_socket_dir, pg_port=st.pg_port, pg_user="postgres",
                                            cluster_size_bytes=size)
            secs, _ = pl.timed(pl.run_db, argv, env=self.env)
            out["b_compressions"][comp] = {"s": secs, "stored_bytes": self._base_bytes() - before}

        self.log("backup c: the base-backup DAG (dag.test)")
        dag = self.run_dag("pgops_base_backup__main", {})
        out["c_dag_backup_task_s"] = dag["tasks"]["backup"]["duration_s"]
        out["c_dag_run_s"] = dag["run_s"]
        out["c_dag_tasks_s"] = {k: v["duration_s"] for k, v in dag["tasks"].items()}
        self.dag_backup = dag["xcom"].get("verify") or {}
        out["c_backup"] = self.dag_backup

        self.log("backup d: pgBackRest full")
        out["d_pgbackrest_s"], _ = pl.timed(self.pgbr.run, "backup", "--type=full")
        info = json.loads(self.pgbr.run("info", "--output=json"))[0]["backup"][-1]
        out["d_backup"] = {"label": info.get("label"), "repo_bytes": info.get("info", {}).get("repository", {}).get("delta"),
                           "db_bytes": info.get("info", {}).get("size")}
        c, b, d, a = out["c_dag_backup_task_s"], out["b_barman_cli_s"], out["d_pgbackrest_s"], out["a_read_floor_s"]
        out["ratios"] = {"c_over_b": c / b, "c_over_d": c / d, "a_over_c": a / c, "c_run_over_b": out["c_dag_run_s"] / b}
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
            barman_cloud.backup_list_argv(self.cluster, endpoint_url=st.s3_endpoint), env=self.env).stdout)
        newest = [b for b in backups if b.done][-1]
        out["barman_backup"] = newest.backup_id
        scratch = self.state / "restore"
        scratch.mkdir(exist_ok=True)
        os.chmod(scratch, 0o755)
        pl.chown_db(scratch)
        pristine = scratch / "pristine"
        self.log(f"restore: barman-cloud-restore {newest.backup_id}")
        argv = barman_cloud.restore_argv(self.cluster, endpoint_url=st.s3_endpoint, backup_id=newest.backup_id,
                                         destination_dir=str(pristine))
        out["barman_restore_s"], _ = pl.timed(pl.run_db, argv, env=self.env)
        if Path(self.cluster.engine.bin(barman_cloud.PARALLEL_RESTORE_TOOL)).exists():
            self.log(f"restore: pgops-restore --jobs {args.jobs} {newest.backup_id}")
            argv = barman_cloud.parallel_restore_argv(self.cluster, endpoint_url=st.s3_endpoint,
                                                      backup_id=newest.backup_id, destination_dir=str(scratch / "ours"))
            out["pgops_restore_s"], res = pl.timed(pl.run_db, argv, env=self.env)
            out["pgops_restore"] = barman_cloud.parse_restore_summary(res.stdout.splitlines())
            pl.remove_tree(scratch / "ours")

        local = scratch / "walcopy"
        out["local_copy_segments"] = pl.download_wal_copy(lab, st, local, newest.begin_wal or "")
        spool, spool2 = scratch / "spool-bare", scratch / "spool-pgops"  # one each: no segment fetched by the other
        for d in (spool, spool2):
            d.mkdir(mode=0o700, exist_ok=True)
            pl.chown_db(d)
        variants = {
            "barman_no_prefetch": shlex.join(barman_cloud.wal_restore_argv(self.cluster, endpoint_url=st.s3_endpoint))
            + " %f %p",
            "barman_prefetch": shlex.join(barman_cloud.wal_restore_argv(
                self.cluster, endpoint_url=st.s3_endpoint, parallel=args.wal_parallel, spool_dir=str(spool), bare=True)) + " %f %p",
            "pgops_prefetch": core.restore_command(barman_cloud.wal_restore_argv(
                self.cluster, endpoint_url=st.s3_endpoint, parallel=args.wal_parallel, spool_dir=str(spool2))),
            "local_copy": f"cp {shlex.quote(str(local))}/%f %p",
        }
        out["replay"] = {}
        for name, command in variants.items():
            target = scratch / name
            pl.copy_tree_as_db(pristine, target)
            self.log(f"replay: {name}")
            out["replay"][name] = pl.replay(target, restore_command=command, env=self.env)
            pl.remove_tree(target)
        for d in (spool, spool2):
            pl.remove_tree(d)  # the pgops prefetcher stops when its spool is gone
        pl.remove_tree(pristine)

        self.log("restore: the restore-verification DAG (dag.test)")
        dag = self.run_dag("pgops_restore_verify__main", {
            "scratch_root": str(scratch / "dag"), "checks": ["canary", "system_identifier"], "heapallindexed": False,
            "target": "canary"})
        wait = dag["xcom"].get("wait_recovery") or {}
        started = dag["xcom"].get("restore") or {}
        out["dag"] = {"rto_s": wait.get("rto_s"), "replay_s": wait.get("replay_s"),
                      "download_s": started.get("download_s"), "segments_replayed": wait.get("segments_replayed"),
                      "restorer": started.get("restorer"), "restore_parts": started.get("parts"),
                      "run_s": dag["run_s"], "tasks_s": {k: v["duration_s"] for k, v in dag["tasks"].items()}}

        self.log("restore: pgBackRest restore + replay")
        target = scratch / "pgbackrest"
        get = shlex.join(self.pgbr.argv(f"--pg1-path={target}", "archive-get")) + ' %f "%p"'
        out["pgbackrest_restore_s"], _ = pl.timed(self.pgbr.run, "restore", f"--pg1-path={target}",
                                                  f"--recovery-option=restore_command={get}")
        out["pgbackrest_replay"] = pl.replay(target, restore_command=get, env={})
        pl.remove_tree(target)
        pgbr_total = out["pgbackrest_restore_s"] + out["pgbackrest_replay"]["replay_s"]
        out["pgbackrest_total_s"] = pgbr_total
        out["barman_total_prefetch_s"] = out["barman_restore_s"] + out["replay"]["pgops_prefetch"]["replay_s"]
        rp = out["replay"]
        out["ratios"] = {
            "dag_rto_over_pgbackrest": (out["dag"]["rto_s"] or 0) / pgbr_total,
            "barman_prefetch_total_over_pgbackrest": out["barman_total_prefetch_s"] / pgbr_total,
            "replay_prefetch_over_local": rp["pgops_prefetch"]["replay_s"] / rp["local_copy"]["replay_s"],
            "replay_bare_prefetch_over_local": rp["barman_prefetch"]["replay_s"] / rp["local_copy"]["replay_s"],
            "replay_no_prefetch_over_local": rp["barman_no_prefetch"]["replay_s"] / rp["local_copy"]["replay_s"],
        }
        return out

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
        res = subprocess.run([sys.executable, str(HERE / "peers_parse_time.py")], env=env, capture_output=True,
                             text=True, timeout=600)
        lines = [line for line in res.stdout.splitlines() if line.startswith(MARK)]
        if not lines:
            raise pl.BenchError(f"parse time printed no result: {res.stderr[-1500:]}")
        out = json.loads(lines[-1][len(MARK):])
        out["clusters"] = self.args.clusters
        out["goal_s"] = 1.0
        if out["guarded_calls"] or out["import_errors"]:
            raise pl.BenchError(f"DAG parse made a network/database call or failed: {out['guarded_calls']} "
                                f"{out['import_errors']}")
        return out

    # -- all -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        try:
            self.setup()
            self.migrate_airflow()
            self.r["parse"] = self.parse_time()
            self.r["wal"] = {name: self.wal_phase(name) for name in
                             ("barman-cloud-wal-archive", "pgBackRest async", "pgops wrapper")}
            self.r["backup"] = self.backups()
            self.r["restore"] = self.restores()
        finally:
            self.r["bench_wall_s"] = time.perf_counter() - t0
            self.r["finished_at"] = datetime.now(UTC).isoformat()
            self.lab.down()
            if not self.args.keep_state:
                shutil.rmtree(self.state, ignore_errors=True)
        return self.r


def table(r: dict) -> str:
    rows: list[tuple[str, str, str]] = []
    db, m = r["database"], r["machine"]
    rows.append(("database", f"pgbench scale {db['scale']}, {db['pgbench_db_bytes'] / 2**20:.0f} MiB",
                 f"{m.get('cpus')} cpus, {m.get('memory_gib')} GiB"))
    b = r["backup"]
    rows += [("backup a: pg_basebackup to /dev/null", f"{b['a_read_floor_s']:.1f} s", "read floor"),
             ("backup b: barman-cloud-backup CLI", f"{b['b_barman_cli_s']:.1f} s", "default compression"),
             *((f"  b with --{k}", f"{v['s']:.1f} s", f"{(v.get('stored_bytes') or 0) / 2**20:.0f} MiB stored")
               for k, v in b.get("b_compressions", {}).items()),
             ("backup c: DAG backup task / whole run", f"{b['c_dag_backup_task_s']:.1f} s / {b['c_dag_run_s']:.1f} s", ""),
             ("backup d: pgBackRest full", f"{b['d_pgbackrest_s']:.1f} s", ""),
             ("  c/b (goal <= 1.10)", f"{b['ratios']['c_over_b']:.2f}", "ok" if b["ratios"]["c_over_b"] <= 1.10 else "MISS"),
             ("  c/d (goal <= 1.0)", f"{b['ratios']['c_over_d']:.2f}", "ok" if b["ratios"]["c_over_d"] <= 1.0 else "MISS"),
             ("  a/c (goal >= 0.5)", f"{b['ratios']['a_over_c']:.2f}", "ok" if b["ratios"]["a_over_c"] >= 0.5 else "MISS")]
    for name, w in r["wal"].items():
        rows.append((f"WAL {name}", f"{w['archived_segments_s_during_load']:.2f} seg/s of {w['produced_segments_s']:.2f}",
                     f"lag {w['lag_segments_at_load_end']} seg ({w['lag_bytes_at_load_end'] / 2**20:.0f} MiB), max "
                     f"{w['max_lag_segments']}, drain {w['drain_s']:.0f} s, keeps up: {'yes' if w['keeps_up'] else 'NO'}"))
    c = r["wal"].get("pgops wrapper", {}).get("already_archived_check")
    if c and c["share"] is not None:
        rows.append(("  already-archived check (LIST)", f"{c['check_ms']:.1f} ms/seg",
                     f"{c['check_ms'] * c['rate_seg_s']:.1f} ms per second at {c['rate_seg_s']:.2f} seg/s: "
                     f"{c['share']:.2%} of {c['parallel']} upload threads"))
    x = r["restore"]
    rp = x["replay"]
    rows += [("restore a: barman-cloud-restore", f"{x['barman_restore_s']:.1f} s", f"{x['replayed_wal_bytes'] / 2**20:.0f} MiB WAL to replay"),
             ("  pgops-restore (parts in parallel)", f"{x['pgops_restore_s']:.1f} s" if "pgops_restore_s" in x else "-",
              f"{x.get('pgops_restore', {}).get('parts', '?')} parts, {x.get('pgops_restore', {}).get('jobs', '?')} "
              "at a time" if "pgops_restore_s" in x else "not installed in the DB-host venv"),
             ("  replay, no prefetch", f"{rp['barman_no_prefetch']['replay_s']:.1f} s", f"{rp['barman_no_prefetch']['segments_restored']} seg"),
             ("  replay, barman --parallel prefetch", f"{rp['barman_prefetch']['replay_s']:.1f} s", f"{rp['barman_prefetch']['segments_restored']} seg"),
             ("  replay, pgops prefetcher", f"{rp['pgops_prefetch']['replay_s']:.1f} s",
              f"{rp['pgops_prefetch']['segments_restored']} seg"),
             ("  replay from a local WAL copy", f"{rp['local_copy']['replay_s']:.1f} s", ""),
             ("restore b: restore-verify DAG RTO", f"{x['dag']['rto_s'] or 0:.1f} s",
              f"whole run {x['dag']['run_s']:.1f} s; download {x['dag']['download_s'] or 0:.1f} s by "
              f"{x['dag'].get('restorer')} ({x['dag'].get('restore_parts') or 1} parts)"),
             ("restore c: pgBackRest restore + replay", f"{x['pgbackrest_total_s']:.1f} s",
              f"{x['pgbackrest_restore_s']:.1f} s + {x['pgbackrest_replay']['replay_s']:.1f} s"),
             ("  b/c", f"{x['ratios']['dag_rto_over_pgbackrest']:.2f}", ""),
             ("  replay prefetch / local (goal <= 1.2)", f"{x['ratios']['replay_prefetch_over_local']:.2f}",
              "ok" if x["ratios"]["replay_prefetch_over_local"] <= 1.2 else "MISS")]
    p = r["parse"]
    rows.append((f"parse: DagBag fill, {p['clusters']} clusters ({p['dags']} DAGs)", f"{p['fill_s']:.2f} s",
                 ("ok" if p["fill_s"] <= 1.0 else "MISS") + " (goal <= 1 s); no network/DB call"))
    w1 = max(len(a) for a, _, _ in rows)
    w2 = max(len(b_) for _, b_, _ in rows)
    return "\n".join(f"{a:<{w1}}  {b_:>{w2}}  {c}" for a, b_, c in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    try:
        r = bench.run()
    except Exception:
        pl.dump(Path(args.out).with_suffix(".failed.json"), bench.r)
        raise
    pl.dump(Path(args.out), r)
    print("\n" + table(r), flush=True)
    print(f"\nwrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
