"""Account states and the edge-triggered transition rule with hysteresis (SPEC §5)."""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from monitor.config import Thresholds


class AccountState(IntEnum):
    HEALTHY = 0
    MARGIN_CALL = 1
    LIQUIDATING = 2


# The event announcing entry into each state, and the topic kind it is published to.
EVENT_TYPE: Final = {
    AccountState.HEALTHY: "recovered",
    AccountState.MARGIN_CALL: "margin_call",
    AccountState.LIQUIDATING: "liquidation",
}
EVENT_TYPES: Final = ("margin_call", "liquidation", "recovered")


def next_state(state: AccountState, ratio: float, thresholds: Thresholds) -> AccountState:
    """Escalate as soon as the ratio reaches a threshold; de-escalate only once it falls
    below that threshold minus the hysteresis, so a ratio hovering at a boundary cannot flap."""
    if ratio >= thresholds.liquidation:
        up = AccountState.LIQUIDATING
    elif ratio >= thresholds.margin_call:
        up = AccountState.MARGIN_CALL
    else:
        up = AccountState.HEALTHY
    if up > state:
        return up
    h = thresholds.hysteresis
    if ratio >= thresholds.liquidation - h:
        down = AccountState.LIQUIDATING
    elif ratio >= thresholds.margin_call - h:
        down = AccountState.MARGIN_CALL
    else:
        down = AccountState.HEALTHY
    return down if down < state else state
