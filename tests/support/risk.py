"""The small risk config whose numbers the worked examples use by hand (conftest's `risk`
fixture is this, parsed)."""

from __future__ import annotations

from typing import Any

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
