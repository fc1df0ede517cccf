"""include/iam/pgops-policy.json against the AWS operations the code really made during this test session.

tests/aws_calls.py records every botocore operation in the test process (and runs this file last). Each
operation made by pgops code (not by test set-up or the lab harness) must be allowed by the policy; after a
full, green run, every action the policy grants must have been used, except the statements that cover
calls made outside this process (barman-cloud subprocesses on the DB host, EC2 calling KMS for us) and
the few operations the lab's moto cannot serve (NOT_EXERCISED, each with its reason).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "include" / "iam" / "pgops-policy.json"
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
                        + ". Fix: add the action to the DAG kind's statement in include/iam/pgops-policy.json")


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


def test_iam_action_mapping():
    assert iam_action("s3:ListObjectsV2") == "s3:ListBucket"
    assert iam_action("s3:HeadBucket") == "s3:ListBucket"
    assert iam_action("s3:GetBucketLifecycleConfiguration") == "s3:GetLifecycleConfiguration"
    assert iam_action("ec2:CreateSnapshots") == "ec2:CreateSnapshots"
    assert iam_action("ebs:ListChangedBlocks") == "ebs:ListChangedBlocks"
    assert _allowed("sns:Publish", _policy()["Statement"]) == ["AlertsPublish"]
    assert _allowed("kms:ReEncryptFrom", _policy()["Statement"]) == ["EbsEncryptedCopyKmsViaEc2Service"]
    assert not _allowed("s3:DeleteBucket", _policy()["Statement"])
