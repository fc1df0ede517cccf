"""The standby-rebuild link of the audit's findings never pre-fills `force`: every conf pgops builds (the evidence's
conf, the trigger-form URL, the CLI line, and the URL as the dashboard shows it) names the node, its directory,
slot and backup, and nothing else; through the real DAG's params it runs with force=false, so replacing a node's own
data stays a decision a person makes in the form."""

from __future__ import annotations

import copy
import html
import json
import re
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import pytest

from pgops.airflow.ui import api, summary
from pgops.core import replication as R
from pgops.core.reports import envelope
from pgops.inventory import ReplicaNode, Replication

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
BASE_URL = "https://airflow.example.com"
DAG_ID = f"{R.REBUILD_DAG_PREFIX}main"
PG1_DIR, PG2_DIR = "/var/lib/postgresql/15/pg1", "/srv/pg/15/pg2"
REPL = Replication(primary=ReplicaNode(name="pg1", postgres_conn_id="c1", data_directory=PG1_DIR, slot="pg1"),
                   standbys=(ReplicaNode(name="pg2", postgres_conn_id="c2", data_directory=PG2_DIR, slot="pg2_slot"),))
ROW = {"system_identifier": "7", "current_lsn": "0/5000000", "has_repmgr": False}
PRIMARY = {**ROW, "in_recovery": False, "primary_timeline": 1}
STANDBY = {**ROW, "in_recovery": True, "received_tli": 1, "receiver_status": "streaming"}
EXPECTED = {"pg1": {"target": "pg1", "data_directory": PG1_DIR, "slot": "pg1", "backup": "latest"},
            "pg2": {"target": "pg2", "data_directory": PG2_DIR, "slot": "pg2_slot", "backup": "latest"}}

# Every finding that links the rebuild, from what the nodes answered.
SCENARIOS = {
    # pg2 was promoted and pg1 came back writable: PRIMARY_MOVED, MULTIPLE_PRIMARIES, TIMELINE_MISMATCH on pg1
    "failover_old_primary_writable": R.Observed(nodes={"pg1": PRIMARY, "pg2": {**PRIMARY, "primary_timeline": 2}}),
    # pg1 rejoined as a standby of the old timeline
    "old_primary_on_the_old_timeline": R.Observed(nodes={"pg1": {**STANDBY, "received_tli": 1},
                                                         "pg2": {**PRIMARY, "primary_timeline": 2}}),
    "standby_unreachable": R.Observed(nodes={"pg1": PRIMARY, "pg2": {"error": "connection refused"}}),
    "standby_not_receiving": R.Observed(nodes={"pg1": PRIMARY, "pg2": {**STANDBY, "receiver_status": None}}),
    "standby_of_another_system": R.Observed(nodes={"pg1": PRIMARY, "pg2": {**STANDBY, "system_identifier": "8"}}),
    "slot_lost": R.Observed(nodes={"pg1": PRIMARY, "pg2": STANDBY},
                            stat_replication=[{"application_name": "pg2", "state": "streaming"}],
                            slots=[{"slot_name": "pg2_slot", "slot_type": "physical", "active": False,
                                    "wal_status": "lost", "retained_bytes": None}]),
}

_URL = re.compile(r"https?://\S+?/trigger\?conf=[^\s;)<'\"]+")
_CLI = re.compile(r"--conf '(\{[^']*\})'")


def _links(value: Any):
    """Every rebuild link dict ({dag_id, conf, url, cli}) anywhere in a finding's evidence."""
    if isinstance(value, dict):
        if {"dag_id", "conf", "url", "cli"} <= set(value):
            yield value
        else:
            for v in value.values():
                yield from _links(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _links(v)


def _conf_of_url(url: str) -> dict:
    query = urllib.parse.urlsplit(url).query
    (conf,) = urllib.parse.parse_qs(query, strict_parsing=True)["conf"]
    return json.loads(conf)


def _evaluate(obs: R.Observed) -> list[dict]:
    _, found = R.evaluate("main", REPL, obs, base_url=BASE_URL)
    return [f.to_dict() for f in found]


def _every_conf(findings: list[dict]) -> list[tuple[str, dict]]:
    """(where, conf) for every rebuild conf in the findings: the evidence's conf, url and cli, and each URL and CLI
    line written into a message or a fix."""
    out: list[tuple[str, dict]] = []
    for f in findings:
        for link in _links(f.get("evidence")):
            assert link["dag_id"] == DAG_ID
            out += [(f"{f['id']}.evidence.conf", json.loads(link["conf"])),
                    (f"{f['id']}.evidence.url", _conf_of_url(link["url"])),
                    (f"{f['id']}.evidence.cli", json.loads(_CLI.search(link["cli"]).group(1)))]
        for field in ("message", "fix"):
            text = f.get(field) or ""
            out += [(f"{f['id']}.{field}.url", _conf_of_url(u)) for u in _URL.findall(text)]
            out += [(f"{f['id']}.{field}.cli", json.loads(c)) for c in _CLI.findall(text)]
    return out


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_no_rebuild_conf_in_any_finding_carries_force(scenario):
    findings = _evaluate(SCENARIOS[scenario])
    confs = _every_conf(findings)
    assert confs, f"{scenario}: no rebuild link in {[f['id'] for f in findings]}"  # the scenario links the rebuild
    for where, conf in confs:
        assert "force" not in conf, (where, conf)
        assert conf == EXPECTED[conf["target"]], (where, conf)


def test_the_failover_links_rebuild_the_old_primary_with_its_own_directory_and_slot():
    findings = {f["id"]: f for f in _evaluate(SCENARIOS["failover_old_primary_writable"])}
    mismatch = findings[R.REPLICATION_TIMELINE_MISMATCH]
    link = mismatch["evidence"]["rebuild"]
    assert link["url"] == (f"{BASE_URL}/dags/{DAG_ID}/trigger?conf="
                           + urllib.parse.quote(json.dumps(EXPECTED["pg1"], sort_keys=True)))
    assert link["cli"] == f"airflow dags trigger {DAG_ID} --conf '{json.dumps(EXPECTED['pg1'], sort_keys=True)}'"
    assert "force" not in link["url"] and "force" not in link["cli"]
    assert set(findings[R.REPLICATION_MULTIPLE_PRIMARIES]["evidence"]["rebuild"]) == {"pg1"}


def test_rebuild_conf_never_has_force_whatever_the_node():
    for node in (*REPL.nodes, ReplicaNode(name="pg3", postgres_conn_id="c3"),
                 ReplicaNode(name="force", postgres_conn_id="c4", slot="force")):
        conf = R.rebuild_conf(node)
        assert set(conf) == {"target", "data_directory", "slot", "backup"}, conf
        link = R.rebuild_link("main", node, base_url=BASE_URL)
        assert "force" not in _conf_of_url(link["url"]) and "force" not in json.loads(link["conf"])


def test_the_dashboard_shows_the_links_without_force():
    """The cluster page lists the findings' messages, rebuild URL included: the URL as shown carries no force."""
    found = _evaluate(SCENARIOS["failover_old_primary_writable"])
    report = envelope(kind="wal-audit", cluster="main", run_id="r", started_at=NOW, finished_at=NOW,
                      status="critical", body={"replication": {"current_primary": "pg2", "inventory_primary": "pg1",
                                                               "nodes": {}}, "findings": found, "counts": {}})
    row = summary.fleet_row("main", now=NOW, audit=report)
    page = api._cluster_html(row, summary.timeline(report, now=NOW), summary.rto_series([], target_s=3600), [],
                             "/pgops", 14)
    urls = _URL.findall(html.unescape(page))
    assert urls, "the cluster page shows no rebuild link"
    for url in urls:
        assert _conf_of_url(url) == EXPECTED["pg1"], url


def test_the_linked_conf_runs_the_real_dag_without_force():
    """Merged into the rebuild DAG's params as the trigger form does, the link's conf validates and leaves force at
    its default, false."""
    import yaml

    from pgops.airflow.dags.standby_rebuild import build_standby_rebuild_dag
    from pgops.inventory import DEFAULT_INVENTORY, parse_inventory

    raw = yaml.safe_load(DEFAULT_INVENTORY.read_text())
    cluster = raw["clusters"][0]
    cluster["replication"] = {"primary": {"name": "pg1", "data_directory": PG1_DIR, "slot": "pg1"},
                              "standbys": [{"name": "pg2", "postgres_conn_id": "c2", "slot": "pg2_slot",
                                            "data_directory": PG2_DIR}]}
    c = parse_inventory(raw, DEFAULT_INVENTORY).get(cluster["name"])
    dag = build_standby_rebuild_dag(c)
    for finding in _evaluate(SCENARIOS["failover_old_primary_writable"]):
        for link in _links(finding.get("evidence")):
            params = copy.deepcopy(dag.params)
            params.update(_conf_of_url(link["url"]))
            resolved = params.validate()
            assert resolved["force"] is False and resolved["target"] == "pg1", resolved
            assert resolved["data_directory"] == PG1_DIR and resolved["slot"] == "pg1"
