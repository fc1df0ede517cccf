"""Exact names: a run's backup name is its own (no prefix match, no collision), the end-WAL check takes the
segment's own key only, and the archive wrapper's records name the destination they were made for."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import REPO

from pgops.airflow.operators.backup import backup_name_for_run, is_own_backup_name, next_attempt_name
from pgops.airflow.triggers.s3 import is_segment_key
from pgops.dbhost.engines import barman_cloud
from pgops.inventory import load_inventory


def test_runs_sharing_a_beginning_get_names_of_their_own():
    nightly, nightly2 = backup_name_for_run("nightly"), backup_name_for_run("nightly-2")
    assert nightly != nightly2
    assert not is_own_backup_name(nightly2, nightly) and not is_own_backup_name(nightly, nightly2)
    assert is_own_backup_name(nightly, nightly) and is_own_backup_name(f"{nightly}-a2", nightly)
    assert not is_own_backup_name(f"{nightly}-a2x", nightly) and not is_own_backup_name(None, nightly)


def test_names_do_not_collide_after_cutting_or_making_safe():
    long_a, long_b = "manual__" + "x" * 120 + "a", "manual__" + "x" * 120 + "b"
    assert backup_name_for_run(long_a) != backup_name_for_run(long_b)
    assert backup_name_for_run("a:b") != backup_name_for_run("a-b") != backup_name_for_run("a+b")
    for run_id in (long_a, "scheduled__2026-11-25T02:00:00+00:00", "::", "nightly"):
        name = backup_name_for_run(run_id)
        assert name == backup_name_for_run(run_id)  # a retry of the run finds it again
        assert name.startswith("pgops-") and len(name) <= 100
        assert all(c.isalnum() or c in "_.-" for c in name), name
        assert name.lower() not in barman_cloud.RESERVED_BACKUP_NAMES


def test_a_new_attempt_is_numbered_past_every_attempt_made():
    assert next_attempt_name("n", []) == "n"
    assert next_attempt_name("n", ["n"]) == "n-a2"
    assert next_attempt_name("n", ["n", "n-a2"]) == "n-a3"
    assert next_attempt_name("n", ["n-a5"]) == "n-a6"  # an earlier attempt without a catalog entry is not reused


def test_end_wal_is_the_segments_own_key_only():
    seg = "clusters/main/wals/0000000100000000/000000010000000000000007"
    assert is_segment_key(seg, seg)
    assert is_segment_key(seg + ".lz4", seg) and is_segment_key(seg + ".gz", seg) and is_segment_key(seg + ".zst", seg)
    assert not is_segment_key(seg + ".partial", seg)
    assert not is_segment_key(seg + ".00000028.backup", seg)
    assert not is_segment_key(seg + "0", seg) and not is_segment_key(seg + ".lz4.tmp", seg)


def test_the_spool_default_is_next_to_the_data_directory(wrapper, tmp_path):
    data = tmp_path / "main"
    assert str(wrapper.default_spool(data)) == barman_cloud.wal_archive_spool_dir(str(data))
    assert barman_cloud.wal_archive_spool_dir("/var/lib/postgresql/15/main/") == \
        "/var/lib/postgresql/15/pgops_wal_spool.main"


def test_every_destination_argument_changes_the_hash(wrapper):
    cluster = load_inventory(REPO / "include" / "clusters.example.yaml").clusters[0]

    def dest(c, endpoint="http://127.0.0.1:9000") -> str:
        argv = barman_cloud.archive_command_argv(c, endpoint_url=endpoint)
        return wrapper.destination_hash(argv[argv.index("--") + 1:])

    base = dest(cluster)
    assert base == dest(cluster)
    others = [
        dest(cluster, endpoint="http://127.0.0.1:9001"),
        dest(dataclasses.replace(cluster, storage=dataclasses.replace(cluster.storage, prefix="elsewhere"))),
        dest(dataclasses.replace(cluster, storage=dataclasses.replace(cluster.storage, bucket="other-bucket"))),
        dest(dataclasses.replace(cluster, storage=dataclasses.replace(cluster.storage, server_name="other"))),
        dest(dataclasses.replace(cluster, engine=dataclasses.replace(cluster.engine, wal_compression="gzip"))),
    ]
    assert base not in others and len(set(others)) == len(others)


def test_the_quick_option_parser_agrees_with_argparse_or_hands_over(wrapper):
    argv = ["--parallel", "2", "--in-process", "--background", "--", "/bin/archive", "--lz4", "s3://b/p", "main", "x"]
    opts, command, wal = wrapper._parse(argv)
    assert type(opts).__name__ == "SimpleNamespace"  # the fast path took it, without argparse
    assert (opts.parallel, opts.in_process, opts.background, opts.wait_s, opts.idle_s, opts.batch) == \
           (2, True, True, 120.0, 60.0, 0)
    assert command == ["/bin/archive", "--lz4", "s3://b/p", "main"] and wal == "x"
    assert wrapper._parse(["--wait-s=5", "--", "a", "x"])[0].wait_s == 5.0
    # an abbreviation is argparse's to expand, a bad value argparse's to refuse
    opts, _, _ = wrapper._parse(["--par", "3", "--", "a", "x"])
    assert type(opts).__name__ == "Namespace" and opts.parallel == 3
    with pytest.raises(SystemExit):
        wrapper._parse(["--parallel", "two", "--", "a", "x"])
    with pytest.raises(SystemExit):
        wrapper._parse(["--in-process=yes", "--", "a", "x"])
