"""Lab fixtures beyond the session lab: a replicated pair (primary + streaming standby, registered with repmgr).

The pair is its own cluster ("repl", its own prefix in the lab bucket), so failing over and rebuilding it leaves
the lab primary and its archive as the other tests expect them. Every postmaster it starts is stopped by pid.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import REPO

CLUSTER = "repl"


@dataclass
class ReplicatedPair:
    rl: object  # pgops.lab.replica.ReplicaLab
    cluster_name: str
    inventory: Path
    primary: object  # Node
    standby: object  # Node

    def cluster(self):
        from pgops.inventory import load_inventory

        return load_inventory(self.inventory).get(self.cluster_name)


def _inventory(rl, primary, standby, *, server_name: str) -> dict:
    base = yaml.safe_load((REPO / "include" / "clusters.example.yaml").read_text())["clusters"][0]
    base.update(name=CLUSTER, postgres_conn_id="pgops_repl_pg1")
    base["storage"] = {**base["storage"], "server_name": server_name}
    base["runner"] = {**base["runner"], "queue": "dbhost_repl"}
    base["replication"] = {
        "repmgr": True, "replication_user": "postgres", "passfile": str(rl.passfile),
        "max_lag_bytes": 16 * 1024 * 1024, "max_lag_s": 60,
        "slot_warning_bytes": 64 * 1024 * 1024, "slot_critical_bytes": 256 * 1024 * 1024,
        "primary": rl.inventory_node(primary, None),
        "standbys": [rl.inventory_node(standby, "pgops_repl_pg2")],
    }
    return {"clusters": [base]}


_PAIR_NUMBERS = itertools.count(1)


@pytest.fixture(scope="module")
def replicated_pair(lab, tmp_path_factory):
    """pg1 (primary, archiving to s3://<lab bucket>/clusters/repl-<pid>/) and pg2 streaming from it through slot pg2."""
    from pgops.lab.replica import ReplicaLab

    # A prefix of its own per pair: each pair is a new database system, and a restore_command reading another
    # pair's WAL or .history under a shared prefix fails ("WAL file is from different database system").
    pair_id = f"{os.getpid()}-{next(_PAIR_NUMBERS)}"
    rl = ReplicaLab(lab, root=lab.state_dir / f"replica-{pair_id}")
    saved = {k: os.environ.get(k) for k in ("PGOPS_INVENTORY", "AIRFLOW_CONN_PGOPS_REPL_PG1",
                                            "AIRFLOW_CONN_PGOPS_REPL_PG2")}
    try:
        server_name = f"repl-{pair_id}"
        inv_path = tmp_path_factory.mktemp("inventory") / "clusters.yaml"
        # the inventory must exist before pg1 starts: its archive_command names the cluster's prefix
        from pgops.inventory import parse_inventory

        primary_cluster = parse_inventory(
            {"clusters": [{**yaml.safe_load((REPO / "include" / "clusters.example.yaml").read_text())["clusters"][0],
                           "name": CLUSTER, "storage": {"bucket": lab.load().bucket, "prefix": lab.load().prefix,
                                                        "server_name": server_name}}]}, inv_path).clusters[0]
        primary = rl.init_primary("pg1", 1, primary_cluster)
        primary.slot = "pg1"  # its slot on another node after a failover
        rl.register_primary(primary)
        standby = rl.create_standby("pg2", 2, primary, slot="pg2")
        rl.register_standby(standby)
        inv_path.write_text(yaml.safe_dump(_inventory(rl, primary, standby, server_name=server_name)))
        os.environ["PGOPS_INVENTORY"] = str(inv_path)
        os.environ["AIRFLOW_CONN_PGOPS_REPL_PG1"] = json.dumps(rl.connection(primary))
        os.environ["AIRFLOW_CONN_PGOPS_REPL_PG2"] = json.dumps(rl.connection(standby))
        yield ReplicatedPair(rl=rl, cluster_name=CLUSTER, inventory=inv_path, primary=primary, standby=standby)
    finally:
        rl.down()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
