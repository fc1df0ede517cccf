"""A timeline history file the prefetcher of include/dbhost/pgops_wal_restore.py cannot download (the bucket lists it,
but the GET answers 500 or 403, or the connection drops; or the listing itself fails) goes to barman-cloud-wal-restore
with the call's own arguments, and PostgreSQL gets that command's answer and exit status: never the prefetcher's
"does not exist" (exit 1), which would end recovery's timeline search on a file the archive has.

The prefetcher runs for real (barman's code in the DB-host tools venv, botocore's real errors) against a stub S3
endpoint on loopback; a stand-in for barman-cloud-wal-restore records its argv and answers as told."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

import pytest
from helpers import REPO, pid_in, wait_for

from pgops.dbhost.engines import barman_cloud
from pgops.dbhost.runners import CHILD_PATH
from pgops.inventory import Storage, load_inventory
from pgops.lab.local import dbhost_venv, pid_alive

WRAPPER = REPO / "include" / "dbhost" / "pgops_wal_restore.py"
PYTHON = dbhost_venv() / "bin" / "python"
BUCKET, PREFIX, SERVER = "stub-bucket", "clusters", "main"
HISTORY = "00000002.history"
HISTORY_KEY = f"{PREFIX}/{SERVER}/wals/{HISTORY}.gz"
FALLBACK_BODY = b"1\t0/3000000\tno recovery target specified\n"

pytestmark = pytest.mark.skipif(not PYTHON.exists(), reason=f"the DB-host tools venv ({PYTHON}) is not set up")

# the stand-in for barman-cloud-wal-restore: its argv, one word a line, then its answer (FALLBACK_EXIT)
FAKE_BARMAN = """#!/bin/sh
for word in "$@"; do printf '%s\\n' "$word"; done > "$FALLBACK_RECORD"
for last in "$@"; do :; done
if [ "$FALLBACK_EXIT" = 0 ]; then printf '1\\t0/3000000\\tno recovery target specified\\n' > "$last"
else echo "ERROR: Barman cloud WAL restore exception: stand-in failure" >&2; fi
exit "$FALLBACK_EXIT"
"""


class StubS3(BaseHTTPRequestHandler):
    """Lists HISTORY_KEY under its prefix; answers every GET of an object (and, with fail "list", every listing) with
    the failure the server was told: an S3 error document with its status, or a connection closed unanswered."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _fail(self) -> None:
        fail = self.server.fail
        if fail == "reset":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        status, code = {"500": (500, "InternalError"), "403": (403, "AccessDenied"),
                        "list": (500, "InternalError")}[fail]
        self._send(status, f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                           f"<Message>stub {code}</Message></Error>".encode())

    def do_GET(self):  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        bucket, _, key = url.path.lstrip("/").partition("/")
        query = parse_qs(url.query)
        self.server.requests.append(("LIST" if not key else "GET", key or query.get("prefix", [""])[0]))
        if bucket != BUCKET:
            return self._send(404, b"<Error><Code>NoSuchBucket</Code></Error>")
        if key or self.server.fail == "list":
            return self._fail()
        prefix = query.get("prefix", [""])[0]
        contents = "".join(
            f"<Contents><Key>{escape(k)}</Key><LastModified>2024-01-01T00:00:00.000Z</LastModified>"
            f"<ETag>&quot;0&quot;</ETag><Size>64</Size><StorageClass>STANDARD</StorageClass></Contents>"
            for k in [HISTORY_KEY] if k.startswith(prefix) and "/" not in k[len(prefix):])
        count = contents.count("<Contents>")
        self._send(200, (f"<?xml version='1.0' encoding='UTF-8'?><ListBucketResult "
                         f"xmlns='http://s3.amazonaws.com/doc/2006-03-01/'><Name>{BUCKET}</Name>"
                         f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{count}</KeyCount><MaxKeys>1000</MaxKeys>"
                         f"<Delimiter>/</Delimiter><IsTruncated>false</IsTruncated>{contents}"
                         "</ListBucketResult>").encode())


@pytest.fixture
def s3():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubS3)
    server.daemon_threads = True
    server.requests, server.fail = [], "500"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def area(tmp_path):
    yield tmp_path
    spool = tmp_path / "spool"
    pid = pid_in(spool / ".prefetcher.pid")
    shutil.rmtree(spool, ignore_errors=True)  # the prefetcher stops when its spool goes
    if pid and not wait_for(lambda: not pid_alive(pid), 15):
        os.kill(pid, signal.SIGKILL)


def _restore(s3, area: Path, fallback_exit: int) -> tuple[subprocess.CompletedProcess, list[str], list[str]]:
    """PostgreSQL's call for HISTORY: the restore_command's argv (the wrapper, then barman-cloud-wal-restore's
    arguments) with the stand-in in barman's place. The wrapper's result, the argv the stand-in got, the command."""
    fake = area / "barman-cloud-wal-restore"
    fake.write_text(FAKE_BARMAN)
    fake.chmod(0o755)
    cluster = load_inventory().get("main")
    cluster = dataclasses.replace(cluster, storage=Storage(bucket=BUCKET, prefix=PREFIX, server_name=SERVER))
    argv = barman_cloud.wal_restore_argv(cluster, endpoint_url=f"http://127.0.0.1:{s3.server_port}", parallel=2,
                                         spool_dir=str(area / "spool"))
    cut = argv.index("--")
    command = [str(fake), *argv[cut + 2:]]
    dest = area / "pg_wal" / "RECOVERYHISTORY"
    dest.parent.mkdir()
    env = {"PATH": CHILD_PATH, "HOME": str(area), "AWS_ACCESS_KEY_ID": "stub", "AWS_SECRET_ACCESS_KEY": "stub",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1",  # botocore's retries would only add time
           "FALLBACK_RECORD": str(area / "fallback-argv"), "FALLBACK_EXIT": str(fallback_exit)}
    res = subprocess.run([str(PYTHON), str(WRAPPER), *argv[1:cut], "--wait-s", "60", "--", *command, HISTORY,
                          str(dest)], env=env, capture_output=True, text=True, timeout=120)
    record = area / "fallback-argv"
    return res, record.read_text().splitlines() if record.exists() else [], command


@pytest.mark.parametrize(("fail", "fallback_exit"), [("500", 0), ("403", 4), ("reset", 2), ("list", 0)])
def test_a_history_file_the_prefetcher_cannot_fetch_goes_to_barman(s3, area, fail, fallback_exit):
    s3.fail = fail
    started = time.monotonic()
    res, fallback_argv, command = _restore(s3, area, fallback_exit)
    dest = area / "pg_wal" / "RECOVERYHISTORY"
    spool = area / "spool"
    log = (spool / ".prefetcher.log").read_text() if (spool / ".prefetcher.log").exists() else ""

    # the prefetcher asked the bucket for it and failed ...
    if fail == "list":
        assert ("LIST", f"{PREFIX}/{SERVER}/wals/{HISTORY}") in s3.requests, s3.requests
        assert "stopped: ClientError" in log and "InternalError" in log, log
    else:
        assert ("GET", HISTORY_KEY) in s3.requests, s3.requests
        assert f"download of {HISTORY} failed" in log, log
        assert (spool / f"{HISTORY}.missing").exists()  # its answer to the waiting call: ask barman
        assert {"500": "InternalError", "403": "AccessDenied", "reset": "Connection"}[fail] in log, log
    # ... so barman-cloud-wal-restore was called, with exactly the call's arguments (its own, %f, %p) ...
    assert fallback_argv == [*command[1:], HISTORY, str(dest)]
    # ... and its answer is PostgreSQL's: its exit status, and the file only when it delivered one
    assert res.returncode == fallback_exit, res.stderr
    if fallback_exit == 0:
        assert dest.read_bytes() == FALLBACK_BODY
    else:
        assert not dest.exists() and "stand-in failure" in res.stderr
    assert "does not exist" not in res.stderr
    # nothing (half-)downloaded where the shell's `mv` could take it
    assert not [n for n in os.listdir(spool) if n.startswith(".tmp-") or n == HISTORY], sorted(os.listdir(spool))
    assert time.monotonic() - started < 30
