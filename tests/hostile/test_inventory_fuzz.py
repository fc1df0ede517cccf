"""Inventory fuzz: every field with wrong types, '..', newlines, NUL, unicode and huge numbers.

Each result is either a clean parse whose values are safe to put in paths, argv, config files and timedeltas, or an
InventoryError naming the cluster, the field and the fix; never another exception (a traceback at DAG-parse time
hides every DAG of every cluster).
"""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from pgops.inventory import InventoryError, parse_inventory

REPO = Path(__file__).resolve().parents[2]
PATH = Path("/etc/pgops/clusters.yaml")
BASE = yaml.safe_load((REPO / "include" / "clusters.example.yaml").read_text())["clusters"][0]
BASE = {**BASE, "name": "fuzz", "tags": ["team-a"]}
BASE["replication"] = {
    "repmgr": False, "replication_user": "postgres", "passfile": "/var/lib/postgresql/.pgpass",
    "primary": {"name": "pg1", "host": "db1.internal", "port": 5432, "slot": "pg1",
                "data_directory": "/var/lib/postgresql/15/main"},
    "standbys": [{"name": "pg2", "postgres_conn_id": "fuzz_pg2", "host": "db2.internal", "slot": "pg2",
                  "data_directory": "/var/lib/postgresql/15/main", "repmgr_conf": "/etc/repmgr.conf"}],
}

HOSTILE = [1, -1, 10**30, 1e308, float("nan"), True, [], ["a"], {"a": 1}, "", "..", "../../etc", "/var/lib/../..",
           "a\nb", "a\x00b", "x\r\ny", "ŝérvér", "🙂", "a" * 5000, "$(id)", "a b", "/tmp//x", "-rf"]
# Strings that end up in paths, argv, config files or S3 keys: '..', control characters and spaces never pass.
PATHLIKE = {("storage", "prefix"), ("storage", "server_name"), ("engine", "bin_dir"), ("engine", "extra_args"),
            ("replication", "passfile"), ("replication", "primary", "data_directory"),
            ("replication", "primary", "host"), ("replication", "standbys", 0, "data_directory"),
            ("replication", "standbys", 0, "repmgr_conf"), ("replication", "standbys", 0, "host"), ("tags",)}


def _fields(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _fields(v, (*path, k))
    elif isinstance(node, list) and node and isinstance(node[0], dict):
        for i, v in enumerate(node):
            yield from _fields(v, (*path, i))
    else:
        yield path


FIELDS = sorted(set(_fields(BASE)), key=str)


def _set(data, path, value):
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _unsafe(text: str) -> bool:
    return ".." in text.split("/") or any(c in text for c in "\n\r\x00 ") or text.startswith("-") or "//" in text


def test_the_base_parses():
    parse_inventory({"clusters": [copy.deepcopy(BASE)]}, PATH)


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: ".".join(map(str, f)))
def test_each_field_refuses_hostile_values_with_a_named_error(field):
    for value in HOSTILE:
        for wrapped in ([value] if field in (("tags",), ("engine", "extra_args")) else []) + [value]:
            data = copy.deepcopy(BASE)
            _set(data, field, wrapped)
            try:
                inv = parse_inventory({"clusters": [data]}, PATH)
            except InventoryError as exc:
                text = str(exc)
                assert "Fix:" in text, (field, value, text)
                named = str(field[-1] if not isinstance(field[-1], int) else field[-2])
                assert f"'{named}'" in text or named in text, (field, value, text)
                assert "cluster 'fuzz'" in text or field == ("name",), (field, value, text)
                continue
            except Exception as exc:  # noqa: BLE001 - the point of the test
                pytest.fail(f"{field} = {wrapped!r}: {type(exc).__name__}: {exc} (not an InventoryError)")
            c = inv.clusters[0]
            for secs in (c.engine.timeout_s + 600, 3 * c.targets.rto_s, c.targets.rpo_s):
                timedelta(seconds=secs)  # the DAG factories build these at parse time
            if field in PATHLIKE or field[:1] == ("tags",):
                texts = wrapped if isinstance(wrapped, list) else [wrapped]
                assert not [t for t in texts if isinstance(t, str) and _unsafe(t)], (field, wrapped)


def test_a_hostile_name_and_a_non_mapping_cluster():
    for raw in (None, 1, "fuzz", ["fuzz"]):
        with pytest.raises(InventoryError, match="Fix:|must be a mapping"):
            parse_inventory({"clusters": [raw]}, PATH)
    for doc in ({"clusters": None}, {"clusters": "x"}, [], "clusters", {"clusters": [], "extra": 1}):
        with pytest.raises(InventoryError, match="Fix:"):
            parse_inventory(doc, PATH)


def _value(field):
    node = BASE
    for key in field:
        node = node[key]
    return node


STRING_FIELDS = [f for f in FIELDS if (v := _value(f)) and all(isinstance(x, str) and x
                                                              for x in (v if isinstance(v, list) else [v]))]


@pytest.mark.parametrize("field", STRING_FIELDS, ids=lambda f: ".".join(map(str, f)))
def test_a_trailing_newline_is_refused_in_every_string_field(field):
    """A regular expression ending in '$' also matches before a final newline ("main\\n"): every pattern must
    match the whole value, so a YAML block scalar cannot smuggle a newline into a name, path, argv or S3 key.
    (Only values the parser normalises, such as a cron expression's whitespace, may pass, and without it.)"""
    node = _value(field)
    values = node if isinstance(node, list) else [node]
    data = copy.deepcopy(BASE)
    _set(data, field, [v + "\n" for v in values] if isinstance(node, list) else node + "\n")
    try:
        inv = parse_inventory({"clusters": [data]}, PATH)
    except InventoryError as exc:
        assert "Fix:" in str(exc)
        return
    # accepted only when normalised (a cron expression's or a retention policy's whitespace): no newline kept
    assert "\\n" not in repr(inv.clusters[0]), (field, inv.clusters[0])
