"""pgqueue: a PostgreSQL job queue and transactional outbox.

Jobs are rows in your own database, enqueued in your own transaction; workers lease them
with ``FOR UPDATE SKIP LOCKED`` and run them at least once.
"""

from pgqueue.app import App, Route, Task
from pgqueue.enqueue import JobSpec, enqueue, enqueue_async, enqueue_many, enqueue_many_async
from pgqueue.errors import (
    Cancel,
    ConfigurationError,
    DatabaseError,
    DuplicateJob,
    JobControl,
    LeaseLost,
    NonRetryable,
    NotFound,
    PayloadTooLarge,
    PgQueueError,
    QueueFull,
    Retry,
    SchemaNotReady,
    Snooze,
)
from pgqueue.job import Job
from pgqueue.outbox import OutboxMessage, publish, publish_async, publish_many, publish_many_async
from pgqueue.queues import configure_queue, list_queues, pause_queue, resume_queue
from pgqueue.relay import Relay, RelaySettings
from pgqueue.retry import RetryPolicy
from pgqueue.threads import JobTimeout
from pgqueue.worker import Worker, WorkerSettings

__version__ = "0.1.0"

__all__ = [
    "App",
    "Cancel",
    "ConfigurationError",
    "DatabaseError",
    "DuplicateJob",
    "Job",
    "JobControl",
    "JobSpec",
    "JobTimeout",
    "LeaseLost",
    "NonRetryable",
    "NotFound",
    "OutboxMessage",
    "PayloadTooLarge",
    "PgQueueError",
    "QueueFull",
    "Relay",
    "RelaySettings",
    "Retry",
    "RetryPolicy",
    "Route",
    "SchemaNotReady",
    "Snooze",
    "Task",
    "Worker",
    "WorkerSettings",
    "__version__",
    "configure_queue",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "enqueue_many_async",
    "list_queues",
    "pause_queue",
    "publish",
    "publish_async",
    "publish_many",
    "publish_many_async",
    "resume_queue",
]
