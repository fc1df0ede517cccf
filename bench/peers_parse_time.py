"""DagBag fill time of dags/ with a given inventory, under a guard that fails any network or database call.

Run: PGOPS_INVENTORY=clusters.yaml AIRFLOW_HOME=... python bench/peers_parse_time.py
Prints one JSON line: fill seconds (first and second fill), DAG count, import errors, guarded calls.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "PGOPS_BENCH_RESULT "
CALLS: list[str] = []


def _guard(owner, attr: str, what: str) -> None:
    def refused(*args, **kwargs):
        CALLS.append(f"{what}{args[1:] if what.startswith('socket.socket') else args}"[:200])
        raise RuntimeError(f"{what} during DAG parse: parsing must do no network or database I/O")

    setattr(owner, attr, refused)


def install_guard() -> None:
    for attr in ("connect", "connect_ex"):
        _guard(socket.socket, attr, f"socket.socket.{attr}")
    _guard(socket, "create_connection", "socket.create_connection")
    _guard(socket, "getaddrinfo", "socket.getaddrinfo")
    import sqlite3

    _guard(sqlite3, "connect", "sqlite3.connect")
    for mod in ("psycopg2", "psycopg"):
        try:
            module = __import__(mod)
        except ImportError:
            continue
        _guard(module, "connect", f"{mod}.connect")  # libpq connects in C, below the socket guard


def main() -> int:
    # airflow itself is imported before timing, as in a dag-processor
    from airflow.dag_processing.dagbag import DagBag

    install_guard()
    started = time.perf_counter()
    bag = DagBag(dag_folder=str(REPO / "dags"))
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    again = DagBag(dag_folder=str(REPO / "dags"))
    second_s = time.perf_counter() - started
    out = {"fill_s": first_s, "second_fill_s": second_s, "dags": len(bag.dags), "dags_second": len(again.dags),
           "import_errors": {k: str(v)[:300] for k, v in bag.import_errors.items()}, "guarded_calls": CALLS,
           "files": [{"file": Path(s.file).name, "duration_s": s.duration.total_seconds() if hasattr(s.duration, "total_seconds")
                      else s.duration, "dags": s.dag_num} for s in bag.dagbag_stats]}
    print(MARK + json.dumps(out), flush=True)
    return 0 if not CALLS and not bag.import_errors else 1


if __name__ == "__main__":
    sys.exit(main())
