"""`make bench`: every benchmark in bench/, each printing its figures and ratios against a baseline
measured in the same run; results as JSON under bench/results/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_audit_listing.py", "bench_ebs_chain.py", "bench_peers.py"]


def main() -> int:
    (HERE / "results").mkdir(exist_ok=True)
    failed = []
    for name in BENCHES:
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
