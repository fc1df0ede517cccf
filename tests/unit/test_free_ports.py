"""Lab ports come from outside the kernel's ephemeral range, so a client socket cannot take one before its server binds it."""

import socket
import subprocess
import sys

from pgops.dbhost.host import FREE_PORT_PY
from pgops.dbhost.procs import _ephemeral_range, free_port, free_ports


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range():
    lo, hi = _ephemeral_range()
    ports = free_ports(11)
    assert len(set(ports)) == 11
    for port in ports:
        assert not lo <= port <= hi, (port, lo, hi)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    assert not lo <= free_port() <= hi


def test_free_ports_skips_a_port_in_use(monkeypatch):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    try:
        taken = held.getsockname()[1]
        held.listen()
        spare = free_port()
        monkeypatch.setattr("pgops.dbhost.procs._listen_candidates", lambda: [taken, spare])
        assert free_ports(1) == [spare]
    finally:
        held.close()


def test_db_host_free_port_script_answers_a_port_below_the_ephemeral_range():
    lo, hi = _ephemeral_range()
    port = int(subprocess.run([sys.executable, "-c", FREE_PORT_PY], capture_output=True, text=True, check=True).stdout)
    assert not lo <= port <= hi
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
