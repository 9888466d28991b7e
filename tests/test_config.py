"""Risk config loading (SPEC §3): valid files load, every broken rule names its key."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest

from monitor.config import ConfigError, fingerprint, load_config, parse_config
from tests.support.risk import RISK

REPO = Path(__file__).resolve().parent.parent


def broken(path: str, value: Any) -> dict[str, Any]:
    """RISK with one value replaced (or removed when value is ...), path as dotted keys."""
    raw = copy.deepcopy(RISK)
    *parents, last = path.split("/")
    node: Any = raw
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return raw


def test_example_config_loads() -> None:
    config = load_config(REPO / "examples" / "risk.toml")
    assert config.thresholds.margin_call == 0.8
    assert config.instruments["ETHBTC-PERP"].settle == "BTC"
    assert config.assets["USDT"].fixed_price == 1.0
    assert all(len(i.tiers) >= 3 for i in config.instruments.values())


def test_maintenance_amounts_follow_the_tiers(risk) -> None:
    tiers = risk.instruments["BTC-PERP"].tiers
    # cum_t = cum_{t-1} + max_{t-1} * (mmr_t - mmr_{t-1})
    assert tiers[0].maintenance_amount == 0
    assert tiers[1].maintenance_amount == pytest.approx(50_000 * (0.005 - 0.004))  # 50
    assert tiers[2].maintenance_amount == pytest.approx(50 + 250_000 * (0.01 - 0.005))  # 1300
    assert tiers[3].maintenance_amount == pytest.approx(1300 + 1_000_000 * (0.025 - 0.01))
    assert tiers[3].max_notional == math.inf


def test_defaults_price_symbol_to_asset_name_and_mark_symbol_to_instrument(risk) -> None:
    assert risk.assets["ETH"].price_symbol == "ETH"
    assert risk.instruments["BTC-PERP"].mark_symbol == "BTC-PERP"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("thresholds/hysteresis", -0.1, "thresholds.hysteresis: must be ≥ 0"),
        ("thresholds/hysteresis", 0.8, "thresholds.hysteresis: must be < margin_call"),
        ("thresholds/margin_call", 0.0, "thresholds.margin_call: must be > 0"),
        ("thresholds/liquidation", 0.8, "thresholds.liquidation: must be > margin_call"),
        ("thresholds/margin_call", ..., "thresholds.margin_call: missing"),
        ("thresholds/margin_call", "high", "thresholds.margin_call: must be a number"),
        ("assets/BTC/collateral_weight", 1.2, "assets.BTC.collateral_weight: must be in [0, 1]"),
        ("assets/BTC/collateral_weight", -0.1, "assets.BTC.collateral_weight: must be in [0, 1]"),
        ("assets/USDT/price", 0, "assets.USDT.price: must be ≥ 1e-15"),
        ("assets/USDT/price", 1e-300, "assets.USDT.price: must be ≥ 1e-15 and ≤ 1e+15, got 1e-300"),
        ("assets/USDT/price", 1e300, "assets.USDT.price: must be ≥ 1e-15 and ≤ 1e+15, got 1e+300"),
        ("assets/USDT/haircut", 0.1, "assets.USDT.haircut: unknown key"),
        ("instruments/BTC-PERP/settle", "EUR", 'instruments.BTC-PERP.settle: asset \'EUR\''),
        ("instruments/BTC-PERP/settle", ..., "instruments.BTC-PERP.settle: missing"),
        ("assets/BTC/price_symbol", "B" * 257,
         "assets.BTC.price_symbol: a name records can give is at most 256 characters, got 257"),
        ("instruments/BTC-PERP/mark_symbol", "M" * 300,
         "instruments.BTC-PERP.mark_symbol: a name records can give is at most 256 characters"),
        ("instruments/BTC-PERP/settle", 5,
         "instruments.BTC-PERP.settle: must be the name of an asset, got 5"),
        ("instruments/BTC-PERP/contract_size", 0,
         "instruments.BTC-PERP.contract_size: must be ≥ 1e-15"),
        ("instruments/BTC-PERP/contract_size", 1e-16,
         "instruments.BTC-PERP.contract_size: must be ≥ 1e-15 and ≤ 1e+15, got 1e-16"),
        ("instruments/BTC-PERP/contract_size", 1e16,
         "instruments.BTC-PERP.contract_size: must be ≥ 1e-15 and ≤ 1e+15, got 1e+16"),
        ("instruments/BTC-PERP/tiers", [], "instruments.BTC-PERP.tiers: must be a non-empty"),
        ("instruments/BTC-PERP/tiers/1/max_notional", 40_000,
         "instruments.BTC-PERP.tiers[1].max_notional: must be > the previous tier's"),
        ("instruments/BTC-PERP/tiers/1/mmr", 0.003,
         "instruments.BTC-PERP.tiers[1].mmr: must be ≥ the previous tier's"),
        ("instruments/BTC-PERP/tiers/0/mmr", 0.0,
         "instruments.BTC-PERP.tiers[0]: must satisfy 0 < mmr"),
        ("instruments/BTC-PERP/tiers/0/imr", 0.002, "instruments.BTC-PERP.tiers[0]: must satisfy"),
        ("instruments/BTC-PERP/tiers/3/imr", 1.5, "instruments.BTC-PERP.tiers[3]: must satisfy"),
        ("instruments/BTC-PERP/tiers/0/max_notional", "inf",
         'instruments.BTC-PERP.tiers[0].max_notional: only the last tier may be "inf"'),
        # liquidation − hysteresis = 0.95: a plan must aim strictly below where LIQUIDATING ends
        ("thresholds/liquidation_target", 0.95,
         "thresholds.liquidation_target: must be > 0 and < liquidation − hysteresis (0.95)"),
        ("thresholds/liquidation_target", 1.2,
         "thresholds.liquidation_target: must be > 0 and < liquidation − hysteresis"),
        ("thresholds/liquidation_target", 0.0,
         "thresholds.liquidation_target: must be > 0 and < liquidation − hysteresis"),
        ("thresholds/liquidation_target", "0.9", "thresholds.liquidation_target: must be a number"),
        ("instruments/BTC-PERP/liquidation_fee", 1.0,
         "instruments.BTC-PERP.liquidation_fee: must be in [0, 1)"),
        ("instruments/BTC-PERP/liquidation_fee", -0.001,
         "instruments.BTC-PERP.liquidation_fee: must be in [0, 1)"),
        ("instruments/BTC-PERP/liquidation_fee", True,
         "instruments.BTC-PERP.liquidation_fee: must be a number"),
    ],
)
def test_each_broken_rule_is_reported_with_its_key(path: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(broken(path, value))
    assert str(excinfo.value).startswith(message), str(excinfo.value)


@pytest.mark.parametrize("table", ["assets", "instruments"])
def test_a_name_no_record_can_give_is_refused(table: str) -> None:
    """Every fill of a 257-character instrument would be a bad_identifier."""
    raw = copy.deepcopy(RISK)
    first = next(iter(raw[table]))
    raw[table]["X" * 257] = raw[table][first]
    with pytest.raises(ConfigError, match=rf"^{table}\.X{{257}}: a name records can give is at "
                                          r"most 256 characters, got 257$"):
        parse_config(raw)


def test_an_instrument_ending_in_a_slash_and_another_instrument_is_refused() -> None:
    """Account "a"'s isolated "X/BTC-PERP" and account "a/X"'s isolated "BTC-PERP" would
    both have event ids "a/X/BTC-PERP:1:…" (SPEC §4.1)."""
    raw = copy.deepcopy(RISK)
    raw["instruments"]["X/BTC-PERP"] = raw["instruments"]["BTC-PERP"]
    with pytest.raises(ConfigError, match=r"^instruments\.\"X/BTC-PERP\": must not end in "
                                          r"'/' and the name of instrument 'BTC-PERP'"):
        parse_config(raw)


def test_an_instrument_with_a_slash_before_no_instrument_is_accepted() -> None:
    raw = copy.deepcopy(RISK)
    raw["instruments"]["BTC/USDT"] = raw["instruments"]["BTC-PERP"]
    assert "BTC/USDT" in parse_config(raw).instruments


def test_fixed_price_and_price_symbol_together_are_refused() -> None:
    raw = broken("assets/USDT/price_symbol", "USDT")
    with pytest.raises(ConfigError, match=r"assets\.USDT\.price_symbol: give either"):
        parse_config(raw)


@pytest.mark.parametrize("table", ["assets", "instruments"])
def test_an_empty_name_is_refused_as_such(table: str) -> None:
    raw = copy.deepcopy(RISK)
    raw[table][""] = next(iter(raw[table].values()))
    with pytest.raises(ConfigError, match=f'^{table}."": the name is empty'):
        parse_config(raw)


def test_unreadable_and_malformed_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read risk config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[thresholds\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)


def test_a_config_saved_with_a_byte_order_mark_and_crlf_reads_as_without(tmp_path: Path
                                                                         ) -> None:
    example = REPO / "examples" / "risk.toml"
    marked = tmp_path / "windows.toml"
    marked.write_bytes(b"\xef\xbb\xbf" + example.read_bytes().replace(b"\n", b"\r\n"))
    assert fingerprint(load_config(marked)) == fingerprint(load_config(example))


def test_fingerprint_ignores_how_the_toml_is_written() -> None:
    reordered = dict(reversed(list(copy.deepcopy(RISK).items())))
    reordered["assets"] = dict(reversed(list(reordered["assets"].items())))
    assert fingerprint(parse_config(reordered)) == fingerprint(parse_config(RISK))


def test_fingerprint_changes_with_one_mmr() -> None:
    # BTC-PERP's first tier: mmr 0.004 -> 0.0045 (imr 0.008 still ≥ mmr)
    changed = parse_config(broken("instruments/BTC-PERP/tiers/0/mmr", 0.0045))
    assert fingerprint(changed) != fingerprint(parse_config(RISK))


# -- optional keys of the liquidation plan and stale prices (SPEC §3) ------------------------------


def test_liquidation_target_defaults_to_liquidation_minus_twice_the_hysteresis(risk) -> None:
    assert risk.thresholds.liquidation_target == pytest.approx(1.0 - 2 * 0.05)  # 0.9


def test_liquidation_target_defaults_to_95_percent_of_liquidation_without_hysteresis() -> None:
    config = parse_config(broken("thresholds/hysteresis", 0.0))
    assert config.thresholds.liquidation_target == pytest.approx(0.95)


def test_liquidation_target_given_is_kept() -> None:
    config = parse_config(broken("thresholds/liquidation_target", 0.7))
    assert config.thresholds.liquidation_target == 0.7


def test_a_default_liquidation_target_that_is_not_positive_asks_for_one() -> None:
    # hysteresis 0.6 (< margin_call 0.8): the default 1.0 − 2·0.6 = −0.2 cannot be a target.
    with pytest.raises(ConfigError) as excinfo:
        parse_config(broken("thresholds/hysteresis", 0.6))
    assert str(excinfo.value).startswith(
        "thresholds.liquidation_target: missing, and its default liquidation − 2·hysteresis"
    ), str(excinfo.value)


def test_liquidation_fee_defaults_to_zero_and_is_read_per_instrument() -> None:
    config = parse_config(broken("instruments/ETH-PERP/liquidation_fee", 0.005))
    assert config.instruments["ETH-PERP"].liquidation_fee == 0.005
    assert config.instruments["BTC-PERP"].liquidation_fee == 0.0


def with_prices(table: Any) -> dict[str, Any]:
    return {**copy.deepcopy(RISK), "prices": table}


def test_max_age_defaults_to_no_check(risk) -> None:
    assert risk.prices.max_age_ms is None


def test_max_age_is_read_in_milliseconds() -> None:
    assert parse_config(with_prices({"max_age_ms": 5000})).prices.max_age_ms == 5000


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"max_age_ms": 0}, "prices.max_age_ms: must be > 0, got 0"),
        ({"max_age_ms": -5}, "prices.max_age_ms: must be > 0, got -5"),
        ({"max_age_ms": 1.5}, "prices.max_age_ms: must be an integer (milliseconds), got 1.5"),
        ({"max_age_ms": True}, "prices.max_age_ms: must be an integer (milliseconds), got True"),
        ({"max_age": 5000}, "prices.max_age: unknown key"),
        ("5000", "prices: must be a table"),
    ],
)
def test_each_broken_price_rule_is_reported_with_its_key(table: Any, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(with_prices(table))
    assert str(excinfo.value).startswith(message), str(excinfo.value)


def test_fingerprint_ignores_optional_keys_spelt_out_at_their_defaults() -> None:
    raw = with_prices({})
    raw["thresholds"]["liquidation_target"] = 0.9
    raw["instruments"]["BTC-PERP"]["liquidation_fee"] = 0.0
    assert fingerprint(parse_config(raw)) == fingerprint(parse_config(RISK))


@pytest.mark.parametrize(
    "raw",
    [
        broken("thresholds/liquidation_target", 0.8),
        broken("instruments/BTC-PERP/liquidation_fee", 0.005),
        with_prices({"max_age_ms": 5000}),
    ],
)
def test_fingerprint_changes_with_an_optional_key_set(raw: dict[str, Any]) -> None:
    assert fingerprint(parse_config(raw)) != fingerprint(parse_config(RISK))
