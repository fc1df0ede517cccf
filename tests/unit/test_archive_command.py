"""The archive_command always goes through the pgops wrapper (its overwrite check), whatever
engine.wal_archive_parallel is; at 1 each call archives its own file, in its own process, and nothing else."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from pgops.dbhost.engines import barman_cloud
from pgops.inventory import load_inventory


def _cluster(parallel: int):
    c = load_inventory().get("main")
    return dataclasses.replace(c, engine=dataclasses.replace(c.engine, wal_archive_parallel=parallel))


@pytest.mark.parametrize("parallel", [1, 2, 4])
def test_archive_command_always_starts_with_the_wrapper(parallel):
    c = _cluster(parallel)
    argv = barman_cloud.archive_command_argv(c, endpoint_url="http://127.0.0.1:9000")
    assert argv[0] == c.engine.bin(barman_cloud.WAL_ARCHIVE_WRAPPER) and argv[0].endswith("/bin/pgops-wal-archive")
    cut = argv.index("--")
    # barman's arguments unchanged behind it, so the destination hash does not depend on wal_archive_parallel
    assert argv[cut + 1:] == barman_cloud.wal_archive_argv(c, endpoint_url="http://127.0.0.1:9000")
    options = argv[1:cut]
    assert "--in-process" in options  # the overwrite check lives in the in-process uploader
    assert options[options.index("--parallel") + 1] == str(parallel)
    if parallel == 1:
        assert "--background" not in options and options[options.index("--batch") + 1] == "1"
    else:
        assert "--background" in options and "--batch" not in options


def test_the_wrapper_reads_the_parallel_1_options_without_argparse(wrapper):
    argv = barman_cloud.archive_command_argv(_cluster(1), endpoint_url=None)
    opts, command, wal = wrapper._parse([*argv[1:], "pg_wal/000000010000000000000003"])
    assert type(opts).__name__ == "SimpleNamespace"
    assert (opts.parallel, opts.batch, opts.in_process, opts.background) == (1, 1, True, False)
    assert command == barman_cloud.wal_archive_argv(_cluster(1), endpoint_url=None)
    assert wal == "pg_wal/000000010000000000000003"


class _FakeUploader:
    """Stands in for barman's uploader: records what was pushed; names in ``conflicts`` hold other content,
    names in ``same`` the same content."""

    pushed: list[str] = []
    conflicts: set[str] = set()
    same: set[str] = set()
    wrapper = None

    def __init__(self, command: list[str], sample_path: str):
        self.cw = SimpleNamespace(is_any_xlog_file=lambda path: True)

    def push(self, path: Path) -> bool:
        type(self).pushed.append(path.name)
        if path.name in self.conflicts:
            raise self.wrapper.ArchiveConflict(f"WAL file {path.name} is already archived with different content")
        return path.name not in self.same

    def close(self) -> None:
        pass


@pytest.fixture
def pg_wal(tmp_path, monkeypatch, wrapper):
    """A data directory stand-in with three ready segments and a timeline history file; the fake uploader."""
    data = tmp_path / "data"
    (data / "pg_wal" / "archive_status").mkdir(parents=True)
    for name in ("000000010000000000000003", "000000010000000000000004", "000000010000000000000005",
                 "00000002.history"):
        (data / "pg_wal" / name).write_bytes(b"x" * 64)
        (data / "pg_wal" / "archive_status" / f"{name}.ready").touch()
    monkeypatch.chdir(data)  # PostgreSQL runs archive_command in the data directory
    monkeypatch.setattr(_FakeUploader, "pushed", [])
    monkeypatch.setattr(_FakeUploader, "conflicts", set())
    monkeypatch.setattr(_FakeUploader, "same", set())
    monkeypatch.setattr(_FakeUploader, "wrapper", wrapper)
    monkeypatch.setattr(wrapper, "Uploader", _FakeUploader)
    argv = barman_cloud.archive_command_argv(_cluster(1), endpoint_url=None)
    return data, lambda name: wrapper.main([*argv[1:], f"pg_wal/{name}"])


def test_parallel_1_archives_its_own_file_only(pg_wal):
    data, call = pg_wal
    assert call("000000010000000000000003") == 0
    assert _FakeUploader.pushed == ["000000010000000000000003"]  # nothing ahead, so nothing to vouch for later
    assert not list(data.parent.glob("pgops_wal_spool.data/*.archived"))
    assert call("000000010000000000000004") == 0
    assert _FakeUploader.pushed == ["000000010000000000000003", "000000010000000000000004"]


def test_parallel_1_refuses_other_content_and_accepts_the_same(pg_wal, wrapper, capsys):
    _, call = pg_wal
    _FakeUploader.conflicts = {"000000010000000000000003", "00000002.history"}
    _FakeUploader.same = {"000000010000000000000004"}
    assert call("000000010000000000000003") == wrapper.EXIT_ERROR
    err = capsys.readouterr().err
    assert "archive command failed for WAL segment 000000010000000000000003" in err and "different content" in err
    assert call("000000010000000000000004") == 0
    assert "000000010000000000000004 is already archived with the same content" in capsys.readouterr().err
    # a timeline history file takes the same check (never handed to the bare CLI)
    assert call("00000002.history") == wrapper.EXIT_ERROR
    assert _FakeUploader.pushed == ["000000010000000000000003", "000000010000000000000004", "00000002.history"]
