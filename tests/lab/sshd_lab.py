"""A real sshd (Debian openssh-server) on a loopback port for the ssh runner's tests; stopped by pid."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pgops.dbhost.procs import free_port, stop_pid

SSHD = Path("/usr/sbin/sshd")


@dataclass
class Sshd:
    dir: Path
    port: int
    pid: int
    host_pub: str
    client_key: str
    log: Path

    def conn(self, **extra_changes) -> str:
        extra = {"private_key": self.client_key, "host_key": self.host_pub, "no_host_key_check": False,
                 "conn_timeout": 10, **extra_changes}
        extra = {k: v for k, v in extra.items() if v is not None}
        return json.dumps({"conn_type": "ssh", "host": "127.0.0.1", "port": self.port, "login": "postgres",
                           "extra": extra})


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pgops-test", "-f", str(path)],
                   check=True, capture_output=True)


@contextlib.contextmanager
def start_sshd(private_root: Path | None = None):
    """sshd on a loopback port. With private_root: sshd (and every session it starts) runs in its own mount
    namespace where private_root is a tmpfs owned by postgres, mode 0700: the worker sees an empty directory
    there, so anything pgops reads on the worker instead of on the host fails loudly."""
    d = Path(tempfile.mkdtemp(prefix="pgops-sshd-"))
    os.chmod(d, 0o755)  # sshd reads authorized_keys as the postgres user
    _keygen(d / "host_key")
    _keygen(d / "client_key")
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o644)
    port = free_port()
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host_key'}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "StrictModes no", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM yes",  # without PAM sshd refuses the postgres account: its password is locked ("!")
        "PermitRootLogin no",
        "AllowUsers postgres", "X11Forwarding no", "AllowTcpForwarding no", "LogLevel VERBOSE", "",
    ]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    log = d / "sshd.log"
    argv = [str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")]
    if private_root is not None:
        import pwd

        pw = pwd.getpwnam("postgres")
        private_root.mkdir(parents=True, exist_ok=True)
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs -o "mode=0700,uid=$1,gid=$2,size=2g" pgops-private "$3" && shift 3 && exec "$@"',
                "sh", str(pw.pw_uid), str(pw.pw_gid), str(private_root), *argv]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while "Server listening" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start within 20 s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield Sshd(dir=d, port=port, pid=proc.pid, host_pub=(d / "host_key.pub").read_text().strip(),
                   client_key=(d / "client_key").read_text(), log=log)
    finally:
        stop_pid(proc.pid, timeout_s=10)
        proc.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)
        if private_root is not None:
            shutil.rmtree(private_root, ignore_errors=True)
