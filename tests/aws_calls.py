"""pytest plugin: record every AWS operation made in the test process, for the IAM policy check.

Every botocore session (boto3's, the Amazon provider's, aiobotocore's) gets a ``before-call`` handler that
records ``service:Operation``, the calling module (the innermost frame inside this repository) and the test.
Calls made from tests/ or the lab harness are test set-up (CreateBucket, CreateQueue, Subscribe, ...) and
are marked as such. At the end of the session the calls go to ``$PGOPS_AWS_CALLS_FILE`` (default
tests/artifacts/aws-calls.json). tests/test_zz_iam_policy.py reads them from ``RECORDER`` while the session
runs; this plugin moves it to the end of the run. Calls made by subprocesses (barman-cloud, the scheduler
test's Airflow components) are not seen here.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILE = REPO / "tests" / "artifacts" / "aws-calls.json"
POLICY_TEST = "test_zz_iam_policy.py"
# Repository files whose AWS calls are test set-up, not the product's own.
TEST_SIDE = ("tests/", "plugins/pgops/lab/local.py", "plugins/pgops/lab/replica.py", "bench/")


class Recorder:
    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str, str, bool]] = Counter()  # (service, operation, caller, test_side)
        self.current_test = ""
        self.lock = threading.Lock()
        self.outcomes: dict[str, str] = {}
        self.collected: list[str] = []
        self.deselected = 0
        self.selection_narrowed = False

    def record(self, service: str, operation: str) -> None:
        caller = _caller()
        # No repository frame on the stack: Airflow machinery (a provider trigger) running our DAG's task.
        test_side = caller.startswith(TEST_SIDE)
        with self.lock:
            self.calls[(service, operation, caller, test_side)] += 1

    def product_calls(self) -> dict[str, set[str]]:
        """service:Operation -> calling modules, for calls made by pgops code (plugins/, dags/, include/)."""
        out: dict[str, set[str]] = {}
        with self.lock:
            for (service, op, caller, test_side), _n in self.calls.items():
                if not test_side:
                    out.setdefault(f"{service}:{op}", set()).add(caller)
        return out

    def dump(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            rows = [{"service": s, "operation": o, "caller": c, "test_side": t, "count": n}
                    for (s, o, c, t), n in sorted(self.calls.items())]
        path.write_text(json.dumps({"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "tests_collected": len(self.collected), "full_suite": self.full_suite(),
                                    "calls": rows}, indent=2))

    def full_suite(self) -> bool:
        return not self.selection_narrowed and self.deselected == 0

    def not_run(self, exclude: str = POLICY_TEST) -> list[str]:
        """Tests that were collected but failed or were not reached (a skip by design does not count)."""
        return [n for n in self.collected if exclude not in n and self.outcomes.get(n) not in ("passed", "skipped")]


RECORDER = Recorder()


def _caller() -> str:
    frame = sys._getframe(2)
    repo = str(REPO) + os.sep
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(repo) and "/.venv/" not in path and not path.endswith("tests/aws_calls.py"):
            return path[len(repo):]
        frame = frame.f_back
    return "(outside the repository)"


def _on_before_call(model=None, **kwargs) -> None:
    if model is None:
        return
    sm = model.service_model
    service = sm.signing_name or sm.endpoint_prefix or sm.service_name
    RECORDER.record(service, model.name)


def _install() -> None:
    import botocore.session

    if getattr(botocore.session.Session, "_pgops_recording", False):
        return
    original = botocore.session.Session.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.register("before-call", _on_before_call, unique_id="pgops-aws-calls")

    botocore.session.Session.__init__ = __init__
    botocore.session.Session._pgops_recording = True


_install()


def pytest_collection_modifyitems(session, config, items):
    # The policy check reads the whole run's calls: it goes last, wherever pytest collected it.
    items.sort(key=lambda item: POLICY_TEST in item.nodeid)
    RECORDER.collected = [item.nodeid for item in items]
    RECORDER.selection_narrowed = bool(config.getoption("keyword", "") or config.getoption("markexpr", "")
                                       or config.getoption("lf", False)
                                       or any(Path(a.split("::")[0]).resolve() != (REPO / "tests").resolve()
                                              for a in config.args))


def pytest_deselected(items):
    RECORDER.deselected += len(items)


def pytest_runtest_logstart(nodeid, location):
    RECORDER.current_test = nodeid


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        RECORDER.outcomes[report.nodeid] = report.outcome
    elif report.when == "teardown" and report.outcome == "failed":
        RECORDER.outcomes[report.nodeid] = "failed"


def pytest_sessionfinish(session, exitstatus):
    RECORDER.dump(Path(os.environ.get("PGOPS_AWS_CALLS_FILE") or DEFAULT_FILE))


@pytest.fixture(scope="session")
def aws_calls() -> Recorder:
    return RECORDER
