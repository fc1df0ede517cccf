"""The `pgops` command line: the lab, the demo, and ad-hoc checks outside Airflow."""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def _lab(args: argparse.Namespace) -> int:
    from pgops.lab import Lab, LabError

    lab = Lab(args.state_dir)
    try:
        if args.action == "up":
            st = lab.up()
            print(f"lab up: S3 {st.s3_endpoint} (https {st.s3_https_endpoint}), moto {st.moto_endpoint}, "
                  f"PostgreSQL 127.0.0.1:{st.pg_port}, state in {st.state_dir}", file=sys.stderr)
        elif args.action == "env":
            for key, value in lab.env().items():
                print(f"export {key}={shlex.quote(value)}")
        elif args.action == "status":
            print(json.dumps(lab.status(), indent=2))
            return 0 if lab.running() else 1
        elif args.action == "down":
            lab.down()
            print("lab down", file=sys.stderr)
    except LabError as exc:
        print(f"pgops lab {args.action}: {exc}", file=sys.stderr)
        return 2
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pgops.demo import main as demo_main

    return demo_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("lab", help="the local lab: SeaweedFS S3, moto, PostgreSQL 15")
    lab.add_argument("action", choices=["up", "env", "status", "down"])
    lab.add_argument("--state-dir", default=None, help="lab state directory (default $PGOPS_LAB_DIR or .lab/)")
    lab.set_defaults(func=_lab)
    demo = sub.add_parser("demo", help="start the lab and Airflow, run the base backup, leave the UI up")
    demo.add_argument("action", choices=["up", "down"], nargs="?", default="up")
    demo.add_argument("--state-dir", default=None)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
