"""Hostile AWS set-ups through the real EBS-migration DAG and operators on the lab's moto: a key policy that names
the target account only in a Deny (or only in text) is refused by the preflight before any snapshot; a retried
CreateVolume carries the same ClientToken and makes no second volume."""

from __future__ import annotations

import json

import pytest
from helpers import load_dag, task_states

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

DAG_ID = "pgops_ebs_migration__main"
SOURCE_REGION, TARGET_REGION = "us-east-1", "us-west-2"
TARGET_ACCOUNT = "210987654321"


def _snapshots(lab) -> list[str]:
    return [s["SnapshotId"] for r in (SOURCE_REGION, TARGET_REGION)
            for s in lab.aws_client("ec2", region=r).describe_snapshots(OwnerIds=["self"])["Snapshots"]]


OWNER = {"Sid": "Owner", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:root"}, "Action": "kms:*",
         "Resource": "*"}
POLICIES = {
    "deny-naming-the-account": [OWNER, {"Sid": "NoSharingWith" + TARGET_ACCOUNT, "Effect": "Deny",
                                        "Principal": {"AWS": f"arn:aws:iam::{TARGET_ACCOUNT}:root"},
                                        # (moto applies a Deny to every caller: not DescribeKey, which we call)
                                        "Action": ["kms:Decrypt", "kms:CreateGrant"], "Resource": "*"}],
    "allow-and-deny": [OWNER, {"Sid": "Share", "Effect": "Allow",
                               "Principal": {"AWS": f"arn:aws:iam::{TARGET_ACCOUNT}:root"},
                               "Action": ["kms:Decrypt", "kms:DescribeKey", "kms:CreateGrant", "kms:ReEncrypt*"],
                               "Resource": "*"},
                       {"Sid": "ButNotReally", "Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt",
                        "Resource": "*"}],
    "account-only-in-a-condition": [OWNER, {"Sid": "Other", "Effect": "Allow", "Principal": {"AWS": "*"},
                                            "Action": "kms:*", "Resource": "*",
                                            "Condition": {"StringNotEquals": {"kms:CallerAccount": TARGET_ACCOUNT}}}],
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_kms_preflight_refuses_keys_the_target_account_cannot_use(moto, run_dag, name):
    lab = moto
    volume_id = lab.aws_client("ec2", region=SOURCE_REGION).create_volume(
        Size=8, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"]
    policy = {"Version": "2012-10-17", "Statement": POLICIES[name]}
    assert TARGET_ACCOUNT in json.dumps(policy)  # a substring search would have passed it
    key_arn = lab.aws_client("kms", region=TARGET_REGION).create_key(
        Description=name, Policy=json.dumps(policy))["KeyMetadata"]["Arn"]
    dr = run_dag(load_dag(DAG_ID), conf={"volume_ids": [volume_id], "target_region": TARGET_REGION,
                                         "target_az": f"{TARGET_REGION}b", "kms_key_id": key_arn,
                                         "target_account": TARGET_ACCOUNT, "cutover_mode": "crash-consistent"})
    states = task_states(dr)
    assert states["preflight"] == "failed" and states["chain"] == "upstream_failed", states
    assert _snapshots(lab) == []  # nothing was snapshotted, copied or shared

    from airflow.sdk.exceptions import AirflowFailException

    from pgops.airflow.operators.ebs import EbsMigrationPreflightOperator

    op = EbsMigrationPreflightOperator(task_id="preflight", aws_conn_id=lab.cluster.aws_conn_id)
    with pytest.raises(AirflowFailException) as err:
        op.execute({"params": dr.conf})
    text = str(err.value)
    assert f"does not let account {TARGET_ACCOUNT} use it" in text and "Fix:" in text
    if name != "account-only-in-a-condition":
        assert "denies it" in text


def test_a_retried_create_volume_sends_the_same_client_token_and_makes_one_volume(moto, monkeypatch):
    """The first try's CreateVolume went through; the retry finds it (tags) or EC2 answers the same volume (token).

    moto 5.2.5 ignores ClientToken on CreateVolume (the same token twice makes two volumes), so for the retry that
    cannot see the first volume's tags, CreateVolume answers here as EC2 documents it: a repeated token with the same
    parameters returns the first call's volume, with other parameters IdempotentParameterMismatch."""
    import botocore.client
    from botocore.exceptions import ClientError

    from pgops.airflow.operators.ebs import EbsCreateVolumeOperator

    lab = moto
    ec2 = lab.aws_client("ec2", region=TARGET_REGION)
    vol = ec2.create_volume(Size=8, AvailabilityZone=f"{TARGET_REGION}a")["VolumeId"]
    snap = ec2.create_snapshot(VolumeId=vol)["SnapshotId"]
    sent: list[dict] = []
    answered: dict[str, tuple[dict, dict]] = {}  # token -> (the first call's parameters, its response)
    original = botocore.client.BaseClient._make_api_call

    def ec2_idempotent(self, operation_name, api_params):  # records what the real call carries, then makes it
        if operation_name != "CreateVolume":
            return original(self, operation_name, api_params)
        sent.append(dict(api_params))
        token = api_params.get("ClientToken")
        if token in answered:
            first_params, response = answered[token]
            if first_params != api_params:
                raise ClientError({"Error": {"Code": "IdempotentParameterMismatch", "Message": token}}, operation_name)
            return response
        response = original(self, operation_name, api_params)
        if token:
            answered[token] = (dict(api_params), response)
        return response

    def volumes_from_snapshot() -> list[str]:
        return sorted(v["VolumeId"] for v in ec2.describe_volumes(
            Filters=[{"Name": "snapshot-id", "Values": [snap]}])["Volumes"])

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", ec2_idempotent)
    op = EbsCreateVolumeOperator(task_id="create_volume", aws_conn_id=lab.cluster.aws_conn_id,
                                 snapshot_ids={"vol-src": snap}, region=TARGET_REGION,
                                 availability_zone=f"{TARGET_REGION}b")
    context = {"run_id": "retry-volume", "ti": type("TI", (), {"dag_id": "pgops_test"})()}
    first = op.execute(context)
    created = first["volumes"]["vol-src"]
    tokens = [c["ClientToken"] for c in sent]
    assert len(tokens) == 1 and 0 < len(tokens[0]) <= 64
    assert volumes_from_snapshot() == [created]

    second = op.execute(context)  # a retry that sees the first volume's tags
    assert second["volumes"] == first["volumes"]
    assert len(sent) == 1  # found by its tags: no second CreateVolume at all
    assert volumes_from_snapshot() == [created]  # moto itself holds one volume: the product's lookup found it

    # a retry whose first volume is not (yet) listed under our tag: only the token can prevent a duplicate
    ec2.delete_tags(Resources=[created], Tags=[{"Key": "pgops:migration-id"}])
    third = op.execute(context)
    assert len(sent) == 2 and sent[1] == sent[0]  # the same token and the same parameters: EC2 returns the volume
    assert third["volumes"] == first["volumes"]
    assert volumes_from_snapshot() == [created]
