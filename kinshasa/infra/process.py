"""Child processes of the local stack: started with logs and pid files, stopped as a group, never orphaned."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class InfraError(RuntimeError):
    """A piece of local infrastructure could not be set up or started; the message says what to do."""


_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int) -> Callable[[], None]:
    """Ask the kernel to signal the child when its parent dies, so a SIGKILLed test run leaves no broker."""

    def preexec() -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)
        # The parent may already be gone between fork and prctl.
        if os.getppid() == 1:
            os.kill(os.getpid(), sig)

    return preexec


# Ports free_port chooses from: below the kernel's ephemeral range, which it hands to outgoing connections
# (every Kafka client's). A port of that range can be taken by a connection between the moment it was
# found free and the moment its server binds it: a stack once failed to start on "address already in use".
_LOWEST_PORT = 20_000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port() -> int:
    """A port free on 127.0.0.1 now, never one this process handed out before, and outside the range
    outgoing connections take theirs from (when that range leaves room below it)."""
    low = _ephemeral_low()
    if low - _LOWEST_PORT >= 1_000:
        for _ in range(200):
            port = random.randrange(_LOWEST_PORT, low)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); look at its state.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


@dataclass
class ManagedProcess:
    """One long-running child: its command, log file, pid file and how to stop it.

    `attached=True` ties the child's life to ours (tests, `kinshasa up`); detached children
    (`kinshasa infra up`) outlive the command and are found again through the pid file.
    """

    name: str
    argv: Sequence[str]
    log_path: Path
    pid_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    stop_signal: int = signal.SIGTERM
    user: str | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, attached: bool) -> int:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent(self.stop_signal) if attached else None,
                user=self.user,
            )
        finally:
            log.close()
        self.pid_path.write_text(str(self.popen.pid))
        return self.popen.pid

    @property
    def pid(self) -> int | None:
        if self.popen is not None:
            return self.popen.pid
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        pid = self.pid
        return pid is not None and pid_alive(pid)

    def stop(self, timeout: float = 20.0) -> None:
        """Signal the child's whole process group, wait, and kill what is left."""
        pid = self.pid
        if pid is not None and self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, self.stop_signal)
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                while self.alive() and time.monotonic() < deadline + 5:
                    time.sleep(0.05)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=1)
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def wait_until(
    ready: Callable[[], bool],
    process: ManagedProcess,
    timeout: float,
    what: str,
) -> float:
    """Poll `ready` until it holds; fail fast with the log tail if the process dies first."""
    start = time.monotonic()
    while True:
        if ready():
            return time.monotonic() - start
        if not process.alive():
            raise InfraError(
                f"{what} exited during start-up; last lines of {process.log_path}:\n"
                f"{process.log_tail()}"
            )
        if time.monotonic() - start > timeout:
            raise InfraError(
                f"{what} did not become ready within {timeout:.0f}s; see {process.log_path}:\n"
                f"{process.log_tail()}"
            )
        time.sleep(0.2)
