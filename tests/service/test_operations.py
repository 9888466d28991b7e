"""Operations (SPEC §8): /metrics, /healthz, /readyz on a monitor fed by a real broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.error
import urllib.request

import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from monitor.config import parse_config
from monitor.records import Reason
from monitor.service import runner
from monitor.service.broker import EmbeddedBroker, free_port
from monitor.service.checkpointer import KafkaSink
from monitor.service.metrics import HealthServer
from tests.support.kafka import (
    RunningMonitor,
    fresh_settings,
    produce,
    run_args,
    started_processes,
    wait_processed,
)
from tests.support.messages import deposit
from tests.support.paths import REPO
from tests.support.risk import RISK

SPEC_METRICS = {  # SPEC §8, by family name as the parser reports it
    "liqmon_records_consumed", "liqmon_records_rejected", "liqmon_stale_ticks",
    "liqmon_duplicates", "liqmon_events_emitted", "liqmon_event_latency_seconds",
    "liqmon_consumer_lag_records", "liqmon_accounts", "liqmon_positions",
    "liqmon_accounts_by_state", "liqmon_price_age_seconds", "liqmon_checkpoint_duration_seconds",
    "liqmon_checkpoint_age_seconds",
}


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


@pytest.mark.asyncio(loop_scope="session")
async def test_metrics_cover_the_spec_and_move_with_the_records(broker):
    settings = fresh_settings(broker.bootstrap, checkpoint_interval=0.1)
    t = settings.topics
    dep = {"entry_id": "d1", "account": "a", "asset": "USDT", "amount": 300, "kind": "deposit",
           "ts": 1}
    messages = [
        (t.prices, b"BTC-PERP", orjson.dumps({"symbol": "BTC-PERP", "price": 50_000, "ts": 5})),
        (t.prices, b"BTC-PERP", orjson.dumps({"symbol": "BTC-PERP", "price": 50_000, "ts": 4})),
        (t.ledger, b"a", orjson.dumps(dep)),
        (t.ledger, b"a", orjson.dumps(dep)),  # duplicate
        (t.ledger, b"a", b"not json"),
    ]
    fill = {"fill_id": "f1", "account": "a", "symbol": "BTC-PERP", "side": "buy", "qty": 1,
            "price": 50_000, "ts": 6}
    crash = (t.prices, b"BTC-PERP", orjson.dumps({"symbol": "BTC-PERP", "price": 49_890,
                                                  "ts": 7}))
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        server = HealthServer(monitor.metrics, port=0, host="127.0.0.1").start()
        following = asyncio.ensure_future(  # as `liqmon run` keeps /readyz told
            server.follow(monitor.not_ready_because))
        try:
            for phase in (messages, [(t.fills, b"a", orjson.dumps(fill))], [crash]):
                await wait_processed(monitor, await produce(broker.bootstrap, phase))
            # A checkpoint is due every 0.1 s: wait for one that has saved all state (the
            # deadline only guards against a hang, it times nothing).
            deadline = time.monotonic() + 60
            while True:
                status, body = await asyncio.to_thread(get, server.port, "/metrics")
                scraped = samples(body.decode())
                if (scraped.get(("liqmon_checkpoint_duration_seconds_count", ()), 0) >= 1
                        and scraped.get(("liqmon_checkpoint_age_seconds", ())) == 0):
                    break
                assert time.monotonic() < deadline, "no checkpoint saved all state"
                await asyncio.sleep(0.05)
        finally:
            following.cancel()
            server.stop()
    assert status == 200
    text = body.decode()
    families = {f.name for f in text_string_to_metric_families(text)}
    assert families >= SPEC_METRICS, SPEC_METRICS - families
    scraped = samples(text)
    assert value(scraped, "liqmon_records_consumed_total", topic=t.prices) == 3
    assert value(scraped, "liqmon_records_consumed_total", topic=t.ledger) == 3
    assert value(scraped, "liqmon_records_consumed_total", topic=t.fills) == 1
    assert value(scraped, "liqmon_records_rejected_total", topic=t.ledger,
                 reason="invalid_json") == 1
    assert value(scraped, "liqmon_stale_ticks_total") == 1
    assert value(scraped, "liqmon_duplicates_total") == 1
    # 1 BTC-PERP bought at 50,000 on 300 USDT is healthy (MM 200 / equity 300); the fall to
    # 49,890 liquidates it (199.56 / 190) without a margin call on the way.
    assert value(scraped, "liqmon_events_emitted_total", type="liquidation") == 1
    assert value(scraped, "liqmon_events_emitted_total", type="margin_call") == 0
    assert value(scraped, "liqmon_event_latency_seconds_count", trigger="price") == 1
    for topic in (t.prices, t.fills, t.ledger):
        assert value(scraped, "liqmon_consumer_lag_records", topic=topic, partition="0") == 0
    assert value(scraped, "liqmon_accounts") == 1
    assert value(scraped, "liqmon_positions") == 1
    assert value(scraped, "liqmon_accounts_by_state", state="LIQUIDATING") == 1
    assert value(scraped, "liqmon_accounts_by_state", state="HEALTHY") == 0
    # no isolated position (SPEC §4.1) in this stream: each state counts none
    assert [value(scraped, "liqmon_isolated_positions_by_state", state=state)
            for state in ("HEALTHY", "MARGIN_CALL", "LIQUIDATING")] == [0, 0, 0]
    assert 0 <= value(scraped, "liqmon_price_age_seconds", symbol="BTC-PERP") < 60
    assert value(scraped, "liqmon_ready") == 1


def test_every_rejection_reason_of_every_input_is_exported_at_zero_from_the_start() -> None:
    """Else a series appears at 1 with the first rejection, and increase() over a window
    that begins before it says 0: the dead-letter panel showed nothing for one bad record."""
    settings = fresh_settings("127.0.0.1:1")
    monitor = runner.Monitor(settings, parse_config(RISK))
    scraped = samples(generate_latest(monitor.metrics.registry).decode())
    t = settings.topics
    for topic in (t.prices, t.fills, t.ledger):
        for reason in (Reason.NOT_OBJECT, Reason.INVALID_JSON, Reason.TS_IN_FUTURE):
            assert value(scraped, "liqmon_records_rejected_total", topic=topic,
                         reason=reason) == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_a_restart_exports_the_age_of_every_restored_price(broker):
    """The feed falls silent, then the instance restarts: the price it restored is as old as
    its tick, not absent (LiqmonNoTicks would clear, and the panel go empty)."""
    settings = fresh_settings(broker.bootstrap, checkpoint_interval=0.1)
    t = settings.topics
    stamped = int(time.time() * 1000) - 90_000  # the last tick, a minute and a half ago
    tick = (t.prices, b"BTC-PERP", orjson.dumps({"symbol": "BTC-PERP", "price": 50_000,
                                                  "ts": stamped}))
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        await wait_processed(monitor, await produce(broker.bootstrap, [tick]))
    async with RunningMonitor(settings, parse_config(RISK)) as restarted:
        scraped = samples(generate_latest(restarted.metrics.registry).decode())
    assert value(scraped, "liqmon_price_age_seconds", symbol="BTC-PERP") >= 90


@pytest.mark.asyncio(loop_scope="session")
async def test_a_configured_price_never_ticked_ages_from_the_start(broker):
    """A fleet whose feed never started: every symbol the config prices from ticks (BTC,
    ETH and the three marks; USDT's price is fixed) exports an age that grows, so
    LiqmonNoTicks fires instead of seeing no series at all."""
    settings = fresh_settings(broker.bootstrap)
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        first = samples(generate_latest(monitor.metrics.registry).decode())
        await asyncio.sleep(1.1)
        later = samples(generate_latest(monitor.metrics.registry).decode())
    symbols = {"BTC", "ETH", "BTC-PERP", "ETH-PERP", "ETHBTC-PERP"}
    assert symbols == parse_config(RISK).price_symbols()
    for symbol in symbols:
        assert value(later, "liqmon_price_age_seconds", symbol=symbol) >= (
            value(first, "liqmon_price_age_seconds", symbol=symbol) + 1)


@pytest.mark.kafka  # starts a broker of its own
def test_health_before_and_after_kafka_is_reachable() -> None:
    kafka_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "run", "--config",
         str(REPO / "examples" / "risk.toml"), "--bootstrap", f"127.0.0.1:{kafka_port}",
         "--metrics-port", str(http_port), "--session-timeout", "2"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    started_processes.append(proc)
    try:
        deadline = time.monotonic() + 30
        while get(http_port, "/healthz")[0] != 200:
            assert time.monotonic() < deadline, "no /healthz"
            time.sleep(0.05)
        # nothing listens on the port: the reason says why the last attempt failed
        failed = b"not ready: connecting to kafka: the last attempt failed (KafkaConnectionError"
        while not (answer := get(http_port, "/readyz"))[1].startswith(failed):
            assert answer[0] == 503
            assert time.monotonic() < deadline, "never tried kafka"  # alive, but no Kafka yet
            time.sleep(0.05)
        with EmbeddedBroker(port=kafka_port):
            while get(http_port, "/readyz")[0] != 200:
                assert time.monotonic() < deadline + 30, "never ready"
                time.sleep(0.1)
            assert get(http_port, "/healthz") == (200, b"ok\n")
            proc.terminate()
            assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        stderr = proc.stderr.read() if proc.stderr else b""
    logs = [orjson.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]
    said = [entry["event"] for entry in logs]
    assert "kafka unreachable, retrying" in said  # JSON lines, with the reason
    assert "consuming" in said and "stopped" in said


def wait_for_status(port: int, path: str, status: int, timeout: float = 60) -> None:
    """Until the endpoint answers with this status (the deadline only guards a hang)."""
    deadline = time.monotonic() + timeout
    while get(port, path)[0] != status:
        assert time.monotonic() < deadline, f"{path} never answered {status}"
        time.sleep(0.1)


@pytest.mark.kafka  # starts a broker of its own
def test_readyz_is_503_while_kafka_does_not_answer_and_200_once_it_does_again() -> None:
    http_port = free_port()
    with EmbeddedBroker() as kafka:
        settings = fresh_settings(kafka.bootstrap)
        proc = subprocess.Popen(
            [*run_args(settings, "--group", settings.group, "--metrics-port", str(http_port),
                       "--session-timeout", "2")],
            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        started_processes.append(proc)
        wait_for_status(http_port, "/readyz", 200)
        kafka.pause()  # holds its connections, answers nothing: unreachable
        try:
            wait_for_status(http_port, "/readyz", 503)
            assert get(http_port, "/healthz") == (200, b"ok\n")  # alive all the same
        finally:
            kafka.resume()
        wait_for_status(http_port, "/readyz", 200)
        proc.terminate()
        assert proc.wait(timeout=60) == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_a_broker_lost_between_creating_topics_and_starting_the_clients_is_waited_for(
        own_broker, monkeypatch) -> None:
    settings = fresh_settings(own_broker.bootstrap, request_timeout_ms=1_000)
    ensure = runner.ensure_topics

    async def then_the_broker_goes_away(admin, settings, log):
        counts = await ensure(admin, settings, log)
        if not paused:
            paused.append(True)
            own_broker.pause()
            asyncio.get_running_loop().call_later(3.0, own_broker.resume)
        return counts

    paused: list[bool] = []
    monkeypatch.setattr(runner, "ensure_topics", then_the_broker_goes_away)
    with capture_logs() as logs:
        async with RunningMonitor(settings, parse_config(RISK)) as monitor:
            assert monitor.ready.is_set()
    assert paused
    assert "kafka unreachable, retrying" in [e["event"] for e in logs]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_stop_while_the_group_gives_no_answer_checkpoints_once_it_answers(
        own_broker) -> None:
    """SIGTERM while the broker stalls: the final checkpoint's question to the group times
    out (1 s) and is asked again until the broker is back (3.5 s, within the session and
    shutdown timeouts), rather than the instance stopping as if it had checkpointed."""
    settings = fresh_settings(own_broker.bootstrap, request_timeout_ms=1_000,
                              session_timeout_ms=20_000, checkpoint_interval=3_600.0)
    monitor = runner.Monitor(settings, parse_config(RISK))
    task = asyncio.create_task(monitor.run())
    await asyncio.wait_for(monitor.ready.wait(), timeout=30)
    ends = await produce(own_broker.bootstrap, [deposit(settings.topics, "alice", 100.0)])
    await wait_processed(monitor, ends)
    before = monitor._checkpointer.seq
    with capture_logs() as logs:
        own_broker.pause()
        asyncio.get_running_loop().call_later(3.5, own_broker.resume)
        monitor.request_stop()
        await asyncio.wait_for(task, timeout=40)
    said = [entry["event"] for entry in logs]
    assert any(event.startswith("checkpoint not written: the group did not confirm")
               for event in said)
    assert monitor._checkpointer.seq == before + 1
    assert said[-1] == "stopped"


@pytest.mark.asyncio(loop_scope="session")
async def test_a_stop_the_group_does_not_vouch_for_says_it_stopped_without_its_checkpoint(
        broker, monkeypatch) -> None:
    """The group said no (it replaced this instance): asking again cannot help, and the stop
    must not read like one that checkpointed."""
    settings = fresh_settings(broker.bootstrap, checkpoint_interval=3_600.0)
    monitor = runner.Monitor(settings, parse_config(RISK))
    task = asyncio.create_task(monitor.run())
    await asyncio.wait_for(monitor.ready.wait(), timeout=30)
    ends = await produce(broker.bootstrap, [deposit(settings.topics, "alice", 100.0)])
    await wait_processed(monitor, ends)
    asked: list[bool] = []

    async def replaced(self: KafkaSink, offsets: object) -> bool:
        asked.append(True)
        return False

    monkeypatch.setattr(KafkaSink, "fence", replaced)
    with capture_logs() as logs:
        monitor.request_stop()
        await asyncio.wait_for(task, timeout=30)
    assert asked == [True]  # asked once
    assert monitor._checkpointer.seq == 0
    (last,) = logs[-1:]
    assert last["log_level"] == "warning"
    assert last["event"].startswith("stopped without its final checkpoint")
