"""Account state machine (SPEC §5): thresholds 0.8 / 1.0, hysteresis 0.05."""

from __future__ import annotations

import pytest

from monitor.config import Thresholds
from monitor.state import AccountState, next_state

H, MC, LIQ = AccountState.HEALTHY, AccountState.MARGIN_CALL, AccountState.LIQUIDATING
T = Thresholds(margin_call=0.8, liquidation=1.0, hysteresis=0.05)


@pytest.mark.parametrize(
    ("state", "ratio", "expected"),
    [
        (H, 0.79, H),
        (H, 0.8, MC),  # at the threshold: margin call
        (H, 1.0, LIQ),  # straight to liquidation
        (H, float("inf"), LIQ),  # insolvent
        (MC, 1.0, LIQ),
        (MC, 0.99, MC),
        (MC, 0.75, MC),  # hysteresis: 0.75 is not below 0.8 − 0.05
        (MC, 0.7499, H),
        (LIQ, 0.95, LIQ),  # not below 1.0 − 0.05
        (LIQ, 0.9499, MC),  # below liq − h but not below mc − h: step down one level
        (LIQ, 0.5, H),
        (LIQ, 0.0, H),  # positions closed
    ],
)
def test_transition_rule(state: AccountState, ratio: float, expected: AccountState) -> None:
    assert next_state(state, ratio, T) == expected


def test_no_hysteresis_means_leaving_exactly_below_the_threshold() -> None:
    t = Thresholds(margin_call=0.8, liquidation=1.0, hysteresis=0.0)
    assert next_state(MC, 0.8, t) == MC
    assert next_state(MC, 0.7999999, t) == H


def test_rule_is_idempotent_for_an_unchanged_ratio() -> None:
    # Re-evaluating an account whose ratio did not move never emits a second event.
    for ratio in (0.0, 0.5, 0.76, 0.8, 0.97, 1.0, 3.0, float("inf")):
        for state in AccountState:
            once = next_state(state, ratio, T)
            assert next_state(once, ratio, T) == once
