"""Runners: where DB-host commands run. One argv list in, streamed output and an exit code out.

`local`: the task itself runs on the DB host (routed there by the cluster's Airflow worker queue).
Commands run in their own process group so a timeout or a cancelled task kills the whole tree.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pgops.inventory import Cluster

log = logging.getLogger(__name__)


class CommandFailed(RuntimeError):
    def __init__(self, message: str, *, returncode: int | None, output_tail: str):
        super().__init__(message)
        self.returncode = returncode
        self.output_tail = output_tail


class CommandTimeout(CommandFailed):
    pass


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
            capture: bool = False, check: bool = True, on_line: Callable[[str], None] | None = None) -> CommandResult:
        raise NotImplementedError

    def kill(self) -> None:
        """Kill the running command (called from an operator's on_kill)."""


class LocalRunner(Runner):
    def __init__(self, *, run_as: str | None = None):
        self.run_as = run_as
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _argv(self, argv: Sequence[str]) -> list[str]:
        argv = [str(a) for a in argv]
        if self.run_as and os.geteuid() == 0 and _current_user() != self.run_as:
            # runuser passes our environment through (secrets stay out of argv) and sets HOME to the user's own.
            return ["runuser", "-u", self.run_as, "--", *argv]
        return argv

    def run(self, argv, *, env=None, timeout_s=3600, capture=False, check=True, on_line=None) -> CommandResult:
        full_env = {**os.environ, **(env or {})}
        cmd = self._argv(argv)
        shown = " ".join(str(a) for a in argv)
        log.info("running: %s", shown)
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


def get_runner(cluster: Cluster) -> Runner:
    if cluster.runner.kind == "local":
        return LocalRunner(run_as=cluster.runner.run_as)
    raise NotImplementedError(f"cluster {cluster.name!r}: runner kind {cluster.runner.kind!r} is not available yet. "
                              "Fix: use runner.kind: local with an Airflow worker queue on the DB host")
