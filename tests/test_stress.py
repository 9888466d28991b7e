"""What-if price shocks over the book (`monitor.stress`, SPEC §7 `liqmon stress`)."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator

import pytest

import monitor.stress
from monitor.account import Account, RiskKey, UnitKey
from monitor.config import RiskConfig
from monitor.engine import Engine
from monitor.events import Source
from monitor.margin import value_account
from monitor.records import Fill, InputRecord, LedgerEntry, PriceTick
from monitor.state import next_state
from monitor.stress import ScenarioResult, StressBook, stress

TOPIC = {PriceTick: "prices", Fill: "fills", LedgerEntry: "ledger"}


def build(config: RiskConfig, records: list[InputRecord]) -> Engine:
    engine = Engine(config)
    for index, record in enumerate(records):
        engine.apply(record, Source(topic=TOPIC[type(record)], index=index))
    return engine


def deposit(account: str, amount: float, asset: str = "USDT") -> LedgerEntry:
    return LedgerEntry(f"d-{account}-{asset}", account, asset, amount, "deposit", 1)


def fill(account: str, symbol: str, side: str, qty: float, price: float) -> Fill:
    return Fill(fill_id=f"f-{account}-{symbol}", account=account, symbol=symbol, side=side,
                qty=qty, price=price, fee=0.0, ts=2)


def tick(symbol: str, price: float, ts: int = 3) -> PriceTick:
    return PriceTick(symbol, price, ts)


def run_scenarios(engine: Engine, shocks: list[dict[str, float]]) -> list[ScenarioResult]:
    return stress(engine, shocks).scenarios


def long_and_short(risk: RiskConfig) -> Engine:
    # each: 10,000 USDT and 1 BTC-PERP at 60,000 (MM 60,000 · 0.004 = 240, ratio 0.024)
    return build(risk, [tick("BTC-PERP", 60_000.0),
                        deposit("long", 10_000.0), fill("long", "BTC-PERP", "buy", 1, 60_000.0),
                        deposit("short", 10_000.0),
                        fill("short", "BTC-PERP", "sell", 1, 60_000.0)])


def test_a_fall_liquidates_the_long_and_the_short_gains(risk: RiskConfig) -> None:
    # −17 %: mark 49,800. long: 10,000 − 10,200 = −200 (insolvent, bad debt 200);
    # short: 10,000 + 10,200 = 20,200, MM 49,800 · 0.004 = 199.2 (tier 1), ratio 0.0099
    [result] = run_scenarios(long_and_short(risk), [{"BTC-PERP": -0.17}])
    assert result.accounts_by_state == {"HEALTHY": 1, "MARGIN_CALL": 0, "LIQUIDATING": 1}
    assert result.newly_liquidating == ["long"]
    assert result.bad_debt == pytest.approx(200.0)
    assert result.equity == pytest.approx(20_000.0)
    assert result.maintenance_margin == pytest.approx(2 * 199.2)


def test_a_rise_liquidates_the_short_and_the_long_gains(risk: RiskConfig) -> None:
    # +17 %: mark 70,200, tier 2 (50,000 < N ≤ 250,000): MM = 70,200 · 0.005 − 50 = 301 each;
    # short: −200 (bad debt 200), long: 20,200
    [result] = run_scenarios(long_and_short(risk), [{"BTC-PERP": 0.17}])
    assert result.newly_liquidating == ["short"]
    assert result.bad_debt == pytest.approx(200.0)
    assert result.maintenance_margin == pytest.approx(2 * 301.0)


def test_largest_losers_rank_equity_lost_against_the_unshocked_book(risk: RiskConfig) -> None:
    # −10 %: the long loses 6,000 (10,000 → 4,000); the short gains, so it is no loser
    [result] = run_scenarios(long_and_short(risk), [{"BTC-PERP": -0.1}])
    assert result.largest_losers == [
        {"account": "long", "equity_loss": pytest.approx(6_000.0),
         "equity": pytest.approx(4_000.0)}]


def test_a_hedged_account_stays_healthy_whichever_way_btc_moves(risk: RiskConfig) -> None:
    # 1 BTC collateral (weight 0.95) against a short of 1 BTC-PERP at 60,000: equity 57,000.
    # −50 %: 28,500 + 30,000 = 58,500, MM 30,000 · 0.004 = 120;
    # +50 %: 85,500 − 30,000 = 55,500, MM 90,000 · 0.005 − 50 = 400
    engine = build(risk, [tick("BTC", 60_000.0), tick("BTC-PERP", 60_000.0),
                          deposit("hedged", 1.0, "BTC"),
                          fill("hedged", "BTC-PERP", "sell", 1, 60_000.0)])
    down, up = run_scenarios(engine, [{"BTC": -0.5, "BTC-PERP": -0.5},
                                      {"BTC": 0.5, "BTC-PERP": 0.5}])
    assert (down.equity, down.maintenance_margin) == (pytest.approx(58_500.0),
                                                     pytest.approx(120.0))
    assert (up.equity, up.maintenance_margin) == (pytest.approx(55_500.0), pytest.approx(400.0))
    assert down.accounts_by_state["HEALTHY"] == up.accounts_by_state["HEALTHY"] == 1


def test_an_account_in_margin_call_recovers_under_a_rise(risk: RiskConfig) -> None:
    # 1,000 USDT, long 1 at 60,000, mark 59,290: equity 290, MM 237.16, ratio 0.818 → MC.
    # +1 %: mark 59,882.9, equity 882.9, MM 239.53, ratio 0.271 < 0.8 − 0.05 → HEALTHY
    engine = build(risk, [tick("BTC-PERP", 60_000.0), deposit("a", 1_000.0),
                          fill("a", "BTC-PERP", "buy", 1, 60_000.0),
                          tick("BTC-PERP", 59_290.0, ts=4)])
    assert engine.accounts["a"].state.name == "MARGIN_CALL"
    [result] = run_scenarios(engine, [{"BTC-PERP": 0.01}])
    assert result.accounts_by_state == {"HEALTHY": 1, "MARGIN_CALL": 0, "LIQUIDATING": 0}
    assert result.newly_liquidating == []


def test_a_liquidating_account_stays_within_the_hysteresis_band(risk: RiskConfig) -> None:
    # 1,000 USDT, long 1 at 60,000, mark 59,200: equity 200, MM 236.8, ratio 1.18 → LIQ.
    # +0.075 %: mark 59,244.4, equity 244.4, MM 236.98, ratio 0.970: below 1.0 but not below
    # 1.0 − 0.05, so it stays LIQUIDATING (from HEALTHY the same ratio is a MARGIN_CALL)
    engine = build(risk, [tick("BTC-PERP", 60_000.0), deposit("a", 1_000.0),
                          fill("a", "BTC-PERP", "buy", 1, 60_000.0),
                          tick("BTC-PERP", 59_200.0, ts=4)])
    assert engine.accounts["a"].state.name == "LIQUIDATING"
    [result] = run_scenarios(engine, [{"BTC-PERP": 0.00075}])
    assert result.accounts_by_state == {"HEALTHY": 0, "MARGIN_CALL": 0, "LIQUIDATING": 1}
    assert result.newly_liquidating == []


def test_a_symbol_without_a_tick_is_not_moved(risk: RiskConfig) -> None:
    # no ETH-PERP tick: the position is marked at its entry, uPnL 0, whatever the shock
    engine = build(risk, [deposit("a", 100.0), fill("a", "ETH-PERP", "buy", 10, 3_000.0)])
    [result] = run_scenarios(engine, [{"ETH-PERP": -0.9}])
    assert result.equity == pytest.approx(100.0)


def test_the_report_names_the_shocked_symbols_no_scenario_moved(risk: RiskConfig) -> None:
    # BTC-PERP ticked, ETH-PERP and BTC never: two scenarios, the symbols listed once, sorted
    engine = build(risk, [tick("BTC-PERP", 60_000.0), deposit("a", 100.0),
                          fill("a", "ETH-PERP", "buy", 10, 3_000.0)])
    report = stress(engine, [{"ETH-PERP": -0.5, "BTC-PERP": -0.5}, {"BTC": 0.1}])
    assert report.not_moved == ["BTC", "ETH-PERP"]
    assert stress(engine, [{"BTC-PERP": -0.5}]).not_moved == []


def test_an_account_whose_settle_asset_has_no_price_is_counted_apart(risk: RiskConfig) -> None:
    # ETHBTC-PERP settles in BTC, which has no tick: SPEC §4 does not evaluate the account
    engine = build(risk, [tick("ETHBTC-PERP", 0.05), deposit("a", 100.0),
                          fill("a", "ETHBTC-PERP", "buy", 10, 0.05)])
    [result] = run_scenarios(engine, [{"ETHBTC-PERP": -0.5}])
    assert result.unpriced == 1
    assert sum(result.accounts_by_state.values()) == 0
    assert result.equity == 0.0


# -- agreement with the scalar SPEC §4 valuation and with ticks applied to the engine --------

SYMBOLS = ("BTC", "ETH", "BTC-PERP", "ETH-PERP", "ETHBTC-PERP")
START = {"BTC": 60_000.0, "ETH": 3_000.0, "BTC-PERP": 60_000.0, "ETH-PERP": 3_000.0,
         "ETHBTC-PERP": 0.05}


def random_records(seed: int, accounts: int = 400) -> list[InputRecord]:
    """Leveraged books over three instruments (one settled in BTC), some collateral in BTC
    and ETH, then a move that leaves accounts in every state. A fifth of the positions are
    isolated (SPEC §4.1), on wallets funded with a tenth of their notional or so."""
    rng = random.Random(seed)
    records: list[InputRecord] = [tick(s, p, ts=1) for s, p in START.items()]
    for n in range(accounts):
        a = f"acct-{n:04d}"
        records.append(LedgerEntry(f"d{n}", a, "USDT", rng.uniform(500, 20_000), "deposit", 2))
        if rng.random() < 0.3:
            asset = rng.choice(["BTC", "ETH"])
            records.append(LedgerEntry(f"c{n}", a, asset, rng.uniform(0.01, 2), "deposit", 2))
        for k, symbol in enumerate(rng.sample(["BTC-PERP", "ETH-PERP", "ETHBTC-PERP"],
                                              rng.randint(1, 3))):
            price = START[symbol] * rng.uniform(0.97, 1.03)
            notional = rng.uniform(1_000, 400_000) / (60_000 if symbol == "ETHBTC-PERP" else 1)
            qty = notional / price / (0.1 if symbol == "ETH-PERP" else 1.0)
            mode = "isolated" if rng.random() < 0.2 else "cross"
            if mode == "isolated":
                settle = "BTC" if symbol == "ETHBTC-PERP" else "USDT"
                wallet = notional * rng.uniform(0.01, 0.2)  # notional is in settle units
                records.append(LedgerEntry(f"m{n}-{k}", a, settle, wallet, "isolated_margin", 2,
                                           symbol))
            records.append(Fill(fill_id=f"f{n}-{k}", account=a, symbol=symbol,
                                side=rng.choice(["buy", "sell"]), qty=qty, price=price, fee=0.0,
                                ts=2, margin_mode=mode))
    records += [tick("BTC-PERP", 58_800.0, ts=3), tick("ETH-PERP", 3_090.0, ts=3)]
    return records


SCENARIOS = [{"BTC-PERP": -0.2}, {"ETH-PERP": 0.15}, {"BTC": -0.3}, {"ETHBTC-PERP": 0.25},
             {"BTC": -0.1, "BTC-PERP": -0.1, "ETH": -0.15, "ETH-PERP": -0.15},
             {s: 0.3 for s in SYMBOLS}]


def close(a: float, b: float, scale: float) -> bool:
    """Within 1e-9 relative; near zero, relative to the account's largest figure."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9 * scale)


@pytest.mark.parametrize("shock", SCENARIOS, ids=lambda s: ",".join(f"{k}{v:+}" for k, v in
                                                                  s.items()))
def test_every_account_agrees_with_the_scalar_valuation(risk: RiskConfig,
                                                        shock: dict[str, float]) -> None:
    engine = build(risk, random_records(seed=11))
    book = StressBook(engine)
    figures = book.figures(book.shocked_prices(shock))
    states = book.next_states(figures.ratio)
    prices = {s: p * (1 + shock.get(s, 0.0)) for s, p in engine.prices.items()}
    assert {s.name for s in (held(engine, key).state for key in book.keys)} == {
        "HEALTHY", "MARGIN_CALL", "LIQUIDATING"}  # the book exercises every transition
    assert {held(engine, key).state.name for key in book.keys
            if isinstance(key, UnitKey)} == {"HEALTHY", "MARGIN_CALL", "LIQUIDATING"}
    for row, account_id in enumerate(book.keys):
        account = held(engine, account_id)
        v = value_account(account.balances, account.positions, risk, prices,
                          isolated=isinstance(account_id, UnitKey))
        assert v is not None
        scale = abs(v.collateral_value) + abs(v.unrealized_pnl) + v.maintenance_margin
        assert close(figures.equity[row], v.equity, scale), account_id
        assert close(figures.mm[row], v.maintenance_margin, scale), account_id
        assert states[row] == next_state(account.state, v.ratio, risk.thresholds), account_id


@pytest.mark.parametrize("symbol", SYMBOLS)
@pytest.mark.parametrize("fraction", [-0.25, 0.2])
def test_every_state_agrees_with_the_tick_applied_to_a_copy_of_the_engine(
        risk: RiskConfig, symbol: str, fraction: float) -> None:
    # one symbol at a time: several ticks would be several §5 steps, a shock is one
    records = random_records(seed=12)
    engine = build(risk, records)
    book = StressBook(engine)
    figures = book.figures(book.shocked_prices({symbol: fraction}))
    states = book.next_states(figures.ratio)
    copy = build(risk, records)
    copy.apply(tick(symbol, copy.prices[symbol] * (1 + fraction), ts=10), Source("prices"))
    for row, account_id in enumerate(book.keys):
        v = copy.valuation(account_id)
        assert v is not None
        scale = abs(v.collateral_value) + abs(v.unrealized_pnl) + v.maintenance_margin
        assert close(figures.equity[row], v.equity, scale), account_id
        assert close(figures.mm[row], v.maintenance_margin, scale), account_id
        assert states[row] == held(copy, account_id).state, account_id


def test_newly_liquidating_lists_exactly_the_accounts_the_ticks_liquidate(
        risk: RiskConfig) -> None:
    records = random_records(seed=13)
    engine = build(risk, records)
    [result] = run_scenarios(engine, [{"BTC-PERP": -0.2}])
    copy = build(risk, records)
    events = copy.apply(tick("BTC-PERP", 58_800.0 * 0.8, ts=10), Source("prices"))
    # events come by account, cross margin first, then isolated positions named account/symbol
    assert result.newly_liquidating == [e.event_id.rsplit(":", 2)[0] for e in events
                                        if e.type == "liquidation"]
    assert result.newly_liquidating  # the scenario is not vacuous
    assert any("/" in name for name in result.newly_liquidating)


def held(engine: Engine, key: RiskKey) -> Account:
    """The account, or isolated position, the key names."""
    return engine.units[key] if isinstance(key, UnitKey) else engine.accounts[key]


def test_the_first_scenario_is_valued_under_the_compile_lock(
        risk: RiskConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its kernels compile then, so two `liqmon stress` on a fresh install take turns
    (`monitor.compiled.compiling`); the scenarios after it run without the lock."""
    locked, valued_while = [False], []

    @contextlib.contextmanager
    def lock() -> Iterator[None]:
        locked[0] = True
        try:
            yield
        finally:
            locked[0] = False

    figures = StressBook.figures
    monkeypatch.setattr(monitor.stress, "compiling", lock)
    monkeypatch.setattr(StressBook, "figures",
                        lambda book, px: valued_while.append(locked[0]) or figures(book, px))

    run_scenarios(long_and_short(risk), [{"BTC-PERP": -0.17}, {"BTC-PERP": 0.17}])

    assert valued_while == [True, True, False]  # the unshocked book, then each scenario
