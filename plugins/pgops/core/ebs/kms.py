"""Can another account use a KMS key? Read from the key policy's statements and the key's grants (pure).

A shared encrypted snapshot is usable in the target account only when that account may use the key. The policy
is read as IAM reads it, conservatively: an Allow counts only when its principal names the account (or is "*"),
its action covers the operation, its resource is the key, and it has no condition this reader cannot prove true;
a Deny that could cover the account and the operation wins over every Allow and grant, whatever its condition.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from typing import Any

# What the target account does with a shared, encrypted snapshot: describe the key, create a volume (a grant for
# EBS), decrypt, and re-encrypt when it copies the snapshot under its own key.
REQUIRED_ACTIONS = ("kms:DescribeKey", "kms:CreateGrant", "kms:Decrypt", "kms:ReEncryptFrom")
# Conditions that name the calling account, which this reader can check against the target account.
_ACCOUNT_CONDITION_KEYS = ("kms:calleraccount", "aws:principalaccount")


@dataclass
class KeyAccess:
    account: str
    allowed_by: dict[str, str] = field(default_factory=dict)  # action -> Sid or grant id
    denied_by: dict[str, str] = field(default_factory=dict)  # action -> Sid
    unreadable: list[str] = field(default_factory=list)  # Sids of Allow statements with conditions not judged

    @property
    def missing(self) -> list[str]:
        return [a for a in REQUIRED_ACTIONS if a not in self.allowed_by]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.denied_by

    def refusal(self, key_arn: str) -> str:
        """Why the account cannot use the key, and the fix (for a refused preflight)."""
        why = []
        if self.denied_by:
            why.append("the key policy denies it " + ", ".join(f"{a} (statement {s})"
                                                              for a, s in self.denied_by.items()))
        if self.missing:
            why.append("neither an Allow statement of the key policy nor a grant gives it " + ", ".join(self.missing))
        if self.unreadable:
            why.append("Allow statement(s) with conditions pgops cannot judge were not counted: "
                       + ", ".join(self.unreadable))
        return (f"KMS key {key_arn} does not let account {self.account} use it ({'; '.join(why)}), so a shared "
                "snapshot would be unusable there. Fix: add an Allow statement with principal "
                f"arn:aws:iam::{self.account}:root for {', '.join(REQUIRED_ACTIONS)} (Resource \"*\") to the key "
                "policy, and remove any Deny that covers that account")

    def to_dict(self) -> dict[str, Any]:
        return {"account": self.account, "ok": self.ok, "allowed_by": self.allowed_by, "denied_by": self.denied_by,
                "missing": self.missing, "conditions_not_judged": self.unreadable}


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return [value] if isinstance(value, str | dict) else list(value)


def _names_account(principal_value: str, account: str) -> bool:
    return principal_value == account or bool(re.match(rf"^arn:aws[a-z-]*:(iam|sts)::{account}:", principal_value))


def _principal_covers(statement: dict[str, Any], account: str) -> bool:
    """Does the statement's Principal include the account (or everyone)?"""
    if "NotPrincipal" in statement:
        # NotPrincipal applies to everyone except those listed
        listed = [v for vals in _principal_values(statement["NotPrincipal"]) for v in vals]
        return not any(_names_account(v, account) for v in listed)
    principal = statement.get("Principal")
    if principal == "*":
        return True
    return any(v == "*" or _names_account(v, account) for vals in _principal_values(principal) for v in vals)


def _principal_values(principal: Any) -> list[list[str]]:
    if isinstance(principal, str):
        return [[principal]]
    if isinstance(principal, dict):
        return [[str(v) for v in _as_list(principal.get(k))] for k in ("AWS",)]
    return []


def _action_covers(statement: dict[str, Any], action: str) -> bool:
    def match(patterns: list[Any]) -> bool:
        return any(fnmatch.fnmatchcase(action.lower(), str(p).lower()) for p in patterns)

    if "NotAction" in statement:
        return not match(_as_list(statement["NotAction"]))
    return match(_as_list(statement.get("Action")))


def _resource_covers(statement: dict[str, Any], key_arn: str) -> bool:
    if "NotResource" in statement:
        return not any(fnmatch.fnmatchcase(key_arn, str(r)) for r in _as_list(statement["NotResource"]))
    return any(r == "*" or fnmatch.fnmatchcase(key_arn, str(r)) for r in _as_list(statement.get("Resource", "*")))


def _condition_holds(condition: Any, account: str) -> bool | None:
    """True when every condition is one this reader proves true for the account; None when it cannot judge."""
    if not condition:
        return True
    if not isinstance(condition, dict):
        return None
    for operator, tests in condition.items():
        if operator not in ("StringEquals", "StringLike") or not isinstance(tests, dict):
            return None
        for key, values in tests.items():
            if key.lower() not in _ACCOUNT_CONDITION_KEYS:
                return None
            if not any(fnmatch.fnmatchcase(account, str(v)) if operator == "StringLike" else str(v) == account
                       for v in _as_list(values)):
                return False
    return True


def key_access(policy: str | dict[str, Any], grants: list[dict[str, Any]], *, account: str, key_arn: str) -> KeyAccess:
    """Which of REQUIRED_ACTIONS the account may use on the key, by which statement or grant, and what denies it."""
    doc = json.loads(policy) if isinstance(policy, str) else policy
    statements = [s for s in _as_list((doc or {}).get("Statement")) if isinstance(s, dict)]
    access = KeyAccess(account=account)
    for i, st in enumerate(statements):
        sid = str(st.get("Sid") or f"statement {i}")
        if not (_principal_covers(st, account) and _resource_covers(st, key_arn)):
            continue
        effect = st.get("Effect")
        for action in REQUIRED_ACTIONS:
            if not _action_covers(st, action):
                continue
            if effect == "Deny":
                # a Deny wins whatever its condition: one that might apply is enough to refuse
                if _condition_holds(st.get("Condition"), account) is not False:
                    access.denied_by.setdefault(action, sid)
            elif effect == "Allow":
                holds = _condition_holds(st.get("Condition"), account)
                if holds:
                    access.allowed_by.setdefault(action, sid)
                elif holds is None and sid not in access.unreadable:
                    access.unreadable.append(sid)
    for grant in grants:
        grantee = str(grant.get("GranteePrincipal", ""))
        if not _names_account(grantee, account) or grant.get("Constraints"):
            continue
        ops = {f"kms:{op}" for op in grant.get("Operations", [])}
        for action in REQUIRED_ACTIONS:
            if action in ops:
                access.allowed_by.setdefault(action, f"grant {grant.get('GrantId', '?')}")
    return access
