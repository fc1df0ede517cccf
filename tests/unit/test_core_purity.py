"""pgops.core is pure logic: importing any of its modules loads no Airflow, AWS SDK, PostgreSQL driver or SSH library.

Each module is imported in a fresh interpreter (the test process has loaded them all already), with only the
plugins directory on the path.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
FORBIDDEN = ("airflow", "boto3", "botocore", "psycopg2", "paramiko")


def _core_modules() -> list[str]:
    names = ["pgops.core"]
    for info in pkgutil.walk_packages([str(PLUGINS / "pgops" / "core")], prefix="pgops.core."):
        names.append(info.name)
    return sorted(names)


def test_core_modules_are_found():
    names = _core_modules()
    assert {"pgops.core.replication", "pgops.core.endpoint", "pgops.core.findings", "pgops.core.ebs.planner"} <= set(names)


@pytest.mark.parametrize("module", _core_modules())
def test_core_module_imports_nothing_impure(module):
    probe = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(PLUGINS)
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120,
                          cwd=PLUGINS)
    assert done.returncode == 0, f"importing {module} failed:\n{done.stderr}"
    loaded = done.stdout.strip().splitlines()[-1]
    assert loaded == "[]", f"importing {module} loads {loaded}"
