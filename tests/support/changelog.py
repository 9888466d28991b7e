"""Every account snapshot a changelog holds, not only the newest of each key, and a check of
each one against replay: a snapshot is the state replay reaches once exactly the inputs
before the offsets it names (``as_of``) are applied."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

from monitor.account import Account, RiskKey
from monitor.config import RiskConfig
from monitor.engine import Engine
from monitor.events import Source
from monitor.records import Rejected
from monitor.replay import decode_line
from monitor.service.changelog import ACCOUNT, LAYOUT, RESET
from monitor.snapshot import KIND_HEADER, Layout, Offsets, decode_account, decode_layout, risk_key
from tests.support.compare import account_state
from tests.support.kafka import read_topic

Snapshot = tuple[int, int, RiskKey, Account, Offsets]  # partition, offset, key, account, as_of


async def snapshot_history(bootstrap: str, topic: str, since_reset: bool = False
                           ) -> list[Snapshot]:
    """Every account snapshot of the changelog, partition by partition in the order written
    (tombstones left out); with ``since_reset``, only those after each partition's last reset
    marker (what a restore reads)."""
    layouts: dict[int, Layout] = {}
    history = []
    for record in sorted(await read_topic(bootstrap, topic),
                         key=lambda r: (r.partition, r.offset)):
        kind = dict(record.headers).get(KIND_HEADER, ACCOUNT)
        if kind == LAYOUT:
            layout = decode_layout(record.value)
            layouts[layout.id] = layout
        if kind == RESET and since_reset:
            history = [snapshot for snapshot in history if snapshot[0] != record.partition]
        if kind != ACCOUNT or record.value is None:
            continue
        account, _, as_of = decode_account(record.value, layouts)
        history.append((record.partition, record.offset, risk_key(record.key), account, as_of))
    return history


def _held(engine: Engine, key: RiskKey) -> tuple:
    """`_content` of what the engine holds for ``key`` (a blank account when nothing)."""
    account = (engine.accounts if isinstance(key, str) else engine.units).get(key)
    return _content(Account() if account is None else account)


def _content(account: Account) -> tuple:
    """`account_state`, zero balances left out (a snapshot may carry them, the engine not)."""
    return account_state(replace(account, balances={
        asset: amount for asset, amount in account.balances.items() if amount != 0}))


def snapshots_unlike_replay(history: list[Snapshot], records, positions: list[tuple[str, int, int]],
                            config: RiskConfig) -> list[tuple[Snapshot, tuple | None]]:
    """The snapshots of ``history`` whose content is not what replay of ``records`` (in
    order; ``positions[i]``: where record i is in Kafka) holds for their key at the cut their
    ``as_of`` names, each with what replay holds there. A cut that is no prefix of replay's
    order (the live order differed) counts as unlike."""
    index = {position: i for i, position in enumerate(positions)}
    ends: dict[tuple[str, int], int] = {}
    for topic, partition, offset in positions:
        ends[(topic, partition)] = max(ends.get((topic, partition), 0), offset + 1)
    due: dict[int, list[Snapshot]] = defaultdict(list)  # replay index -> snapshots cut there
    unlike: list[tuple[Snapshot, tuple | None]] = []
    for snapshot in history:
        last_in, first_out = -1, math.inf
        for (topic, partition), next_offset in snapshot[4].items():
            if next_offset > 0:
                last_in = max(last_in, index[(topic, partition, next_offset - 1)])
            if next_offset < ends.get((topic, partition), 0):
                first_out = min(first_out, index[(topic, partition, next_offset)])
        if first_out < last_in:
            unlike.append((snapshot, None))
        else:
            due[last_in].append(snapshot)
    engine = Engine(config)

    def check(at: int) -> None:
        for snapshot in due.pop(at, ()):
            held = _held(engine, snapshot[2])
            if held != _content(snapshot[3]):
                unlike.append((snapshot, held))

    check(-1)
    for i, (kind, _, value) in enumerate(records):
        try:
            _, record = decode_line(b'{"topic": "%s", "value": %s}' % (kind.encode(), value),
                                    config)
            engine.apply(record, Source(topic=kind, index=i))
        except Rejected:
            pass
        check(i)
    return unlike
