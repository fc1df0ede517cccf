"""PostgreSQL starts the archive_command wrapper once per WAL segment: a call whose segment the pusher archives
(already done, or done while it waits) loads no module an interpreter start has not loaded (no re, pathlib,
enum, argparse, subprocess, hashlib), which took as long as the interpreter's start; and it still answers 0 only
for a marker of this very file and destination."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

DBHOST = REPO / "include" / "dbhost"
HEAVY = ("re", "pathlib", "types", "typing", "enum", "signal", "argparse", "subprocess", "shutil", "hashlib",
         "concurrent", "barman", "boto3")
COMMAND = ["barman-cloud-wal-archive", "--cloud-provider", "aws-s3", "s3://bucket/prefix", "main"]
SEGMENT = "000000010000000000000007"
# A fresh interpreter without site (-S -I: nothing but what the start itself loads), then one call's main().
CALL = """
import sys
sys.path.insert(0, {dbhost!r})
import pgops_wal_archive
code = pgops_wal_archive.main({argv!r})
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("RESULT", code, ",".join(heavy))
"""


def _argv(*, background: bool = True) -> list[str]:
    mode = ["--background"] if background else ["--batch", "1"]
    return ["--parallel", "2", "--in-process", *mode, "--wait-s", "20", "--", *COMMAND, f"pg_wal/{SEGMENT}"]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "pg_wal" / "archive_status").mkdir(parents=True)
    (data / "pg_wal" / SEGMENT).write_bytes(b"\x01" * 4096)
    (data / "pg_wal" / "archive_status" / f"{SEGMENT}.ready").touch()
    tmp_path.chmod(0o700)
    return data


def _call(data: Path, argv: list[str]) -> subprocess.Popen:
    code = CALL.format(dbhost=str(DBHOST), argv=argv, heavy=HEAVY)
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", code], cwd=data, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})


def _result(proc: subprocess.Popen) -> tuple[int, list[str], str]:
    out, err = proc.communicate(timeout=60)
    line = next(line for line in out.splitlines() if line.startswith("RESULT"))
    _, code, heavy = (line.split(" ") + [""])[:3]
    return int(code), [m for m in heavy.split(",") if m], err


def _marker(wrapper, data: Path, *, command: list[str] = COMMAND) -> None:
    spool = Path(wrapper.default_spool(data))
    spool.mkdir(mode=0o700, exist_ok=True)
    st = os.stat(data / "pg_wal" / SEGMENT)
    identity = f"{st.st_ino} {st.st_size} {st.st_mtime_ns}"
    (spool / f"{SEGMENT}.archived").write_text(f"{identity} {wrapper.destination_hash(command)}\n")


def test_a_segment_archived_ahead_costs_no_import(wrapper, data_dir):
    _marker(wrapper, data_dir)
    code, heavy, err = _result(_call(data_dir, _argv()))
    assert code == 0, err
    assert heavy == [], f"the call loaded {heavy}"


def test_a_call_that_waits_for_the_pusher_costs_no_import(wrapper, data_dir):
    """A pusher holds the spool's lock (here: this test); the marker comes while the call waits."""
    spool = Path(wrapper.default_spool(data_dir))
    spool.mkdir(mode=0o700)
    fd = os.open(spool / ".pusher.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = _call(data_dir, _argv())
        time.sleep(0.5)
        assert proc.poll() is None  # no marker yet: it waits, and starts no pusher of its own (the lock is held)
        _marker(wrapper, data_dir)
        code, heavy, err = _result(proc)
    finally:
        os.close(fd)
    assert code == 0, err
    assert heavy == [], f"the call loaded {heavy}"
    assert (spool / ".called").read_text().strip() == wrapper.destination_hash(COMMAND)


def test_a_marker_for_another_destination_or_file_is_not_taken(wrapper, data_dir):
    """The lean path still vouches only for this file archived where this command archives: with another
    destination's marker it waits for the pusher (held here), and times out into archiving itself."""
    _marker(wrapper, data_dir, command=[*COMMAND[:-1], "other-server"])
    spool = Path(wrapper.default_spool(data_dir))
    fd = os.open(spool / ".pusher.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        argv = _argv()
        argv[argv.index("--wait-s") + 1] = "0.5"
        code, heavy, err = _result(_call(data_dir, argv))
    finally:
        os.close(fd)
    # it tried to archive the segment itself (no barman under -S -I: nothing could start) and says so
    assert code == wrapper.EXIT_ERROR, err
    assert "failed before any upload" in err


def test_the_segment_name_check_matches_the_old_pattern(wrapper):
    import re

    pattern = re.compile(r"^[0-9A-F]{24}$")
    for name in (SEGMENT, "00000001000000000000000A", "00000002.history", "0000000100000000000000a7",
                 SEGMENT + ".partial", SEGMENT[:-1], SEGMENT + "0", "", "00000001000000000000000G",
                 "0000000100000000000000٣7", SEGMENT + "\n"):
        assert wrapper.is_segment_name(name) == bool(pattern.match(name)) or name.endswith("\n"), name
    assert not wrapper.is_segment_name(SEGMENT + "\n")  # re's $ took a trailing newline; this check does not


def test_spool_functions_take_str_and_path_alike(wrapper, tmp_path):
    data = tmp_path / "pgdata"
    assert wrapper.default_spool(data) == wrapper.default_spool(str(data)) == str(tmp_path / "pgops_wal_spool.pgdata")
    assert wrapper.default_spool(str(data) + "/") == str(tmp_path / "pgops_wal_spool.pgdata")
    target = tmp_path / "x"
    wrapper._write_atomic(target, "a\n", durable=True)
    assert wrapper._read(str(target)) == "a" and wrapper._read(target) == "a"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("bad", [b"\xff\xfe not utf-8", b""])
def test_an_unreadable_marker_is_no_marker(wrapper, data_dir, bad):
    spool = Path(wrapper.default_spool(data_dir))
    spool.mkdir(mode=0o700)
    (spool / f"{SEGMENT}.archived").write_bytes(bad)
    assert not wrapper._marker_matches(spool, SEGMENT, data_dir / "pg_wal" / SEGMENT, wrapper.destination_hash(COMMAND))


def test_the_pusher_is_started_with_its_spool_absolute(wrapper, data_dir, monkeypatch):
    """Started by a call in the data directory, the pusher gets the same spool, data and pg_wal directories."""
    seen = {}

    class FakePusher:
        def __init__(self, opts, command, dest, wal_dir, data_dir_, spool):
            seen.update(wal_dir=wal_dir, data_dir=data_dir_, spool=spool)

        def run(self):
            return 0

    monkeypatch.setattr(wrapper, "Pusher", FakePusher)
    monkeypatch.chdir(data_dir)
    argv = _argv()
    cut = argv.index("--")
    assert wrapper.main([*argv[:cut], "--pusher", *argv[cut:]]) == 0
    assert seen["spool"] == Path(wrapper.default_spool(data_dir)) and seen["spool"].is_absolute()
    assert seen["wal_dir"] == data_dir / "pg_wal" and seen["data_dir"] == data_dir
