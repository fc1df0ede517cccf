"""pgops.core.params: the run-time checks of trigger-form params, and the standby settings schema as Airflow applies it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pgops.core import params as p

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("name", ["restore_command", "archive_command", "archive_cleanup_command",
                                  "recovery_end_command", "archive_library", "shared_preload_libraries",
                                  "session_preload_libraries", "local_preload_libraries", "primary_conninfo",
                                  "primary_slot_name", "data_directory", "hba_file", "ident_file", "config_file",
                                  "dynamic_library_path", "ssl_cert_file", "ssl_key_file", "ssl_ca_file",
                                  "ssl_crl_dir", "listen_addresses", "Shared_Buffers", "", "shared_buffers "])
def test_settings_refuse_names_off_the_allowlist(name):
    with pytest.raises(p.ParamRefused) as err:
        p.check_settings({name: "x"})
    text = str(err.value)
    assert text.startswith("param settings=") and repr(name) in text and "Fix: remove it" in text


def test_settings_refusal_says_why_for_commands_and_libraries():
    assert "runs a shell command" in str(pytest.raises(p.ParamRefused, p.check_settings, {"restore_command": "sh"}).value)
    assert "loads code" in str(pytest.raises(p.ParamRefused, p.check_settings,
                                             {"shared_preload_libraries": "x"}).value)


@pytest.mark.parametrize("value", ["256MB\nrestore_command = 'sh'", "a\x00b", "a\rb", "it's", "back\\slash",
                                   "x" * 257, True, None, float("nan"), float("inf"), [1], {"a": 1}])
def test_settings_refuse_unsafe_values(value):
    with pytest.raises(p.ParamRefused, match=r"param settings\.work_mem=.*Fix: "):
        p.check_settings({"work_mem": value})


def test_settings_accept_plain_values_as_text():
    assert p.check_settings({"work_mem": "64MB", "max_connections": 200, "random_page_cost": 1.1,
                             "hot_standby_feedback": "on"}) == {
        "work_mem": "64MB", "max_connections": "200", "random_page_cost": "1.1", "hot_standby_feedback": "on"}
    assert p.check_settings({}) == {} and p.check_settings(None) == {}
    with pytest.raises(p.ParamRefused, match="is not an object"):
        p.check_settings("work_mem=1MB")


def test_settings_schema_refuses_the_same_in_airflows_param_validation():
    from airflow.sdk import Param
    from airflow.sdk.definitions.param import ParamValidationError

    def valid(value) -> bool:
        try:
            Param({}, **p.SETTINGS_SCHEMA).resolve(value)
        except ParamValidationError:
            return False
        return True

    assert valid({"work_mem": "64MB", "max_connections": 200})
    for bad in ({"restore_command": "curl x|sh"}, {"archive_command": "x"}, {"shared_preload_libraries": "x"},
                {"work_mem": "1MB\nrestore_command='sh'"}, {"work_mem": "a\x00"}, {"work_mem": "it's"},
                {"work_mem": True}, {"data_directory": "/var/lib/postgresql/15//main"}):
        assert not valid(bad), bad
    for name in p.SETTINGS_ALLOWLIST:  # schema and run-time check agree on every allowed name
        assert valid({name: "1"}) and p.check_settings({name: "1"}) == {name: "1"}


@pytest.mark.parametrize("target", ["latest", "canary", "LATEST", "0/3000060", "1234", None, ""])
def test_target_time_ignores_targets_that_are_not_times(target):
    assert p.check_target_time(target, now=NOW) is None


def test_target_time_refuses_the_future_and_names_the_fix():
    past = (NOW - timedelta(hours=1)).isoformat()
    assert p.check_target_time(past, now=NOW) == NOW - timedelta(hours=1)
    assert p.check_target_time((NOW + timedelta(seconds=30)).isoformat(), now=NOW)  # clock skew
    with pytest.raises(p.ParamRefused) as err:
        p.check_target_time("2999-01-01T00:00:00Z", now=NOW)
    assert "param target='2999-01-01T00:00:00Z' is in the future" in str(err.value)
    assert "Fix: give a time in the past, or 'latest'" in str(err.value)
    with pytest.raises(p.ParamRefused, match="no time zone"):
        p.check_target_time("2024-01-01T00:00:00", now=NOW)
    with pytest.raises(p.ParamRefused, match="not an ISO 8601 time"):
        p.check_target_time("2024-13-45T00:00:00Z", now=NOW)


@pytest.mark.parametrize("value", [10**30, "1e400", float("inf"), -1, True, "soon", None, [60]])
def test_duration_refuses_unbounded_and_wrong_values(value):
    with pytest.raises(p.ParamRefused, match=r"param recovery_timeout_s=.*Fix: give"):
        p.check_duration("recovery_timeout_s", value, p.MAX_RECOVERY_TIMEOUT_S, min_s=60)


def test_duration_accepts_numbers_and_rendered_text():
    assert p.check_duration("timeout_s", "3600", p.MAX_STANDBY_TIMEOUT_S) == 3600.0
    assert p.check_duration("timeout_s", 60, 60) == 60.0
    timedelta(seconds=p.check_duration("timeout_s", p.MAX_STANDBY_TIMEOUT_S, p.MAX_STANDBY_TIMEOUT_S))


def test_number_and_future_time_and_dir():
    assert p.check_number("horizon_days", "90", minimum=1, maximum=p.MAX_HORIZON_DAYS, integer=True) == 90
    with pytest.raises(p.ParamRefused, match="not a whole number"):
        p.check_number("horizon_days", 1.5, minimum=1, maximum=10, integer=True)
    assert p.check_future_time("cutover_at", None, max_ahead_s=60) is None
    with pytest.raises(p.ParamRefused, match="more than 30 days ahead"):
        p.check_future_time("cutover_at", "9999-12-31T00:00:00+00:00", max_ahead_s=30 * p.DAY_S, now=NOW)
    assert p.check_abs_dir("scratch_root", "/var/tmp/pgops-restore/") == "/var/tmp/pgops-restore"
    for bad in ("/var/tmp/../lib/postgresql", "/var//tmp", "relative", "/tmp/a\nb", "/tmp/a\x00", "/tmp/.", "/a b"):
        with pytest.raises(p.ParamRefused, match="scratch_root"):
            p.check_abs_dir("scratch_root", bad)
