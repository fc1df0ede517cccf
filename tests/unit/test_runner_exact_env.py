"""A command run with exact_env (the stop-writes restart of a server, with the environment it ran with) gets exactly
the environment it is given: none of the worker's variables, not even the locale and TZ that the runner's minimal
environment (child_env) passes through to every other command; through runuser too, and through the ssh runner's
remote script (run here by a local shell in place of the DB host's login shell)."""

from __future__ import annotations

import os
import pwd
import subprocess

import pytest

from pgops.dbhost.runners import LocalRunner, SshRunner, _env_block

# what the old postmaster ran with (no locale, no TZ)
SERVER_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/srv/pg-home", "PGDATA": "/srv/pg/15/main", "PGOPS_MARK": "old-env"}
WORKER_ONLY = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "LC_MONETARY": "C", "TZ": "Pacific/Chatham",
               "DB_ADMIN_PASSWORD": "sentinel-worker-secret"}


def _environ(stdout: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in stdout.split("\0") if item)


@pytest.fixture
def worker_env(monkeypatch):
    for key, value in WORKER_ONLY.items():
        monkeypatch.setenv(key, value)


def test_exact_env_is_the_whole_environment(worker_env):
    res = LocalRunner().run(["/usr/bin/env", "-0"], env=SERVER_ENV, exact_env=True, capture=True)
    assert _environ(res.stdout) == SERVER_ENV


def test_without_exact_env_the_locale_and_tz_are_passed_through(worker_env):
    # the contrast: every other child gets PATH, the worker's locale and TZ, HOME/USER/LOGNAME, plus what it is given
    got = _environ(LocalRunner().run(["/usr/bin/env", "-0"], env={"PGOPS_MARK": "x"}, capture=True).stdout)
    assert {k: got.get(k) for k in ("LANG", "LC_ALL", "LC_MONETARY", "TZ")} == {
        k: WORKER_ONLY[k] for k in ("LANG", "LC_ALL", "LC_MONETARY", "TZ")}
    assert got["PGOPS_MARK"] == "x" and "DB_ADMIN_PASSWORD" not in got


@pytest.mark.skipif(os.geteuid() != 0, reason="runuser needs root")
def test_exact_env_through_runuser_keeps_home_and_adds_nothing(worker_env):
    user = pwd.getpwnam("postgres")
    res = LocalRunner(run_as="postgres").run(["/usr/bin/env", "-0"], env=SERVER_ENV, exact_env=True, capture=True)
    assert _environ(res.stdout) == SERVER_ENV  # HOME stays the server's, no USER/LOGNAME added
    # the same runner without exact_env: runuser's HOME, USER and LOGNAME are the user's own
    got = _environ(LocalRunner(run_as="postgres").run(["/usr/bin/env", "-0"], capture=True).stdout)
    assert (got["HOME"], got["USER"], got["LOGNAME"], got["LC_ALL"]) == (user.pw_dir, "postgres", "postgres", "C.UTF-8")


def test_ssh_remote_script_with_exact_env_drops_the_login_sessions_variables():
    login_session = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC",
                     "HOME": "/root", "SSH_CONNECTION": "10.0.0.1 5000 10.0.0.2 22", "MAIL": "/var/mail/root"}
    block = _env_block(SERVER_ENV)
    runner = SshRunner(ssh_conn_id="unused")
    exact = subprocess.run(["sh", "-c", runner.remote_command(["env", "-0"], 30, exact_env=True)], input=block,
                           env=login_session, capture_output=True, check=True)
    out = exact.stdout.decode()
    got = _environ(out[out.index("\n") + 1:])  # after the remote pid line
    assert got == SERVER_ENV
    # and a given environment without PATH still finds timeout(1) (the shell's default search path)
    no_path = {k: v for k, v in SERVER_ENV.items() if k != "PATH"}
    res = subprocess.run(["sh", "-c", runner.remote_command(["/usr/bin/env", "-0"], 30, exact_env=True)],
                         input=_env_block(no_path), env=login_session, capture_output=True, check=True)
    out = res.stdout.decode()
    assert _environ(out[out.index("\n") + 1:]) == no_path
    # without exact_env the login session's variables stay (the given ones on top)
    plain = subprocess.run(["sh", "-c", runner.remote_command(["env", "-0"], 30)], input=block, env=login_session,
                           capture_output=True, check=True).stdout.decode()
    got = _environ(plain[plain.index("\n") + 1:])
    assert got["SSH_CONNECTION"] == login_session["SSH_CONNECTION"] and got["PGOPS_MARK"] == "old-env"
