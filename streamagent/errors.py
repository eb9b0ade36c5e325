"""One root exception for streamagent; each subclass says what an operator should do."""


class StreamagentError(Exception):
    """Root of every error streamagent raises on purpose."""


class ConfigError(StreamagentError):
    """A setting is missing or wrong. The message names the STREAMAGENT_* variable to fix."""


class BrokerError(StreamagentError):
    """The local Kafka broker could not be provisioned, started or stopped.

    Check that Java 17+ and Maven are installed and that the port is free, or use an
    external broker by setting STREAMAGENT_KAFKA_BOOTSTRAP.
    """


class InvalidMessage(StreamagentError):
    """A consumed message broke its topic's contract; it belongs on the dead-letter topic.

    ``reason`` is a short, bounded class (used as a metric label); ``detail`` is free text.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SnapshotRejected(StreamagentError):
    """A model snapshot is unfit to decide with; whoever holds a model keeps it.

    ``reason`` is one of ``REASONS`` (a metric label); ``detail`` says what exactly. A
    snapshot from model-updates is skipped: look at who published it (docs/OPERATIONS.md,
    model safety).
    """

    REASONS = ("undecodable", "shape", "non_finite", "actions", "features", "version",
               "producer")

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class CorruptCheckpoint(ConfigError):
    """The learner's checkpoint cannot be read or holds unusable weights. It is written
    atomically, so this means a damaged disk or a hand-edited file: move the file named in the
    message away and start the learner again (docs/OPERATIONS.md, model safety)."""


class CatalogError(ConfigError):
    """The coupon catalog file is malformed. Fix the file named in the message."""


class OfflineDataError(StreamagentError):
    """Logged decisions cannot be evaluated as asked (a malformed log file, a missing field, a
    model whose features or actions differ from the logs'). The message names the file, row
    or difference to fix."""


class MissingExtra(StreamagentError):
    """A command needs an optional dependency that is not installed. The message names the
    extra to install (``pip install 'streamagent[<extra>]'``)."""


class RebalanceStuck(StreamagentError):
    """A worker's part of a rebalance (giving up its partitions: waiting for the batches in
    progress and flushing the producer) did not end in time, so the worker stops itself to be
    restarted by its supervisor, which resumes from the last committed offsets. The log line
    before it holds the agents' and the revocation's stacks: where it waited. Raise
    STREAMAGENT_REVOKE_TIMEOUT_S if a slow broker legitimately needs longer."""
