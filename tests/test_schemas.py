"""The JSON Schemas in schemas/ agree with the code (SPEC §2, §5).

Input schemas accept exactly what the decoder accepts, except the two rules that need the risk
config (a fill's instrument, a ledger entry's asset), where a schema accepts any string. The event
schema describes exactly what the engine emits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from monitor.config import RiskConfig, load_config
from monitor.engine import Engine
from monitor.events import Source
from monitor.market import MarketRecord, simulate
from monitor.records import (
    FILLS,
    INPUT_KINDS,
    LEDGER,
    LEDGER_KINDS,
    MARGIN_MODES,
    MAX_ID_LENGTH,
    MAX_MAGNITUDE,
    MAX_TS,
    MIN_MAGNITUDE,
    PRICES,
    SIDES,
    Reason,
    Rejected,
    decode,
    from_document,
)
from monitor.state import EVENT_TYPES
from tests.support.schemas import (
    ALL_SCHEMAS,
    EVENT_TYPE_SCHEMAS,
    INPUT_SCHEMAS,
    SCHEMA_DIR,
    load_schema,
    schema_errors,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = ROOT / "examples" / "risk.toml"

# Rejections a schema cannot reproduce: they depend on the risk config.
CONFIG_DEPENDENT_REASONS = frozenset({Reason.UNKNOWN_INSTRUMENT, Reason.UNKNOWN_ASSET,
                                      Reason.NOT_SETTLE_ASSET})


def python_json(text: str) -> Any:
    """Parse like Python's json module, which reads numbers that overflow a double as inf."""
    return json.loads(text)


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def config() -> RiskConfig:
    return load_config(EXAMPLE_CONFIG)


@pytest.fixture(scope="module")
def market_records(config: RiskConfig) -> list[MarketRecord]:
    return list(simulate(config, accounts=50, steps=120, seed=3))


def run_engine(
    config: RiskConfig, records: Iterable[MarketRecord], source: Callable[[str, int], Source]
) -> list[dict[str, Any]]:
    """Feed the records to a fresh engine; return every event as a consumer would read it."""
    engine = Engine(config)
    payloads = []
    for i, record in enumerate(records):
        decoded = decode(record.topic, record.value_bytes(), config)
        for event in engine.apply(decoded, source(record.topic, i)):
            payloads.append(orjson.loads(event.encode()))
    return payloads


@pytest.fixture(scope="module")
def replay_events(config: RiskConfig, market_records: list[MarketRecord]) -> list[dict[str, Any]]:
    return run_engine(config, market_records,
                      lambda topic, i: Source(topic=topic, index=i))


@pytest.fixture(scope="module")
def kafka_events(config: RiskConfig, market_records: list[MarketRecord]) -> list[dict[str, Any]]:
    return run_engine(config, market_records,
                      lambda topic, i: Source(topic=topic, partition=i % 3, offset=i))


# -- the schemas themselves --------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_SCHEMAS)
def test_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://liqmon.dev/schemas/{name}.schema.json"
    assert schema["title"]
    assert schema["description"]


def test_every_schema_file_is_checked_by_this_module() -> None:
    on_disk = {path.name.removesuffix(".schema.json") for path in SCHEMA_DIR.glob("*.json")}
    assert on_disk == set(ALL_SCHEMAS)


# -- real messages validate ------------------------------------------------------------------

def test_simulated_inputs_validate_against_their_schemas(
    market_records: list[MarketRecord],
) -> None:
    assert {record.topic for record in market_records} == set(INPUT_KINDS)
    for record in market_records:
        assert isinstance(record.value, dict), "the simulation was asked for no bad records"
        value = orjson.loads(record.value_bytes())
        assert schema_errors(INPUT_SCHEMAS[record.topic], value) == [], value


def test_simulation_emits_every_event_type(replay_events: list[dict[str, Any]]) -> None:
    assert {event["type"] for event in replay_events} == set(EVENT_TYPES)


def test_replay_events_validate_against_the_event_schema(
    replay_events: list[dict[str, Any]],
) -> None:
    for event in replay_events:
        assert "index" in event["trigger"]
        assert schema_errors("event", event) == [], event


def test_kafka_events_validate_against_the_event_schema(
    kafka_events: list[dict[str, Any]],
) -> None:
    for event in kafka_events:
        assert {"partition", "offset"} <= event["trigger"].keys()
        assert schema_errors("event", event) == [], event


def test_each_event_validates_against_the_schema_of_its_type(
    replay_events: list[dict[str, Any]],
) -> None:
    for event in replay_events:
        assert schema_errors(EVENT_TYPE_SCHEMAS[event["type"]], event) == [], event


def test_each_event_fails_the_schemas_of_the_other_types(
    replay_events: list[dict[str, Any]],
) -> None:
    for event in replay_events:
        for other in set(EVENT_TYPES) - {event["type"]}:
            assert schema_errors(EVENT_TYPE_SCHEMAS[other], event) != [], (other, event)


# -- the event schema's own rules, on variations of a real event ----------------------------------

@pytest.fixture
def event(replay_events: list[dict[str, Any]]) -> dict[str, Any]:
    """A deep copy of a real event with a position, safe to mutate."""
    first = next(event for event in replay_events if event["positions"])
    return json.loads(json.dumps(first))


# Present exactly when the risk config asks for it ([prices] max_age_ms): no schema can require it.
CONFIG_DEPENDENT_EVENT_FIELDS = frozenset({"stale_prices"})


def test_event_schema_requires_every_field(event: dict[str, Any]) -> None:
    for name in set(event) - CONFIG_DEPENDENT_EVENT_FIELDS:
        incomplete = {key: value for key, value in event.items() if key != name}
        assert schema_errors("event", incomplete) != [], name


def test_event_schema_accepts_an_event_without_config_dependent_fields(
    event: dict[str, Any],
) -> None:
    plain = {key: value for key, value in event.items()
             if key not in CONFIG_DEPENDENT_EVENT_FIELDS}
    assert schema_errors("event", plain) == []


def test_event_schema_requires_every_position_field(event: dict[str, Any]) -> None:
    position = event["positions"][0]
    for name in position:
        incomplete = {key: value for key, value in position.items() if key != name}
        assert schema_errors("event", {**event, "positions": [incomplete]}) != [], name


def test_event_schema_rejects_unknown_properties(event: dict[str, Any]) -> None:
    event["note"] = "x"
    assert schema_errors("event", event) != []


def test_event_schema_rejects_unknown_position_properties(event: dict[str, Any]) -> None:
    event["positions"][0]["leverage"] = 10
    assert schema_errors("event", event) != []


def test_event_schema_rejects_a_trigger_with_both_index_and_offset(
    event: dict[str, Any],
) -> None:
    event["trigger"].update(partition=0, offset=5)
    assert schema_errors("event", event) != []


def test_event_schema_rejects_a_trigger_with_no_location(event: dict[str, Any]) -> None:
    del event["trigger"]["index"]
    assert schema_errors("event", event) != []


def test_event_schema_requires_null_ratio_exactly_when_insolvent(
    event: dict[str, Any],
) -> None:
    insolvent = {**event, "margin_ratio": None, "insolvent": True}
    ratio_missing = {**event, "margin_ratio": None, "insolvent": False}
    ratio_while_insolvent = {**event, "margin_ratio": 1.5, "insolvent": True}
    assert schema_errors("event", insolvent) == []
    assert schema_errors("event", ratio_missing) != []
    assert schema_errors("event", ratio_while_insolvent) != []


def test_event_schema_rejects_a_type_that_does_not_match_the_state(
    event: dict[str, Any],
) -> None:
    mismatched = next(t for t in EVENT_TYPES if t != event["type"])
    event["type"] = mismatched
    assert schema_errors("event", event) != []


def test_event_schema_accepts_a_null_liquidation_price(event: dict[str, Any]) -> None:
    event["positions"][0]["liquidation_price"] = None
    assert schema_errors("event", event) == []


def test_event_schema_accepts_a_null_bankruptcy_price(event: dict[str, Any]) -> None:
    event["positions"][0]["bankruptcy_price"] = None
    assert schema_errors("event", event) == []


def test_event_schema_rejects_a_bankruptcy_price_of_zero(event: dict[str, Any]) -> None:
    event["positions"][0]["bankruptcy_price"] = 0
    assert schema_errors("event", event) != []


@pytest.fixture
def liquidation(replay_events: list[dict[str, Any]]) -> dict[str, Any]:
    """A deep copy of a real liquidation event whose plan has a step, safe to mutate."""
    first = next(event for event in replay_events
                 if event["type"] == "liquidation" and event["liquidation_plan"]["steps"])
    return json.loads(json.dumps(first))


def test_event_schema_requires_a_plan_on_a_liquidation(liquidation: dict[str, Any]) -> None:
    del liquidation["liquidation_plan"]
    assert schema_errors("event", liquidation) != []


def test_event_schema_rejects_a_plan_on_other_events(
    replay_events: list[dict[str, Any]], liquidation: dict[str, Any],
) -> None:
    other = next(event for event in replay_events if event["type"] != "liquidation")
    assert schema_errors("event", {**other, "liquidation_plan": liquidation["liquidation_plan"]})


def test_event_schema_requires_every_plan_and_step_field(liquidation: dict[str, Any]) -> None:
    plan = liquidation["liquidation_plan"]
    for name in plan:
        incomplete = {key: value for key, value in plan.items() if key != name}
        assert schema_errors("event", {**liquidation, "liquidation_plan": incomplete}), name
    step = plan["steps"][0]
    for name in step:
        incomplete = {key: value for key, value in step.items() if key != name}
        broken = {**plan, "steps": [incomplete]}
        assert schema_errors("event", {**liquidation, "liquidation_plan": broken}), name


def test_event_schema_accepts_null_ratios_in_a_plan(liquidation: dict[str, Any]) -> None:
    plan = liquidation["liquidation_plan"]
    plan["margin_ratio_after"] = None
    plan["steps"][0]["margin_ratio_after"] = None
    assert schema_errors("event", liquidation) == []


def test_event_schema_rejects_unknown_plan_step_properties(liquidation: dict[str, Any]) -> None:
    liquidation["liquidation_plan"]["steps"][0]["venue"] = "adl"
    assert schema_errors("event", liquidation) != []


def test_replay_events_list_stale_prices_under_the_example_config(
    replay_events: list[dict[str, Any]],
) -> None:
    assert all(isinstance(event["stale_prices"], list) for event in replay_events)


@pytest.mark.parametrize("stale", [["BTC", "BTC"], [1], "BTC"])
def test_event_schema_rejects_malformed_stale_prices(event: dict[str, Any], stale: Any) -> None:
    assert schema_errors("event", {**event, "stale_prices": stale}) != []


# -- the decoder and the input schemas agree ---------------------------------------------------

VALID_TICK: dict[str, Any] = {"symbol": "BTC-PERP", "price": 65000.5, "ts": 1732400000123}
VALID_FILL: dict[str, Any] = {
    "fill_id": "f-1", "account": "acct-1", "symbol": "BTC-PERP", "side": "buy",
    "qty": 0.5, "price": 65000.0, "fee": 1.3, "ts": 1732400000123,
}
VALID_LEDGER: dict[str, Any] = {
    "entry_id": "l-1", "account": "acct-1", "asset": "USDT", "amount": -250.0,
    "kind": "withdrawal", "ts": 1732400000123,
}
VALID = {PRICES: VALID_TICK, FILLS: VALID_FILL, LEDGER: VALID_LEDGER}
REQUIRED = {
    PRICES: ("symbol", "price", "ts"),
    FILLS: ("fill_id", "account", "symbol", "side", "qty", "price", "ts"),
    LEDGER: ("entry_id", "account", "asset", "amount", "kind", "ts"),
}
OPTIONAL = {PRICES: (), FILLS: ("fee", "margin_mode"), LEDGER: ("symbol",)}
# SPEC §4.1: moves 250 USDT from the cross balance to the wallet of (acct-1, BTC-PERP).
VALID_ISOLATED_MARGIN: dict[str, Any] = {**VALID_LEDGER, "kind": "isolated_margin",
                                         "amount": 250.0, "symbol": "BTC-PERP"}
IDENTIFIERS = [(PRICES, "symbol"), (FILLS, "fill_id"), (FILLS, "account"), (FILLS, "symbol"),
               (LEDGER, "entry_id"), (LEDGER, "account"), (LEDGER, "asset")]


def with_field(topic_kind: str, /, **fields: Any) -> dict[str, Any]:
    return {**VALID[topic_kind], **fields}


def without(kind: str, name: str) -> dict[str, Any]:
    return {key: value for key, value in VALID[kind].items() if key != name}


# (kind, document, reason the decoder gives), one row per rejection class of SPEC §2.
BAD_DOCUMENTS: list[tuple[str, Any, str]] = [
    # not an object
    *[(kind, document, Reason.NOT_OBJECT) for kind in INPUT_KINDS
      for document in (None, [], [VALID[kind]], "x", 7, True)],
    # each missing field
    *[(kind, without(kind, name), Reason.MISSING_FIELD) for kind in INPUT_KINDS
      for name in REQUIRED[kind]],
    # strings that must be strings
    (PRICES, with_field(PRICES, symbol=1), Reason.WRONG_TYPE),
    (PRICES, with_field(PRICES, symbol=None), Reason.WRONG_TYPE),
    (FILLS, with_field(FILLS, fill_id=7), Reason.WRONG_TYPE),
    (FILLS, with_field(FILLS, account=None), Reason.WRONG_TYPE),
    (FILLS, with_field(FILLS, symbol=["BTC-PERP"]), Reason.WRONG_TYPE),
    (FILLS, with_field(FILLS, side=True), Reason.WRONG_TYPE),
    (LEDGER, with_field(LEDGER, entry_id={"id": 1}), Reason.WRONG_TYPE),
    (LEDGER, with_field(LEDGER, account=1.5), Reason.WRONG_TYPE),
    (LEDGER, with_field(LEDGER, asset=False), Reason.WRONG_TYPE),
    (LEDGER, with_field(LEDGER, kind=0), Reason.WRONG_TYPE),
    # booleans are not numbers
    (PRICES, with_field(PRICES, price=True), Reason.WRONG_TYPE),
    (PRICES, with_field(PRICES, ts=True), Reason.WRONG_TYPE),
    (FILLS, with_field(FILLS, qty=True), Reason.WRONG_TYPE),
    (FILLS, with_field(FILLS, fee=False), Reason.WRONG_TYPE),
    (LEDGER, with_field(LEDGER, amount=True), Reason.WRONG_TYPE),
    # strings are not numbers
    (PRICES, with_field(PRICES, price="65000.5"), Reason.WRONG_TYPE),
    (PRICES, with_field(PRICES, ts="1732400000123"), Reason.WRONG_TYPE),
    (FILLS, with_field(FILLS, qty="1"), Reason.WRONG_TYPE),
    (FILLS, with_field(FILLS, price="65000"), Reason.WRONG_TYPE),
    (FILLS, with_field(FILLS, fee="0"), Reason.WRONG_TYPE),
    (LEDGER, with_field(LEDGER, amount="10"), Reason.WRONG_TYPE),
    # other non-numbers
    (FILLS, with_field(FILLS, fee=None), Reason.WRONG_TYPE),
    (LEDGER, with_field(LEDGER, amount=[10]), Reason.WRONG_TYPE),
    # ts is an integer number of milliseconds
    (PRICES, with_field(PRICES, ts=1.5), Reason.WRONG_TYPE),
    (FILLS, with_field(FILLS, ts=1732400000123.25), Reason.WRONG_TYPE),
    (PRICES, with_field(PRICES, ts=-1), Reason.OUT_OF_RANGE),
    (LEDGER, with_field(LEDGER, ts=-1.0), Reason.OUT_OF_RANGE),
    (PRICES, with_field(PRICES, ts=MAX_TS + 1), Reason.OUT_OF_RANGE),
    (FILLS, with_field(FILLS, ts=1e19), Reason.OUT_OF_RANGE),
    # numbers that must be > 0
    (PRICES, with_field(PRICES, price=0), Reason.OUT_OF_RANGE),
    (PRICES, with_field(PRICES, price=-1), Reason.OUT_OF_RANGE),
    (FILLS, with_field(FILLS, qty=0), Reason.OUT_OF_RANGE),
    (FILLS, with_field(FILLS, qty=-0.5), Reason.OUT_OF_RANGE),
    (FILLS, with_field(FILLS, price=-1), Reason.OUT_OF_RANGE),
    (FILLS, with_field(FILLS, price=-0.0), Reason.OUT_OF_RANGE),
    # ... and ≥ 1e-15: four such factors multiplied underflowed to 0, then divided by
    (PRICES, with_field(PRICES, price=5e-324), Reason.OUT_OF_RANGE),
    (PRICES, with_field(PRICES, price=9.99e-16), Reason.OUT_OF_RANGE),
    (FILLS, with_field(FILLS, qty=1e-300), Reason.OUT_OF_RANGE),
    (FILLS, with_field(FILLS, price=1e-16), Reason.OUT_OF_RANGE),
    # huge numbers, which Python's json module parses to infinity
    (PRICES, python_json('{"symbol": "BTC", "price": 1e400, "ts": 1}'), Reason.NON_FINITE),
    (PRICES, python_json('{"symbol": "BTC", "price": 1, "ts": 1e400}'), Reason.NON_FINITE),
    (PRICES, python_json('{"symbol": "BTC", "price": -1e400, "ts": 1}'), Reason.NON_FINITE),
    (FILLS, with_field(FILLS, qty=python_json("1e400")), Reason.NON_FINITE),
    (FILLS, with_field(FILLS, fee=python_json("-1e999")), Reason.NON_FINITE),
    (LEDGER, with_field(LEDGER, amount=python_json("1e400")), Reason.NON_FINITE),
    (LEDGER, with_field(LEDGER, amount=python_json("-1e400")), Reason.NON_FINITE),
    # integers beyond a double's range, as Python's json module reads them
    (PRICES, with_field(PRICES, price=10**400), Reason.NON_FINITE),
    (FILLS, with_field(FILLS, fee=-(10**400)), Reason.NON_FINITE),
    (LEDGER, with_field(LEDGER, amount=10**400), Reason.NON_FINITE),
    # identifiers: empty or too long
    *[(kind, with_field(kind, **{name: text}), Reason.BAD_IDENTIFIER)
      for kind, name in IDENTIFIERS for text in ("", "x" * (MAX_ID_LENGTH + 1))],
    # ledger signs: a deposit brings money in, a withdrawal takes it out
    (LEDGER, with_field(LEDGER, kind="deposit", amount=-250.0), Reason.WRONG_SIGN),
    (LEDGER, with_field(LEDGER, kind="deposit", amount=0), Reason.WRONG_SIGN),
    (LEDGER, with_field(LEDGER, kind="deposit", amount=-0.0), Reason.WRONG_SIGN),
    (LEDGER, with_field(LEDGER, kind="withdrawal", amount=250.0), Reason.WRONG_SIGN),
    (LEDGER, with_field(LEDGER, kind="withdrawal", amount=0.0), Reason.WRONG_SIGN),
    # finite, but beyond the bound that keeps the arithmetic far from overflow
    (PRICES, with_field(PRICES, price=1.7976931348623157e308), Reason.TOO_LARGE),
    (PRICES, with_field(PRICES, price=1.0000000000000002e15), Reason.TOO_LARGE),
    (PRICES, with_field(PRICES, price=10**15 + 1), Reason.TOO_LARGE),
    (FILLS, with_field(FILLS, qty=1e308), Reason.TOO_LARGE),
    (FILLS, with_field(FILLS, price=2e15), Reason.TOO_LARGE),
    (FILLS, with_field(FILLS, fee=-1e16), Reason.TOO_LARGE),
    (FILLS, with_field(FILLS, fee=1e16), Reason.TOO_LARGE),
    (LEDGER, with_field(LEDGER, amount=-1e308), Reason.TOO_LARGE),
    (LEDGER, with_field(LEDGER, kind="deposit", amount=1e308), Reason.TOO_LARGE),
    (LEDGER, with_field(LEDGER, kind="funding", amount=10**20), Reason.TOO_LARGE),
    # unknown enumerations
    (FILLS, with_field(FILLS, side="hold"), Reason.UNKNOWN_SIDE),
    (FILLS, with_field(FILLS, side="BUY"), Reason.UNKNOWN_SIDE),
    (LEDGER, with_field(LEDGER, kind="gift"), Reason.UNKNOWN_KIND),
    (LEDGER, with_field(LEDGER, kind=""), Reason.UNKNOWN_KIND),
    # margin modes (SPEC §4.1)
    (FILLS, with_field(FILLS, margin_mode="ISOLATED"), Reason.UNKNOWN_MARGIN_MODE),
    (FILLS, with_field(FILLS, margin_mode="portfolio"), Reason.UNKNOWN_MARGIN_MODE),
    (FILLS, with_field(FILLS, margin_mode=None), Reason.WRONG_TYPE),
    (FILLS, with_field(FILLS, margin_mode=1), Reason.WRONG_TYPE),
    # an isolated_margin entry names the position its wallet belongs to
    (LEDGER, {k: v for k, v in VALID_ISOLATED_MARGIN.items() if k != "symbol"},
     Reason.MISSING_FIELD),
    (LEDGER, {**VALID_ISOLATED_MARGIN, "symbol": 7}, Reason.WRONG_TYPE),
    (LEDGER, {**VALID_ISOLATED_MARGIN, "symbol": ""}, Reason.BAD_IDENTIFIER),
    (LEDGER, {**VALID_ISOLATED_MARGIN, "symbol": "x" * (MAX_ID_LENGTH + 1)},
     Reason.BAD_IDENTIFIER),
]


@pytest.mark.parametrize(("kind", "document", "reason"), BAD_DOCUMENTS)
def test_bad_document_is_rejected_by_decoder_and_schema(
    config: RiskConfig, kind: str, document: Any, reason: str
) -> None:
    with pytest.raises(Rejected) as rejection:
        from_document(kind, document, config)
    assert rejection.value.reason == reason
    assert schema_errors(INPUT_SCHEMAS[kind], document) != []


GOOD_DOCUMENTS: list[tuple[str, dict[str, Any]]] = [
    *[(kind, VALID[kind]) for kind in INPUT_KINDS],
    (PRICES, with_field(PRICES, ts=123.0)),  # an integral float counts as an integer
    (PRICES, with_field(PRICES, ts=0)),
    (PRICES, with_field(PRICES, ts=MAX_TS)),
    (PRICES, with_field(PRICES, price=MIN_MAGNITUDE, symbol="NOT-CONFIGURED")),  # any symbol
    (FILLS, with_field(FILLS, qty=MIN_MAGNITUDE, price=MIN_MAGNITUDE)),
    (PRICES, with_field(PRICES, price=MAX_MAGNITUDE)),
    (PRICES, with_field(PRICES, price=10**15)),  # the bound, as an integer
    (FILLS, with_field(FILLS, qty=MAX_MAGNITUDE, price=MAX_MAGNITUDE, fee=-MAX_MAGNITUDE)),
    (LEDGER, with_field(LEDGER, amount=-MAX_MAGNITUDE)),
    (PRICES, with_field(PRICES, source="binance", seq=[1, 2])),  # extra fields are ignored
    (FILLS, without(FILLS, "fee")),  # fee defaults to 0
    (FILLS, with_field(FILLS, fee=-0.25, side="sell", ts=1732400000123.0)),  # rebate
    (FILLS, with_field(FILLS, qty=3, price=2, fee=0)),  # integers are numbers
    *[(LEDGER, with_field(LEDGER, kind=kind, symbol="BTC-PERP"))
      for kind in sorted(LEDGER_KINDS - {"deposit"})],
    *[(LEDGER, with_field(LEDGER, kind=kind, amount=250.0, symbol="BTC-PERP"))
      for kind in sorted(LEDGER_KINDS - {"withdrawal"})],
    (LEDGER, VALID_ISOLATED_MARGIN),
    (LEDGER, {**VALID_ISOLATED_MARGIN, "amount": -250.0}),  # back to the cross balance
    (LEDGER, with_field(LEDGER, symbol=None)),  # other kinds ignore symbol
    (FILLS, with_field(FILLS, margin_mode="cross")),
    (FILLS, with_field(FILLS, margin_mode="isolated")),
    (LEDGER, with_field(LEDGER, amount=0, asset="BTC", kind="adjustment")),
    (LEDGER, with_field(LEDGER, kind="deposit", amount=5e-324)),
    (FILLS, with_field(FILLS, account="a", fill_id="1")),  # one character is enough
    (FILLS, with_field(FILLS, account="é" * MAX_ID_LENGTH)),  # characters, not bytes
]


@pytest.mark.parametrize(("kind", "document"), GOOD_DOCUMENTS)
def test_good_document_is_accepted_by_decoder_and_schema(
    config: RiskConfig, kind: str, document: dict[str, Any]
) -> None:
    from_document(kind, document, config)
    assert schema_errors(INPUT_SCHEMAS[kind], document) == []


@pytest.mark.parametrize(("kind", "document", "reason"), [
    (FILLS, with_field(FILLS, symbol="DOGE-PERP"), Reason.UNKNOWN_INSTRUMENT),
    (LEDGER, with_field(LEDGER, asset="DOGE"), Reason.UNKNOWN_ASSET),
    (LEDGER, {**VALID_ISOLATED_MARGIN, "symbol": "DOGE-PERP"}, Reason.UNKNOWN_INSTRUMENT),
    # BTC-PERP settles in USDT: its wallet cannot hold BTC
    (LEDGER, {**VALID_ISOLATED_MARGIN, "asset": "BTC"}, Reason.NOT_SETTLE_ASSET),
])
def test_schema_accepts_names_that_only_the_risk_config_can_reject(
    config: RiskConfig, kind: str, document: dict[str, Any], reason: str
) -> None:
    with pytest.raises(Rejected) as rejection:
        from_document(kind, document, config)
    assert rejection.value.reason == reason
    assert schema_errors(INPUT_SCHEMAS[kind], document) == []


def test_integer_literal_too_large_for_a_double_is_dead_lettered_as_non_finite(
    config: RiskConfig,
) -> None:
    raw = '{"symbol": "BTC", "price": 1' + "0" * 400 + ', "ts": 1}'
    assert schema_errors("price_tick", python_json(raw)) != []
    with pytest.raises(Rejected) as rejection:
        decode(PRICES, raw.encode(), config)
    assert rejection.value.reason == Reason.NON_FINITE


# -- property: arbitrary JSON-ish documents ------------------------------------------------------

EDGE_INTS = (0, 1, -1, MAX_TS, MAX_TS + 1, -(2**63), 2**64, 10**400, -(10**400))
EDGE_FLOATS = (0.0, -0.0, 1.5, 123.0, 5e-324, 1.7976931348623157e308, 9.223372036854776e18,
               MAX_MAGNITUDE, -MAX_MAGNITUDE, 1.0000000000000002e15, MIN_MAGNITUDE, 9.99e-16)
# Arbitrary integers stay well inside a double's range; 10**400 checks the integers beyond it.
# Integers up to 2**53 are exact doubles, so at the ±1e15 bound the decoder's float() and the
# schema's exact comparison agree.
NUMBERS = (
    st.integers(min_value=-(2**80), max_value=2**80) | st.sampled_from(EDGE_INTS)
    | st.floats(allow_nan=False) | st.sampled_from(EDGE_FLOATS)
)
SCALARS = st.none() | st.booleans() | NUMBERS | st.text(max_size=8)
JUNK = SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(st.text(max_size=3), SCALARS,
                                                                  max_size=2)
POSITIVE = st.floats(min_value=0.0, max_value=MAX_MAGNITUDE, exclude_min=True)
FINITE = st.floats(min_value=-MAX_MAGNITUDE, max_value=MAX_MAGNITUDE)
TIMESTAMPS = st.integers(min_value=0, max_value=MAX_TS) | st.integers(0, 2**53).map(float)


def plausible_values(kind: str, name: str, config: RiskConfig) -> st.SearchStrategy[Any]:
    """Values that usually pass the field's rule, so that whole documents are often valid."""
    if name == "symbol" and kind in (FILLS, LEDGER):  # a ledger symbol names an instrument
        return st.sampled_from(sorted(config.instruments))
    if name == "symbol":
        return st.sampled_from(sorted(config.price_symbols())) | st.text(max_size=8)
    if name == "asset":
        return st.sampled_from(sorted(config.assets))
    if name == "side":
        return st.sampled_from(sorted(SIDES))
    if name == "margin_mode":
        return st.sampled_from(MARGIN_MODES)
    if name == "kind":
        return st.sampled_from(sorted(LEDGER_KINDS))
    if name in ("price", "qty"):
        return POSITIVE
    if name in ("fee", "amount"):
        return FINITE
    if name == "ts":
        return TIMESTAMPS
    return st.text(min_size=1, max_size=8)  # ids and account


def near_misses(kind: str, name: str) -> st.SearchStrategy[Any]:
    """Values of the right JSON type that break the field's rule, or only just pass it."""
    if name in ("side", "kind", "asset", "margin_mode") or (name == "symbol" and kind == FILLS):
        return st.text(max_size=8) | st.sampled_from(("BUY", "Sell", "gift", "DOGE-PERP", ""))
    if name in ("fill_id", "entry_id", "account", "symbol"):
        return st.sampled_from(("", "x" * MAX_ID_LENGTH, "x" * (MAX_ID_LENGTH + 1)))
    if name in ("price", "qty", "fee", "amount"):
        return NUMBERS | st.sampled_from((0, -1, float("inf"), float("-inf")))
    if name == "ts":
        return NUMBERS
    return JUNK  # a string field: any other JSON type misses


@st.composite
def documents(draw: st.DrawFn, kind: str, config: RiskConfig) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(JUNK)
    fields = REQUIRED[kind] + OPTIONAL[kind]
    document: dict[str, Any] = {}
    for name in fields:
        choice = draw(st.sampled_from(("plausible",) * 6 + ("near miss", "junk", "absent")))
        if choice == "plausible":
            document[name] = draw(plausible_values(kind, name, config))
        elif choice == "near miss":
            document[name] = draw(near_misses(kind, name))
        elif choice == "junk":
            document[name] = draw(JUNK)
    extra = draw(st.dictionaries(st.text(max_size=4).filter(lambda key: key not in fields), JUNK,
                                 max_size=2))
    return {**document, **extra}


@pytest.mark.parametrize("kind", INPUT_KINDS)
@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_schema_and_decoder_agree_on_arbitrary_documents(
    config: RiskConfig, kind: str, data: st.DataObject
) -> None:
    document = data.draw(documents(kind, config))
    errors = schema_errors(INPUT_SCHEMAS[kind], document)
    try:
        from_document(kind, document, config)
    except Rejected as rejection:
        if rejection.reason not in CONFIG_DEPENDENT_REASONS:
            assert errors != [], f"decoder rejects ({rejection}), schema accepts {document!r}"
    else:
        assert errors == [], f"decoder accepts, schema rejects {document!r}"


# -- dead letters ------------------------------------------------------------------------------
# Hand-built records pin the schema's shape here; tests/service/test_service.py validates the
# dead letters the service really produces against the same schema.

DEAD_LETTER_SAMPLE: dict[str, Any] = {
    "error": "unknown_side: side: must be \"buy\" or \"sell\", got 'hold'",
    "source_topic": "fills",
    "source_partition": 2,
    "source_offset": 81234,
    "key": "acct-17",
    "value": '{"fill_id": "f-9", "side": "hold"}',
}


def test_dead_letter_schema_shape_accepts_a_hand_built_record() -> None:
    assert schema_errors("dead_letter", DEAD_LETTER_SAMPLE) == []
    assert schema_errors("dead_letter", {**DEAD_LETTER_SAMPLE, "key": None}) == []


@pytest.mark.parametrize("change", [
    {"extra": 1},
    {"key": 5},
    {"value": None},
    {"source_partition": -1},
    {"source_offset": "81234"},
])
def test_dead_letter_schema_shape_rejects_a_malformed_record(change: dict[str, Any]) -> None:
    assert schema_errors("dead_letter", {**DEAD_LETTER_SAMPLE, **change}) != []


def test_dead_letter_schema_shape_requires_every_field() -> None:
    for name in DEAD_LETTER_SAMPLE:
        record = {key: value for key, value in DEAD_LETTER_SAMPLE.items() if key != name}
        assert schema_errors("dead_letter", record) != [], name
