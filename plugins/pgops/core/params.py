"""Run-time checks of trigger-form params (pure: no Airflow, no I/O), and the JSON-schema pieces the DAGs share.

A DAG's Param schema refuses bad values in the trigger form, before a run exists. A run created through the
REST API with a crafted conf, or a value the schema cannot judge (a time compared with now), reaches the
operators anyway: they call these functions again before any side effect. Every refusal names the param,
the value and the fix.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

# -- bounds shared by the Param schemas and the run-time checks --------------------------------------------
DAY_S = 86400
MAX_RECOVERY_TIMEOUT_S = 7 * DAY_S  # a restore that replays for more than a week is not a verification
MAX_STANDBY_TIMEOUT_S = 7 * DAY_S
MAX_HORIZON_DAYS = 3650
MAX_REQUIRED_BYTES = 2**50  # 1 PiB: far above any scratch disk, far below an overflow
MAX_DOWNTIME_TARGET_MINUTES = 24 * 60
MAX_COPY_TIME_MINUTES = 7 * 24 * 60
MAX_CUTOVER_AHEAD_DAYS = 30  # cutover_at: the chain keeps snapshotting until then
MAX_VOLUME_SIZE_GIB = 64 * 1024  # EBS io2 Block Express maximum
MAX_THROUGHPUT_MIB_S = 10_000
MAX_LAG_BYTES = 2**50
# A restore target a little ahead of this worker's clock is clock skew between hosts, not the future.
TARGET_CLOCK_SKEW_S = 60



def whole(pattern: str) -> str:
    """A Param pattern that matches whole values only. JSON Schema patterns are searched (jsonschema calls
    re.search) and Python's '$' also matches before a final newline, so '^x$' lets 'x\\n' through the trigger form;
    '(?!\\n)$' refuses it in Python and is plain '$' in the browser's JavaScript."""
    if not (pattern.startswith("^") and pattern.endswith("$")):
        raise ValueError(f"pattern {pattern!r} must be anchored with ^ and $")
    return pattern[:-1] + r"(?!\n)$"


# Values written into a PostgreSQL config file: one line, no quote or backslash to escape, no control bytes.
SETTING_VALUE_PATTERN = whole(r"^[^\x00-\x1f\x7f'\\]{0,256}$")
_SETTING_VALUE_RE = re.compile(SETTING_VALUE_PATTERN)
# Recovery and resource settings a rebuilt standby may get on top of pgops' own. Nothing here names a command,
# a library, a file, a directory or the connection to the primary: those stay pgops' (or the inventory's).
SETTINGS_ALLOWLIST: tuple[str, ...] = (
    # recovery and standby behaviour
    "hot_standby", "hot_standby_feedback", "max_standby_archive_delay", "max_standby_streaming_delay",
    "recovery_min_apply_delay", "recovery_prefetch", "recovery_target_timeline", "wal_receiver_status_interval",
    "wal_receiver_timeout", "wal_retrieve_retry_interval", "wal_decode_buffer_size",
    # resources
    "shared_buffers", "huge_pages", "temp_buffers", "work_mem", "maintenance_work_mem", "autovacuum_work_mem",
    "logical_decoding_work_mem", "effective_cache_size", "effective_io_concurrency", "maintenance_io_concurrency",
    "max_connections", "max_worker_processes", "max_parallel_workers", "max_parallel_workers_per_gather",
    "max_parallel_maintenance_workers", "max_locks_per_transaction", "max_pred_locks_per_transaction",
    "max_prepared_transactions", "max_wal_senders", "max_replication_slots", "wal_buffers", "max_wal_size",
    "min_wal_size", "checkpoint_timeout", "checkpoint_completion_target", "temp_file_limit", "random_page_cost",
    "seq_page_cost", "statement_timeout", "idle_in_transaction_session_timeout", "log_min_duration_statement",
)
# Named in refusals, so the reader learns why a familiar setting is not on the list.
_FORBIDDEN_HINTS = (
    (re.compile(r"_command$"), "runs a shell command as the postgres OS user"),
    (re.compile(r"^archive_library$|_preload_libraries$|^dynamic_library_path$"), "loads code into the server"),
    (re.compile(r"^primary_(conninfo|slot_name)$"), "is set by pgops from the inventory's node and slot"),
    (re.compile(r"^(data_directory|hba_file|ident_file|config_file|external_pid_file)$"),
     "names a file or directory pgops takes from the inventory"),
    (re.compile(r"^ssl_.*(file|dir)$"), "names a file on the DB host"),
)


def settings_schema() -> dict[str, Any]:
    """JSON schema of the standby rebuild's `settings` param: allowlisted names, one-line values."""
    return {
        "type": "object",
        "propertyNames": {"enum": list(SETTINGS_ALLOWLIST)},
        "additionalProperties": {"type": ["string", "number"], "pattern": SETTING_VALUE_PATTERN},
        "maxProperties": len(SETTINGS_ALLOWLIST),
    }


SETTINGS_SCHEMA = settings_schema()


class ParamRefused(ValueError):
    """A param value pgops will not act on; the message names the param, the value and the fix."""


def refusal(name: str, value: Any, problem: str, fix: str) -> ParamRefused:
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "...'"
    return ParamRefused(f"param {name}={shown} {problem}. Fix: {fix}")


def check_settings(settings: Any) -> dict[str, str]:
    """Extra postgresql.conf settings as {name: value text}, each name allowlisted and each value one safe line.

    Refuses (ParamRefused) command, library, file and connection settings, values with a newline, NUL, other
    control characters, a quote or a backslash, booleans, NaN and infinities.
    """
    if settings is None or settings == "":
        return {}
    if not isinstance(settings, dict):
        raise refusal("settings", settings, "is not an object", 'give {"name": "value", ...} or {}')
    out: dict[str, str] = {}
    for name, value in settings.items():
        if not isinstance(name, str) or name not in SETTINGS_ALLOWLIST:
            why = next((w for rx, w in _FORBIDDEN_HINTS if isinstance(name, str) and rx.search(name.lower())),
                       "is not a recovery or resource setting pgops lets a trigger change")
            raise refusal("settings", {name: value}, f"names {name!r}, which {why}",
                          f"remove it; allowed: {', '.join(SETTINGS_ALLOWLIST)}")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise refusal(f"settings.{name}", value, "is not a string or a number",
                          "give the value as PostgreSQL writes it, e.g. '256MB', 'on' or 4")
        if isinstance(value, float) and not math.isfinite(value):
            raise refusal(f"settings.{name}", value, "is not a finite number", "give a finite number")
        text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
        if not _SETTING_VALUE_RE.fullmatch(text):
            raise refusal(f"settings.{name}", value, "holds a newline, NUL, control character, quote or backslash, "
                          "or is longer than 256 characters", "give one plain value like '256MB' or '30s'")
        out[name] = text
    return out


def check_duration(name: str, value: Any, max_s: float, *, min_s: float = 0) -> float:
    """A duration param in seconds (an int, a float or their text), within [min_s, max_s]."""
    number = _number(name, value, "a number of seconds")
    if not min_s <= number <= max_s:
        raise refusal(name, value, f"is outside {min_s:g}..{max_s:g} seconds",
                      f"give between {min_s:g} and {max_s:g} ({max_s / DAY_S:g} days)")
    return number


def check_number(name: str, value: Any, *, minimum: float, maximum: float, integer: bool = False) -> float | int:
    """A bounded numeric param (sizes, counts, days)."""
    number = _number(name, value, "an integer" if integer else "a number")
    if integer and number != int(number):
        raise refusal(name, value, "is not a whole number", f"give an integer from {minimum:g} to {maximum:g}")
    if not minimum <= number <= maximum:
        raise refusal(name, value, f"is outside {minimum:g}..{maximum:g}", f"give a value from {minimum:g} to {maximum:g}")
    return int(number) if integer else number


def _number(name: str, value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise refusal(name, value, f"is a boolean, not {what}", f"give {what}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise refusal(name, value, f"is not {what}", f"give {what}") from None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise refusal(name, value, f"is not {what}", f"give {what}")
    return float(value)


def parse_time(name: str, value: Any) -> datetime:
    """An ISO 8601 time with a zone, as an aware datetime."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and len(value) <= 64:
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise refusal(name, value, "is not an ISO 8601 time", "write e.g. 2025-01-05T02:00:00+00:00") from None
    else:
        raise refusal(name, value, "is not an ISO 8601 time", "write e.g. 2025-01-05T02:00:00+00:00")
    if parsed.utcoffset() is None:
        raise refusal(name, value, "has no time zone, so it is ambiguous", "add +00:00 (or Z)")
    return parsed


def check_target_time(target: Any, *, now: datetime | None = None, name: str = "target",
                      skew_s: float = TARGET_CLOCK_SKEW_S) -> datetime | None:
    """A restore target: None for latest/canary/an LSN/an xid; for a timestamp, the time, refused when in the future.

    A target in the future would fail only after the whole download and replay (recovery never reaches it).
    """
    if target is None:
        return None
    text = str(target).strip()
    if text.lower() in ("", "latest", "canary") or re.fullmatch(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", text) \
            or re.fullmatch(r"\d{1,10}", text):
        return None
    when = parse_time(name, text)
    now = now or datetime.now(UTC)
    if when > now + timedelta(seconds=skew_s):
        raise refusal(name, target, f"is in the future (now is {now.astimezone(UTC).isoformat(timespec='seconds')}): "
                      "recovery would replay every archived segment and never reach it",
                      "give a time in the past, or 'latest' for the end of the archived WAL")
    return when


def check_future_time(name: str, value: Any, *, max_ahead_s: float, now: datetime | None = None) -> datetime | None:
    """An optional time the run waits for (cutover_at): None when empty; refused when further ahead than allowed."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    when = parse_time(name, value)
    now = now or datetime.now(UTC)
    if when > now + timedelta(seconds=max_ahead_s):
        raise refusal(name, value, f"is more than {max_ahead_s / DAY_S:g} days ahead",
                      f"give a time within {max_ahead_s / DAY_S:g} days, or trigger the run later")
    return when


# An absolute directory: plain path components, no '.' or '..', no doubled slash, no control characters.
ABS_DIR_PATTERN = whole(r"^(?!.*/\.{1,2}(/|$))(/[A-Za-z0-9._+@=,-]+)+/?$")
_ABS_DIR_RE = re.compile(ABS_DIR_PATTERN)
# A backup id (barman-cloud's 20250105T020000), a backup name, or latest.
BACKUP_ID_PATTERN = whole(r"^[A-Za-z0-9_.:-]{1,100}$")
_BACKUP_ID_RE = re.compile(BACKUP_ID_PATTERN)

# -- trigger-form help --------------------------------------------------------------------------------------
# Airflow refuses a value that fails a Param's `pattern` with jsonschema's own words ("'x' does not match
# '^...'"): jsonschema has no custom messages (no errorMessage keyword) and the form shows the Param's
# description under the field. So a regex-checked param's description says what it accepts and the fix, and the
# run-time checks here say it again with the param and the value.
ABS_DIR_HELP = ("an absolute directory of plain components (letters, digits and ._+@=,- between single slashes; "
                "no '.', '..', '//', spaces or control characters). Fix: give a path like /var/tmp/pgops-restore")
BACKUP_ID_HELP = ("a backup id or name from the catalog (up to 100 letters, digits and _.:-), or latest for the "
                  "newest DONE backup. Fix: copy an id from barman-cloud-backup-list, e.g. 20250105T020000, or "
                  "give latest")
SETTINGS_HELP = ('{"name": "value", ...}: recovery and resource settings only (hot_standby_feedback, '
                 "shared_buffers, work_mem, max_connections ...; never a command, library, file or connection), "
                 "each value one line without quotes or backslashes. Fix: drop other names; give values as "
                 "PostgreSQL writes them, e.g. '256MB', 'on' or 4")


def check_abs_dir(name: str, value: Any) -> str:
    """An absolute directory path made of plain components (refuses '..', '//', newlines, NUL, spaces)."""
    if not isinstance(value, str) or len(value) > 1024 or not _ABS_DIR_RE.fullmatch(value):
        raise refusal(name, value, "is not a plain absolute directory (no '..', '.', '//', spaces or control "
                      "characters)", "give a path like /var/tmp/pgops-restore")
    return value.rstrip("/") or "/"


def check_backup_id(name: str, value: Any) -> str:
    """A backup id or name from the catalog, or latest (refuses paths, spaces, newlines, over 100 characters).

    A name of digits only reaches a task as an int (the DAGs render templates as native objects): it is taken
    back as its text."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else value
    if not isinstance(text, str) or not _BACKUP_ID_RE.fullmatch(text):
        raise refusal(name, value, "is not a backup id, a backup name or latest (up to 100 letters, digits and "
                      "_.:-)", "copy an id from barman-cloud-backup-list, e.g. 20250105T020000, or give latest")
    return text
