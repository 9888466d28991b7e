"""The topics liqmon checks before it starts: a changelog must keep what does not change."""

from __future__ import annotations

import pytest
import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from structlog.testing import capture_logs

from monitor.service.topics import (
    ChangelogCheck,
    Replication,
    TopicLayoutError,
    _say_created,
    changelog_kept,
    control_record_limit,
    create_topics,
    ensure_topics,
    replication_for,
)
from tests.support.kafka import fresh_settings

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def kept(bootstrap: str, topic: str, configs: dict[str, str] | None) -> ChangelogCheck:
    """`changelog_kept` of a topic made with these configs (None: liqmon makes it)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if configs is not None:
            await admin.create_topics([NewTopic(topic, 1, 1, topic_configs=configs)])
        return await changelog_kept(admin, topic)
    finally:
        await admin.close()


async def test_the_changelog_liqmon_makes_is_kept(broker) -> None:
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    assert (await kept(broker.bootstrap, settings.topics.state, None)).doubt is None


async def test_the_changelog_liqmon_makes_rolls_its_segments_hourly_or_at_100_mib(broker) -> None:
    """Compaction skips the active segment: with Kafka's default roll (7 days, 1 GiB) a restore
    would read every control record written for days."""
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        (answer,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, settings.topics.state)])
    finally:
        await admin.close()
    configs = {name: value for name, value, *_ in answer.resources[0][4]}
    assert configs == {**configs, "cleanup.policy": "compact", "segment.ms": "3600000",
                       "segment.bytes": "104857600"}


@pytest.mark.parametrize("configs", [
    {"cleanup.policy": "delete"},
    {"cleanup.policy": "compact,delete", "retention.ms": "604800000"},
])
async def test_a_changelog_that_deletes_by_age_is_refused(broker, configs) -> None:
    topic = f"{fresh_settings(broker.bootstrap).topics.state}.deleting"
    with pytest.raises(TopicLayoutError, match=rf"^'{topic}' has cleanup.policy="
                       rf"{configs['cleanup.policy']}.*the snapshot of an account that does "
                       "not change would be deleted by age"):
        await kept(broker.bootstrap, topic, configs)


async def test_compact_and_delete_with_no_time_limit_is_kept(broker) -> None:
    topic = f"{fresh_settings(broker.bootstrap).topics.state}.forever"
    configs = {"cleanup.policy": "compact,delete", "retention.ms": "-1"}
    assert (await kept(broker.bootstrap, topic, configs)).doubt is None


async def test_a_policy_the_broker_does_not_report_is_a_doubt_not_a_refusal(broker) -> None:
    """The embedded broker reports no cleanup.policy for a topic made without one."""
    topic = f"{fresh_settings(broker.bootstrap).topics.state}.unset"
    assert (await kept(broker.bootstrap, topic, {})).doubt == (
        "the broker does not report its cleanup.policy")


async def test_a_changelog_s_max_message_bytes_bounds_its_control_records(broker) -> None:
    topic = f"{fresh_settings(broker.bootstrap).topics.state}.roomy"
    configs = {"cleanup.policy": "compact", "max.message.bytes": "4000000"}
    assert (await kept(broker.bootstrap, topic, configs)).record_limit == 4_000_000 - 16_384


async def test_a_changelog_that_does_not_report_its_size_limit_gets_kafka_s_default(broker) -> None:
    # the embedded broker reports only the configs a topic was made with
    topic = f"{fresh_settings(broker.bootstrap).topics.state}.plain"
    assert (await kept(broker.bootstrap, topic, {"cleanup.policy": "compact"})).record_limit == (
        1_048_588 - 16_384)


@pytest.mark.parametrize(("max_message_bytes", "limit"), [
    ("2000000", 2_000_000 - 16_384),
    ("100000000", 64 * 1024 * 1024 - 16_384),  # no more than the producer hands over
    ("1000", 16_384),  # smaller than any checkpoint: nothing is cut for it beyond this
    ("not a number", 1_048_588 - 16_384),
])
async def test_control_record_limit(max_message_bytes: str, limit: int) -> None:
    assert control_record_limit(max_message_bytes) == limit


async def test_a_missing_ledger_is_created_with_as_many_partitions_as_the_existing_fills(
        broker) -> None:
    """It was created with --partitions (1), and the start then refused the pair as not
    co-partitioned, leaving the operator a topic to delete."""
    settings = fresh_settings(broker.bootstrap, partitions=1)
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(settings.topics.fills, 3, 1)])
    finally:
        await admin.close()
    counts = await create_topics(settings)
    assert (counts[settings.topics.fills], counts[settings.topics.ledger],
            counts[settings.topics.state], counts[settings.topics.prices]) == (3, 3, 3, 1)


# -- replication of the topics liqmon creates -------------------------------------------------

@pytest.mark.parametrize(("brokers", "configs", "factor", "reported"), [
    (5, {"default.replication.factor": "3"}, 3, True),  # what a topic created bare gets
    (3, {"default.replication.factor": "1"}, 1, True),  # the platform's word, said (below)
    (5, {}, 3, False),  # a broker that does not report it: as many as brokers, up to 3
    (1, {}, 1, False),
    (2, {"default.replication.factor": "garbage"}, 2, False),
])
async def test_topics_are_created_with_the_cluster_s_default_replication(
        brokers: int, configs: dict[str, str], factor: int, reported: bool) -> None:
    assert replication_for(brokers, configs) == Replication(factor, brokers, reported)


async def test_the_topics_liqmon_creates_are_said_with_their_replication(broker) -> None:
    """The embedded broker is one broker that reports no default: one replica, no warning."""
    settings = fresh_settings(broker.bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        with capture_logs() as logs:
            await ensure_topics(admin, settings, structlog.get_logger("liqmon"))
    finally:
        await admin.close()
    (said,) = logs
    t = settings.topics
    assert said["event"] == "topics created"
    assert set(said["topics"]) == {t.prices, t.fills, t.ledger, t.margin_calls, t.liquidations,
                                   t.dead_letter, t.state}
    assert (said["replication_factor"], said["brokers"], said["cluster_default"]) == (1, 1, False)


async def test_one_replica_on_a_cluster_of_several_brokers_is_a_warning() -> None:
    with capture_logs() as logs:
        _say_created(structlog.get_logger("liqmon"), ["liquidations"], Replication(1, 3, True))
    assert [log["log_level"] for log in logs] == ["info", "warning"]
    assert logs[1]["event"].startswith("topics created with one replica")
    assert (logs[1]["topics"], logs[1]["brokers"]) == (["liquidations"], 3)
