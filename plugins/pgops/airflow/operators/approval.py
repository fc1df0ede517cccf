"""Approval gates: a person agrees before the EBS cutover and before a standby rebuild stops and wipes a node.

Airflow's ApprovalOperator (providers-standard, human-in-the-loop) asks in the UI's Required Actions and through
the REST API (PATCH /api/v2/dags/<dag>/dagRuns/<run>/taskInstances/<gate>/-1/hitlDetails with
{"chosen_options": ["Approve"]}); the task waits in the awaiting_input state without a worker slot. Each gate
builds its question at run time from what the step before it found (the chain's rounds and the planner's
numbers; the rebuild plan), so the person sees the values the next steps act on.

Reject, or no answer within the timeout (the scheduler then answers the default, Reject), skips the steps after
the gate; the report still runs and records the decision. The `skip_approval` param answers for automation. The
gate's XCom is the decision: approved / rejected / timed_out / skipped, by whom and when, and what was shown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk.exceptions import AirflowFailException

XCOM_RETURN_KEY = "return_value"
APPROVED, REJECTED, TIMED_OUT, SKIPPED = "approved", "rejected", "timed_out", "skipped"
NOT_APPROVED = (REJECTED, TIMED_OUT)
CUTOVER_GATE, REBUILD_GATE = "approve_cutover", "approve_rebuild"
MAX_TIMEOUT_MINUTES = 7 * 24 * 60
IF_NOT_APPROVED = ("keep", "delete")  # the EBS chain's snapshots and copies after a reject or a timeout


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    return str(value) if value else None


def secs(value: Any) -> str:
    """A duration for a person: 42 s, 7.5 min, 2.1 h; "unknown" when there is no number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "unknown"
    if abs(value) < 90:
        return f"{value:.0f} s"
    if abs(value) < 5400:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def size(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "unknown"
    from pgops.core.restore import human_bytes

    return human_bytes(float(value))


def _cell(value: Any) -> str:
    """A value as a Markdown table cell: one line, no pipe or backtick that could end the cell or the code span."""
    text = " ".join(str(value).split()).replace("|", "/").replace("`", "'")
    return f"`{text}`" if text else "—"


def markdown(intro: str, facts: Sequence[tuple[str, Any]], outcomes: Sequence[str]) -> str:
    rows = "\n".join(f"| {label} | {_cell(value)} |" for label, value in facts)
    return f"{intro}\n\n| | |\n|---|---|\n{rows}\n\n" + "\n".join(f"- {line}" for line in outcomes)


def checked_timeout_minutes(value: Any) -> float:
    try:
        minutes = float(value)
    except (TypeError, ValueError):
        minutes = float("nan")
    if not math.isfinite(minutes) or not 0 < minutes <= MAX_TIMEOUT_MINUTES:
        raise AirflowFailException(f"param approval_timeout_minutes={value!r} must be a number of minutes above 0 "
                                   f"and at most {MAX_TIMEOUT_MINUTES} (7 days). Fix: e.g. 60")
    return minutes


def decision_record(event: Mapping[str, Any], *, asked_at: str | None, timeout_minutes: float | None,
                    facts: Mapping[str, Any] | None) -> dict[str, Any]:
    """The gate's outcome from Airflow's resume event: a person's answer, or the scheduler's default at timeout."""
    chosen = list(event.get("chosen_options") or [])
    user = event.get("responded_by_user") or None
    if event.get("timedout") and not user:
        decision = TIMED_OUT  # the scheduler wrote the default (Reject): nobody answered
    elif chosen == [ApprovalOperator.APPROVE]:
        decision = APPROVED
    else:
        decision = REJECTED
    return {"decision": decision, "by": (user or {}).get("name"), "by_id": (user or {}).get("id"),
            "at": _iso(event.get("responded_at")), "asked_at": asked_at, "timeout_minutes": timeout_minutes,
            "chosen_options": chosen, "facts": dict(facts or {})}


def skipped_record(*, by: str | None, at: datetime, facts: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"decision": SKIPPED, "by": by, "by_id": None, "at": _iso(at), "asked_at": None, "timeout_minutes": None,
            "chosen_options": [], "param": "skip_approval", "facts": dict(facts or {})}


def describe(record: Mapping[str, Any] | None) -> str | None:
    """One line for logs, reports and the dashboard: who decided what, when."""
    if not isinstance(record, Mapping) or not record.get("decision"):
        return None
    at = str(record.get("at") or "unknown time")
    by = str(record.get("by") or "unknown user")
    decision = record["decision"]
    if decision == APPROVED:
        return f"approved by {by} at {at}"
    if decision == REJECTED:
        return f"rejected by {by} at {at}"
    if decision == TIMED_OUT:
        minutes = record.get("timeout_minutes")
        within = f"within {minutes:g} min" if isinstance(minutes, int | float) else "within the timeout"
        return f"timed out: no answer {within} (asked at {record.get('asked_at') or 'unknown time'})"
    if decision == SKIPPED:
        who = f" (run triggered by {record['by']})" if record.get("by") else ""
        return f"not asked: param skip_approval{who}, at {at}"
    return f"{decision} at {at}"


# -- the questions -------------------------------------------------------------------------------------------------
CUTOVER_MODE_TEXT = {
    "backup": "pg_backup_start, the final snapshot(s), pg_backup_stop (PostgreSQL keeps running; the backup_label "
              "is stored in the bucket)",
    "stop-writes": "PostgreSQL on the DB host is stopped (pg_ctl -m fast) for the final snapshot(s), then started "
                   "again",
    "crash-consistent": "the final snapshot(s) with no quiesce (crash-consistent)",
}


def cutover_question(cluster: str, chain: Mapping[str, Any], preflight: Mapping[str, Any] | None,
                     params: Mapping[str, Any], *, timeout_minutes: float) -> tuple[str, str, dict[str, Any]]:
    """(subject, Markdown body, facts) of the EBS cutover gate, from the chain's state and the planner's numbers."""
    rounds = [r for r in chain.get("rounds") or [] if isinstance(r, Mapping)]
    decisions = [d for d in chain.get("decisions") or [] if isinstance(d, Mapping)]
    last = decisions[-1] if decisions else {}
    n = last.get("numbers") if isinstance(last.get("numbers"), Mapping) else {}
    mode = str(params.get("cutover_mode") or "backup")
    keep = str(params.get("if_not_approved") or "keep")
    facts = {
        "predicted_downtime_s": n.get("predicted_downtime_s"), "rounds": len(rounds), "floor_s": n.get("floor_s"),
        "downtime_target_s": n.get("downtime_target_s"), "predicted_final_snapshot_s": n.get("predicted_next_s"),
        "predicted_copy_s": n.get("predicted_copy_s"), "planner": last.get("action"), "reason": last.get("reason"),
        "cutover_mode": mode, "volume_ids": list((preflight or {}).get("volume_ids") or []),
        "target_region": params.get("target_region"),
        "last_round_completed_at": rounds[-1].get("completed_at") if rounds else None,
        "if_not_approved": keep,
    }
    subject = (f"EBS cutover of {cluster}: predicted downtime {secs(facts['predicted_downtime_s'])} "
               f"(target {secs(facts['downtime_target_s'])}) after {len(rounds)} round(s)")
    shown = [("Predicted downtime", secs(facts["predicted_downtime_s"])),
             ("Downtime target", secs(facts["downtime_target_s"])),
             ("Floor (d*)", secs(facts["floor_s"])),
             ("Rounds so far", len(rounds)),
             ("Final snapshot + copy", f"{secs(facts['predicted_final_snapshot_s'])} + "
                                       f"{secs(facts['predicted_copy_s'])}"),
             ("Last round completed", facts["last_round_completed_at"] or "unknown"),
             ("Planner", f"{facts['planner']}: {facts['reason']}"),
             ("Cutover mode", f"{mode}: {CUTOVER_MODE_TEXT.get(mode, mode)}"),
             ("Volumes", ", ".join(facts["volume_ids"]) or "unknown"),
             ("Destination", facts["target_region"] or "unknown")]
    not_approved = ("the chain's snapshots and copies are deleted" if keep == "delete" else
                    "the chain's snapshots and copies stay: clear this task (with downstream) in the run to ask "
                    "again, then a fresh round precedes the cutover")
    outcomes = ["**Approve**: the cutover starts at once; if the answer comes long after the last round, one "
                "fresh round first keeps the final snapshot as small as predicted.",
                f"**Reject**, or no answer within {timeout_minutes:g} min: no cutover; {not_approved} "
                f"(param if_not_approved={keep}). The report records the decision."]
    return subject, markdown(f"**Cut over {cluster}'s EBS volumes now?**", shown, outcomes), facts


def rebuild_question(cluster: str, plan: Mapping[str, Any], *, timeout_minutes: float
                     ) -> tuple[str, str, dict[str, Any]]:
    """(subject, Markdown body, facts) of the standby rebuild gate, from the preflight's plan."""
    node, host, data_dir = plan.get("node"), plan.get("host"), plan.get("data_dir")
    facts = {k: plan.get(k) for k in ("node", "host", "data_dir", "data_realpath", "system_identifier",
                                      "target_system_identifier", "target_pid", "target_state", "target_used_bytes",
                                      "was_running", "was_non_empty", "backup_id", "backup_end_time",
                                      "backup_size_bytes", "primary", "slot", "slot_exists")}
    steps = []
    if plan.get("was_running"):
        steps.append(f"stop PostgreSQL (pid {plan.get('target_pid')}, {plan.get('target_state') or 'a standby'})")
    if plan.get("was_non_empty"):
        steps.append(f"remove the contents of {data_dir} ({size(plan.get('target_used_bytes'))})")
    steps.append(f"restore backup {plan.get('backup_id')} there")
    subject = f"Standby rebuild of {node} on {host}: " + ", ".join(steps)
    sysid = plan.get("target_system_identifier") or "none (empty directory)"
    shown = [("Node", node), ("Host", host), ("Data directory", data_dir),
             ("Realpath on the host", plan.get("data_realpath")),
             ("System identifier (cluster)", plan.get("system_identifier") or "unknown"),
             ("System identifier (in the directory)", sysid),
             ("PostgreSQL there", f"pid {plan.get('target_pid')}, {plan.get('target_state')}"
              if plan.get("was_running") else "not running"),
             ("Contents to remove", size(plan.get("target_used_bytes")) if plan.get("was_non_empty") else "none"),
             ("Backup", f"{plan.get('backup_id')} (ended {plan.get('backup_end_time')}, "
                        f"{size(plan.get('backup_size_bytes'))})"),
             ("Primary", plan.get("primary")),
             ("Replication slot", f"{plan.get('slot')} "
                                  + ("(exists)" if plan.get("slot_exists") else "(created on the primary)"))]
    outcomes = ["**Approve**: " + "; ".join(steps) + f"; start it as a standby of {plan.get('primary')}.",
                f"**Reject**, or no answer within {timeout_minutes:g} min: nothing is stopped or removed and nothing "
                "is created on the primary. The report records the decision."]
    return subject, markdown(f"**Rebuild {node} of {cluster} as a standby?**", shown, outcomes), facts


# -- the operators -------------------------------------------------------------------------------------------------
class PgopsApprovalOperator(ApprovalOperator):
    """
    An approval gate whose question is built at run time (`question`); Reject is the answer at timeout.

    :param cluster_name: The inventory cluster (the question's subject; its SNS topic is told) (templated).
    :param skip_approval: Answer without asking (automation); the record says so (templated).
    :param timeout_minutes: No answer within this long counts as Reject (templated).
    """

    template_fields: Sequence[str] = (*ApprovalOperator.template_fields, "cluster_name", "skip_approval",
                                      "timeout_minutes")

    def __init__(self, *, cluster_name: str, skip_approval: bool | str = False, timeout_minutes: float | str = 60,
                 **kwargs: Any):
        kwargs.setdefault("subject", "pgops approval")  # replaced by `question` when the task runs
        kwargs.setdefault("retries", 0)  # a gate that fails must not ask again on its own
        super().__init__(defaults=ApprovalOperator.REJECT, ignore_downstream_trigger_rules=False,
                         fail_on_reject=False, response_timeout=timedelta(minutes=60), **kwargs)
        # not `skip`: that name is SkipMixin's method, which skips the tasks after a Reject
        self.cluster_name, self.skip_approval, self.timeout_minutes = cluster_name, skip_approval, timeout_minutes

    def question(self, context, timeout_minutes: float) -> tuple[str, str, dict[str, Any]]:
        raise NotImplementedError

    def execute(self, context):
        timeout_minutes = checked_timeout_minutes(self.timeout_minutes)
        subject, body, facts = self.question(context, timeout_minutes)
        if str(self.skip_approval).strip().lower() in ("true", "1", "yes"):
            dag_run = context.get("dag_run")
            record = skipped_record(by=getattr(dag_run, "triggering_user_name", None), at=_now(), facts=facts)
            self.log.warning("approval not asked (param skip_approval): %s", subject)
            return record
        self.subject, self.body = subject, body
        self.response_timeout = timedelta(minutes=timeout_minutes)
        asked_at = _iso(_now())
        # kept across the wait (the resumed task is the same try), for the decision record
        context["ti"].xcom_push(key="question", value={"asked_at": asked_at, "timeout_minutes": timeout_minutes,
                                                       "facts": facts})
        self.log.info("asking for approval (Required Actions in the Airflow UI, or the REST API); no answer "
                      "within %g min counts as Reject: %s\n%s", timeout_minutes, subject, body)
        self._notify(context, subject, body, timeout_minutes)
        return super().execute(context)

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        record = None
        if "error" not in event:
            self.validate_chosen_options(list(event.get("chosen_options") or []))
            asked = context["ti"].xcom_pull(task_ids=self.task_id, key="question") or {}
            record = decision_record(event, asked_at=asked.get("asked_at"),
                                     timeout_minutes=asked.get("timeout_minutes"), facts=asked.get("facts"))
            self.log.info("%s: %s", self.task_id, describe(record))
            # pushed now: on Reject the task ends inside super() (SkipMixin.skip raises DownstreamTasksSkipped), so
            # no return value would be stored, and the report reads the decision from it
            context["ti"].xcom_push(key=XCOM_RETURN_KEY, value=record)
        super().execute_complete(context=context, event=event)  # on Reject: skips what follows and ends here
        return record

    def _notify(self, context, subject: str, body: str, timeout_minutes: float) -> None:
        """Tell the cluster's SNS topic that a person is needed; a failure here must not block the question."""
        try:
            from pgops.inventory import load_inventory

            cluster = load_inventory().get(self.cluster_name)
            arn = cluster.alerts.sns_topic_arn
            if not arn:
                return
            try:
                link = self.generate_link_to_ui_from_context(context=context)
            except Exception:  # no [api] base_url: the Required Actions page is still there
                link = "Airflow UI → Browse → Required Actions"
            from airflow.providers.amazon.aws.notifications.sns import SnsNotifier

            message = (f"{subject}\n\nAnswer within {timeout_minutes:g} min (no answer counts as Reject): {link}\n"
                       f"DAG {context['ti'].dag_id}, run {context['run_id']}, task {self.task_id}.\n\n{body}")
            SnsNotifier(aws_conn_id=cluster.alerts_conn_id, target_arn=arn, message=message,
                        subject=f"pgops approval needed: {cluster.name}"[:100],
                        region_name=arn.split(":")[3]).notify(context)
        except Exception as exc:
            self.log.warning("could not send the approval request to SNS (%s); it waits in Required Actions", exc)


class EbsCutoverApprovalOperator(PgopsApprovalOperator):
    """
    Before the EBS cutover: predicted downtime, rounds so far, floor and target, from the chain's state.

    :param chain: The chain's result: its rounds and the planner's decisions (templated).
    :param preflight: The preflight's result: the source volumes shown in the question (templated).
    :param cluster_name: The inventory cluster (the question's subject; its SNS topic is told) (templated).
    :param skip_approval: Answer without asking (automation); the record says so (templated).
    :param timeout_minutes: No answer within this long counts as Reject (templated).
    """

    template_fields: Sequence[str] = (*PgopsApprovalOperator.template_fields, "chain", "preflight")

    def __init__(self, *, chain: Mapping[str, Any] | str | None, preflight: Mapping[str, Any] | str | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.chain, self.preflight = chain, preflight

    def question(self, context, timeout_minutes: float) -> tuple[str, str, dict[str, Any]]:
        if not self.chain:
            raise AirflowFailException(f"{self.task_id}: no chain state (the chain task's result is empty): "
                                       "nothing to approve")
        return cutover_question(self.cluster_name, self.chain, self.preflight, dict(context["params"]),
                                timeout_minutes=timeout_minutes)


class StandbyRebuildApprovalOperator(PgopsApprovalOperator):
    """
    Before a standby rebuild stops and removes a node: node, host, data directory, system identifier.

    :param plan: The rebuild preflight's plan (templated).
    :param cluster_name: The inventory cluster (the question's subject; its SNS topic is told) (templated).
    :param skip_approval: Answer without asking (automation); the record says so (templated).
    :param timeout_minutes: No answer within this long counts as Reject (templated).
    """

    template_fields: Sequence[str] = (*PgopsApprovalOperator.template_fields, "plan")

    def __init__(self, *, plan: Mapping[str, Any] | str | None, **kwargs: Any):
        super().__init__(**kwargs)
        self.plan = plan

    def question(self, context, timeout_minutes: float) -> tuple[str, str, dict[str, Any]]:
        if not self.plan:
            raise AirflowFailException(f"{self.task_id}: no rebuild plan (the preflight's result is empty): "
                                       "nothing to approve")
        return rebuild_question(self.cluster_name, self.plan, timeout_minutes=timeout_minutes)
