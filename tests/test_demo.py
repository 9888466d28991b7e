"""The demo's live view: how it summarises a liquidation plan (the run itself: test_process)."""

from __future__ import annotations

from monitor.demo import plan_summary


def test_plan_summary_names_closes_and_partial_reductions_in_order() -> None:
    plan = {"steps": [
        {"symbol": "ETH-PERP", "side": "buy", "qty": 40.0, "close": True},
        {"symbol": "BTC-PERP", "side": "sell", "qty": 0.0250000001, "close": False},
    ]}
    assert plan_summary(plan) == "close ETH-PERP, sell 0.025 BTC-PERP"
