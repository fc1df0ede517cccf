"""Benchmark: layout parsing + continuity over a synthetic barman-cloud listing.

Usage: python bench/bench_audit_listing.py [--keys N]
Prints keys/s (untraced runs), peak traced memory (separate traced runs) for the audit path and for a baseline that only iterates the
listing and splits each key, plus their ratio.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from pgops.core import layouts, wal  # noqa: E402
from pgops.core.continuity import check_continuity  # noqa: E402

PREFIX = "pgops/main"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def listing(n_keys: int) -> Iterator[tuple[str, int, datetime]]:
    """n_keys gzip WAL segments on timeline 1, in S3 listing order, one every 10 s."""
    per_xlogid = wal.segments_per_xlogid()
    step = timedelta(seconds=10)
    for segno in range(n_keys):
        name = f"00000001{segno // per_xlogid:08X}{segno % per_xlogid:08X}"
        yield f"{PREFIX}/main/wals/{name[:16]}/{name}.gz", 4_000_000, T0 + step * segno


def baseline(n_keys: int) -> int:
    parts = 0
    for key, _size, _lm in listing(n_keys):
        parts += len(key.split("/"))
    return parts


def audit(n_keys: int) -> tuple[int, str]:
    result = layouts.parse_listing(listing(n_keys), prefix=PREFIX)
    backup = layouts.BackupRef(backup_id="bench", status=layouts.DONE, timeline=1,
                               begin_segment="000000010000000000000000", begin_lsn=0x28)
    report = check_continuity([backup], result.wal)
    return result.key_count, report.status


def timed(fn, n_keys: int) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn(n_keys)
    return time.perf_counter() - started, value


def peak_traced_bytes(fn, n_keys: int) -> int:
    # a separate run: tracing slows Python allocation several times over
    tracemalloc.start()
    fn(n_keys)
    _current, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    n_keys = parser.parse_args().keys
    base_s, _ = timed(baseline, n_keys)
    audit_s, (seen, status) = timed(audit, n_keys)
    assert seen == n_keys, (seen, n_keys)
    base_peak = peak_traced_bytes(baseline, n_keys)
    audit_peak = peak_traced_bytes(audit, n_keys)
    print(f"keys: {n_keys}  continuity status: {status}")
    print(f"baseline (iterate + split): {base_s:7.2f} s  {n_keys / base_s:12,.0f} keys/s  "
          f"peak {base_peak / 2**20:7.1f} MiB")
    print(f"audit (parse + continuity): {audit_s:7.2f} s  {n_keys / audit_s:12,.0f} keys/s  "
          f"peak {audit_peak / 2**20:7.1f} MiB")
    print(f"ratio audit/baseline: {audit_s / base_s:.2f}x time")
    print(f"max RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
