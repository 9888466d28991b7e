"""Shared fixtures: a small risk config whose numbers the worked examples use by hand."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.support")  # before its imports below

from monitor.config import RiskConfig, parse_config  # noqa: E402
from tests.support.risk import RISK  # noqa: E402


@pytest.fixture
def risk() -> RiskConfig:
    return parse_config(RISK)


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> None:
    """Compile (or load from numba's cache) every kernel once, before the first test: on a
    fresh install that takes ~30–60 s, which must not count against the readiness timeout of
    whichever service test happens to run first."""
    from monitor.service.runner import warm_up_kernels

    warm_up_kernels()


@pytest.fixture(autouse=True)
def reap_processes():
    """No monitor a test started outlives it, even when the test fails."""
    yield
    from tests.support.kafka import reap

    reap()


@pytest.fixture(autouse=True)
def logging_as_it_was():
    """A test that runs a command in-process (`cli.main`) configures logging for the whole
    process: put it back after, or a later test in the same worker captures no log line
    (`liqmon demo` configures the level "error", which drops the rest before any processor
    sees them) and the stdlib's handler writes to a captured stream pytest has closed."""
    import logging

    import structlog

    config = structlog.get_config()
    root, client = logging.getLogger(), logging.getLogger("aiokafka")
    handlers, level, client_level = root.handlers[:], root.level, client.level
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)
    client.setLevel(client_level)


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
