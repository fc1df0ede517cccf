"""The operators' base: errors a retry cannot mend fail at once, other errors are left to retries; hooks kept."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

from pgops.airflow.operators.base import ClusterOperator, PgopsOperator
from pgops.core.params import ParamRefused
from pgops.inventory import InventoryError


def test_a_cluster_not_in_the_inventory_fails_at_once_naming_it():
    op = ClusterOperator(task_id="t", cluster_name="no-such-cluster")
    with pytest.raises(AirflowFailException, match="'no-such-cluster' is not in the inventory.*clusters: main"):
        op.cluster  # noqa: B018


@pytest.mark.parametrize("error", [InventoryError("bad field. Fix: x"), ParamRefused("param p='v': no. Fix: y")])
def test_inventory_and_param_errors_fail_fast_with_their_message(error):
    def refuse():
        raise error

    with pytest.raises(AirflowFailException) as exc:
        PgopsOperator.fail_fast(refuse)
    assert str(exc.value) == str(error)


@pytest.mark.parametrize("error", [ConnectionRefusedError("refused"), TimeoutError("slow"), RuntimeError("500")])
def test_other_errors_are_left_to_the_retries(error):
    def transient():
        raise error

    with pytest.raises(type(error)):
        PgopsOperator.fail_fast(transient)


def test_one_s3_hook_per_connection_for_the_tasks_life():
    op = ClusterOperator(task_id="t", cluster_name="main")
    first = op.s3
    assert op.s3 is first and op.s3_hook(op.cluster.aws_conn_id) is first
    assert op.s3_hook("another_aws") is not first


def test_every_pgops_operator_derives_from_the_base():
    import importlib
    import inspect
    import pkgutil

    import pgops.airflow.operators as ops
    from pgops.airflow.operators.approval import PgopsApprovalOperator

    found = []
    for mod in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"pgops.airflow.operators.{mod.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and cls.__name__.endswith("Operator"):
                found.append(cls)
    # approvals derive from Airflow's own ApprovalOperator (its Human-in-the-loop trigger and UI)
    outside = [c.__name__ for c in found if not issubclass(c, (PgopsOperator, PgopsApprovalOperator))]
    assert len(found) > 20 and outside == []
    # each documents the arguments its own constructor adds, as the provider's operators do
    undocumented = [f"{c.__name__}.{p}" for c in found if "__init__" in c.__dict__
                    for p in inspect.signature(c.__dict__["__init__"]).parameters
                    if p not in ("self", "kwargs") and f":param {p}:" not in (c.__doc__ or "")]
    assert undocumented == []
