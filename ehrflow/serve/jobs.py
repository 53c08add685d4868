"""The durable job store: every accepted job is a row, written before the client hears 202.

SQLite locally, any SQLAlchemy URL (e.g. PostgreSQL) on a cluster. Jobs are claimed with a
conditional UPDATE and held by a lease the worker renews; a job whose worker died (lease
expired) is claimed again and resumes from its LangGraph checkpoint (thread id = job id).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

_META = sa.MetaData()
JOBS = sa.Table(
    "jobs",
    _META,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("patient_id", sa.String(128), nullable=False),
    sa.Column("tasks", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.String(128), nullable=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("progress_done", sa.Integer, nullable=False, default=0),
    sa.Column("progress_total", sa.Integer, nullable=False, default=0),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("worker", sa.String(64), nullable=True),
    sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("result", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_key"),
)
OWNERS = sa.Table(
    "patient_owners",
    _META,
    sa.Column("patient_id", sa.String(128), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
)
TERMINAL = ("succeeded", "failed")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite returns naive datetimes for timezone-aware columns."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str) -> sa.Engine:
    engine = sa.create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    patient_id: str
    tasks: list[str]
    idempotency_key: str | None
    status: str
    progress_done: int
    progress_total: int
    attempts: int
    result: dict[str, Any] | None
    error: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: sa.Row) -> Job:
        m = row._mapping
        return cls(
            id=m["id"],
            tenant=m["tenant"],
            patient_id=m["patient_id"],
            tasks=json.loads(m["tasks"]),
            idempotency_key=m["idempotency_key"],
            status=m["status"],
            progress_done=m["progress_done"],
            progress_total=m["progress_total"],
            attempts=m["attempts"],
            result=json.loads(m["result"]) if m["result"] else None,
            error=m["error"],
            created_at=_aware(m["created_at"]),  # type: ignore[arg-type]
            finished_at=_aware(m["finished_at"]),
        )


class IdempotencyConflict(ValueError):
    """The key was used before for a different patient or task list."""


class QueueFull(RuntimeError):
    pass


class JobStore:
    def __init__(self, url: str):
        self.engine = make_engine(url)
        _META.create_all(self.engine)

    # -- submission ---------------------------------------------------------------------------
    def submit(
        self, tenant: str, patient_id: str, tasks: list[str], idempotency_key: str | None, max_queued: int
    ) -> tuple[Job, bool]:
        """Insert a queued job, or return the job already made with this key. ``(job, created)``."""
        if idempotency_key is not None:
            existing = self._by_key(tenant, idempotency_key)
            if existing is not None:
                return self._same_request(existing, patient_id, tasks), False
        if self.count("queued") >= max_queued:
            raise QueueFull(f"more than {max_queued} jobs are queued")
        row = {
            "id": str(uuid.uuid4()),
            "tenant": tenant,
            "patient_id": patient_id,
            "tasks": json.dumps(tasks),
            "idempotency_key": idempotency_key,
            "status": "queued",
            "progress_done": 0,
            "progress_total": 0,
            "attempts": 0,
            "created_at": _now(),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(JOBS.insert().values(**row))
        except sa.exc.IntegrityError:
            # a concurrent request with the same key won the insert
            existing = self._by_key(tenant, idempotency_key or "")
            if existing is None:
                raise
            return self._same_request(existing, patient_id, tasks), False
        job = self.get(row["id"])
        assert job is not None
        return job, True

    @staticmethod
    def _same_request(job: Job, patient_id: str, tasks: list[str]) -> Job:
        if job.patient_id != patient_id or job.tasks != tasks:
            raise IdempotencyConflict(
                f"idempotency_key was already used for job {job.id} with a different patient_id or tasks"
            )
        return job

    def _by_key(self, tenant: str, key: str) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(JOBS).where(JOBS.c.tenant == tenant, JOBS.c.idempotency_key == key)
            ).one_or_none()
        return None if row is None else Job.from_row(row)

    # -- reading ------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(JOBS).where(JOBS.c.id == job_id)).one_or_none()
        return None if row is None else Job.from_row(row)

    def count(self, status: str) -> int:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(sa.func.count()).select_from(JOBS).where(JOBS.c.status == status)
            ).scalar_one()

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(JOBS.c.status, sa.func.count()).group_by(JOBS.c.status)).all()
        return {"queued": 0, "running": 0, "succeeded": 0, "failed": 0} | dict(rows)  # type: ignore[arg-type]

    # -- execution ----------------------------------------------------------------------------
    def claim(self, worker: str, lease_s: float) -> Job | None:
        """Take the oldest queued job, or a running one whose lease expired (its worker died)."""
        now = _now()
        with self.engine.connect() as conn:
            candidates = conn.execute(
                sa.select(JOBS.c.id)
                .where((JOBS.c.status == "queued") | ((JOBS.c.status == "running") & (JOBS.c.lease_until < now)))
                .order_by(JOBS.c.created_at)
                .limit(5)
            ).scalars()
            ids = list(candidates)
        for job_id in ids:
            with self.engine.begin() as conn:
                taken = conn.execute(
                    JOBS.update()
                    .where(
                        JOBS.c.id == job_id,
                        (JOBS.c.status == "queued") | ((JOBS.c.status == "running") & (JOBS.c.lease_until < now)),
                    )
                    .values(
                        status="running",
                        worker=worker,
                        lease_until=now + dt.timedelta(seconds=lease_s),
                        attempts=JOBS.c.attempts + 1,
                    )
                ).rowcount
            if taken == 1:
                return self.get(job_id)
        return None

    def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    JOBS.update()
                    .where(JOBS.c.id == job_id, JOBS.c.worker == worker, JOBS.c.status == "running")
                    .values(lease_until=_now() + dt.timedelta(seconds=lease_s))
                ).rowcount
                == 1
            )

    def set_progress(self, job_id: str, done: int, total: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(JOBS.update().where(JOBS.c.id == job_id).values(progress_done=done, progress_total=total))

    def finish(self, job_id: str, worker: str, result: dict[str, Any]) -> bool:
        """Mark succeeded, only if this worker still holds the job (else another took it over)."""
        return self._end(job_id, worker, status="succeeded", result=json.dumps(result), error=None)

    def fail(self, job_id: str, worker: str, error: str) -> bool:
        return self._end(job_id, worker, status="failed", result=None, error=error)

    def requeue(self, job_id: str, worker: str, error: str) -> bool:
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    JOBS.update()
                    .where(JOBS.c.id == job_id, JOBS.c.worker == worker, JOBS.c.status == "running")
                    .values(status="queued", worker=None, lease_until=None, error=error)
                ).rowcount
                == 1
            )

    def _end(self, job_id: str, worker: str, **values: Any) -> bool:
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    JOBS.update()
                    .where(JOBS.c.id == job_id, JOBS.c.worker == worker, JOBS.c.status == "running")
                    .values(finished_at=_now(), lease_until=None, **values)
                ).rowcount
                == 1
            )

    # -- patient ownership --------------------------------------------------------------------
    def owner(self, patient_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(OWNERS.c.tenant).where(OWNERS.c.patient_id == patient_id)
            ).scalar_one_or_none()

    def claim_patients(self, tenant: str, patient_ids: list[str]) -> None:
        with self.engine.begin() as conn:
            owned = set(
                conn.execute(sa.select(OWNERS.c.patient_id).where(OWNERS.c.patient_id.in_(patient_ids))).scalars()
            )
            new = [{"patient_id": pid, "tenant": tenant} for pid in patient_ids if pid not in owned]
            if new:
                conn.execute(OWNERS.insert(), new)
