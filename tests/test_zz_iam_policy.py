"""include/iam/: one IAM policy per role, checked against the AWS operations the code really made in this session.

- pgops-airflow-policy.json: the Airflow workers (the AWS connection the tasks use, also handed to the barman-cloud
  subprocesses the backup and restore tasks start). tests/aws_calls.py records every botocore operation in the test
  process (and runs this file last). Each operation made by pgops code (not by test set-up or the lab harness) must
  be allowed by it; after a full, green run, every action it grants must have been used, except the statements that
  cover calls made outside this process (barman-cloud subprocesses, EC2 calling KMS for us) and the few operations
  the lab's moto cannot serve (NOT_EXERCISED, each with its reason).
- pgops-dbhost-policy.json: the DB hosts' own credentials (archive_command, the WAL prefetcher): WAL and base backups
  only. A small evaluator (Allow, explicit Deny wins, wildcards as IAM matches them) proves the split: the DB host
  writes WAL and backups of any cluster prefix, and never a pgops report, which the dashboard renders.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "include" / "iam" / "pgops-airflow-policy.json"
DBHOST_POLICY = REPO / "include" / "iam" / "pgops-dbhost-policy.json"
# Statements for calls this process cannot observe: barman-cloud runs as a subprocess on the DB host (its
# actions from its S3 client: head_bucket/list -> ListBucket, get/head_object -> GetObject, put_object and
# multipart -> PutObject, abort -> AbortMultipartUpload, delete_objects -> DeleteObject), and EC2 calls KMS
# itself when it copies an encrypted snapshot.
UNOBSERVABLE_SIDS = ("BarmanCloudOnDbHostSubprocess", "EbsEncryptedCopyKmsViaEc2Service",
                     "EbsEncryptedCopyKmsGrantViaEc2Service")
# Actions the code calls on paths the suite does not exercise (each has a call site in plugins/pgops, which
# test_not_exercised_actions_have_call_sites checks). Remove an entry once a test covers its path.
NOT_EXERCISED = {
    "ec2:EnableFastSnapshotRestores": "create_volume with fast snapshot restore: moto has no FSR (ARCHITECTURE.md)",
}
# Operation -> IAM action where the names differ (S3); every other service uses "<prefix>:<Operation>".
S3_ACTIONS = {
    "ListObjectsV2": "s3:ListBucket", "ListObjects": "s3:ListBucket", "HeadBucket": "s3:ListBucket",
    "ListObjectVersions": "s3:ListBucketVersions", "ListBuckets": "s3:ListAllMyBuckets",
    "GetObject": "s3:GetObject", "HeadObject": "s3:GetObject",
    "PutObject": "s3:PutObject", "CopyObject": "s3:PutObject", "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject", "CompleteMultipartUpload": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "DeleteObject": "s3:DeleteObject", "DeleteObjects": "s3:DeleteObject",
    "GetBucketLifecycleConfiguration": "s3:GetLifecycleConfiguration",
    "PutBucketLifecycleConfiguration": "s3:PutLifecycleConfiguration",
    "GetBucketVersioning": "s3:GetBucketVersioning", "GetBucketEncryption": "s3:GetEncryptionConfiguration",
    "GetPublicAccessBlock": "s3:GetBucketPublicAccessBlock",
    "GetObjectLockConfiguration": "s3:GetBucketObjectLockConfiguration",
    "GetBucketLocation": "s3:GetBucketLocation", "CreateBucket": "s3:CreateBucket",
    "GetObjectTagging": "s3:GetObjectTagging", "PutObjectTagging": "s3:PutObjectTagging",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads", "ListParts": "s3:ListMultipartUploadParts",
}


def iam_action(call: str) -> str:
    service, operation = call.split(":", 1)
    if service == "s3":
        return S3_ACTIONS.get(operation, f"s3:{operation}")
    return f"{service}:{operation}"


def _policy() -> dict:
    return json.loads(POLICY.read_text())


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _allowed(action: str, statements: list[dict]) -> list[str]:
    return [s["Sid"] for s in statements if s["Effect"] == "Allow"
            and any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _as_list(s["Action"]))]


def test_policy_is_least_privilege_by_construction():
    policy = _policy()
    sids = [s.get("Sid") for s in policy["Statement"]]
    assert all(sids) and len(set(sids)) == len(sids), "every statement needs its own Sid"
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and "NotAction" not in st and "NotResource" not in st, st["Sid"]
        for action in _as_list(st["Action"]):
            assert not action.endswith(":*") and action != "*", f"{st['Sid']}: wildcard action {action}"
        resources = _as_list(st["Resource"])
        if any(a.startswith("s3:") for a in _as_list(st["Action"])):
            assert "*" not in resources and all(r.startswith("arn:aws:s3:::pgops-lab") for r in resources), st["Sid"]
            object_actions = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
            for r in resources:  # objects only under the cluster prefix, never the whole bucket
                if "/" in r.split(":::", 1)[1]:
                    assert r.endswith("/clusters/*"), (st["Sid"], r)
            if object_actions & set(_as_list(st["Action"])):
                assert any(r.endswith("/clusters/*") for r in resources), st["Sid"]
        if any(a in ("ec2:DeleteSnapshot", "ec2:ModifySnapshotAttribute") for a in _as_list(st["Action"])):
            assert "aws:ResourceTag/pgops:migration-id" in json.dumps(st.get("Condition", {})), st["Sid"]
    assert set(UNOBSERVABLE_SIDS) <= set(sids)


def test_every_aws_call_of_the_code_is_allowed(aws_calls):
    statements = _policy()["Statement"]
    calls = aws_calls.product_calls()
    if not calls:
        pytest.skip("no AWS call was made by pgops code in this session (run the lab tests with it)")
    denied = {call: sorted(callers) for call, callers in calls.items() if not _allowed(iam_action(call), statements)}
    assert not denied, ("the code made AWS calls the IAM policy does not allow: "
                        + "; ".join(f"{iam_action(c)} ({c} from {', '.join(w)})" for c, w in sorted(denied.items()))
                        + ". Fix: add the action to the DAG kind's statement in include/iam/pgops-airflow-policy.json")


def test_no_policy_action_is_unused(aws_calls):
    if not aws_calls.full_suite():
        pytest.skip("only a subset of the suite ran (-k/-m/paths/deselection): unused actions cannot be judged")
    not_run = aws_calls.not_run()
    if not_run:
        pytest.skip(f"{len(not_run)} test(s) failed or did not run in this session (e.g. {not_run[0]}): "
                    "their AWS calls may be missing, so unused actions cannot be judged")
    used = {iam_action(c) for c in aws_calls.product_calls()}
    unused = []
    for st in _policy()["Statement"]:
        if st["Sid"] in UNOBSERVABLE_SIDS:
            continue
        for action in _as_list(st["Action"]):
            if action in NOT_EXERCISED:
                continue
            if not any(fnmatch.fnmatchcase(u.lower(), action.lower()) for u in used):
                unused.append(f"{st['Sid']}: {action}")
    assert not unused, (f"the policy grants actions no code used in the full test run: {unused}. Fix: remove "
                        "them, or list them in NOT_EXERCISED with the reason the lab cannot exercise them")


def test_not_exercised_actions_have_call_sites():
    import re

    code = "\n".join(p.read_text() for p in (REPO / "plugins" / "pgops").rglob("*.py"))
    for action in NOT_EXERCISED:
        method = re.sub(r"(?<!^)(?=[A-Z])", "_", action.split(":", 1)[1]).lower()
        assert f".{method}(" in code, f"{action}: no call to {method}() in plugins/pgops; drop it from the policy"
        assert _allowed(action, _policy()["Statement"]), f"{action} is listed but not in the policy"


# The audit's endpoint check (plugins/pgops/airflow/endpoint.py, also the standby-rebuild report): reads only, one statement
# per service. tests/lab/test_endpoint.py exercises every one of them against moto.
ENDPOINT_SIDS = ("AuditEndpointRead", "AuditEndpointDnsRecordRead")
ENDPOINT_ACTIONS = {"ec2:DescribeAddresses", "ec2:DescribeInstances", "route53:ListResourceRecordSets"}
ENDPOINT_CALLER = "plugins/pgops/airflow/endpoint.py"
ENDPOINT_TESTS = "tests/lab/test_endpoint.py"


def test_endpoint_statements_grant_exactly_the_reads_of_the_check():
    statements = {s["Sid"]: s for s in _policy()["Statement"]}
    granted = {a for sid in ENDPOINT_SIDS for a in _as_list(statements[sid]["Action"])}
    assert granted == ENDPOINT_ACTIONS
    assert _as_list(statements["AuditEndpointDnsRecordRead"]["Resource"]) == ["arn:aws:route53:::hostedzone/*"]
    for write in ("ec2:AssociateAddress", "ec2:DisassociateAddress", "ec2:StopInstances",
                  "route53:ChangeResourceRecordSets"):  # the fix is a human's (or repmgrd's), never the audit's
        assert not _allowed(write, _policy()["Statement"]), write


def test_endpoint_check_calls_are_allowed_by_its_statements_and_use_them_all(aws_calls):
    statements = [s for s in _policy()["Statement"] if s["Sid"] in ENDPOINT_SIDS]
    called = {iam_action(c) for c, callers in aws_calls.product_calls().items() if ENDPOINT_CALLER in callers}
    if not called:
        pytest.skip(f"the endpoint check made no AWS call in this session (run {ENDPOINT_TESTS} with this file)")
    assert called <= ENDPOINT_ACTIONS, f"{ENDPOINT_CALLER} made calls outside its statements: {called - ENDPOINT_ACTIONS}"
    assert all(_allowed(a, statements) for a in called), called
    ran = [n for n in aws_calls.collected if n.startswith(ENDPOINT_TESTS)]
    if not ran or any(aws_calls.outcomes.get(n) != "passed" for n in ran):
        pytest.skip(f"{ENDPOINT_TESTS} did not run and pass in this session: unused endpoint actions cannot be judged")
    assert called == ENDPOINT_ACTIONS, f"granted but never used by the endpoint check: {ENDPOINT_ACTIONS - called}"


def test_iam_action_mapping():
    assert iam_action("s3:ListObjectsV2") == "s3:ListBucket"
    assert iam_action("s3:HeadBucket") == "s3:ListBucket"
    assert iam_action("s3:GetBucketLifecycleConfiguration") == "s3:GetLifecycleConfiguration"
    assert iam_action("ec2:CreateSnapshots") == "ec2:CreateSnapshots"
    assert iam_action("ebs:ListChangedBlocks") == "ebs:ListChangedBlocks"
    assert iam_action("route53:ListResourceRecordSets") == "route53:ListResourceRecordSets"
    assert _allowed("sns:Publish", _policy()["Statement"]) == ["AlertsPublish"]
    assert _allowed("kms:ReEncryptFrom", _policy()["Statement"]) == ["EbsEncryptedCopyKmsViaEc2Service"]
    assert not _allowed("s3:DeleteBucket", _policy()["Statement"])


# --- the DB host's policy: WAL and backups, never reports ----------------------------------------------------
BUCKET = "arn:aws:s3:::pgops-lab"


def _decide(policy: dict, action: str, resource: str) -> str:
    """IAM's decision for one action on one resource under one identity policy: Deny wins, then Allow, else
    an implicit deny. Wildcards in Action and Resource match as IAM matches them ('*' spans '/')."""
    def covers(st: dict) -> bool:
        return (any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _as_list(st["Action"]))
                and any(fnmatch.fnmatchcase(resource, r) for r in _as_list(st["Resource"])))

    matching = [st for st in policy["Statement"] if covers(st)]
    if any(st["Effect"] == "Deny" for st in matching):
        return "deny"
    return "allow" if any(st["Effect"] == "Allow" for st in matching) else "implicit-deny"


def _dbhost() -> dict:
    return json.loads(DBHOST_POLICY.read_text())


REPORT_KEYS = ["clusters/main/pgops/reports/ebs-migration/latest.json",
               "clusters/main/pgops/reports/wal-audit/20250101T000000.000000Z.json",
               "clusters/other/pgops/reports/restore-verify/latest.json",
               "clusters/main/pgops/reports/ebs-migration-labels/run-0123.json",
               "clusters/main/pgops/reports/wals/latest.json",  # a report kind that looks like WAL
               "clusters/main/pgops/reports/base/x/latest.json",
               "clusters/main/pgops/preflight/write-probe"]
ENGINE_KEYS = ["clusters/main/wals/0000000100000000/000000010000000000000003.lz4",
               "clusters/main/wals/0000000100000000/00000002.history",
               "clusters/main/base/20250101T020000/backup.info",
               "clusters/main/base/20250101T020000/data.tar.lz4",
               "clusters/repl-1234/wals/0000000200000001/000000020000000100000007"]


def test_dbhost_policy_writes_wal_and_backups_and_never_reports():
    policy = _dbhost()
    for key in ENGINE_KEYS:
        for action in ("s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
            assert _decide(policy, action, f"{BUCKET}/{key}") == "allow", (action, key)
    for key in REPORT_KEYS:
        for action in ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:PutObjectTagging"):
            assert _decide(policy, action, f"{BUCKET}/{key}") != "allow", (action, key)
        assert _decide(policy, "s3:PutObject", f"{BUCKET}/{key}") == "deny", key  # explicitly, not by omission
    assert _decide(policy, "s3:ListBucket", BUCKET) == "allow"
    for action, resource in (("s3:PutObject", f"{BUCKET}/elsewhere/x"), ("s3:PutBucketPolicy", BUCKET),
                             ("s3:PutLifecycleConfiguration", BUCKET), ("ec2:CreateSnapshot", "*"),
                             ("kms:Decrypt", "*"), ("sns:Publish", "*"), ("s3:DeleteBucket", BUCKET)):
        assert _decide(policy, action, resource) != "allow", (action, resource)


def test_the_airflow_role_still_writes_reports():
    policy = _policy()
    for key in REPORT_KEYS[:4]:
        assert _decide(policy, "s3:PutObject", f"{BUCKET}/{key}") == "allow", key
        assert _decide(policy, "s3:GetObject", f"{BUCKET}/{key}") == "allow", key


def test_dbhost_policy_is_least_privilege_by_construction():
    policy = _dbhost()
    sids = [s.get("Sid") for s in policy["Statement"]]
    assert all(sids) and len(set(sids)) == len(sids)
    for st in policy["Statement"]:
        assert "NotAction" not in st and "NotResource" not in st and "Condition" not in st, st["Sid"]
        for action in _as_list(st["Action"]):
            assert action.startswith("s3:") and "*" not in action, (st["Sid"], action)
        for r in _as_list(st["Resource"]):
            assert r == BUCKET or r.startswith(f"{BUCKET}/clusters/*/"), (st["Sid"], r)
    # the engine's objects only: every Allow on objects is under <prefix>/<server>/wals/ or .../base/
    for st in policy["Statement"]:
        if st["Effect"] == "Allow":
            assert all(r == BUCKET or r.endswith(("/wals/*", "/base/*")) for r in _as_list(st["Resource"])), st["Sid"]
