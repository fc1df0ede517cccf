"""The one way operators stop a postmaster (restore teardown, standby rebuild): only a proven one, never a primary
when the caller says standby only, and never a process that postmaster.pid names but that is not its postmaster."""

from __future__ import annotations

import logging

import pytest
from airflow.sdk.exceptions import AirflowFailException

from pgops.airflow.operators.base import stop_proven_postmaster
from pgops.dbhost.host import Postmaster

DATA = "/srv/pg/data"


class FakeHost:
    where = "the worker of queue 'db'"

    def __init__(self, proof: str, stop: str = "stopped", cluster_state: str = "in archive recovery"):
        self.proof, self.stop, self.cluster_state = proof, stop, cluster_state
        self.signalled: list[str] = []

    def postmaster(self, data_dir: str) -> Postmaster:
        return Postmaster(state=self.proof, pid=4242 if self.proof in ("running", "other") else None, data_dir=data_dir)

    def controldata(self, data_dir: str) -> dict[str, str]:
        return {"Database cluster state": self.cluster_state}

    def stop_postmaster(self, data_dir: str, *, mode: str, timeout_s: float) -> Postmaster:
        self.signalled.append(mode)
        return Postmaster(state=self.stop, pid=4242 if self.stop != "none" else None, data_dir=data_dir)


def test_a_proven_postmaster_is_stopped_and_its_pid_returned():
    host = FakeHost("running")
    assert stop_proven_postmaster(host, DATA, mode="immediate", fix="x") == 4242
    assert host.signalled == ["immediate"]
    assert stop_proven_postmaster(FakeHost("running", stop="none"), DATA, mode="fast", fix="x") is None


def test_a_pid_file_naming_another_process_is_refused_with_the_callers_fix():
    with pytest.raises(AirflowFailException) as err:
        stop_proven_postmaster(FakeHost("other", stop="other"), DATA, mode="immediate",
                               fix="remove /var/tmp/s by hand")
    assert str(err.value) == (f"postmaster.pid of {DATA} on the worker of queue 'db' names pid 4242, which is not a "
                              "postmaster of that directory; nothing was signalled or removed. Fix: check what runs "
                              "there, then remove /var/tmp/s by hand")


@pytest.mark.parametrize("proof", ["none", "stale", "nodir"])
def test_standby_only_signals_nothing_when_nothing_runs(proof):
    host = FakeHost(proof)
    assert stop_proven_postmaster(host, DATA, mode="fast", fix="x", standby_only=True) is None
    assert host.signalled == []


def test_standby_only_refuses_a_primary_and_an_unproven_pid_before_any_signal():
    primary = FakeHost("running", cluster_state="in production")
    with pytest.raises(AirflowFailException, match="REFUSED: PostgreSQL \\(pid 4242\\).*'in production', not as a "
                                                   "standby; it is not stopped"):
        stop_proven_postmaster(primary, DATA, mode="fast", fix="x", standby_only=True)
    unproven = FakeHost("other")
    with pytest.raises(AirflowFailException, match="names pid 4242, which is not a postmaster"):
        stop_proven_postmaster(unproven, DATA, mode="fast", fix="x", standby_only=True)
    assert primary.signalled == unproven.signalled == []


def test_standby_only_stops_a_standby_and_says_so(caplog):
    host = FakeHost("running")
    with caplog.at_level(logging.WARNING):
        assert stop_proven_postmaster(host, DATA, mode="fast", fix="x", standby_only=True,
                                      log=logging.getLogger("t")) == 4242
    assert host.signalled == ["fast"] and "stopping PostgreSQL (pid 4242)" in caplog.text
