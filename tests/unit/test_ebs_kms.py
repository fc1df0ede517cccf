"""pgops.core.ebs.kms: reading a key policy's statements and grants for the target account, as IAM would."""

from __future__ import annotations

import json

from pgops.airflow.ebs_hooks import client_token
from pgops.core.ebs.kms import REQUIRED_ACTIONS, key_access

ACCOUNT, OTHER = "210987654321", "123456789012"
KEY = f"arn:aws:kms:us-west-2:{OTHER}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
OWNER = {"Sid": "Owner", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{OTHER}:root"}, "Action": "kms:*",
         "Resource": "*"}
SHARE = {"Sid": "Share", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
         "Action": ["kms:Decrypt", "kms:DescribeKey", "kms:CreateGrant", "kms:ReEncrypt*"], "Resource": "*"}


def access(*statements, grants=()):
    return key_access(json.dumps({"Version": "2012-10-17", "Statement": list(statements)}), list(grants),
                      account=ACCOUNT, key_arn=KEY)


def test_an_allow_naming_the_account_for_every_action_passes():
    a = access(OWNER, SHARE)
    assert a.ok and set(a.allowed_by) == set(REQUIRED_ACTIONS) and set(a.allowed_by.values()) == {"Share"}


def test_a_deny_naming_the_account_never_passes():
    deny = {"Sid": "NoTarget", "Effect": "Deny", "Principal": {"AWS": [f"arn:aws:iam::{ACCOUNT}:root"]},
            "Action": "kms:*", "Resource": "*"}
    a = access(OWNER, deny)
    assert not a.ok and a.denied_by == dict.fromkeys(REQUIRED_ACTIONS, "NoTarget")
    a = access(OWNER, SHARE, deny)  # an Allow as well: the Deny wins
    assert not a.ok and a.denied_by
    conditional = {**deny, "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
    assert not access(SHARE, conditional).ok  # a Deny that might apply is enough
    everyone = {"Sid": "DenyAll", "Effect": "Deny", "Principal": "*", "NotAction": "kms:DescribeKey", "Resource": "*"}
    a = access(SHARE, everyone)
    assert not a.ok and "kms:DescribeKey" not in a.denied_by and "kms:Decrypt" in a.denied_by


def test_the_account_mentioned_anywhere_but_an_allowed_principal_does_not_pass():
    for st in ({"Sid": f"Deny{ACCOUNT}", "Effect": "Deny", "Principal": {"AWS": f"arn:aws:iam::{OTHER}:root"},
                "Action": "kms:Decrypt", "Resource": "*"},
               {**SHARE, "Action": "kms:DescribeKey"},  # only one of the actions
               {**SHARE, "Resource": f"arn:aws:kms:us-west-2:{OTHER}:key/another"},
               {**SHARE, "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}0:root"}},  # a different account
               {**SHARE, "Effect": "Deny"},
               {**SHARE, "NotPrincipal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Principal": None},
               {**SHARE, "Condition": {"StringEquals": {"aws:SourceVpce": f"vpce-{ACCOUNT}"}}}):
        assert not access(OWNER, st).ok, st


def test_conditions_on_the_calling_account_are_judged():
    everyone = {"Sid": "ViaCallerAccount", "Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:*",
                "Resource": "*", "Condition": {"StringEquals": {"kms:CallerAccount": [ACCOUNT]}}}
    assert access(everyone).ok
    elsewhere = {**everyone, "Condition": {"StringEquals": {"kms:CallerAccount": OTHER}}}
    a = access(elsewhere)
    assert not a.ok and a.missing == list(REQUIRED_ACTIONS)
    unknown = {**everyone, "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}}
    a = access(unknown)
    assert not a.ok and a.unreadable == ["ViaCallerAccount"]


def test_grants_to_the_account_count_and_others_do_not():
    grant = {"GrantId": "g1", "GranteePrincipal": f"arn:aws:iam::{ACCOUNT}:root",
             "Operations": ["Decrypt", "DescribeKey", "CreateGrant", "ReEncryptFrom"]}
    a = access(OWNER, grants=[grant])
    assert a.ok and set(a.allowed_by.values()) == {"grant g1"}
    assert not access(OWNER, grants=[{**grant, "GranteePrincipal": f"arn:aws:iam::{OTHER}:role/{ACCOUNT}"}]).ok
    assert not access(OWNER, grants=[{**grant, "Constraints": {"EncryptionContextEquals": {"a": "b"}}}]).ok


def test_client_token_is_stable_per_run_and_distinct_per_volume():
    a = client_token("dag/run1", "vol-1", "snap-1", "us-west-2b")
    assert a == client_token("dag/run1", "vol-1", "snap-1", "us-west-2b") and len(a) <= 64 and a.isascii()
    assert a != client_token("dag/run2", "vol-1", "snap-1", "us-west-2b")
    assert a != client_token("dag/run1", "vol-2", "snap-1", "us-west-2b")


def test_a_refusal_names_the_key_the_account_what_denies_and_the_fix():
    deny = {"Sid": "NoTarget", "Effect": "Deny", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
            "Action": "kms:Decrypt", "Resource": "*"}
    text = access(OWNER, SHARE, deny).refusal(KEY)
    assert text.startswith(f"KMS key {KEY} does not let account {ACCOUNT} use it (the key policy denies it")
    assert "kms:Decrypt (statement NoTarget)" in text and f"arn:aws:iam::{ACCOUNT}:root" in text
    assert "Fix:" in text
    missing = access(OWNER).refusal(KEY)
    assert "neither an Allow statement of the key policy nor a grant gives it kms:DescribeKey" in missing
