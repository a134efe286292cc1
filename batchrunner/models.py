"""The job database's tables, mapped with SQLAlchemy 2, and the states a job goes through."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The states live in states.py (no ORM needed); imported from here too, as before.
from batchrunner.states import (
    BATCH_NAME_CHARS,
    CUSTOM_ID_CHARS,
    ENDED_STATES,
    KEY_ENV_CHARS,
    MODEL_CHARS,
    REQUEST_ID_CHARS,
    UNFINISHED_STATES,
    JobState,
)

__all__ = [
    "ENDED_STATES",
    "UNFINISHED_STATES",
    "Attempt",
    "Base",
    "Batch",
    "InvalidLine",
    "Job",
    "JobState",
    "Result",
    "Worker",
]

# Stable constraint names, so that migrations can drop and alter them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Batch(Base):
    """One submitted request file."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(BATCH_NAME_CHARS))
    source_file: Mapped[str] = mapped_column(Text)
    content_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    base_url: Mapped[str] = mapped_column(Text)
    api_key_env: Mapped[str] = mapped_column(String(KEY_ENV_CHARS))
    options: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    total_jobs: Mapped[int] = mapped_column(Integer, default=0)
    invalid_lines: Mapped[int] = mapped_column(Integer, default=0)
    #: Every key of the jobs' metadata, sorted, as a JSON array: the CSV export's columns.
    #: NULL for batches loaded before it was kept (see migration 0004).
    meta_keys: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: Unix times, like every timestamp in the database.
    created_at: Mapped[float] = mapped_column(Float)
    cancelled_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Job(Base):
    """One request line of a batch."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id"),
        # The claim query: a batch's pending jobs in line order.
        Index("ix_jobs_claim", "batch_id", "state", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    #: No foreign keys on jobs, results and attempts: see migration 0003.
    batch_id: Mapped[str] = mapped_column(String(40))
    line: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(String(CUSTOM_ID_CHARS))
    method: Mapped[str] = mapped_column(String(10), default="POST")
    endpoint: Mapped[str] = mapped_column(String(200))
    #: The request body exactly as it will be sent (JSON text).
    body: Mapped[str] = mapped_column(Text)
    #: The line's `metadata`, kept with the job and never sent (JSON text).
    meta: Mapped[str | None] = mapped_column(Text, nullable=True)
    model: Mapped[str] = mapped_column(String(MODEL_CHARS))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Cheap estimate of prompt + maximum output tokens, for tokens-per-minute pacing.
    est_tokens: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Unix time before which the job is not sent again (backoff that outlived a run).
    not_before: Mapped[float | None] = mapped_column(Float, nullable=True)
    error_kind: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: Why the job failed: the error body as received, or the transport error.
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Result(Base):
    """The completion of a succeeded job; at most one per job."""

    __tablename__ = "results"

    job_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    #: Not indexed: a batch's results are reached through its jobs (see migration 0002).
    batch_id: Mapped[str] = mapped_column(String(40))
    status_code: Mapped[int] = mapped_column(Integer)
    #: The completion object exactly as received (streams: the reassembled object; the few
    #: answers only a lenient parser reads are written anew: `client.loads_lenient`).
    response: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(String(REQUEST_ID_CHARS), nullable=True)
    model: Mapped[str | None] = mapped_column(String(MODEL_CHARS), nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cached_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reasoning_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: Whether the content matched the request's json_schema; None when there was none.
    schema_valid: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer)
    finished_at: Mapped[float] = mapped_column(Float)


class Attempt(Base):
    """One HTTP attempt of a job, whatever came of it."""

    __tablename__ = "attempts"
    # One index only: every request adds a row, and a batch's attempts are reached through
    # its jobs (see migration 0002). Unique: an attempt is logged once, whichever of two
    # statements that log it comes first (see migration 0005).
    __table_args__ = (Index("uq_attempts_job_started", "job_id", "started_at", unique=True),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BigId)
    batch_id: Mapped[str] = mapped_column(String(40))
    worker_id: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_kind: Mapped[str | None] = mapped_column(String(64), nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float)
    request_id: Mapped[str | None] = mapped_column(String(REQUEST_ID_CHARS), nullable=True)
    started_at: Mapped[float] = mapped_column(Float)


class DiscardedAnswer(Base):
    """A complete answer paid for and not kept as its job's result: one whose content did not
    match the request's json_schema, tried again (`--retry-invalid-json`), or one that came
    after its job was cancelled or taken over by another worker. Its usage counts in the
    batch's tokens and cost; the answer itself is the job's last error, or gone. Rows only for
    such answers: most batches have none."""

    __tablename__ = "discarded_answers"
    # `status` reads a batch's rows: few are ever written, so the index costs nothing.
    __table_args__ = (Index("ix_discarded_answers_batch_id", "batch_id"),)

    job_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    #: The attempt's start, as in `attempts` (an answer is kept once, as an attempt is logged).
    started_at: Mapped[float] = mapped_column(Float, primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(40))
    #: The answer's model, or the request's where the answer named none.
    model: Mapped[str] = mapped_column(String(MODEL_CHARS))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    reasoning_tokens: Mapped[int] = mapped_column(Integer)
    total_tokens: Mapped[int] = mapped_column(Integer)


class InvalidLine(Base):
    """A bad line left out by `submit --skip-invalid`."""

    __tablename__ = "invalid_lines"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    line: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)


class Worker(Base):
    """A `batchrunner run` process working on a batch; its heartbeat keeps its share alive."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Seconds to wait before sending, set by a worker that was told to slow down (429).
    paused_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Progress counters of this worker, for `status` from another shell.
    sent: Mapped[int] = mapped_column(Integer, default=0)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Jobs ended and tokens a second between its last two heartbeats (NULL until it has two).
    recent_requests_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    recent_tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: With --max-cost: USD its answers cost since it started, and USD it holds reserved for
    #: requests in flight; every worker of the batch counts the others' (NULL: no cap).
    spent_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    reserved_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
