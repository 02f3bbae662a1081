"""pgqueue: a PostgreSQL job queue and transactional outbox.

Jobs are rows in your own database, enqueued in your own transaction; workers lease them
with ``FOR UPDATE SKIP LOCKED`` and run them at least once.
"""

from pgqueue.app import App, Task
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
from pgqueue.retry import RetryPolicy
from pgqueue.worker import JobTimeout, Worker, WorkerSettings

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
    "PayloadTooLarge",
    "PgQueueError",
    "QueueFull",
    "Retry",
    "RetryPolicy",
    "SchemaNotReady",
    "Snooze",
    "Task",
    "Worker",
    "WorkerSettings",
    "__version__",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "enqueue_many_async",
]
