"""Every string param of every DAG refuses a trailing newline in the trigger form (JSON Schema patterns are searched
and Python's '$' also matches before a final newline), and the run-time checks refuse it again."""

from __future__ import annotations

import copy
import re

import pytest

from pgops.airflow.dags.base_backup import build_base_backup_dag
from pgops.airflow.dags.ebs_migration import build_ebs_migration_dag
from pgops.airflow.dags.restore_verify import build_restore_verify_dag
from pgops.airflow.dags.standby_rebuild import build_standby_rebuild_dag
from pgops.airflow.dags.wal_audit import build_wal_audit_dag
from pgops.core import params as P
from pgops.inventory import load_inventory


def _string_params():
    import yaml

    from pgops.inventory import DEFAULT_INVENTORY, parse_inventory

    raw = yaml.safe_load(DEFAULT_INVENTORY.read_text())
    cluster = raw["clusters"][0]
    cluster["replication"] = {"primary": {"name": "pg1", "data_directory": "/var/lib/postgresql/15/main"},
                              "standbys": [{"name": "pg2", "postgres_conn_id": "c2", "slot": "pg2",
                                            "data_directory": "/var/lib/postgresql/15/main"}]}
    c = parse_inventory(raw, DEFAULT_INVENTORY).get(cluster["name"])
    for build in (build_base_backup_dag, build_restore_verify_dag, build_wal_audit_dag, build_ebs_migration_dag,
                  build_standby_rebuild_dag):
        dag = build(c)
        for name in dag.params:
            param = dag.params.get_param(name)
            if isinstance(param.value, str) and param.value and "pattern" in param.schema:
                yield pytest.param(param, id=f"{dag.dag_id}.{name}")


@pytest.mark.parametrize("param", list(_string_params()))
def test_the_form_refuses_a_trailing_newline(param):
    fresh = copy.deepcopy(param)
    fresh.resolve(param.value)  # the default itself passes
    with pytest.raises(Exception, match="does not match"):
        copy.deepcopy(param).resolve(param.value + "\n")


def test_whole_refuses_only_what_it_should():
    pattern = P.whole(r"^[a-z]{1,5}$")
    assert re.search(pattern, "abc") and not re.search(pattern, "abc\n") and not re.search(pattern, "abc\nx")
    with pytest.raises(ValueError, match="anchored"):
        P.whole(r"[a-z]+")


def test_the_run_time_checks_refuse_a_trailing_newline_too():
    from pgops.core.ebs import spec

    with pytest.raises(P.ParamRefused, match="plain absolute"):
        P.check_abs_dir("scratch_root", "/var/tmp/pgops-restore\n")
    with pytest.raises(P.ParamRefused):
        P.check_settings({"hot_standby": "on\n"})
    for name, pattern in (("volume", spec.VOLUME_ID_PATTERN), ("region", spec.REGION_PATTERN),
                          ("account", spec.ACCOUNT_PATTERN)):
        good = {"volume": "vol-0123456789abcdef0", "region": "us-west-2", "account": "123456789012"}[name]
        assert re.fullmatch(pattern, good) and not re.fullmatch(pattern, good + "\n"), name
    assert load_inventory().get("main")  # the example inventory still parses
