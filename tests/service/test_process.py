"""The service and the demo as operators run them: separate OS processes and signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from monitor.market import simulate
from monitor.service.broker import EmbeddedBroker, free_port
from tests.support.fleet import Instance, start
from tests.support.kafka import (
    MonitorProcess,
    fresh_settings,
    produce,
    read_events,
    run_args,
    started_processes,
)
from tests.support.paths import REPO
from tests.test_compiled import holding_the_lock

pytestmark = pytest.mark.kafka  # every test here runs a broker: the shared one or its own


async def committed_offsets(settings) -> dict[str, int]:
    """The group's committed offsets, read without joining the group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=settings.group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        found = {}
        for topic in (settings.topics.fills, settings.topics.ledger):
            offset = await consumer.committed(TopicPartition(topic, 0))
            if offset is not None:
                found[f"{topic}/0"] = offset
        return found
    finally:
        await consumer.stop()


async def test_sigterm_again_and_again_while_stopping_still_exits_0(broker) -> None:
    """The loop's signal handlers went when it closed, and the HTTP server takes up to half a
    second to close after that: a second SIGTERM then ended a clean stop with status 143."""
    settings = fresh_settings(broker.bootstrap)
    env = {**os.environ, "LIQMON_GROUP": settings.group, "LIQMON_LOG_LEVEL": "info"}
    proc = await asyncio.create_subprocess_exec(
        *run_args(settings, "--metrics-port", str(free_port())), env=env,
        stderr=subprocess.PIPE)
    started_processes.append(proc)
    assert proc.stderr is not None
    while b'"event":"consuming"' not in await asyncio.wait_for(proc.stderr.readline(), 120):
        pass
    stderr = asyncio.ensure_future(proc.stderr.read())
    while proc.returncode is None:  # until it has exited, whenever that is
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout=0.05)
    assert proc.returncode == 0, (await stderr).decode()[-2000:]
    assert b'"event":"stopped"' in await stderr


def readyz(port: int) -> str:
    """/readyz's body (its reason while not ready)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return str(answer.read().decode())
    except urllib.error.HTTPError as refused:
        return str(refused.read().decode())
    except OSError:
        return ""  # not listening yet


async def test_sigterm_while_waiting_for_the_group_exits_0_and_says_stopped(broker) -> None:
    """The group holds a new member's join while a member killed with -9 is still counted in
    it. Stopped then, the instance logged "stopping" and never "stopped"."""
    settings = fresh_settings(broker.bootstrap)
    killed = await start(settings)
    assert await killed.stop(kill=True) == -9
    waiting = await Instance(settings).start()
    deadline = time.monotonic() + 60
    while "waiting for consumer group" not in await asyncio.to_thread(readyz, waiting.port):
        assert time.monotonic() < deadline, "never waited for the group"
        await asyncio.sleep(0.1)
    assert await waiting.stop() == 0
    assert [entry["event"] for entry in waiting.logs][-1] == "stopped"


@pytest.mark.asyncio(loop_scope="session")
async def test_sigterm_mid_stream_exits_0_with_offsets_committed(broker, example_config):
    settings = fresh_settings(broker.bootstrap)
    env = {**os.environ, "LIQMON_GROUP": settings.group, "LIQMON_LOG_LEVEL": "info"}
    proc = await asyncio.create_subprocess_exec(*run_args(settings, "--metrics-port", "0"), env=env,
                                                stderr=subprocess.PIPE)
    started_processes.append(proc)
    names = {"prices": settings.topics.prices, "fills": settings.topics.fills,
             "ledger": settings.topics.ledger}
    records = [(names[r.topic], r.key.encode(), r.value_bytes())
               for r in simulate(example_config, accounts=300, steps=600, seed=2)]
    feeding = asyncio.create_task(produce(broker.bootstrap, records))
    deadline = time.monotonic() + 60
    while not (await committed_offsets(settings)):
        assert time.monotonic() < deadline, "the monitor never committed anything"
        await asyncio.sleep(0.2)
    # Some event must be out before the signal, or "nothing emitted after exit" below would
    # hold of an empty list (the first comes ~35 % into this stream).
    while not await read_events(broker.bootstrap, settings.topics, idle=0.1):
        assert time.monotonic() < deadline, "the monitor never emitted an event"

    proc.send_signal(signal.SIGTERM)
    # the timeout only guards against a hang: how long shutdown takes is not asserted
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
    exited_ms = time.time() * 1000
    assert proc.returncode == 0, stderr.decode()[-2000:]
    await feeding

    logs = [orjson.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]
    (stopped,) = [entry for entry in logs if entry["event"] == "stopped"]
    committed = await committed_offsets(settings)  # mirrored from the final checkpoint
    fills_tp, ledger_tp = f"{settings.topics.fills}/0", f"{settings.topics.ledger}/0"
    assert committed == {tp: stopped["offsets"][tp] for tp in (fills_tp, ledger_tp)}
    assert committed[fills_tp] > 0

    events = await read_events(broker.bootstrap, settings.topics)
    assert all(event["emitted_at"] <= exited_ms for event in events)  # nothing after exit
    await asyncio.sleep(1.0)
    assert len(await read_events(broker.bootstrap, settings.topics)) == len(events)


@pytest.mark.asyncio(loop_scope="session")
async def test_sigusr1_logs_where_every_task_waits_and_the_service_goes_on(broker):
    """For an instance gone quiet: what each task awaits, down to the innermost call."""
    settings = fresh_settings(broker.bootstrap)
    monitor = await MonitorProcess(run_args(settings, "--group", settings.group,
                                            "--metrics-port", "0")).start()
    await asyncio.wait_for(monitor.consuming.wait(), timeout=60)
    monitor.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while not (dump := [e for e in monitor.logs if e["event"] == "task stack (SIGUSR1)"]):
        assert time.monotonic() < deadline, "no task stack logged"
        await asyncio.sleep(0.1)
    chains = [entry["awaiting"] for entry in dump]
    (main,) = [chain for chain in chains if chain and chain[0].endswith(" in serve")]
    assert any(frame.endswith(" in run") and "runner.py" in frame for frame in main[1:])
    (loop,) = [chain for chain in chains if chain and chain[0].endswith(" in _consume")]
    assert len(loop) > 1  # down into what the loop waits on
    assert await monitor.stop() == 0  # SIGUSR1 did not end it


def children(pid: int) -> set[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, check=False)
    return {int(child) for child in found.stdout.split()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_runs_a_crash_shows_every_event_type_and_leaves_nothing_running() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "demo", "--duration", "20", "--accounts", "1000",
         "--seed", "3", "--config", str(REPO / "examples" / "risk.toml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
    )
    started_processes.append(demo)
    spawned: set[int] = set()
    while demo.poll() is None and not spawned:  # the embedded broker it starts
        spawned = children(demo.pid)
        time.sleep(0.05)
    stdout, stderr = demo.communicate(timeout=180)
    assert demo.returncode == 0, stderr.decode()[-3000:]
    tail = " ".join(stdout.decode().split())  # rich wraps lines to the terminal width
    summary = re.search(r"demo finished: .*? events: (.*?); broker", tail)
    assert summary, tail[-2000:]
    counts = dict((kind, int(n.replace(",", ""))) for kind, n in
                  re.findall(r"(\w+) ([\d,]+)", summary.group(1)))
    assert counts.keys() == {"margin_call", "liquidation", "recovered"}
    assert all(n > 0 for n in counts.values())
    isolated = re.search(r"Of the events, ([\d,]+) were about isolated positions", tail)
    assert isolated and int(isolated.group(1).replace(",", "")) > 0, tail[-2000:]
    # replay of the topics it wrote gives exactly the events it published
    check = re.search(r"check \(liqmon replay --bootstrap --check\): ([\d,]+) events replayed, "
                      r"([\d,]+) published \(0 repeats\): agree", tail)
    assert check, tail[-2000:]
    assert int(check.group(1).replace(",", "")) == int(check.group(2).replace(",", "")) \
        == sum(counts.values())
    assert spawned and not any(alive(pid) for pid in spawned)


def test_broker_command_prints_its_address_and_stops_on_ctrl_c() -> None:
    port = free_port()
    broker = subprocess.Popen([sys.executable, "-m", "monitor.cli", "broker", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started_processes.append(broker)
    assert broker.stdout is not None
    first = broker.stdout.readline().decode()
    assert f"127.0.0.1:{port}" in first
    spawned = children(broker.pid)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # it listens
    broker.send_signal(signal.SIGINT)
    assert broker.wait(timeout=15) == 0
    assert spawned and not any(alive(pid) for pid in spawned)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


@pytest.mark.asyncio(loop_scope="session")
async def test_sigterm_while_kafka_is_down_gives_up_at_the_shutdown_timeout_and_says_what():
    with EmbeddedBroker() as kafka:
        settings = fresh_settings(kafka.bootstrap)
        monitor = await MonitorProcess(run_args(
            settings, "--group", settings.group, "--metrics-port", "0",
            "--shutdown-timeout", "2", "--log-level", "info")).start()
        await asyncio.wait_for(monitor.consuming.wait(), timeout=60)
        kafka.stop()
    deadline = time.monotonic() + 60
    while not any(e["event"] == "kafka unreachable, clients keep retrying" for e in monitor.logs):
        assert time.monotonic() < deadline, "the outage was never noticed"
        await asyncio.sleep(0.1)
    assert await monitor.stop() == 1  # exits (stop() waits 30 s at most: a hang guard)
    (abandoned,) = [e for e in monitor.logs if e["event"] == "shutdown abandoned"]
    assert abandoned["level"] == "error"
    assert "not checkpointed" in abandoned["error"]
    assert "re-processed on restart" in abandoned["error"]
    # the sends given up on are accounted for by that line, not reported again by asyncio
    assert not [e for e in monitor.logs if "never retrieved" in e["event"]]


@pytest.mark.asyncio(loop_scope="session")
async def test_sigterm_while_another_process_compiles_the_kernels_stops_without_waiting(
        broker, tmp_path) -> None:
    """A start waiting for the kernels (another process compiling them, a minute or more, or
    for ever if that process hangs) stopped only once they were ready: past a rolling
    update's grace period, killed, and seen as a crash. Nothing is applied yet, so nothing
    is saved: it stops at once, exit 0."""
    holder = holding_the_lock(tmp_path)
    try:
        settings = fresh_settings(broker.bootstrap)
        proc = await asyncio.create_subprocess_exec(
            *run_args(settings, "--group", settings.group, "--metrics-port", "0"),
            env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "LIQMON_LOG_LEVEL": "info"},
            stderr=subprocess.PIPE)
        started_processes.append(proc)
        assert proc.stderr is not None
        async with asyncio.timeout(60):  # a hang guard only
            while b"another process is compiling the kernels" not in await proc.stderr.readline():
                pass
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):  # a hang guard: the lock stays held all along
            rest = await proc.stderr.read()
            assert await proc.wait() == 0
        assert holder.poll() is None  # still compiling, as far as liqmon knows
        events = [orjson.loads(line)["event"] for line in rest.splitlines()
                  if line.startswith(b"{")]
        assert events[-1] == "stopped"
        assert "kernels ready" not in events
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
