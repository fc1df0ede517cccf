"""The EBS migration's hooks and operators, without AWS: the provider's EC2 hook in client mode, one hook (one
client) per region per operator, and upstream values taken as templated arguments, not pulled by task id."""

from __future__ import annotations

import inspect
import re

import pytest
from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

from pgops.airflow.ebs_hooks import EbsDirectHook, EbsEc2Hook, EbsKmsHook


def test_the_ec2_hook_is_the_providers_in_client_mode_with_our_waiters():
    hook = EbsEc2Hook(aws_conn_id="aws_default", region_name="us-west-2")
    assert isinstance(hook, EC2Hook) and hook._api_type == "client_type" and hook.client_type == "ec2"
    assert hook.region_name == "us-west-2" and str(hook.waiter_path).endswith("waiters/ec2.json")
    # the trigger's base builds it with keyword arguments only
    assert EbsEc2Hook(aws_conn_id=None, region_name=None, verify=None, config=None)._api_type == "client_type"
    assert EbsKmsHook(aws_conn_id="aws_default").client_type == "kms"
    assert EbsDirectHook(aws_conn_id="aws_default").client_type == "ebs"


def test_an_operator_keeps_one_hook_per_region():
    from pgops.airflow.operators.ebs import EbsMigrationPreflightOperator

    op = EbsMigrationPreflightOperator(task_id="preflight", aws_conn_id="aws_default")
    assert op.ec2() is op.ec2() is op.ec2(None)
    assert op.ec2("us-west-2") is op.ec2("us-west-2") and op.ec2("us-west-2") is not op.ec2()


@pytest.mark.parametrize("module", ["pgops.airflow.operators.ebs", "pgops.airflow.operators.approval", "pgops.airflow.sensors.ebs",
                                    "pgops.airflow.triggers.ebs"])
def test_no_raw_client_calls_or_upstream_pulls_outside_the_hooks(module):
    import importlib

    source = inspect.getsource(importlib.import_module(module))
    code = [line.split("#")[0] for line in source.splitlines()]
    assert not [line for line in code if ".conn." in line or re.search(r"^\s*(import|from) boto3", line)
                or "boto3." in line]
    # a task reads only its own XCom; upstream values arrive as templated arguments
    pulls = [line.strip() for line in source.splitlines() if "xcom_pull(" in line]
    assert all("task_ids=self.task_id" in line for line in pulls), pulls


def test_the_dag_passes_upstream_values_as_templates():
    from helpers import load_dag

    dag = load_dag("pgops_ebs_migration__main")
    assert dag.render_template_as_native_obj
    assert dag.get_task("chain").preflight == "{{ ti.xcom_pull(task_ids='preflight') }}"
    assert dag.get_task("chain").resume_chain is None and not dag.get_task("chain").resumes
    fresh = dag.get_task("fresh_round")
    assert fresh.resumes and fresh.resume_chain == "{{ ti.xcom_pull(task_ids='chain') }}"
    assert dag.get_task("approve_cutover").chain == "{{ ti.xcom_pull(task_ids='chain') }}"
    for task_id in ("cutover", "report"):
        task = dag.get_task(task_id)
        assert {"preflight", "chain"} <= set(task.template_fields)
        assert "fresh_round" in task.chain and "'chain'" in task.chain
