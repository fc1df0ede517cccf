"""Runners: where DB-host commands run. One argv list in, streamed output and an exit code out.

`local`: the task itself runs on the DB host (routed there by the cluster's Airflow worker queue).
Commands run in their own process group so a timeout or a cancelled task kills the whole tree.
`ssh`: the task runs on any worker and executes the argv on the DB host through the ssh provider's
connection (``runner.ssh_conn_id``); the remote command runs under coreutils ``timeout`` in its own
process group, and a cancel or a lost timeout kills that group over a second channel.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pgops.inventory import Cluster
from pgops.inventory import Runner as RunnerSpec

log = logging.getLogger(__name__)

# What a DB-host child process gets from us: a fixed PATH, the locale, and exactly the variables the caller
# names (AWS credentials for barman-cloud, PGPASSWORD ...). Never the worker's own environment: in a
# deployment that holds Airflow's Fernet key, JWT secret and database URLs, and a PostgreSQL started with it
# would hand them to any superuser through pg_read_file('/proc/self/environ').
# A server that pgops starts again (the stop-writes restart) is the exception: it gets exactly the environment it
# ran with before (exact_env=True), nothing of this one added, not even the locale.
CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PASSED_THROUGH = ("LANG", "LANGUAGE", "TZ")


def child_env(extra: dict[str, str] | None = None, *, user: str | None = None) -> dict[str, str]:
    """The whole environment of a DB-host child process: PATH, LANG/LC_*, HOME of ``user``, plus ``extra``."""
    env = {"PATH": CHILD_PATH}
    for key, value in os.environ.items():
        if key in _PASSED_THROUGH or key.startswith("LC_"):
            env[key] = value
    if user:
        import pwd

        try:
            pw = pwd.getpwnam(user)
            env.update(HOME=pw.pw_dir, USER=user, LOGNAME=user)
        except KeyError:
            pass
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


class CommandFailed(RuntimeError):
    def __init__(self, message: str, *, returncode: int | None, output_tail: str):
        super().__init__(message)
        self.returncode = returncode
        self.output_tail = output_tail


class CommandTimeout(CommandFailed):
    pass


class RunnerUnavailable(RuntimeError):
    """The runner could not reach the host (network, sshd down): a retry may help."""


class RunnerAccessDenied(RuntimeError):
    """Authentication failed or the host key is unknown or changed: only a human can fix it."""


@dataclass
class CommandResult:
    argv: list[str]
    returncode: int
    stdout: str
    duration_s: float
    output_tail: list[str] = field(default_factory=list)


class Runner:
    """Base class: run an argv list on the DB host."""

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float = 3600,
            capture: bool = False, check: bool = True, on_line: Callable[[str], None] | None = None,
            exact_env: bool = False) -> CommandResult:
        """Run argv with exactly ``env`` (plus PATH and the locale: child_env) on the DB host.

        exact_env=True: ``env`` is the whole environment, with nothing added (no PATH, locale or HOME of ours; a
        user switch keeps it as it is): what a restarted server must get, the environment it ran with before.
        """
        raise NotImplementedError

    def kill(self) -> None:
        """Kill the running command (called from an operator's on_kill)."""


class LocalRunner(Runner):
    def __init__(self, *, run_as: str | None = None):
        self.run_as = run_as
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _argv(self, argv: Sequence[str], *, exact_env: bool = False) -> list[str]:
        argv = [str(a) for a in argv]
        if self.run_as and os.geteuid() == 0 and _current_user() != self.run_as:
            # runuser passes our environment through (secrets stay out of argv) and sets HOME to the user's own;
            # with -m it sets nothing (an exact environment stays exact). Found on our PATH, not on the child's.
            runuser = shutil.which("runuser", path=CHILD_PATH) or "runuser"
            return [runuser, "-u", self.run_as, *(["-m"] if exact_env else []), "--", *argv]
        return argv

    def run(self, argv, *, env=None, timeout_s=3600, capture=False, check=True, on_line=None,
            exact_env=False) -> CommandResult:
        cmd = self._argv(argv, exact_env=exact_env)
        switched = len(cmd) > len(argv)  # runuser in front
        full_env = ({k: str(v) for k, v in (env or {}).items()} if exact_env
                    else child_env(env, user=self.run_as if switched else _current_user()))
        log.info("running: %s", _shown(argv))
        started = time.monotonic()
        tail: deque[str] = deque(maxlen=40)
        captured: list[str] = []
        with self._lock:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE if capture else subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=full_env, start_new_session=True, text=True,
                                          errors="replace", cwd="/")
        proc = self._proc
        timed_out = threading.Event()

        def _watchdog() -> None:
            if proc.poll() is None:
                timed_out.set()
                _kill_group(proc)

        timer = threading.Timer(timeout_s, _watchdog)
        timer.daemon = True
        timer.start()
        stderr_lines: list[str] = []
        err_thread = None
        if capture:
            def _read_err() -> None:
                for line in proc.stderr:
                    line = line.rstrip("\n")
                    stderr_lines.append(line)
                    tail.append(line)
                    (on_line or log.info)(line)
            err_thread = threading.Thread(target=_read_err, daemon=True)
            err_thread.start()
        try:
            for line in proc.stdout:
                if capture:
                    captured.append(line)
                else:
                    line = line.rstrip("\n")
                    tail.append(line)
                    (on_line or log.info)(line)
            proc.wait()
            if err_thread:
                err_thread.join(timeout=5)
        finally:
            timer.cancel()
            if proc.poll() is None:
                _kill_group(proc)
            with self._lock:
                self._proc = None
        duration_s = time.monotonic() - started
        result = CommandResult(argv=list(map(str, argv)), returncode=proc.returncode, stdout="".join(captured),
                               duration_s=duration_s, output_tail=list(tail))
        if timed_out.is_set():
            raise CommandTimeout(f"{argv[0]} timed out after {timeout_s:.0f} s and was killed; last output: "
                                 f"{_last(tail)}", returncode=proc.returncode, output_tail="\n".join(tail))
        if check and proc.returncode != 0:
            raise CommandFailed(f"{os.path.basename(str(argv[0]))} failed with exit code {proc.returncode}: {_last(tail)}",
                                returncode=proc.returncode, output_tail="\n".join(tail))
        return result

    def kill(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            log.warning("killing %s (pid %s) and its children", proc.args[0], proc.pid)
            _kill_group(proc)


def _last(tail: deque[str] | list[str], n: int = 5) -> str:
    lines = [line for line in tail if line.strip()][-n:]
    return " | ".join(lines) if lines else "(no output)"


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait(timeout=grace_s)


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _shown(argv: Sequence[str]) -> str:
    """The command as logged: a long inline script (sh -c ...) is shortened to its first line."""
    words = [str(a) for a in argv]
    if len(words) > 2 and words[0] == "sh" and words[1] == "-c" and len(words[2]) > 80:
        first = next((line for line in words[2].splitlines() if line.strip()), "")
        words[2] = first.strip()[:60] + " ..."
    return " ".join(words)


def get_runner(cluster: Cluster) -> Runner:
    """The cluster's runner (the primary's host and the restore host)."""
    return runner_from_spec(cluster.runner, cluster.name)


def runner_from_spec(spec: RunnerSpec, cluster_name: str) -> Runner:
    if spec.kind == "local":
        return LocalRunner(run_as=spec.run_as)
    if spec.kind == "ssh":
        return SshRunner(ssh_conn_id=spec.ssh_conn_id, run_as=spec.run_as, cluster_name=cluster_name)
    raise NotImplementedError(f"cluster {cluster_name!r}: runner kind {spec.kind!r} is not available. "
                              "Fix: use runner.kind local (a worker queue on the DB host) or ssh")


# --- ssh ----------------------------------------------------------------------------------------------------
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PID_MARKER = "pgops-remote-pid "
KILL_GRACE_S = 10
# Runs on the DB host: environment from stdin (never argv: the remote process list is public), then
# `timeout` (which makes its own process group, pgid = $$) so the timeout and a kill reach the whole tree.
_READ_ENV = 'while IFS= read -r line; do [ -z "$line" ] && break; export "$line"; done; '
_EXEC = ('printf "%s%s\\n" "' + PID_MARKER + '" "$$"; '
         'secs=$1; shift; '
         'exec timeout --kill-after=' + str(KILL_GRACE_S) + ' "$secs" "$@" </dev/null')
REMOTE_SCRIPT = _READ_ENV + 'cd / || exit 125; ' + _EXEC
# exact_env: started by `env -i`, the script leaves for / before it reads the environment and drops the shell's own
# PWD/OLDPWD, so the command gets the given environment and nothing else (no variable of the login session; no PATH
# unless given: the shell's default search path finds timeout).
REMOTE_SCRIPT_EXACT = 'cd / || exit 125; unset OLDPWD PWD; ' + _READ_ENV + _EXEC


class SshRunner(Runner):
    """Run the argv on the DB host through an Airflow SSH connection (``apache-airflow-providers-ssh``).

    Host keys are checked (the connection's ``host_key`` extra or the worker's known_hosts); an unknown
    key is refused unless the connection sets ``no_host_key_check: true``.
    """

    def __init__(self, *, ssh_conn_id: str, run_as: str | None = None, cluster_name: str = "?",
                 connect_timeout_s: int = 20):
        self.ssh_conn_id = ssh_conn_id
        self.run_as = run_as
        self.cluster_name = cluster_name
        self.connect_timeout_s = connect_timeout_s
        self.remote_pid: int | None = None
        self._client = None
        self._chan = None
        self._lock = threading.Lock()
        self._where = f"connection {ssh_conn_id!r}"

    # -- connecting ------------------------------------------------------------------------------------------
    def _connect(self):
        import paramiko
        from airflow.providers.ssh.hooks.ssh import SSHHook

        # One attempt: the hook's own retries would repeat an auth failure three times; task retries cover
        # a host that is briefly down.
        hook = SSHHook(ssh_conn_id=self.ssh_conn_id, conn_timeout=self.connect_timeout_s, cmd_timeout=None,
                       conn_retry_attempts=1)
        target = f"{hook.username}@{hook.remote_host}:{hook.port}"
        self._where = f"{target} (connection {self.ssh_conn_id!r})"
        if self.run_as and self.run_as != hook.username:
            raise RunnerAccessDenied(
                f"cluster {self.cluster_name!r}: runner.run_as is {self.run_as!r} but SSH connection "
                f"{self.ssh_conn_id!r} logs in as {hook.username!r}. Fix: log in as {self.run_as!r} (the "
                "connection's login) or remove runner.run_as from the inventory")
        try:
            return hook.get_conn()
        except paramiko.BadHostKeyException as exc:
            raise RunnerAccessDenied(
                f"cluster {self.cluster_name!r}: host key mismatch for {target}: the server presented "
                f"{exc.key.get_name()} {_fingerprint(exc.key)}, the connection expects {_fingerprint(exc.expected_key)}. "
                "This is either a re-keyed host or a man in the middle. Fix: verify the host's key out of band, "
                f"then update extra.host_key of connection {self.ssh_conn_id!r} (or the worker's known_hosts)"
            ) from None
        except paramiko.AuthenticationException as exc:
            raise RunnerAccessDenied(
                f"cluster {self.cluster_name!r}: SSH authentication as {target} failed ({exc}). Fix: add the "
                f"public half of connection {self.ssh_conn_id!r}'s key (extra.private_key or extra.key_file) "
                f"to ~{hook.username}/.ssh/authorized_keys on the DB host, or correct the connection's login/key"
            ) from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise RunnerAccessDenied(
                    f"cluster {self.cluster_name!r}: the host key of {target} is unknown, and unknown host keys "
                    f"are refused. Fix: put the host's public key in extra.host_key of connection "
                    f"{self.ssh_conn_id!r} (e.g. from 'ssh-keyscan -p {hook.port} {hook.remote_host}', checked out "
                    "of band) or in the worker's ~/.ssh/known_hosts; only for throw-away hosts set extra "
                    "no_host_key_check: true") from None
            raise RunnerUnavailable(f"cluster {self.cluster_name!r}: SSH to {target} failed: {exc}") from None
        except (TimeoutError, OSError, EOFError) as exc:
            raise RunnerUnavailable(f"cluster {self.cluster_name!r}: cannot reach {target} over SSH ({exc}). "
                                    "Fix: check that sshd runs there and the worker can reach the port") from None

    # -- running ---------------------------------------------------------------------------------------------
    def remote_command(self, argv: Sequence[str], timeout_s: float, *, exact_env: bool = False) -> str:
        """The command line sshd hands to the login shell: every word quoted by shlex.join. exact_env: the script
        starts from an empty environment (env -i), so the login session's variables do not reach the command."""
        secs = max(1, int(round(timeout_s)))
        head = ["env", "-i", "sh", "-c", REMOTE_SCRIPT_EXACT] if exact_env else ["sh", "-c", REMOTE_SCRIPT]
        return shlex.join([*head, "pgops-runner", f"{secs}s", *map(str, argv)])

    def run(self, argv, *, env=None, timeout_s=3600, capture=False, check=True, on_line=None,
            exact_env=False) -> CommandResult:
        argv = [str(a) for a in argv]
        env_block = _env_block(env or {})
        emit = on_line or log.info
        client = self._connect()
        log.info("running on %s: %s%s", self._where, _shown(argv),
                 f" (environment: {', '.join(sorted(env))})" if env else "")
        started = time.monotonic()
        tail: deque[str] = deque(maxlen=40)
        captured: list[str] = []
        timed_out = threading.Event()
        self.remote_pid = None
        try:
            chan = client.get_transport().open_session(timeout=self.connect_timeout_s)
            if not capture:
                chan.set_combine_stderr(True)
            chan.exec_command(self.remote_command(argv, timeout_s, exact_env=exact_env))
            chan.sendall(env_block)
            chan.shutdown_write()
            with self._lock:
                self._client, self._chan = client, chan

            def _watchdog() -> None:  # the remote `timeout` should have fired; the link may be hung
                if not chan.exit_status_ready():
                    timed_out.set()
                    self.kill()
                    chan.close()

            timer = threading.Timer(timeout_s + 2 * KILL_GRACE_S + 5, _watchdog)
            timer.daemon = True
            timer.start()
            err_thread = None
            if capture:
                def _read_err() -> None:
                    for raw in chan.makefile_stderr("rb"):
                        line = raw.decode(errors="replace").rstrip("\n")
                        tail.append(line)
                        emit(line)
                err_thread = threading.Thread(target=_read_err, daemon=True)
                err_thread.start()
            try:
                for raw in chan.makefile("rb"):
                    text = raw.decode(errors="replace")
                    if self.remote_pid is None and text.startswith(PID_MARKER):
                        self.remote_pid = int(text[len(PID_MARKER):].strip())
                        continue
                    if capture:
                        captured.append(text)
                    else:
                        line = text.rstrip("\n")
                        tail.append(line)
                        emit(line)
                returncode = chan.recv_exit_status()
                if err_thread:
                    err_thread.join(timeout=5)
            finally:
                timer.cancel()
        finally:
            with self._lock:
                self._client, self._chan = None, None
            client.close()
        duration_s = time.monotonic() - started
        # timeout(1) exits 124 when it sent TERM, 137 when the grace ran out and it sent KILL.
        if returncode in (124, 137) and duration_s >= timeout_s - 1:
            timed_out.set()
        result = CommandResult(argv=argv, returncode=returncode, stdout="".join(captured), duration_s=duration_s,
                               output_tail=list(tail))
        if timed_out.is_set():
            raise CommandTimeout(f"{argv[0]} on {self._where} timed out after {timeout_s:.0f} s and was killed; "
                                 f"last output: {_last(tail)}", returncode=returncode, output_tail="\n".join(tail))
        if returncode == 125 and self.remote_pid is None:
            raise CommandFailed(f"the remote wrapper could not start {argv[0]} on {self._where}: {_last(tail)}",
                                returncode=returncode, output_tail="\n".join(tail))
        if check and returncode != 0:
            raise CommandFailed(f"{os.path.basename(argv[0])} failed on {self._where} with exit code {returncode}: "
                                f"{_last(tail)}", returncode=returncode, output_tail="\n".join(tail))
        return result

    def kill(self) -> None:
        """Kill the remote process group (TERM, then KILL after a grace) over a second channel."""
        with self._lock:
            client, pid = self._client, self.remote_pid
        if client is None or not pid:
            return
        log.warning("killing remote process group %s on %s", pid, self._where)
        # dash's kill takes "-SIG -PGID" (no "--", no "-s"): a negative pid is the process group.
        script = (f"kill -TERM -{pid} 2>/dev/null || exit 0; "
                  f"i=0; while kill -0 -{pid} 2>/dev/null && [ $i -lt {KILL_GRACE_S * 10} ]; do "
                  "sleep 0.1; i=$((i+1)); done; "
                  f"kill -KILL -{pid} 2>/dev/null; exit 0")
        try:
            chan = client.get_transport().open_session(timeout=self.connect_timeout_s)
            chan.exec_command(shlex.join(["sh", "-c", script]))
            chan.recv_exit_status()
            chan.close()
        except Exception as exc:  # the link is gone: the remote `timeout` still bounds the process
            log.warning("could not kill remote process group %s on %s: %s", pid, self._where, exc)


def _env_block(env: dict[str, str]) -> bytes:
    lines = []
    for key, value in env.items():
        value = str(value)
        if not ENV_NAME_RE.match(key):
            raise ValueError(f"environment variable name {key!r} is not valid for the remote shell")
        if "\n" in value or "\0" in value:
            raise ValueError(f"environment variable {key} has a newline or NUL; it cannot be passed to the remote host")
        lines.append(f"{key}={value}\n")
    return ("".join(lines) + "\n").encode()


def _fingerprint(key) -> str:
    import base64
    import hashlib

    if key is None:
        return "(none)"
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
