"""The chaos drill: a fleet of `liqmon run` processes abused as production abuses it, judged
against replay. Not part of the test suite (a run takes minutes):

    .venv/bin/python -m tests.chaos --runs 5 --seed 1

Each run starts an embedded broker and two instances in one consumer group (4 partitions,
session timeout 2 s). One producer sends a stream, each record acknowledged before the next:
a deposit for every account, then ticks (a random walk, σ 0.3 % a tick), fills and ledger
entries. Unless --plain-stream, one account in twenty trades isolated margin (its fills
isolated, one in ten cross, which conflicts with an open isolated position; transfers to and
from its isolated wallets), and among the rest is what producers also send: about one record
in a hundred bad input, two in a hundred re-sent (a retry of a recent fill or ledger entry,
the same bytes). Every 1-3 s one of: freeze an instance past its session timeout (SIGSTOP
for 2.5-7 s; leave out with --no-pauses), kill one (-9), stop one (SIGTERM), start another,
and with --outages, freeze the broker (SIGSTOP for 2-6 s: every client's requests time out),
and with --resets, start another with --reset-state (as LIQMON_RESET_STATE=1 left set on a
fleet does: it rebuilds the partitions it takes from the inputs' start, and every instance
running checkpoints its own whole again).
Then the live instances read every input to its end and stop, and the run is judged:

- events: exactly the ids replay of the input topics emits (`liqmon replay --bootstrap
  --check`'s replay and comparison), with the same contents; a repeat (at-least-once) is
  identical to the first;
- dead letters: exactly the inputs replay rejects, each for replay's reason (repeats allowed);
- the changelog: what a restore of it holds is replay's final state;
- snapshots going back (written, after a newer one of the same account, by an instance that
  had lost the partition: a frozen one's in-flight chunk) are counted, not judged: a restore
  must not take them, which the state check covers.

The run line also gives what the instances logged applying out of replay's order, by design
(README, *Order*): records released without proof of order past --merge-wait (5 s unless
--merge-wait says otherwise), partitions declared stalled, records applied late. A run
unlike replay with none of those is a bug; one with some may be explained by them (the
evidence --keep-logs keeps says which accounts differ).

An instance that stops by an error fails the run, with the error. A run whose instances stop
consuming otherwise is reported as a wedged consumer group (the embedded broker's coordinator
can hold a group; README, *Scaling out*) and is not judged; its instances log where each of
their tasks waits (SIGUSR1) before they are killed. The exit status is 1 if a run failed or
differs from replay. With --keep-logs DIR, each run leaves DIR/seed-N/: every instance's log
lines (instance-K.jsonl), what was done to whom and when (actions.jsonl), and, if it differs
from replay, the check's lines (check.jsonl), the fleet's events (published.jsonl), replay's
(replay.jsonl), and the dead letters and restored accounts unlike replay's.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import orjson
from aiokafka.structs import ConsumerRecord

from monitor.account import UnitKey
from monitor.config import RiskConfig, load_config
from monitor.engine import Engine
from monitor.service.broker import EmbeddedBroker
from monitor.service.input_history import (
    check_topics,
    read_published_events,
)
from monitor.service.runner import warm_up_kernels
from monitor.service.settings import ServiceSettings
from monitor.service.topics import create_topics
from tests.support.compare import state_of
from tests.support.fleet import (
    PARTITIONS,
    Instance,
    consumed,
    final_state,
    snapshots_going_back,
    start,
)
from tests.support.kafka import (
    fresh_settings,
    produce_located,
    read_topic,
)
from tests.support.paths import REPO

SYMBOLS = {"BTC-PERP": 60_000.0, "ETH-PERP": 3_000.0, "SOL-PERP": 150.0}
Record = tuple[str, bytes, bytes]  # topic kind, key, value
Located = list[tuple[str, int, int]]  # topic, partition, offset of each record produced


# Bad input as producers send it, one of each reason family: (topic kind, value)
BAD_INPUT: list[tuple[str, bytes]] = [
    ("fills", b'{"fill_id": "x", "account": '),  # cut short: not JSON
    ("fills", b'["not", "an", "object"]'),
    ("fills", b'{"fill_id": "x", "account": "a0", "symbol": "DOGE-PERP", "side": "buy", '
              b'"qty": 1, "price": 1, "ts": 1}'),  # an instrument not configured
    ("fills", b'{"fill_id": "x", "account": "a0", "symbol": "BTC-PERP", "side": "buy", '
              b'"qty": -1, "price": 60000, "ts": 1}'),
    ("ledger", b'{"entry_id": "x", "account": "a0", "asset": "USDT", "amount": -5, '
               b'"kind": "deposit", "ts": 1}'),  # a deposit must be positive
    ("prices", b'{"symbol": "BTC-PERP", "price": "60000", "ts": 1}'),  # a string price
]
RECENT = 200  # a re-sent record is a fill or ledger entry among the last this many records


def stream(rng: random.Random, accounts: int, length: int, varied: bool = True
           ) -> list[Record]:
    """A deposit for every account, then 20 % ticks, 70 % fills (notional 500-4,000 USDT,
    so that accounts of 500 USDT go under), 10 % ledger entries (a third of them
    withdrawals). ``varied``: with isolated margin (every twentieth account), bad input (1 %)
    and re-sent records (2 %) among them."""
    prices = dict(SYMBOLS)
    out: list[Record] = [("prices", s.encode(), orjson.dumps({"symbol": s, "price": p, "ts": 1}))
                         for s, p in prices.items()]
    out += [("ledger", f"a{n}".encode(), orjson.dumps({
        "entry_id": f"d{n}", "account": f"a{n}", "asset": "USDT",
        "amount": rng.choice([500, 1_000, 3_000]), "kind": "deposit", "ts": 1}))
        for n in range(accounts)]
    n = 0
    while len(out) < length:
        n += 1
        if varied:
            roll = rng.random()
            if roll < 0.01:
                kind, value = rng.choice(BAD_INPUT)
                key = "BTC-PERP" if kind == "prices" else f"a{rng.randrange(accounts)}"
                out.append((kind, key.encode(), value))
                continue
            if roll < 0.03:
                resendable = [record for record in out[-RECENT:] if record[0] != "prices"]
                if resendable:
                    out.append(rng.choice(resendable))
                    continue
        roll, symbol = rng.random(), rng.choice(list(SYMBOLS))
        number = rng.randrange(accounts)
        account = f"a{number}"
        isolated = varied and number % 20 == 0
        if isolated and roll >= 0.9:  # its ledger entries move money to and from a wallet
            out.append(("ledger", account.encode(), orjson.dumps({
                "entry_id": f"l{n}", "account": account, "asset": "USDT", "symbol": symbol,
                "amount": rng.choice([-50, 500, 1_000]), "kind": "isolated_margin", "ts": n})))
            continue
        if roll < 0.2:
            prices[symbol] *= 1 + rng.gauss(0, 0.003)
            out.append(("prices", symbol.encode(), orjson.dumps(
                {"symbol": symbol, "price": round(prices[symbol], 4), "ts": n})))
        elif roll < 0.9:
            out.append(("fills", account.encode(), orjson.dumps({
                "fill_id": f"f{n}", "account": account, "symbol": symbol,
                "side": rng.choice(["buy", "sell"]),
                "qty": round(rng.uniform(0.5, 4) * 1_000 / prices[symbol], 6),
                "price": round(prices[symbol], 4), "ts": n,
                **({"margin_mode": "isolated" if rng.random() < 0.9 else "cross"}
                   if isolated else {})})))
        else:
            withdrawal = rng.random() < 0.3
            out.append(("ledger", account.encode(), orjson.dumps({
                "entry_id": f"l{n}", "account": account, "asset": "USDT",
                "amount": -100 if withdrawal else rng.choice([200, 500]),
                "kind": "withdrawal" if withdrawal else "deposit", "ts": n})))
    return out


@dataclass
class Verdict:
    seed: int
    actions: dict[str, int]
    wedged: bool = False
    events_equal: bool = True
    differing_repeats: int = 0
    dead_letters: int = 0  # inputs replay rejects
    dead_letters_unlike: int = 0  # inputs dead-lettered but not rejected by replay, or not
    # dead-lettered but rejected, or dead-lettered for another reason
    accounts_unlike_replay: int = 0
    snapshots_going_back: int = 0
    # what the instances' logs say they applied out of replay's order, by design and counted:
    # released past --merge-wait or a stalled partition, applied after a later record
    released_unproven: int = 0
    partitions_stalled: int = 0
    applied_late: int = 0
    errors: list[str] = field(default_factory=list)  # of instances stopped by an error
    timeline: list[dict] = field(default_factory=list)  # what was done to whom, and when
    evidence: dict[str, list] = field(default_factory=dict)  # kept when unlike replay

    @property
    def unlike_replay(self) -> bool:
        return not self.events_equal or self.differing_repeats > 0 \
            or self.dead_letters_unlike > 0 or self.accounts_unlike_replay > 0

    @property
    def failed(self) -> bool:
        return bool(self.errors) or (not self.wedged and self.unlike_replay)

    def line(self) -> str:
        if self.errors:
            return f"seed {self.seed}: FAILED, instances stopped by an error: {self.errors}"
        if self.wedged:
            return f"seed {self.seed}: consumer group wedged, not judged ({self.actions})"
        return (f"seed {self.seed}: events {'equal' if self.events_equal else 'UNLIKE'} "
                f"replay's, {self.differing_repeats} repeats unlike the first, "
                f"{self.dead_letters_unlike} of {self.dead_letters} dead letters unlike "
                f"replay's, restored state "
                f"{self.accounts_unlike_replay} accounts unlike replay's, "
                f"{self.snapshots_going_back} snapshots going back; logged: "
                f"{self.released_unproven} records released out of proven order, "
                f"{self.partitions_stalled} partitions stalled, {self.applied_late} records "
                f"applied late ({self.actions})")


async def drill(seed: int, config: RiskConfig, args: argparse.Namespace) -> Verdict:
    rng = random.Random(seed)
    records = stream(rng, args.accounts, args.records, args.varied)
    with EmbeddedBroker() as broker:
        settings = replace(fresh_settings(broker.bootstrap), partitions=PARTITIONS)
        await create_topics(settings)
        kinds = {"prices": settings.topics.prices, "fills": settings.topics.fills,
                 "ledger": settings.topics.ledger}
        live = [await start(settings, args.checkpoint_interval, args.merge_wait)
                for _ in range(2)]
        everyone = list(live)
        producing = asyncio.create_task(produce_located(
            broker.bootstrap, [(kinds[k], key, value) for k, key, value in records], 1_000_000))
        verdict = Verdict(seed, dict.fromkeys(
            ["freeze", "kill", "term", "new", "outage", "reset"], 0))
        try:
            await act(rng, args, broker, settings, live, everyone, verdict, producing)
            await judge(broker, settings, config, live, verdict, await producing)
        finally:
            verdict.errors = [f"{entry.get('kind')}: {entry.get('error')}"
                              for instance in everyone for entry in instance.logs
                              if entry["event"] == "stopped by an error"]
            count_out_of_order(verdict, [entry for instance in everyone
                                         for entry in instance.logs])
            if args.keep_logs:
                keep(args.keep_logs / f"seed-{seed}", everyone, verdict)
    return verdict


def count_out_of_order(verdict: Verdict, logs: list[dict]) -> None:
    """What the fleet said it applied out of replay's order. A late line sums what came since
    the one before (at most one every 30 s): an instance killed meanwhile takes the rest
    with it, so the late count is at least this; none logged means none applied."""
    for entry in logs:
        event = entry["event"]
        if event == "released records out of proven order":
            verdict.released_unproven += entry["records"]
        elif event.startswith("input partition stalled"):
            verdict.partitions_stalled += 1
        elif event.startswith("applied records later than replay would apply them"):
            verdict.applied_late += entry["records"]


def keep(directory: Path, everyone: list[Instance], verdict: Verdict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    files = {f"instance-{n}.jsonl": instance.logs for n, instance in enumerate(everyone)}
    files |= {"actions.jsonl": verdict.timeline}
    files |= {f"{name}.jsonl": rows for name, rows in verdict.evidence.items()}
    for name, rows in files.items():
        (directory / name).write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))


def mark(verdict: Verdict, everyone: list[Instance], action: str, instance: Instance) -> None:
    verdict.timeline.append({"at": time.time(), "action": action,
                             "instance": everyone.index(instance), "pid": instance.proc.pid})


async def act(rng: random.Random, args: argparse.Namespace, broker: EmbeddedBroker,
              settings: ServiceSettings, live: list[Instance], everyone: list[Instance],
              verdict: Verdict, producing: asyncio.Task[Located]) -> None:
    """Freeze, kill, stop and start instances (and freeze the broker) until the producer is
    done."""
    wakes: list[asyncio.Task[None]] = []
    actions = ["freeze", "freeze", "kill", "term", "new"] if args.pauses \
        else ["kill", "term", "new"]
    actions += ["outage"] if args.outages else []
    actions += ["reset"] if args.resets else []
    while not producing.done():
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        if producing.done():
            break
        for gone in [instance for instance in live if instance.proc.returncode is not None]:
            live.remove(gone)  # stopped on its own: its log says why (verdict.errors)
        action = rng.choice(actions)
        if action not in ("new", "outage", "reset") and len(live) < 2:
            action = "new"
        verdict.actions[action] += 1
        if action == "outage":
            verdict.timeline.append({"at": time.time(), "action": action})
            broker.pause()
            await asyncio.sleep(rng.uniform(2.0, 6.0))
            broker.resume()
            verdict.timeline.append({"at": time.time(), "action": "outage ends"})
            continue
        if action in ("new", "reset"):
            instance = Instance(settings, args.checkpoint_interval, args.merge_wait,
                                ["--reset-state"] if action == "reset" else [])
            await instance.start()
            live.append(instance)
            everyone.append(instance)
            mark(verdict, everyone, action, instance)
            continue
        victim = rng.choice(live)
        mark(verdict, everyone, action, victim)
        if action == "freeze":
            victim.proc.send_signal(signal.SIGSTOP)
            wakes.append(asyncio.create_task(wake(
                victim, rng.uniform(2.5, 7.0), partial(mark, verdict, everyone, "wake", victim))))
            continue
        live.remove(victim)
        if victim.proc.returncode is None:
            victim.proc.send_signal(signal.SIGCONT)
        await victim.stop(kill=action == "kill")
    await asyncio.gather(*wakes)


async def judge(broker: EmbeddedBroker, settings: ServiceSettings, config: RiskConfig,
                live: list[Instance], verdict: Verdict,
                located: Located) -> None:
    """Let the live instances read every input to its end, stop them, and compare what the
    fleet published and checkpointed with replay of the records the input topics hold."""
    ends = {(topic, partition): offset + 1 for topic, partition, offset in located}
    try:
        await consumed(live, settings, ends, timeout=240)
    except AssertionError:
        verdict.wedged = True
        for instance in live:  # where each of its tasks waits, into its log (--keep-logs)
            if instance.proc.returncode is None:
                instance.proc.send_signal(signal.SIGUSR1)
        await asyncio.sleep(1.0)
    for instance in live:
        if instance.proc.returncode is None:
            await instance.stop(kill=verdict.wedged)
    if verdict.wedged:
        return
    # replay of the input topics as `liqmon replay --bootstrap --check` does it
    engine = Engine(config)
    out = io.BytesIO()
    rejected: set[tuple[str, int | None, int | None, str]] = set()
    check = await check_topics(broker.bootstrap, settings.topics, engine,
                               lambda source, rejection: rejected.add(
                                   (source.topic, source.partition, source.offset,
                                    rejection.reason)), out)
    verdict.events_equal = not (check.missing or check.extra or check.different
                                or check.unreadable)
    verdict.differing_repeats = len(check.repeats_unlike)
    letters = await read_topic(broker.bootstrap, settings.topics.dead_letter, idle=1.0)
    dead = {dead_letter_of(letter) for letter in letters}
    verdict.dead_letters, verdict.dead_letters_unlike = len(rejected), len(dead ^ rejected)
    restored = await final_state(settings, config)
    expected = state_of(engine)["accounts"]
    unlike = sorted((key for key in restored.keys() | expected.keys()
                     if restored.get(key) != expected.get(key)), key=str)
    verdict.accounts_unlike_replay = len(unlike)
    if verdict.unlike_replay:
        verdict.evidence = {
            "check": [{"line": line} for line in check.lines(examples=1_000)],
            "published": [orjson.loads(value) for value in await read_published_events(
                broker.bootstrap, settings.topics) if value],
            "replay": [orjson.loads(line) for line in out.getvalue().splitlines()],
            "dead-letters-unlike": [{"at": list(at), "in": "fleet" if at in dead else "replay"}
                                    for at in sorted(dead ^ rejected)],
            "accounts-unlike": [{"account": key.label() if isinstance(key, UnitKey) else key,
                                 "restored": restored.get(key),
                                 "replay": expected.get(key)} for key in unlike]}
    verdict.snapshots_going_back = len(await snapshots_going_back(settings))


def dead_letter_of(letter: ConsumerRecord) -> tuple[str, int, int, str]:
    """Where a dead letter's input is (topic, partition, offset), and its reason."""
    value, headers = orjson.loads(letter.value), dict(letter.headers)
    return (value["source_topic"], value["source_partition"], value["source_offset"],
            headers["__liqmon.errors.reason"].decode())


async def wake(instance: Instance, after: float, woken: Callable[[], None]) -> None:
    await asyncio.sleep(after)
    if instance.proc.returncode is None:  # not killed meanwhile
        instance.proc.send_signal(signal.SIGCONT)
        woken()


async def main(args: argparse.Namespace) -> int:
    config = load_config(REPO / "examples" / "risk.toml")
    # As the suite's conftest does: on a cold cache the kernels compile for about a minute,
    # which must not count against the first instances' readiness timeout.
    warm_up_kernels()
    unlike = 0
    for seed in range(args.seed, args.seed + args.runs):
        started = time.monotonic()
        verdict = await drill(seed, config, args)
        unlike += verdict.failed
        print(f"{verdict.line()} in {time.monotonic() - started:.0f} s", flush=True)
    return 1 if unlike else 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1, help="of the first run; then +1")
    parser.add_argument("--accounts", type=int, default=20_000)
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--checkpoint-interval", type=float, default=1.0)
    parser.add_argument("--merge-wait", type=float, default=5.0,
                        help="the fleet's --merge-wait (default %(default)s s: instances "
                             "starved of CPU here answer slowly; production's default is 0.5)")
    parser.add_argument("--no-pauses", dest="pauses", action="store_false",
                        help="no SIGSTOP freezes, only kills, stops and new instances")
    parser.add_argument("--plain-stream", dest="varied", action="store_false",
                        help="cross margin only, no bad input, no re-sent records (the "
                             "stream of the drill before 2026-12-05)")
    parser.add_argument("--outages", action="store_true",
                        help="freeze the broker now and then too")
    parser.add_argument("--resets", action="store_true",
                        help="start instances with --reset-state now and then too")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR",
                        help="keep each run's instance logs and actions (and, if it differs "
                             "from replay, the evidence) under DIR/seed-N/")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
