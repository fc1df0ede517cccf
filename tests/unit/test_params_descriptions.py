"""Every trigger-form Param of every DAG says what it is for; a regex- or enum-checked one also says what it accepts.

Airflow's refusal of a `pattern` shows only jsonschema's words ("'x' does not match '^...'", no custom message),
so the form's description under the field carries the fix, and the run-time checks name the param, the value and
the fix again."""

from __future__ import annotations

import copy
import json
import re

import pytest

from pgops.airflow.dags.base_backup import build_base_backup_dag
from pgops.airflow.dags.ebs_migration import build_ebs_migration_dag
from pgops.airflow.dags.restore_verify import build_restore_verify_dag
from pgops.airflow.dags.standby_rebuild import build_standby_rebuild_dag
from pgops.airflow.dags.wal_audit import build_wal_audit_dag
from pgops.core import params as P

BUILDERS = (build_base_backup_dag, build_restore_verify_dag, build_wal_audit_dag, build_ebs_migration_dag,
            build_standby_rebuild_dag)


def _cluster():
    import yaml

    from pgops.inventory import DEFAULT_INVENTORY, parse_inventory

    raw = yaml.safe_load(DEFAULT_INVENTORY.read_text())
    cluster = raw["clusters"][0]
    cluster["replication"] = {"primary": {"name": "pg1", "data_directory": "/var/lib/postgresql/15/main"},
                              "standbys": [{"name": "pg2", "postgres_conn_id": "c2", "slot": "pg2",
                                            "data_directory": "/var/lib/postgresql/15/main"}]}
    return parse_inventory(raw, DEFAULT_INVENTORY).get(cluster["name"])


def _params():
    cluster = _cluster()
    for build in BUILDERS:
        dag = build(cluster)
        kind = dag.dag_id.split("__")[0]
        for name in dag.params:
            yield f"{kind}.{name}", dag.params.get_param(name)


ALL = list(_params())


def _enum_values(schema: dict) -> list:
    """The allowed values of an enum param, of its array's items or of its object's names."""
    for part in (schema, schema.get("items") or {}, schema.get("propertyNames") or {}):
        if "enum" in part:
            return list(part["enum"])
    return []


def _checked(param) -> bool:
    return "pattern" in json.dumps(param.schema) or bool(_enum_values(param.schema))


def test_the_dags_are_all_here():
    kinds = {key.split(".")[0] for key, _ in ALL}
    assert kinds == {"pgops_base_backup", "pgops_restore_verify", "pgops_wal_audit", "pgops_ebs_migration",
                     "pgops_standby_rebuild"}


@pytest.mark.parametrize(("key", "param"), ALL, ids=[key for key, _ in ALL])
def test_every_param_has_a_description(key, param):
    assert isinstance(param.description, str) and param.description.strip(), f"{key} has no description"


CHECKED = [pytest.param(key, param, id=key) for key, param in ALL if _checked(param)]


@pytest.mark.parametrize(("key", "param"), CHECKED)
def test_a_checked_param_says_what_it_accepts(key, param):
    """A regex-checked param's description says "Fix: ..."; an enum's lists every allowed value (or says Fix)."""
    text = param.description or ""
    if "Fix: " in text:
        return
    values = [v for v in _enum_values(param.schema) if v not in ("", None)]
    assert "pattern" not in json.dumps(param.schema), f"{key}: regex-checked, but its description has no 'Fix: '"
    missing = [v for v in values if not re.search(rf"(?<![\w-]){re.escape(str(v))}(?![\w-])", text)]
    assert values and not missing, f"{key}: its description does not list {missing}"


def test_the_ebs_migration_form_is_complete():
    """Every EBS migration param is described, each regex-checked one with a Fix and an example that passes."""
    ebs = {key.split(".", 1)[1]: p for key, p in ALL if key.startswith("pgops_ebs_migration.")}
    regex = {name for name, p in ebs.items() if "pattern" in json.dumps(p.schema)}
    assert regex == {"volume_ids", "instance_id", "target_region", "target_az", "target_account", "kms_key_id"}
    for name in regex:
        example = re.search(r"e\.g\. (\S+?)(?: or |,|$)", ebs[name].description).group(1)
        example = example.replace("<key-id>", "0123abcd-0123-0123-0123-0123456789ab")
        value = [example] if name == "volume_ids" else example
        copy.deepcopy(ebs[name]).resolve(value)  # the example the fix gives passes the form


@pytest.mark.parametrize(("name", "value"), [
    ("volume_ids", ["vol-xyz"]), ("instance_id", "i-0123; reboot"), ("target_region", "US West (Oregon)"),
    ("target_az", "us-west-2"), ("target_account", "1234-5678-9012"), ("kms_key_id", "alias/x\nkms:*"),
])
def test_an_ebs_regex_param_refused_in_the_form_is_refused_again_with_a_fix(name, value):
    """The form shows only the regex (and the description above); the validate task names param, value and Fix."""
    from airflow.sdk.exceptions import ParamValidationError

    from pgops.core.ebs import spec

    ebs = {key.split(".", 1)[1]: p for key, p in ALL if key.startswith("pgops_ebs_migration.")}
    with pytest.raises(ParamValidationError, match="does not match"):
        copy.deepcopy(ebs[name]).resolve(value)
    conf = {k: p.value for k, p in ebs.items()} | {"volume_ids": ["vol-0123456789abcdef0"], name: value}
    if name == "instance_id":
        conf["volume_ids"] = []
    with pytest.raises(spec.MigrationParamsError) as err:
        spec.migration_spec(conf, regions=frozenset({"us-west-2", "us-east-1"}))
    shown = value[0] if name == "volume_ids" else value
    assert str(err.value).startswith(f"param {name}={shown!r}: ") and ". Fix: " in str(err.value), str(err.value)


def test_the_backup_id_check_names_the_param_the_value_and_the_fix():
    assert P.check_backup_id("backup_id", "20250105T020000") == "20250105T020000"
    assert P.check_backup_id("backup", "latest") == "latest"
    # a name of digits only, as the form takes it, reaches the task as an int (templates render as native objects)
    assert P.check_backup_id("backup_id", 12345) == "12345"
    for bad in ("../other-server/base/x", "latest\n", "a b", "x" * 101, None, True, -1, 1.5, 10 ** 101):
        with pytest.raises(P.ParamRefused) as err:
            P.check_backup_id("backup_id", bad)
        assert str(err.value).startswith(f"param backup_id={bad!r} is not a backup id"), err.value
        assert "Fix: copy an id from barman-cloud-backup-list" in str(err.value)


@pytest.mark.parametrize(("help_text", "pattern", "good", "bad"), [
    (P.BACKUP_ID_HELP, P.BACKUP_ID_PATTERN, "20250105T020000", "../x"),
    (P.ABS_DIR_HELP, P.ABS_DIR_PATTERN, "/var/tmp/pgops-restore", "/var/tmp//x"),
])
def test_the_shared_help_texts_give_a_fix_whose_example_passes(help_text, pattern, good, bad):
    assert "Fix: " in help_text and good in help_text
    assert re.fullmatch(pattern, good) and not re.fullmatch(pattern, bad)
