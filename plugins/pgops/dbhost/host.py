"""DbHost: the one access point to a database host, bound to one node (the primary, a standby, the restore host).

Every question about a DB host's files, processes and ports is answered *on that host*, through the node's
runner (a worker queue on the host itself, or ssh): reading postmaster.pid and server logs, proving that a pid
is the postmaster of a data directory before it is signalled, choosing a free port, free space, realpath,
removing a tree, pg_controldata, and SQL against an instance that only listens on the host's own socket.
Nothing here reads the worker's own filesystem or process table on a DB host's behalf.

Shell snippets take their inputs as positional parameters ("$1" ...), never interpolated into the script.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pgops.dbhost.procs import PG_BIN
from pgops.dbhost.runners import CommandResult, Runner, runner_from_spec
from pgops.inventory import Cluster, ReplicaNode
from pgops.inventory import Runner as RunnerSpec

log = logging.getLogger(__name__)

SIGNALS = {"smart": "TERM", "fast": "INT", "immediate": "QUIT"}  # what pg_ctl stop -m sends
LOG_MARKER = "--pgops-log--"

# prove DIR: sets $state (running | none | stale | other | nodir), $pid and $d (the realpath of DIR).
# "running" only when postmaster.pid's pid is alive, its working directory is DIR's realpath (the postmaster
# chdirs into its data directory) and its argv[0] is the postgres binary. A pid that now belongs to another
# process (a reboot, a reused number) is "other"; one whose /proc entry we may not read is "other" too.
_PROVE_FN = r"""
prove() {
  state=nodir; pid=-; d=$(realpath -e -- "$1" 2>/dev/null) || { d=$1; return 0; }
  state=none; [ -f "$d/postmaster.pid" ] || return 0
  pid=$(head -n 1 -- "$d/postmaster.pid" 2>/dev/null)
  case "$pid" in ''|*[!0-9]*) state=stale; pid=-; return 0;; esac
  state=stale; [ -d "/proc/$pid" ] || return 0
  state=other; cwd=$(readlink "/proc/$pid/cwd" 2>/dev/null) || return 0
  [ "$cwd" = "$d" ] || return 0
  arg0=$(tr '\000' '\n' < "/proc/$pid/cmdline" 2>/dev/null | head -n 1)
  case "${arg0##*/}" in postgres|postmaster) state=running;; esac
  return 0
}
"""
PROVE_SCRIPT = _PROVE_FN + 'prove "$1"; printf "%s %s %s\\n" "$state" "$pid" "$d"'
# stop DIR SIGNAL TICKS [kill]: signal the proven postmaster, wait TICKS x 0.2 s, then (with "kill") SIGKILL it if
# it is still the same proven postmaster. Prints "<outcome> <pid> <dir>" (outcome: stopped | killed | running
# (still up, no kill asked) | <state of prove>).
STOP_SCRIPT = _PROVE_FN + r"""
prove "$1"; outcome=$state; p0=$pid
if [ "$state" = running ]; then
  kill -s "$2" "$p0" 2>/dev/null
  i=0; while prove "$1"; [ "$state" = running ] && [ "$pid" = "$p0" ] && [ "$i" -lt "$3" ]; do sleep 0.2; i=$((i+1)); done
  if [ "$state" = running ] && [ "$pid" = "$p0" ] && [ "$4" != kill ]; then
    outcome=running
  elif [ "$state" = running ] && [ "$pid" = "$p0" ]; then
    kill -s KILL "$p0" 2>/dev/null; outcome=killed
    i=0; while prove "$1"; [ "$state" = running ] && [ "$i" -lt 50 ]; do sleep 0.2; i=$((i+1)); done
  else outcome=stopped; fi
fi
printf "%s %s %s\n" "$outcome" "$p0" "$d"
"""
# environ DIR: the proven postmaster's environment, base64 of /proc/<pid>/environ (NUL-separated)
ENVIRON_SCRIPT = _PROVE_FN + r"""
prove "$1"; printf "%s %s %s\n" "$state" "$pid" "$d"
[ "$state" = running ] && base64 -w 0 < "/proc/$pid/environ" && echo
exit 0
"""
# probe DIR PSQL SOCKET PORT USER SQL LOG BYTES: the proof, the query's CSV (when running) and the log's tail.
PROBE_SCRIPT = _PROVE_FN + r"""
prove "$1"; printf "%s %s %s\n" "$state" "$pid" "$d"
if [ "$state" = running ]; then
  if out=$("$2" -X -q --csv -t -v ON_ERROR_STOP=1 -h "$3" -p "$4" -U "$5" -d postgres -c "$6" 2>&1); then
    printf "ok\n%s\n" "$out"
  else printf "err\n%s\n" "$out" | head -c 2000; echo; fi
else echo none; fi
echo "--pgops-log--"
tail -c "$8" -- "$7" 2>/dev/null
exit 0
"""
# remove PATH [WITHIN] [EXPECT]: rm -rf --one-file-system PATH's contents and PATH itself (or only its contents
# when it is a mount point). Refused: "/", a PATH whose last component is a symlink, a PATH outside WITHIN,
# a PATH whose realpath is not EXPECT.
REMOVE_SCRIPT = r"""
parent=$(realpath -e -- "$(dirname -- "$1")" 2>/dev/null) || { echo "absent $1"; exit 0; }
p="${parent%/}/$(basename -- "$1")"
[ -L "$p" ] && { echo "REFUSED: $1 is a symlink (to $(readlink -- "$p")); pgops removes only real directories"; exit 3; }
[ -e "$p" ] || { echo "absent $p"; exit 0; }
case "$p" in /|/bin|/boot|/dev|/etc|/home|/lib|/proc|/root|/sbin|/sys|/usr|/var|/var/lib|/tmp|/var/tmp)
  echo "REFUSED: $p is a system directory"; exit 3;; esac
if [ -n "$2" ]; then
  w=$(realpath -m -- "$2")
  case "$p/" in "${w%/}"/?*) ;; *) echo "REFUSED: $p is not inside $w"; exit 3;; esac
fi
if [ -n "$3" ] && [ "$p" != "$3" ]; then echo "REFUSED: $1 resolves to $p, not $3"; exit 3; fi
if mountpoint -q -- "$p" 2>/dev/null; then
  find "$p" -mindepth 1 -maxdepth 1 -exec rm -rf --one-file-system -- {} + && echo "emptied $p"
else
  rm -rf --one-file-system -- "$p" && echo "removed $p"
fi
"""
# the working directory of every running postmaster we may inspect (argv[0] is the postgres binary; a backend's
# argv[0] reads "postgres: ..." and is not one)
POSTMASTER_DIRS_SCRIPT = r"""
for p in /proc/[0-9]*; do
  a=$(tr '\000' '\n' < "$p/cmdline" 2>/dev/null | head -n 1)
  case "${a##*/}" in postgres|postmaster) c=$(readlink "$p/cwd" 2>/dev/null) && echo "$c";; esac
done | sort -u
exit 0
"""
# a free loopback port below the ephemeral range (outgoing connections cannot take it before the server binds it)
FREE_PORT_PY = """import random, socket
try:
    lo = int(open('/proc/sys/net/ipv4/ip_local_port_range').read().split()[0])
except (OSError, ValueError, IndexError):
    lo = 32768
pool = list(range(20000, lo)) if lo - 20000 >= 2000 else list(range(10000, 65536))
random.SystemRandom().shuffle(pool)
for port in pool:
    s = socket.socket()
    try:
        s.bind(('127.0.0.1', port))
    except OSError:
        s.close()
        continue
    print(port)
    s.close()
    break
else:
    raise SystemExit('no free loopback port')
"""
# nearest existing ancestor of PATH, then its free bytes
DF_SCRIPT = 'd=$1; while [ ! -d "$d" ]; do d=$(dirname -- "$d"); done; echo "$d"; df -B1 --output=avail -- "$d" | tail -n 1'


class DbHostError(RuntimeError):
    """A DB-host action was refused or its answer could not be read."""


@dataclass(frozen=True)
class Postmaster:
    """What postmaster.pid of a data directory points at, as proven on the host."""

    state: str  # running | none | stale | other | nodir | stopped | killed
    pid: int | None
    data_dir: str  # the realpath on the host (or the path as given when it does not exist)

    @property
    def running(self) -> bool:
        return self.state == "running"

    @classmethod
    def parse(cls, line: str) -> Postmaster:
        parts = line.strip().split(" ", 2)
        if len(parts) != 3:
            raise DbHostError(f"unexpected answer from the postmaster proof: {line!r}")
        state, pid, data_dir = parts
        return cls(state=state, pid=int(pid) if pid.isdigit() else None, data_dir=data_dir)


@dataclass(frozen=True)
class Probe:
    postmaster: Postmaster
    rows: list[list[str]] | None  # the query's rows, None when not running or the query failed
    error: str | None
    log_tail: str


class DbHost:
    """One node's host. ``key`` is the same for two nodes exactly when their commands run in the same place."""

    def __init__(self, runner: Runner, *, node: str, key: tuple[str, str], where: str, pg_bin: str | None = None,
                 on_line: Callable[[str], None] | None = None):
        self.runner = runner
        self.node = node
        self.key = key
        self.where = where
        self.pg_bin = pg_bin or str(PG_BIN)
        self.on_line = on_line or log.info

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def for_node(cls, cluster: Cluster, node: ReplicaNode | None = None, *,
                 on_line: Callable[[str], None] | None = None) -> DbHost:
        """The host of ``node`` (its own runner in the inventory, else the cluster's); None: the cluster's host
        (the primary's, where backups and the restore verification run)."""
        spec = node_runner(cluster, node)
        name = node.name if node else cluster.name
        return cls(runner_from_spec(spec, cluster.name), node=name, key=runner_key(spec),
                   where=describe_runner(spec), on_line=on_line)

    def same_host(self, other: DbHost) -> bool:
        return self.key == other.key

    def bin(self, name: str) -> str:
        return posixpath.join(self.pg_bin, name)

    # -- running ---------------------------------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float = 300,
            capture: bool = False, check: bool = True, quiet: bool = False) -> CommandResult:
        return self.runner.run(list(argv), env=env, timeout_s=timeout_s, capture=capture, check=check,
                               on_line=(lambda _line: None) if quiet else self.on_line)

    def sh(self, script: str, *args: str, timeout_s: float = 120, check: bool = False) -> CommandResult:
        """A fixed script with its inputs as positional parameters; stdout captured."""
        return self.run(["sh", "-c", script, "sh", *map(str, args)], timeout_s=timeout_s, capture=True, check=check,
                        quiet=True)

    def kill(self) -> None:
        self.runner.kill()

    def runner_user(self) -> str:
        return getattr(self.runner, "run_as", None) or "the runner's user"

    # -- files -----------------------------------------------------------------------------------------------
    def realpath(self, path: str) -> str:
        """The canonical path on the host (symlinks resolved; missing components allowed)."""
        # -e when the path exists (an unresolvable existing path is an error, never taken literally); -m when not
        res = self.sh('if [ -e "$1" ] || [ -L "$1" ]; then realpath -e -- "$1"; else realpath -m -- "$1"; fi', path)
        out = res.stdout.strip()
        if res.returncode != 0:
            raise DbHostError(f"cannot resolve {path} on {self.where} as {self.runner_user()}: "
                              f"{' | '.join(res.output_tail) or 'realpath failed'}. Fix: make every directory on "
                              "the way readable (x) by that user")
        if not out.startswith("/"):
            raise DbHostError(f"realpath of {path} on {self.where} gave {out!r}")
        return out

    def read_tail(self, path: str, max_bytes: int = 1 << 20) -> str:
        """The last max_bytes of a file on the host ('' when it is missing or unreadable)."""
        return self.sh('tail -c "$2" -- "$1" 2>/dev/null; exit 0', path, str(int(max_bytes))).stdout

    def tail_lines(self, path: str, n: int = 8) -> str:
        lines = [line for line in self.read_tail(path, 64 * 1024).splitlines() if line.strip()][-n:]
        return " | ".join(lines) or "(empty)"

    def exists(self, path: str) -> bool:
        return self.sh('[ -e "$1" ] || [ -L "$1" ]', path).returncode == 0

    def is_empty_dir(self, path: str) -> bool:
        """True when the directory is missing or empty."""
        return not self.sh('ls -A -- "$1" 2>/dev/null | head -n 1', path).stdout.strip()

    def free_bytes(self, path: str) -> tuple[str, int]:
        """(nearest existing ancestor of path, its free bytes)."""
        out = self.sh(DF_SCRIPT, path, check=True).stdout.strip().splitlines()
        try:
            return out[0], int(out[-1].strip())
        except (IndexError, ValueError):
            raise DbHostError(f"unexpected df output for {path} on {self.where}: {out!r}") from None

    def used_bytes(self, path: str) -> int:
        out = self.sh('du -sb -- "$1" 2>/dev/null', path).stdout.split()
        return int(out[0]) if out and out[0].isdigit() else 0

    def free_port(self) -> int:
        """A free TCP port on the host's loopback (asked on the host, not on the worker)."""
        out = self.run(["python3", "-c", FREE_PORT_PY], capture=True, timeout_s=60, quiet=True).stdout.strip()
        if not out.isdigit():
            raise DbHostError(f"could not pick a free port on {self.where}: {out!r}")
        return int(out)

    def remove_tree(self, path: str, *, within: str | None = None, expect_realpath: str | None = None,
                    timeout_s: float = 3600) -> str:
        """rm -rf --one-file-system, after proving on the host what the path is (see REMOVE_SCRIPT)."""
        res = self.sh(REMOVE_SCRIPT, path, within or "", expect_realpath or "", timeout_s=timeout_s)
        out = res.stdout.strip()
        if res.returncode != 0:
            raise DbHostError(f"removing {path} on {self.where} failed (exit {res.returncode}): "
                              f"{out or res.output_tail}")
        self.on_line(out)
        return out

    # -- PostgreSQL ------------------------------------------------------------------------------------------
    def postmaster(self, data_dir: str) -> Postmaster:
        """Prove whether postmaster.pid of data_dir names a live postmaster of exactly that directory."""
        res = self.sh(PROVE_SCRIPT, data_dir, check=True)
        return Postmaster.parse(res.stdout.strip().splitlines()[-1])

    def stop_postmaster(self, data_dir: str, *, mode: str = "fast", timeout_s: float = 60) -> Postmaster:
        """Signal the proven postmaster of data_dir (as pg_ctl stop -m mode would), SIGKILL it after timeout_s.

        pg_ctl itself signals whatever pid postmaster.pid holds; this proves the pid first, so a stale file
        whose number now belongs to another process (or another cluster's postmaster) is never signalled.
        """
        pm = stop_postmaster(self.runner, data_dir, mode=mode, timeout_s=timeout_s, kill=True)
        if pm.state in ("stopped", "killed"):
            self.on_line(f"postmaster {pm.pid} of {pm.data_dir} {pm.state} ({mode})")
        elif pm.state == "other":
            self.on_line(f"postmaster.pid of {pm.data_dir} names pid {pm.pid}, which is not a postmaster of that "
                         "directory: not signalled")
        return pm

    def postmaster_dirs(self) -> list[str]:
        """Data directories of the postmasters running on the host (those whose /proc entry we may read)."""
        return [line for line in self.sh(POSTMASTER_DIRS_SCRIPT, check=True).stdout.splitlines() if line.startswith("/")]

    def controldata(self, data_dir: str) -> dict[str, str]:
        """pg_controldata's fields ({} when the directory holds no cluster)."""
        res = self.run([self.bin("pg_controldata"), "-D", data_dir], env={"LC_ALL": "C"}, capture=True,
                       check=False, timeout_s=60, quiet=True)
        if res.returncode != 0:
            return {}
        out: dict[str, str] = {}
        for line in res.stdout.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key.strip()] = value.strip()
        return out

    def query(self, sql: str, *, socket_dir: str, port: int, user: str, dbname: str = "postgres",
              timeout_s: float = 600) -> list[list[str]]:
        """Rows (as text; NULL reads as '') of a query against an instance listening on the host's own socket."""
        res = self.run([self.bin("psql"), "-X", "-q", "--csv", "-t", "-v", "ON_ERROR_STOP=1", "-h", socket_dir,
                        "-p", str(port), "-U", user, "-d", dbname, "-c", sql], capture=True, check=False,
                       timeout_s=timeout_s, quiet=True)
        if res.returncode != 0:
            raise DbHostError(" | ".join(line for line in res.output_tail if line.strip())[-2000:]
                              or f"psql exit {res.returncode}")
        return [row for row in csv.reader(io.StringIO(res.stdout)) if row]

    def probe(self, data_dir: str, *, socket_dir: str, port: int, user: str, sql: str, log_file: str,
              log_bytes: int = 256 * 1024, timeout_s: float = 60) -> Probe:
        """One round trip: the postmaster proof, a query when it runs, and the tail of its server log."""
        res = self.sh(PROBE_SCRIPT, data_dir, self.bin("psql"), socket_dir, str(port), user, sql, log_file,
                      str(int(log_bytes)), timeout_s=timeout_s, check=True)
        head, _, log_tail = res.stdout.partition(LOG_MARKER + "\n")
        lines = head.splitlines()
        pm = Postmaster.parse(lines[0])
        rows, error = None, None
        if len(lines) > 1 and lines[1] == "ok":
            rows = [row for row in csv.reader(io.StringIO("\n".join(lines[2:]))) if row]
        elif len(lines) > 1 and lines[1] == "err":
            error = " ".join(lines[2:]).strip()
        return Probe(postmaster=pm, rows=rows, error=error, log_tail=log_tail)


def stop_postmaster(runner: Runner, data_dir: str, *, mode: str = "fast", timeout_s: float = 60,
                    kill: bool = True) -> Postmaster:
    """Signal data_dir's postmaster through ``runner`` only once proven on its host (see STOP_SCRIPT); without
    ``kill`` a server still up after timeout_s is left running (state "running")."""
    ticks = max(1, int(timeout_s / 0.2))
    res = runner.run(["sh", "-c", STOP_SCRIPT, "sh", data_dir, SIGNALS[mode], str(ticks), "kill" if kill else "-"],
                     timeout_s=timeout_s + 30, capture=True, check=True, on_line=lambda _line: None)
    return Postmaster.parse(res.stdout.strip().splitlines()[-1])


def postmaster_environ(runner: Runner, data_dir: str) -> dict[str, str] | None:
    """The environment data_dir's proven postmaster runs with (None when none runs), without Airflow's variables:
    what a restart of that server by pgops must give it again, since pgops' own children get a minimal one."""
    import base64

    res = runner.run(["sh", "-c", ENVIRON_SCRIPT, "sh", data_dir], timeout_s=60, capture=True, check=True,
                     on_line=lambda _line: None)
    lines = res.stdout.strip().splitlines()
    if not lines or not Postmaster.parse(lines[0]).running or len(lines) < 2:
        return None
    env: dict[str, str] = {}
    for item in base64.b64decode(lines[1]).decode(errors="replace").split("\0"):
        key, sep, value = item.partition("=")
        if sep and key and not key.startswith("AIRFLOW") and key not in ("PG_GRANDPARENT_PID",):
            env[key] = value
    return env


def node_runner(cluster: Cluster, node: ReplicaNode | None) -> RunnerSpec:
    return (node.runner if node is not None and node.runner is not None else None) or cluster.runner


def runner_key(spec: RunnerSpec) -> tuple[str, str]:
    """Where commands land: a worker queue (the host that serves it) or an ssh connection."""
    return ("ssh", spec.ssh_conn_id or "") if spec.kind == "ssh" else ("local", spec.queue)


def describe_runner(spec: RunnerSpec) -> str:
    return f"ssh connection {spec.ssh_conn_id!r}" if spec.kind == "ssh" else f"the worker of queue {spec.queue!r}"
