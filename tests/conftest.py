"""Shared fixtures: a small risk config whose numbers the worked examples use by hand."""

from __future__ import annotations

from typing import Any

import pytest

pytest.register_assert_rewrite("tests.kafka_support")  # before its import below

from monitor.config import RiskConfig, parse_config  # noqa: E402

# BTC-PERP tiers: maintenance amounts are 0, 50, 1300, 16300 (computed in test_config).
RISK: dict[str, Any] = {
    "thresholds": {"margin_call": 0.8, "liquidation": 1.0, "hysteresis": 0.05},
    "assets": {
        "USDT": {"collateral_weight": 1.0, "price": 1.0},
        "BTC": {"collateral_weight": 0.95, "price_symbol": "BTC"},
        "ETH": {"collateral_weight": 0.9},
    },
    "instruments": {
        "BTC-PERP": {
            "settle": "USDT",
            "contract_size": 1.0,
            "tiers": [
                {"max_notional": 50_000, "mmr": 0.004, "imr": 0.008},
                {"max_notional": 250_000, "mmr": 0.005, "imr": 0.01},
                {"max_notional": 1_000_000, "mmr": 0.01, "imr": 0.02},
                {"max_notional": "inf", "mmr": 0.025, "imr": 0.05},
            ],
        },
        "ETH-PERP": {
            "settle": "USDT",
            "contract_size": 0.1,
            "tiers": [
                {"max_notional": 10_000, "mmr": 0.01, "imr": 0.02},
                {"max_notional": "inf", "mmr": 0.02, "imr": 0.04},
            ],
        },
        "ETHBTC-PERP": {
            "settle": "BTC",
            "contract_size": 1.0,
            "tiers": [
                {"max_notional": 5, "mmr": 0.01, "imr": 0.02},
                {"max_notional": 25, "mmr": 0.015, "imr": 0.03},
                {"max_notional": "inf", "mmr": 0.03, "imr": 0.06},
            ],
        },
    },
}


@pytest.fixture
def risk() -> RiskConfig:
    return parse_config(RISK)


@pytest.fixture(autouse=True)
def reap_processes():
    """No monitor a test started outlives it, even when the test fails."""
    yield
    from tests.kafka_support import reap

    reap()


# Fixtures that start the embedded broker: a test using one (directly or through another
# fixture) is marked `kafka`, so that `pytest -m "not kafka"` runs the pure tests alone. A test
# that starts a broker in its body carries the marker itself.
BROKER_FIXTURES = frozenset({"broker", "own_broker", "tls_broker"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def broker():
    """One embedded Tansu broker for the session; tests isolate themselves by topic names."""
    from monitor.service.broker import EmbeddedBroker

    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def own_broker():
    """A broker of the test's own, which it may pause without stalling the other tests."""
    from monitor.service.broker import EmbeddedBroker

    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def example_config() -> RiskConfig:
    from pathlib import Path

    from monitor.config import load_config

    return load_config(Path(__file__).resolve().parent.parent / "examples" / "risk.toml")
