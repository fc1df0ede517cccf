"""The only place pgops relies on Airflow task-SDK internals, for parse speed (dags/common.py's pgops_dag).

Two uses, both pinned by tests/test_sdk_adapter.py, which fails loudly when an Airflow upgrade changes them:
- ``set_params``: a DAG's params are set after its tasks are built (no deep copy per operator per class
  level), with ``object.__setattr__`` as the SDK's own attrs converter does, wrapped in a ParamsDict;
- ``is_arg_set``: whether a Param carries a value, by the SDK's own NOTSET sentinel (the same test Airflow runs
  before it validates a scheduled DAG's param defaults).
Anything else in pgops uses public API (``airflow.sdk``).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, Param
from airflow.sdk.definitions.param import ParamsDict


def set_params(dag: DAG, params: dict[str, Param]) -> None:
    object.__setattr__(dag, "params", ParamsDict(params))


def is_arg_set(value: Any) -> bool:
    from airflow.sdk.definitions._internal.types import is_arg_set as _is_arg_set

    return _is_arg_set(value)
