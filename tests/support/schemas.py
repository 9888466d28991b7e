"""Validation against the JSON Schemas in schemas/ (draft 2020-12, cross-references resolved):
for the schema tests and for the tests that check what the service writes."""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from monitor.records import FILLS, LEDGER, PRICES
from monitor.state import EVENT_TYPES
from tests.support.paths import REPO

SCHEMA_DIR = REPO / "schemas"

INPUT_SCHEMAS = {PRICES: "price_tick", FILLS: "fill", LEDGER: "ledger_entry"}
EVENT_TYPE_SCHEMAS = {event_type: event_type for event_type in EVENT_TYPES}
ALL_SCHEMAS = (
    *INPUT_SCHEMAS.values(), "event", *EVENT_TYPE_SCHEMAS.values(), "dead_letter",
    "stress_report",
)

def load_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))


def _registry() -> Registry:
    schemas = [load_schema(name) for name in ALL_SCHEMAS]
    return Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas
    )


REGISTRY = _registry()
VALIDATORS = {
    name: Draft202012Validator(load_schema(name), registry=REGISTRY) for name in ALL_SCHEMAS
}


def schema_errors(name: str, instance: Any) -> list[str]:
    """Every violation of schema `name`, as `json/pointer: message` lines (empty when valid)."""
    return [
        f"/{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in VALIDATORS[name].iter_errors(instance)
    ]
