"""`replay.check_events`: the events a fleet published against replay's, as `liqmon replay
--bootstrap --check` reports them."""

from __future__ import annotations

import orjson

from monitor.replay import check_events


def event(event_id: str, emitted_at: int = 1, **fields: object) -> bytes:
    return orjson.dumps({"event_id": event_id, "type": "liquidation", "equity": -9_000.0,
                         **fields, "emitted_at": emitted_at})


def test_equal_events_agree_whatever_their_emitted_at_and_order() -> None:
    check = check_events([event("a:1:liquidation"), event("b:1:margin_call")],
                         [event("b:1:margin_call", 7), event("a:1:liquidation", 9)])
    assert check.agrees()
    assert (check.replayed, check.published, check.repeats) == (2, 2, 0)


def test_an_identical_repeat_is_at_least_once_delivery_and_agrees() -> None:
    check = check_events([event("a:1:liquidation")],
                         [event("a:1:liquidation", 1), event("a:1:liquidation", 5)])
    assert check.agrees()
    assert (check.published, check.repeats) == (1, 1)


def test_missing_extra_and_different_events_are_named_with_the_fields_that_differ() -> None:
    check = check_events(
        [event("a:1:liquidation"), event("b:1:liquidation"), event("c:2:recovered")],
        [event("a:1:liquidation", equity=-8_000.0, ts=5), event("d:1:margin_call")])
    assert not check.agrees()
    assert check.missing == ["b:1:liquidation", "c:2:recovered"]
    assert check.extra == ["d:1:margin_call"]
    assert check.different == [("a:1:liquidation", ["equity", "ts"])]
    assert check.lines(examples=1) == [
        "3 events replayed, 2 published (0 repeats): DIFFER; 2 missing, 1 extra, 1 different, "
        "0 repeats unlike the first, 0 unreadable",
        "missing b:1:liquidation",
        "extra d:1:margin_call",
        "different a:1:liquidation: equity, ts",
    ]


def test_a_repeat_unlike_the_first_copy_differs() -> None:
    check = check_events([event("a:1:liquidation")],
                         [event("a:1:liquidation"), event("a:1:liquidation", equity=0.0)])
    assert not check.agrees()
    assert check.repeats_unlike == [("a:1:liquidation", ["equity"])]


def test_values_that_are_not_events_are_counted_unreadable() -> None:
    check = check_events([], [b"not json", None, b"[1, 2]", b'{"event_id": 3}'])
    assert check.unreadable == 4
    assert not check.agrees()


def test_a_value_written_as_1_or_as_1_0_is_the_same_value() -> None:
    """Events are compared as values, not as text: the canonical JSON the comparison keeps
    differs, the events do not."""
    check = check_events([event("a:1:liquidation", equity=1.0, positions=[{"qty": 2.0}])],
                         [event("a:1:liquidation", equity=1, positions=[{"qty": 2}])])
    assert check.agrees()


def test_more_events_than_one_batch_of_the_database_are_all_compared() -> None:
    """25,000 events a side (10,000 are written at a time): one of them differs in its equity,
    one is missing and one extra, found as with a handful."""
    ids = [f"acct-{n:05d}:1:liquidation" for n in range(25_000)]
    replayed = [event(event_id) for event_id in ids]
    published = [event(event_id, 5) for event_id in ids[1:]] + [event("other:1:liquidation")]
    published[12_000] = event(ids[12_001], 5, equity=-1.0)
    check = check_events(replayed, published)
    assert (check.replayed, check.published, check.repeats) == (25_000, 25_000, 0)
    assert check.missing == [ids[0]]
    assert check.extra == ["other:1:liquidation"]
    assert check.different == [(ids[12_001], ["equity"])]
