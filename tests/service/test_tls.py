"""The service over TLS: the embedded broker behind a TLS-terminating proxy written here (the
broker advertises the proxy's port, so every connection goes through it)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import structlog
from aiokafka.errors import KafkaConnectionError

from monitor.config import parse_config
from monitor.service.broker import EmbeddedBroker, free_port
from monitor.service.runner import Monitor
from monitor.service.security import KafkaSecurity, refusal
from monitor.service.topics import create_topics
from tests.support.kafka import RunningMonitor, fresh_settings, produce, read_events, wait_processed
from tests.support.messages import deposit, fill, tick
from tests.support.risk import RISK
from tests.support.tls import self_signed

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    return {name: self_signed(directory, name) for name in ("broker", "other-ca", "client")}


class TlsProxy:
    """TLS on `port`, plaintext to the broker behind it. Counts the connections it accepts,
    handshake or not: that is how a test knows a client has tried again."""

    def __init__(self, port: int, upstream: int, cert: Path, key: Path,
                 client_ca: Path | None = None) -> None:
        self.port, self.upstream = port, upstream
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        if client_ca is not None:  # mutual TLS: a client must show a certificate it signed
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(client_ca)
        self.accepted = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TlsProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await writer.start_tls(self.context)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, ssl.SSLError):
            pass  # a refused handshake or a closed side: the client sees it as such
        finally:
            writer.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[tuple[EmbeddedBroker, int]]:
    """An embedded broker that sends clients to the proxy's port, and that port."""
    proxy_port = free_port()
    with EmbeddedBroker(advertised_port=proxy_port) as broker:
        yield broker, proxy_port


async def test_scenario_runs_end_to_end_over_tls(tls_broker, certs) -> None:
    broker, port = tls_broker
    cert, key = certs["broker"]
    security = KafkaSecurity("SSL", ssl_cafile=cert)
    bootstrap = f"127.0.0.1:{port}"
    settings = fresh_settings(bootstrap, security=security)
    t = settings.topics
    phases = [  # as test_service's first scenario, fed a phase at a time
        [tick(t, "BTC-PERP", 50_000.0)],
        [deposit(t, "a", 300.0)],
        [fill(t, "f1", "a", "BTC-PERP", 1.0, 50_000.0)],
        [tick(t, "BTC-PERP", 49_940.0)],  # a: 199.76 / 240 → margin call
        [tick(t, "BTC-PERP", 49_890.0)],  # a: 199.56 / 190 → liquidation
    ]
    async with TlsProxy(port, broker.port, cert, key):
        async with RunningMonitor(settings, parse_config(RISK)) as monitor:
            for phase in phases:
                await wait_processed(monitor, await produce(bootstrap, phase,
                                                            security=security))
        events = await read_events(bootstrap, t, security=security)
    assert sorted(e["event_id"] for e in events) == ["a:1:margin_call", "a:2:liquidation"]


async def test_a_broker_certificate_from_another_ca_is_named_once_and_never_ready(
        tls_broker, certs) -> None:
    broker, port = tls_broker
    cert, key = certs["broker"]
    settings = fresh_settings(f"127.0.0.1:{port}",
                              security=KafkaSecurity("SSL", ssl_cafile=certs["other-ca"][0]))
    monitor = Monitor(settings, parse_config(RISK))
    async with TlsProxy(port, broker.port, cert, key) as proxy:
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(monitor.run())
            # Each attempt is two connections (the admin client's, the diagnosis'): wait for
            # three attempts, so that retries have happened after the first message.
            deadline = time.monotonic() + 60  # a hang guard only
            while proxy.accepted < 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not monitor.ready.is_set()
            monitor.request_stop()
            await asyncio.wait_for(task, timeout=30)
    assert proxy.accepted >= 6
    refused = [e for e in logs if e["event"] == "kafka refused the connection, retrying"]
    assert len(refused) == 1, logs
    assert refused[0]["log_level"] == "error"
    assert refused[0]["cause"].startswith(f"TLS: the certificate of 127.0.0.1:{port} is not "
                                          "trusted (self-signed certificate)")
    assert not any(e["event"] == "kafka unreachable, retrying" for e in logs)


async def test_a_certificate_for_another_host_is_refused_while_hostnames_are_checked(
        tls_broker, certs, tmp_path: Path) -> None:
    broker, port = tls_broker
    cert, key = self_signed(tmp_path, "elsewhere", san="DNS:kafka.example.com")
    settings = fresh_settings(f"127.0.0.1:{port}",
                              security=KafkaSecurity("SSL", ssl_cafile=cert))
    monitor = Monitor(settings, parse_config(RISK))
    async with TlsProxy(port, broker.port, cert, key) as proxy:
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(monitor.run())
            deadline = time.monotonic() + 60  # a hang guard only
            while proxy.accepted < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            monitor.request_stop()
            await asyncio.wait_for(task, timeout=30)
    (refused,) = [e for e in logs if e["event"] == "kafka refused the connection, retrying"]
    assert "Hostname mismatch" in refused["cause"] or "IP address mismatch" in refused["cause"]


async def test_the_same_certificate_is_accepted_with_no_ssl_check_hostname(
        tls_broker, tmp_path: Path) -> None:
    broker, port = tls_broker
    cert, key = self_signed(tmp_path, "elsewhere", san="DNS:kafka.example.com")
    settings = fresh_settings(f"127.0.0.1:{port}", security=KafkaSecurity(
        "SSL", ssl_cafile=cert, ssl_check_hostname=False))
    async with TlsProxy(port, broker.port, cert, key):
        counts = await create_topics(settings)
    assert counts[settings.topics.fills] == 1


async def test_a_client_certificate_is_presented_for_mutual_tls(tls_broker, certs) -> None:
    broker, port = tls_broker
    cert, key = certs["broker"]
    client_cert, client_key = certs["client"]
    settings = fresh_settings(f"127.0.0.1:{port}", security=KafkaSecurity(
        "SSL", ssl_cafile=cert, ssl_certfile=client_cert, ssl_keyfile=client_key))
    async with TlsProxy(port, broker.port, cert, key, client_ca=client_cert):
        counts = await create_topics(settings)
    assert counts[settings.topics.state] == 1


async def test_a_plaintext_client_is_not_let_through_the_tls_listener(tls_broker, certs) -> None:
    """The control for the tests above: the proxy really is TLS-only."""
    broker, port = tls_broker
    cert, key = certs["broker"]
    settings = replace(fresh_settings(f"127.0.0.1:{port}"), request_timeout_ms=2_000)
    async with TlsProxy(port, broker.port, cert, key):
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(create_topics(settings), timeout=60)


async def test_tls_to_a_plaintext_listener_is_named_as_such_not_as_a_network_fault(
        broker, certs) -> None:
    """The embedded broker's plaintext listener waits for a Kafka request and says nothing to a
    TLS hello: each attempt timed out and was logged as `kafka unreachable`, the one thing it
    is not."""
    security = KafkaSecurity("SSL", ssl_cafile=certs["broker"][0])
    cause = await refusal(broker.bootstrap, security, request_timeout_ms=500)
    assert cause is not None and cause.startswith(
        f"TLS handshake with 127.0.0.1:{broker.port} got no answer within 500 ms, though it "
        "accepts connections: is it a TLS listener?")


async def test_a_tls_broker_that_does_not_listen_is_unreachable_not_refusing(certs) -> None:
    security = KafkaSecurity("SSL", ssl_cafile=certs["broker"][0])
    assert await refusal(f"127.0.0.1:{free_port()}", security, request_timeout_ms=500) is None
