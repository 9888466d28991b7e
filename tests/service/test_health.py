"""The HTTP endpoint (SPEC §8): /metrics, /healthz and /readyz only, served concurrently, idle
clients dropped, on the address it is told. No broker needed: the server is the subject."""

from __future__ import annotations

import asyncio
import http.client
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from monitor.config import fingerprint
from monitor.service.broker import free_port
from monitor.service.changelog import RestoreProgress
from monitor.service.metrics import TELL_EVERY, HealthServer, Metrics
from monitor.service.runner import Monitor
from monitor.service.settings import ServiceSettings
from tests.support.kafka import started_processes
from tests.support.paths import REPO

HANG_GUARD = 30.0  # seconds: only ever reached when something hangs


def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(host, port, timeout=HANG_GUARD)
    try:
        connection.request("GET", path)  # the path exactly as given: no normalisation
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture
def server() -> Iterator[HealthServer]:
    running = HealthServer(Metrics(), port=0, host="127.0.0.1").start()
    yield running
    running.stop()


def test_healthz_answers_while_another_connection_sits_idle() -> None:
    # The idle client is never timed out here, so only concurrency lets /healthz through.
    server = HealthServer(Metrics(), port=0, host="127.0.0.1", idle_timeout=600).start()
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=HANG_GUARD)
    try:
        assert get(server.port, "/healthz") == (200, b"ok\n")
        assert get(server.port, "/readyz")[0] == 503
    finally:
        idle.close()  # before stop(): a single-threaded server would still be waiting on it
        server.stop()


def test_a_connection_that_sends_nothing_is_closed_by_the_server() -> None:
    server = HealthServer(Metrics(), port=0, host="127.0.0.1", idle_timeout=0.2).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=HANG_GUARD) as idle:
            assert idle.recv(1) == b""  # end of stream: the server hung up
    finally:
        server.stop()


def test_a_connection_that_trickles_its_request_is_closed_at_the_request_deadline() -> None:
    """A byte every 0.1 s is never idle for 0.5 s: only the request's deadline (1 s) ends it,
    and /healthz answers meanwhile."""
    server = HealthServer(Metrics(), port=0, host="127.0.0.1", idle_timeout=0.5,
                          request_timeout=1.0).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=HANG_GUARD) as slow:
            slow.settimeout(0.1)
            request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"y" * 1_000
            closed = False
            for byte in request:  # far more bytes than the deadline lets through
                try:
                    slow.sendall(bytes([byte]))
                    closed = slow.recv(1) == b""  # nothing comes but the end of stream
                except TimeoutError:
                    continue
                except OSError:  # reset: the server closed it while bytes were in flight
                    closed = True
                if closed:
                    break
                assert get(server.port, "/healthz") == (200, b"ok\n")
            assert closed
    finally:
        server.stop()


def test_dropping_an_idle_connection_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    server = HealthServer(Metrics(), port=0, host="127.0.0.1", idle_timeout=0.2).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=HANG_GUARD) as idle:
            idle.recv(1)  # the error, if any, is reported before the server hangs up
    finally:
        server.stop()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("path", ["/", "/foo", "/metrics/../etc/passwd", "/metrics/",
                                  "/healthz/x", "/favicon.ico"])
def test_unknown_path_is_404(server: HealthServer, path: str) -> None:
    assert get(server.port, path)[0] == 404


def test_metrics_are_served_on_metrics(server: HealthServer) -> None:
    status, body = get(server.port, "/metrics")
    assert status == 200
    assert b"liqmon_ready 0.0" in body


def test_readyz_follows_the_ready_flag(server: HealthServer) -> None:
    assert get(server.port, "/readyz") == (503, b"not ready\n")
    server.tell(True)
    assert get(server.port, "/readyz") == (200, b"ready\n")


def test_readyz_is_503_once_the_event_loop_has_not_told_it_for_two_seconds(
        server: HealthServer) -> None:
    """The loop tells it every 0.1 s; one blocked for good would leave it saying ready."""
    server.tell(True)
    server.told_at -= 5
    assert get(server.port, "/readyz") == (
        503, b"not ready: the event loop has not answered for 5 s\n")


def test_liqmon_ready_reads_what_readyz_answers(server: HealthServer) -> None:
    assert b"liqmon_ready 0.0" in get(server.port, "/metrics")[1]
    server.tell(True)
    assert b"liqmon_ready 1.0" in get(server.port, "/metrics")[1]


def test_liqmon_ready_reads_0_once_the_event_loop_has_not_told_it_for_two_seconds(
        server: HealthServer) -> None:
    """The gauge was set on the event loop: a loop wedged for good left it at 1 while
    /readyz said 503, and LiqmonNotReady (liqmon_ready == 0) never fired (a helper)."""
    server.tell(True)
    server.told_at -= 5
    assert b"liqmon_ready 0.0" in get(server.port, "/metrics")[1]


async def test_following_an_instance_tells_readyz_why_it_is_not_ready_until_nothing_does(
        server: HealthServer) -> None:
    """One answer for both: readiness and its reason told apart, a 503 once came with no
    reason (a helper, during a rebalance)."""
    reason = "restoring state: 10 changelog records read"
    following = asyncio.ensure_future(server.follow(lambda: reason))
    try:
        await asyncio.sleep(0.05)
        assert await asyncio.to_thread(get, server.port, "/readyz") == (
            503, b"not ready: restoring state: 10 changelog records read\n")
        reason = ""
        await asyncio.sleep(2 * TELL_EVERY)
        assert await asyncio.to_thread(get, server.port, "/readyz") == (200, b"ready\n")
    finally:
        following.cancel()


def test_server_listens_only_on_the_address_it_is_given() -> None:
    server = HealthServer(Metrics(), port=0, host="127.0.0.2").start()  # loopback, not .1
    try:
        assert get(server.port, "/healthz", host="127.0.0.2") == (200, b"ok\n")
        with pytest.raises(ConnectionRefusedError):
            get(server.port, "/healthz", host="127.0.0.1")
    finally:
        server.stop()


def test_liqmon_run_binds_the_metrics_host_option() -> None:
    http_port, nothing_there = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "run", "--config",
         str(REPO / "examples" / "risk.toml"), "--bootstrap", f"127.0.0.1:{nothing_there}",
         "--metrics-port", str(http_port), "--metrics-host", "127.0.0.2"],
        stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    started_processes.append(proc)  # killed at the end of the test (no broker to stop for)
    deadline = time.monotonic() + HANG_GUARD
    while True:
        assert proc.poll() is None, "liqmon run exited"
        try:
            status = get(http_port, "/healthz", host="127.0.0.2")[0]
            break
        except ConnectionRefusedError:  # not listening yet
            assert time.monotonic() < deadline, "liqmon run never served /healthz on 127.0.0.2"
            time.sleep(0.05)
    assert status == 200
    with pytest.raises(ConnectionRefusedError):
        get(http_port, "/healthz", host="127.0.0.1")


def test_metrics_label_the_risk_config_fingerprint(risk) -> None:
    metrics = Metrics()
    Monitor(ServiceSettings(config_path=REPO / "risk.toml"), risk, metrics)
    server = HealthServer(metrics, port=0, host="127.0.0.1").start()
    try:
        status, body = get(server.port, "/metrics")
    finally:
        server.stop()
    assert status == 200
    assert f'liqmon_config_info{{fingerprint="{fingerprint(risk)}"}} 1.0'.encode() in body


def test_readyz_says_why_it_is_not_ready(server: HealthServer) -> None:
    server.tell(False, "restoring state: 40,000 of at most 100,000 changelog records")
    assert get(server.port, "/readyz") == (
        503, b"not ready: restoring state: 40,000 of at most 100,000 changelog records\n")


def test_an_instance_waiting_for_its_group_to_assign_partitions_is_not_ready(risk) -> None:
    """From joining the group, or a rebalance taking its partitions back, until the group's
    next assignment, nothing is applied: /readyz says so, and how long it has lasted."""
    monitor = Monitor(ServiceSettings(config_path=REPO / "risk.toml", group="risk-g"), risk,
                      Metrics())
    monitor._warming_up = False
    monitor._group_wait.began()  # what subscribing to the group (or a revocation) does
    assert monitor.not_ready_because() == (
        "waiting for consumer group risk-g to assign partitions (0 s)")
    monitor._consuming = True  # consuming before the rebalance: still not ready during it
    monitor._update_ready()
    assert not monitor.ready.is_set()
    monitor._group_wait.ended()  # what taking the assignment does
    monitor._update_ready()
    assert monitor.ready.is_set() and monitor.not_ready_because() == ""


def test_kafka_not_answering_is_the_reason_before_the_group_assigns_too(risk) -> None:
    """The broker watch runs from the connection on; a broker frozen during the first group
    wait was reported as the group's wait, not Kafka's silence (a helper)."""
    monitor = Monitor(ServiceSettings(config_path=REPO / "risk.toml"), risk, Metrics())
    monitor._warming_up = False
    monitor._group_wait.began()
    monitor._reachability(False, False)  # what the watch found
    assert monitor.not_ready_because() == "kafka does not answer"


def test_a_restore_under_way_is_reported_with_its_progress(risk) -> None:
    monitor = Monitor(ServiceSettings(config_path=REPO / "risk.toml"), risk, Metrics())
    assert monitor.not_ready_because().startswith("loading the engine's compiled kernels")
    monitor._warming_up = False  # what run() sets once they are loaded
    assert monitor.not_ready_because() == "connecting to kafka"
    monitor._connect_failed = "KafkaConnectionError('Unable to bootstrap')"  # `_connect`'s
    assert monitor.not_ready_because() == ("connecting to kafka: the last attempt failed "
                                           "(KafkaConnectionError('Unable to bootstrap'))")
    monitor._restoring = True  # what _take_assignment sets while it reads the changelog
    assert monitor.not_ready_because() == "restoring state"
    monitor._restore_progress(RestoreProgress(records=412_000, expected=1_000_000,
                                              accounts=380_112))
    assert monitor.not_ready_because() == (
        "restoring state: 412,000 of at most 1,000,000 changelog records read, "
        "up to 380,112 accounts and isolated positions")
