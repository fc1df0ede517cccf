"""Lab replication: more PostgreSQL 15 nodes on loopback that stream from a primary, registered with repmgr.

A node is a data directory, a socket directory, a port and a postmaster pid. ``init_primary`` makes a primary
that archives into a cluster's own prefix with barman-cloud; ``create_standby`` clones a node with
``pg_basebackup -R`` through a physical replication slot it creates; ``lab_primary`` describes the lab's own
primary (local.py starts and stops it, this module never does). Every postmaster this module starts is recorded
by pid in ``<lab>/replica/replica.json``; ``down`` stops exactly those. repmgr (Debian ``postgresql-15-repmgr``)
gets one repmgr.conf per node in the lab dir; repmgrd does not run, so repmgr need not be preloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pgops.inventory import Cluster
from pgops.lab.local import (
    PG_BIN,
    Lab,
    LabError,
    LabState,
    _chown_db_user,
    _write_as_db_user,
    as_db_user,
    free_port,
    pid_alive,
    stop_pid,
)

REPMGR_BIN = Path(os.environ.get("PGOPS_REPMGR_BIN", "/usr/bin/repmgr"))


@dataclass
class Node:
    name: str
    node_id: int
    data_dir: str
    socket_dir: str
    port: int
    log_file: str
    repmgr_conf: str
    slot: str | None = None
    pid: int | None = None
    owned: bool = True  # False: the lab's own primary, started and stopped by local.py

    @property
    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=5"


class ReplicaLab:
    def __init__(self, lab: Lab, root: str | Path | None = None):
        self.lab = lab
        st = lab.load()
        if st is None:
            raise LabError("the lab is not running. Fix: run 'pgops lab up' first")
        self.st: LabState = st
        self.root = Path(root) if root else lab.state_dir / "replica"
        self.state_file = self.root / "replica.json"
        self.passfile = self.root / "pgpass"
        self.nodes: dict[str, Node] = {}
        if self.state_file.exists():
            self.nodes = {k: Node(**v) for k, v in json.loads(self.state_file.read_text()).items()}

    # -- state ---------------------------------------------------------------------------------
    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({k: asdict(v) for k, v in self.nodes.items()}, indent=2))

    def _prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        # libpq passfile for primary_conninfo and repmgr's conninfo: the password never sits in a config file
        _write_as_db_user(self.passfile, f"127.0.0.1:*:*:postgres:{self.st.pg_password}\n")
        os.chmod(self.passfile, 0o600)

    def _node_paths(self, name: str, node_id: int, slot: str | None) -> Node:
        base = self.root / name
        return Node(name=name, node_id=node_id, data_dir=str(base / "data"), socket_dir=str(base / "run"),
                    port=free_port(), log_file=str(base / "postgres.log"), repmgr_conf=str(base / "repmgr.conf"),
                    slot=slot)

    def _empty_node(self, name: str, node_id: int, slot: str | None) -> Node:
        """A new node's paths, its directory emptied of any node of that name before."""
        self._prepare_root()
        node = self._node_paths(name, node_id, slot)
        base = Path(node.data_dir).parent
        if base.exists():
            shutil.rmtree(base)
        Path(node.socket_dir).mkdir(parents=True)
        return node

    def _add_and_start(self, node: Node) -> Node:
        self.nodes[node.name] = node
        self._save()
        self.start(node)
        return node

    def lab_primary(self, name: str = "pg1", node_id: int = 1) -> Node:
        """The lab's own primary as a node (never started or stopped here)."""
        self._prepare_root()
        base = self.root / name
        base.mkdir(parents=True, exist_ok=True)
        node = Node(name=name, node_id=node_id, data_dir=self.st.pg_data, socket_dir=self.st.pg_socket_dir,
                    port=self.st.pg_port, log_file=str(Path(self.st.pg_data).parent / "postgres.log"),
                    repmgr_conf=str(base / "repmgr.conf"), pid=self.st.pids.get("pg"), owned=False)
        _chown_db_user(base)
        self.nodes[name] = node
        self._save()
        return node

    # -- nodes ---------------------------------------------------------------------------------
    def init_primary(self, name: str, node_id: int, cluster: Cluster) -> Node:
        """A fresh primary archiving WAL into ``cluster``'s prefix (its own, so a failover here leaves the lab's alone)."""
        import shlex

        from pgops.dbhost.engines import barman_cloud

        node = self._empty_node(name, node_id, None)
        base = Path(node.data_dir).parent
        pwfile = base / "pwfile"
        pwfile.write_text(self.st.pg_password + "\n")
        os.chmod(pwfile, 0o600)
        _chown_db_user(base)
        try:
            _run(as_db_user([str(PG_BIN / "initdb"), "-D", node.data_dir, "-U", "postgres", "--pwfile", str(pwfile),
                             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"]),
                 "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
        archive = shlex.join(barman_cloud.wal_archive_argv(cluster, endpoint_url=self.st.s3_endpoint)) + " %p"
        self._append_conf(node, {
            "wal_level": "replica", "archive_mode": "on", "archive_timeout": "60", "archive_command": archive,
            "max_wal_senders": "10", "max_replication_slots": "10", "wal_keep_size": "64MB", "hot_standby": "on",
            "shared_buffers": "32MB", "log_line_prefix": "%m [%p] ", "logging_collector": "off",
        })
        return self._add_and_start(node)

    def create_standby(self, name: str, node_id: int, upstream: Node, *, slot: str) -> Node:
        """pg_basebackup -R of ``upstream`` through a new physical slot, then start streaming."""
        node = self._empty_node(name, node_id, slot)
        _chown_db_user(Path(node.data_dir).parent)
        _run(as_db_user([str(PG_BIN / "pg_basebackup"), "-h", upstream.socket_dir, "-p", str(upstream.port),
                         "-U", "postgres", "-D", node.data_dir, "-X", "stream", "-R", "-C", "-S", slot,
                         "--checkpoint=fast", "--no-password"]), "pg_basebackup")
        self._append_conf(node, {"primary_conninfo": self.primary_conninfo(upstream, application_name=name),
                                 "primary_slot_name": slot})
        return self._add_and_start(node)

    def primary_conninfo(self, upstream: Node, *, application_name: str) -> str:
        return (f"host=127.0.0.1 port={upstream.port} user=postgres passfile={self.passfile} "
                f"application_name={application_name}")

    def _append_conf(self, node: Node, settings: dict[str, str]) -> None:
        """Per-node settings last in postgresql.auto.conf (a clone copies its upstream's; ours win)."""
        own = {"listen_addresses": "127.0.0.1", "port": str(node.port), "unix_socket_directories": node.socket_dir,
               "cluster_name": node.name, **settings}
        text = "\n# pgops lab node\n" + "".join(f"{k} = '{v.replace(chr(39), chr(39) * 2)}'\n" for k, v in own.items())
        path = Path(node.data_dir) / "postgresql.auto.conf"
        with open(path, "a") as fh:
            fh.write(text)

    def start(self, node: Node) -> int:
        _run(as_db_user([str(PG_BIN / "pg_ctl"), "-D", node.data_dir, "-l", node.log_file, "-w", "-t", "60", "start"],
                        env=self.lab.db_env(self.st)), f"pg_ctl start of {node.name}")
        node.pid = int((Path(node.data_dir) / "postmaster.pid").read_text().split()[0])
        self._save()
        return node.pid

    def stop(self, node: Node, *, mode: str = "fast") -> None:
        """Stop a node by its postmaster pid (pg_ctl first, SIGKILL if it outlives the timeout)."""
        pid = node.pid or _postmaster_pid(node.data_dir)
        if pid_alive(pid):
            subprocess.run(as_db_user([str(PG_BIN / "pg_ctl"), "-D", node.data_dir, "-m", mode, "-w", "-t", "30",
                                       "stop"]), capture_output=True)
            stop_pid(pid, timeout_s=10)
        node.pid = None
        self._save()

    def promote(self, node: Node) -> None:
        """Promote a standby with pg_ctl promote (what a failover does to it); waits until it accepts writes."""
        _run(as_db_user([str(PG_BIN / "pg_ctl"), "-D", node.data_dir, "-w", "-t", "60", "promote"]),
             f"pg_ctl promote of {node.name}")
        deadline = time.monotonic() + 30
        while self.psql(node, "SELECT pg_is_in_recovery()") != "f":
            if time.monotonic() > deadline:
                raise LabError(f"{node.name} is still in recovery 30 s after pg_ctl promote")
            time.sleep(0.2)

    def refresh(self, node: Node) -> Node:
        """Re-read the pid after something else (a DAG) started the node."""
        node.pid = _postmaster_pid(node.data_dir)
        self._save()
        return node

    def psql(self, node: Node, sql: str, *, db: str = "postgres") -> str:
        res = subprocess.run(as_db_user(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", node.socket_dir,
                                         "-p", str(node.port), "-U", "postgres", "-d", db, "-f", "-"]),
                             input=sql, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise LabError(f"psql on {node.name} failed: {res.stderr.strip()}")
        return res.stdout.strip()

    # -- repmgr ----------------------------------------------------------------------------------
    def write_repmgr_conf(self, node: Node) -> str:
        conf = {
            "node_id": str(node.node_id), "node_name": f"'{node.name}'",
            "conninfo": f"'{node.conninfo} passfile={self.passfile}'",
            "data_directory": f"'{node.data_dir}'", "pg_bindir": f"'{PG_BIN}'",
            "log_level": "INFO", "use_replication_slots": "no",
        }
        Path(node.repmgr_conf).parent.mkdir(parents=True, exist_ok=True)
        _write_as_db_user(Path(node.repmgr_conf), "".join(f"{k}={v}\n" for k, v in conf.items()))
        return node.repmgr_conf

    def repmgr(self, node: Node, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        self.write_repmgr_conf(node)
        res = subprocess.run(as_db_user([str(REPMGR_BIN), "-f", node.repmgr_conf, *args]), capture_output=True,
                             text=True, cwd="/", timeout=600)
        if check and res.returncode != 0:
            raise LabError(f"repmgr {' '.join(args)} on {node.name} failed (exit {res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()}")
        return res

    def register_primary(self, node: Node) -> None:
        self.repmgr(node, "primary", "register", "--force")

    def register_standby(self, node: Node, upstream: Node | None = None) -> None:
        args = ["standby", "register", "--force"]
        if upstream is not None:
            args += ["--upstream-node-id", str(upstream.node_id)]
        self.repmgr(node, *args)

    def repmgr_nodes(self, node: Node) -> list[dict[str, Any]]:
        """repmgr.nodes as the given node sees it."""
        out = self.psql(node, "SELECT coalesce(json_agg(n ORDER BY node_id), '[]') FROM "
                              "(SELECT node_id, node_name, type, active, upstream_node_id FROM repmgr.nodes) n")
        return json.loads(out or "[]")

    # -- Airflow / inventory -----------------------------------------------------------------------
    def connection(self, node: Node) -> dict[str, Any]:
        return {"conn_type": "postgres", "host": "127.0.0.1", "port": node.port, "login": "postgres",
                "password": self.st.pg_password, "schema": "postgres"}

    def inventory_node(self, node: Node, conn_id: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {"name": node.name, "host": "127.0.0.1", "port": node.port,
                               "data_directory": node.data_dir, "repmgr_conf": node.repmgr_conf}
        if conn_id:
            out["postgres_conn_id"] = conn_id
        out["slot"] = node.slot or node.name
        return out

    # -- down --------------------------------------------------------------------------------------
    def down(self) -> None:
        """Stop every node this module started, by pid; the lab's own primary is left to local.py."""
        for node in self.nodes.values():
            if node.owned:
                self.stop(node, mode="immediate")


def _postmaster_pid(data_dir: str) -> int | None:
    try:
        return int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _run(argv: list[str], what: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=600)
    if res.returncode != 0:
        raise LabError(f"{what} failed (exit {res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
