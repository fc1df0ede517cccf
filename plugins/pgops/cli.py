"""The `pgops` command line: the lab, the demo, and ad-hoc checks outside Airflow."""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def _lab(args: argparse.Namespace) -> int:
    from pgops.lab.local import Lab, LabError

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
    from pgops.lab.demo import main as demo_main

    return demo_main(args)


def _audit(args: argparse.Namespace) -> int:
    """Exit 0 when clean, 1 on a warning, 2 on a critical finding (or when the audit cannot run)."""
    import contextlib

    from pgops.airflow import audit
    from pgops.inventory import InventoryError, load_inventory

    try:
        cluster = load_inventory(args.inventory).get(args.cluster)
        with contextlib.redirect_stdout(sys.stderr):  # Airflow's connection logging: stdout is for the report
            report = audit.audit_cluster(cluster, run_id="cli")
    except (InventoryError, audit.AuditError) as exc:
        print(f"pgops audit: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True, default=str) if args.json else audit.summary(report))
    return audit.exit_code(report)


def _archive_command(args: argparse.Namespace) -> int:
    """The postgresql.conf lines that archive a cluster's WAL the way pgops expects (print, change nothing)."""
    from pgops.dbhost.engines import barman_cloud
    from pgops.inventory import InventoryError, load_inventory

    try:
        cluster = load_inventory(args.inventory).get(args.cluster)
    except InventoryError as exc:
        print(f"pgops archive-command: {exc}", file=sys.stderr)
        return 2
    command = shlex.join(barman_cloud.archive_command_argv(cluster, endpoint_url=args.endpoint_url)) + " %p"
    settings = {"wal_level": "replica", "archive_mode": "on", "archive_timeout": f"{args.archive_timeout}s",
                "archive_command": command}
    print(f"# pgops: WAL of cluster {cluster.name} into s3://{cluster.storage.bucket}/{cluster.storage.server_prefix}/wals/")
    print("# Include this file from postgresql.conf on the database host and restart PostgreSQL. barman-cloud reads")
    print("# AWS credentials from the postmaster's environment or the instance profile (never from this file).")
    for key, value in settings.items():
        print(f"{key} = '{value.replace(chr(39), chr(39) * 2)}'")
    return 0


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
    aud = sub.add_parser("audit", help="audit a cluster's WAL archive and bucket lifecycle (exit 0 ok, 1 warning, "
                                       "2 critical)")
    aud.add_argument("cluster", help="inventory cluster name")
    aud.add_argument("--inventory", default=None, help="inventory file (default $PGOPS_INVENTORY)")
    aud.add_argument("--json", action="store_true", help="print the JSON report instead of the summary")
    aud.set_defaults(func=_audit)
    arc = sub.add_parser("archive-command", help="print the postgresql.conf lines that archive a cluster's WAL")
    arc.add_argument("cluster", help="inventory cluster name")
    arc.add_argument("--inventory", default=None, help="inventory file (default $PGOPS_INVENTORY)")
    arc.add_argument("--endpoint-url", default=None, help="S3 endpoint, for S3-compatible stores (default: AWS)")
    arc.add_argument("--archive-timeout", type=int, default=60,
                     help="seconds before a partly filled segment is archived (bounds the RPO when idle)")
    arc.set_defaults(func=_archive_command)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
