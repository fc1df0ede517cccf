"""pgops.airflow.dags.sdk_adapter against the installed Airflow: each private use behaves as the public path does.
A failure here after an Airflow upgrade means: re-check dags/common.py's pgops_dag before anything else."""

from __future__ import annotations

import pytest
from airflow.sdk import DAG, Param
from airflow.sdk.definitions.param import ParamsDict

from pgops.airflow.dags import sdk_adapter


def test_is_arg_set_knows_the_sdk_sentinel():
    from airflow.sdk.definitions.param import Param as SdkParam

    assert sdk_adapter.is_arg_set(3) and sdk_adapter.is_arg_set(None) and sdk_adapter.is_arg_set("")
    assert not sdk_adapter.is_arg_set(SdkParam(type="string").value)  # a Param without a default


def test_params_set_afterwards_equal_params_given_to_the_constructor():
    params = {"a": Param(1, type="integer", minimum=0), "b": Param("x", type="string", enum=["x", "y"])}
    public = DAG(dag_id="adapter_public", schedule=None, params=dict(params))
    ours = DAG(dag_id="adapter_ours", schedule=None)
    sdk_adapter.set_params(ours, dict(params))
    assert isinstance(public.params, ParamsDict) and isinstance(ours.params, ParamsDict)
    assert ours.params.dump() == public.params.dump()
    assert {k: ours.params.get_param(k).schema for k in params} == {k: public.params.get_param(k).schema
                                                                   for k in params}
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError, match="not one of"):  # values set later are still validated
        ours.params["b"] = "z"
