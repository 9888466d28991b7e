"""Topic set-up: create what is missing, check what exists (SPEC §2, §6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from monitor.errors import LiqmonError
from monitor.service.settings import ServiceSettings

# The changelog, when liqmon creates it. Compaction never touches a partition's active segment,
# which Kafka rolls after 7 days or 1 GiB by default: every checkpoint writes a control record
# per partition (~0.1-0.9 MB), and a restore would read them all back, hundreds of MB an hour
# at a steady rate. Segments rolled hourly, or at 100 MiB, keep what a restore reads short.
CHANGELOG_CONFIG = {"cleanup.policy": "compact", "segment.ms": str(3_600_000),
                    "segment.bytes": str(100 * 1024 * 1024)}


class TopicLayoutError(LiqmonError):
    """The topics exist but cannot be used as they are (e.g. fills and ledger differ)."""


class TopicMissing(LiqmonError):
    """An output topic disappeared while running: what is published to it is lost."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"output topic {topic!r} no longer exists (deleted while running?): "
                         "stopping without checkpointing, so that nothing published since "
                         "is lost; recreate it and restart")
        self.topic = topic


class PartitionsChanged(LiqmonError):
    """A topic's partition count changed while running: an instance reads the partitions it
    found at start, and its accounts are spread over them."""

    def __init__(self, topic: str, was: int, now: int) -> None:
        super().__init__(
            f"topic {topic!r} has {now} partitions, {was} when this instance started (deleted "
            "and re-created, perhaps by a client's metadata request on a broker that creates "
            "topics on demand, or partitions added): stopping rather than leave partitions "
            "unread. A start reads the partitions there are; fills and ledger must have equal "
            "counts, and the changelog as many, or it refuses (README, Running against Kafka)")
        self.topic, self.was, self.now = topic, was, now


def output_topics(settings: ServiceSettings) -> list[str]:
    """Topics liqmon writes to."""
    t = settings.topics
    return [t.margin_calls, t.liquidations, t.dead_letter, t.state]


@dataclass(frozen=True)
class Replication:
    """The replication factor liqmon creates topics with: the cluster's
    `default.replication.factor` (what a topic created without one gets), or, where the
    brokers do not report it, as many replicas as there are brokers, up to 3."""

    factor: int
    brokers: int
    reported: bool  # the brokers said their default


async def replication(admin: AIOKafkaAdminClient) -> Replication:
    """A literal factor of 1, as liqmon gave every topic it created, overrides the cluster's
    default: on Apache Kafka one broker's loss then loses events and checkpoints, and a
    cluster with min.insync.replicas=2 refuses every acks=all write to them, retriably, so
    nothing is ever published. aiokafka's CreateTopics (v3) cannot ask for the broker's default
    (-1 needs v4), so it is read from the brokers' configs."""
    cluster = await admin.describe_cluster()
    brokers = [broker["node_id"] for broker in cluster["brokers"]]
    try:
        answers = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.BROKER, str(brokers[0]))])
        entries = {entry[0]: entry[1] for answer in answers for resource in answer.resources
                   if not resource[0] for entry in resource[4]}
    except KafkaError:
        entries = {}
    return replication_for(len(brokers), entries)


def replication_for(brokers: int, configs: dict[str, str]) -> Replication:
    """`Replication` on ``brokers`` brokers, from a broker's ``configs`` as described."""
    default = configs.get("default.replication.factor")
    if default is not None and default.isdigit() and int(default) > 0:
        return Replication(int(default), brokers, reported=True)
    return Replication(min(3, brokers), brokers, reported=False)


async def ensure_topics(admin: AIOKafkaAdminClient, settings: ServiceSettings,
                        log: Any = None) -> dict[str, int]:
    """Create missing topics (with the cluster's replication, `replication`; said in
    ``log``) and return every topic's partition count.

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
    partitions = dict.fromkeys(wanted, settings.partitions)
    pair = [name for name in (topics.fills, topics.ledger) if name in existing]
    if len(pair) == 1:
        # co-partitioned: the one created beside the other takes its count, not --partitions
        count = (await partition_counts(admin, pair))[pair[0]]
        partitions[topics.fills] = partitions[topics.ledger] = count
    to_create = [name for name in [*wanted, topics.state] if name not in existing]
    copies = await replication(admin) if to_create else None
    missing = [NewTopic(name, partitions[name], copies.factor, topic_configs=config)
               for name, config in wanted.items() if name not in existing and copies]
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
        assert copies is not None
        await _create(admin, [NewTopic(topics.state, counts[topics.fills], copies.factor,
                                       topic_configs=CHANGELOG_CONFIG)])
    counts.update(await partition_counts(admin, [topics.state]))
    if counts[topics.state] != counts[topics.fills]:
        raise TopicLayoutError(
            f"'{topics.state}' has {counts[topics.state]} partitions but '{topics.fills}' has "
            f"{counts[topics.fills]}: the changelog must have one partition per account partition"
        )
    if copies is not None and log is not None:
        _say_created(log, to_create, copies)
    return counts


def _say_created(log: Any, names: list[str], copies: Replication) -> None:
    log.info("topics created", topics=names, replication_factor=copies.factor,
             brokers=copies.brokers, cluster_default=copies.reported)
    if copies.factor == 1 and copies.brokers > 1:
        log.warning("topics created with one replica (the cluster's default.replication.factor"
                    "): one broker's loss loses their records, the changelog's state with "
                    "them; create liqmon's topics beforehand with the cluster's usual "
                    "replication (deploy/README.md)", topics=names, brokers=copies.brokers)


# Kafka's max.message.bytes by default (1 MiB + 12 B), assumed when the broker does not say.
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
# What a record batch holds beside one record's value (batch and record headers, key,
# liqmon's headers), generously: a control record's value may take the rest.
BATCH_ROOM = 16 * 1024
# The largest record the producer hands over (its max_request_size, clients.py: aiokafka
# checks a record's uncompressed size against it, and nothing else). Above what Kafka's topics
# take (max.message.bytes, of a compressed batch), so that the topic's limit is the one that
# decides, and raising it is the remedy (README, Event size); below the broker's
# socket.request.max.bytes (100 MiB).
MAX_REQUEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ChangelogCheck:
    """What `changelog_kept` found: why it could not tell the changelog's policy (for a
    warning; None when the topic is compacted only), and how many bytes a control record's
    value may take there (`control_record_limit`)."""

    doubt: str | None
    record_limit: int


def control_record_limit(max_message_bytes: str | None) -> int:
    """Bytes a control record's value may take on a changelog whose max.message.bytes is
    this (None: not reported, Kafka's default assumed): a record over it is refused for
    good, and the instance would stop at every checkpoint."""
    limit = DEFAULT_MAX_MESSAGE_BYTES
    if max_message_bytes is not None and max_message_bytes.isdigit():
        limit = int(max_message_bytes)
    return max(min(limit, MAX_REQUEST_BYTES) - BATCH_ROOM, BATCH_ROOM)


async def changelog_kept(admin: AIOKafkaAdminClient, topic: str) -> ChangelogCheck:
    """Refuse (`TopicLayoutError`) a changelog whose broker would delete records by age
    (cleanup.policy delete, or compact,delete with a finite retention.ms): a snapshot of an
    account that does not change would go, and the account with it at the next restore.
    Says why it could not tell (a broker that does not answer, or does not report the
    policy), for a warning, and the size its control records must keep within."""
    try:
        # every config: the embedded broker drops the connection when asked for a few
        answers = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    except KafkaError as exc:
        return ChangelogCheck(f"the broker did not describe its configs ({exc!r})",
                              control_record_limit(None))
    # (error_code, error_message, resource_type, resource_name, config_entries), each entry
    # (name, value, ...), whatever the version
    resources = [resource for answer in answers for resource in answer.resources]
    if not resources or resources[0][0]:
        return ChangelogCheck("the broker did not describe its configs "
                              f"({resources[0][:2] if resources else ''})",
                              control_record_limit(None))
    configs = {entry[0]: entry[1] for entry in resources[0][4]}
    limit = control_record_limit(configs.get("max.message.bytes"))
    policy = configs.get("cleanup.policy")
    if policy is None:
        return ChangelogCheck("the broker does not report its cleanup.policy", limit)
    kinds = {kind.strip() for kind in policy.split(",")}
    retention = configs.get("retention.ms")
    fix = ("Make it compacted only: kafka-configs.sh --alter --entity-type topics "
           f"--entity-name {topic} --add-config cleanup.policy=compact")
    if "delete" in kinds and retention != "-1":
        raise TopicLayoutError(
            f"'{topic}' has cleanup.policy={policy}"
            + (f" and retention.ms={retention}" if retention else "")
            + ": the snapshot of an account that does not change would be deleted by age, "
            f"and the account lost at the next restart. {fix}")
    if "compact" not in kinds:
        raise TopicLayoutError(
            f"'{topic}' has cleanup.policy={policy}: it is not compacted, so every restore "
            f"reads every snapshot ever written. {fix}")
    return ChangelogCheck(None, limit)


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
