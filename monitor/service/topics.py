"""Topic set-up: create what is missing, check what exists (SPEC §2, §6)."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from monitor.errors import LiqmonError
from monitor.service.settings import ServiceSettings

COMPACTED = {"cleanup.policy": "compact"}


class TopicLayoutError(LiqmonError):
    """The topics exist but cannot be used as they are (e.g. fills and ledger differ)."""


class TopicMissing(LiqmonError):
    """An output topic disappeared while running: what is published to it is lost."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"output topic {topic!r} no longer exists (deleted while running?): "
                         "stopping without checkpointing, so that nothing published since "
                         "is lost; recreate it and restart")
        self.topic = topic


def output_topics(settings: ServiceSettings) -> list[str]:
    """Topics liqmon writes to."""
    t = settings.topics
    return [t.margin_calls, t.liquidations, t.dead_letter, t.state]


async def ensure_topics(admin: AIOKafkaAdminClient, settings: ServiceSettings) -> dict[str, int]:
    """Create missing topics and return every topic's partition count.

    Topics are created before any client asks for their metadata: some brokers (Tansu among
    them) auto-create a topic on a metadata request, with their own partition count and no
    compaction.
    """
    topics = settings.topics
    existing = set(await admin.list_topics())
    wanted: dict[str, dict[str, str]] = {  # name: topic config
        topics.prices: {}, topics.fills: {}, topics.ledger: {}, topics.margin_calls: {},
        topics.liquidations: {}, topics.dead_letter: {},
    }
    missing = [NewTopic(name, settings.partitions, 1, topic_configs=config)
               for name, config in wanted.items() if name not in existing]
    if missing:
        await _create(admin, missing)
    counts = await partition_counts(admin, list(wanted))
    if counts[topics.fills] != counts[topics.ledger]:
        raise TopicLayoutError(
            f"'{topics.fills}' has {counts[topics.fills]} partitions but '{topics.ledger}' has "
            f"{counts[topics.ledger]}: they must be co-partitioned by account (equal counts), "
            "because each instance owns the accounts of the partitions it is assigned"
        )
    if topics.state not in existing:
        # The changelog mirrors the account partitioning: partition p holds the accounts of
        # fills/ledger partition p.
        await _create(admin, [NewTopic(topics.state, counts[topics.fills], 1,
                                       topic_configs=COMPACTED)])
    counts.update(await partition_counts(admin, [topics.state]))
    if counts[topics.state] != counts[topics.fills]:
        raise TopicLayoutError(
            f"'{topics.state}' has {counts[topics.state]} partitions but '{topics.fills}' has "
            f"{counts[topics.fills]}: the changelog must have one partition per account partition"
        )
    return counts


async def create_topics(settings: ServiceSettings) -> dict[str, int]:
    """ensure_topics with an admin client of its own (tools, benchmarks, tests)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap,
                                client_id=f"{settings.client_id}-admin",
                                **settings.security.client_kwargs())
    await admin.start()
    try:
        return await ensure_topics(admin, settings)
    finally:
        await admin.close()


async def _create(admin: AIOKafkaAdminClient, new: list[NewTopic]) -> None:
    response = await admin.create_topics(new)
    for name, code, message in response.topic_errors:
        if code and code != TopicAlreadyExistsError.errno:
            raise for_code(code)(f"cannot create topic {name!r}: {message}")


async def partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    described = await admin.describe_topics(names)
    return {topic["topic"]: len(topic["partitions"]) for topic in described}
