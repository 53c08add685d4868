"""The patient store: one row per patient, the full record as compressed JSON plus the columns
cohort filters need. SQLite by default; any SQLAlchemy URL (e.g. PostgreSQL) on a cluster.

Ingesting one file is one transaction: a failure leaves the store exactly as it was.
Upserts are idempotent: a patient whose content did not change is not rewritten.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from ehrflow.records.model import Patient

_META = sa.MetaData()
PATIENTS = sa.Table(
    "patients",
    _META,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("source", sa.String(64), nullable=False, index=True),
    sa.Column("sex", sa.String(1), nullable=False),
    sa.Column("age", sa.Float, nullable=True),
    sa.Column("n_admissions", sa.Integer, nullable=False),
    sa.Column("n_notes", sa.Integer, nullable=False),
    sa.Column("n_measurements", sa.Integer, nullable=False),
    sa.Column("died_in_hospital", sa.Boolean, nullable=True),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("document", sa.LargeBinary, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class CohortFilter:
    """Cohort selection. Every field is optional; all given fields must hold."""

    source: str | None = None
    sex: str | None = None
    min_age: float | None = None
    max_age: float | None = None
    has_notes: bool | None = None
    has_measurements: bool | None = None
    died_in_hospital: bool | None = None
    limit: int | None = None

    @classmethod
    def parse(cls, text: str) -> CohortFilter:
        """Parse ``"source=physionet2012,died_in_hospital=true,limit=10"``."""
        if not text.strip():
            return cls()
        kwargs: dict[str, object] = {}
        for part in text.split(","):
            key, sep, raw = part.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or key not in cls.__dataclass_fields__:
                raise ValueError(
                    f"cohort filter: unknown or malformed term {part!r}; keys: {sorted(cls.__dataclass_fields__)}"
                )
            if key in {"has_notes", "has_measurements", "died_in_hospital"}:
                if raw.lower() not in {"true", "false"}:
                    raise ValueError(f"cohort filter: {key} must be true or false, got {raw!r}")
                kwargs[key] = raw.lower() == "true"
            elif key in {"min_age", "max_age"}:
                kwargs[key] = float(raw)
            elif key == "limit":
                kwargs[key] = int(raw)
            else:
                kwargs[key] = raw
        return cls(**kwargs)  # type: ignore[arg-type]


@dataclass
class IngestResult:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0

    @property
    def total(self) -> int:
        return self.inserted + self.updated + self.unchanged


def _encode(patient: Patient) -> tuple[bytes, str]:
    """Compressed JSON and its digest; measurements as columns (about 2x smaller and 5x faster to read back)."""
    raw = patient.model_dump_json(context={"measurement_columns": True}).encode()
    return zlib.compress(raw, 3), hashlib.sha256(raw).hexdigest()


def _decode(blob: bytes) -> Patient:
    return Patient.model_validate_json(zlib.decompress(blob))


def _row(patient: Patient) -> dict[str, object]:
    doc, digest = _encode(patient)
    deaths = [a.outcomes.in_hospital_death for a in patient.admissions if a.outcomes.in_hospital_death is not None]
    return {
        "id": patient.id,
        "source": patient.source,
        "sex": patient.sex,
        "age": patient.age,
        "n_admissions": len(patient.admissions),
        "n_notes": len(patient.all_notes()),
        "n_measurements": sum(len(a.measurements) for a in patient.admissions),
        "died_in_hospital": any(deaths) if deaths else None,
        "content_hash": digest,
        "document": doc,
        "updated_at": dt.datetime.now(dt.UTC),
    }


class PatientStore:
    """Durable patient records behind a SQLAlchemy URL (``sqlite:///path.db`` by default)."""

    def __init__(self, url: str | Path):
        url = str(url)
        if "://" not in url:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{url}"
        self.url = url
        self.engine = sa.create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        _META.create_all(self.engine)

    def ingest(self, patients: Iterable[Patient], batch_size: int = 200) -> IngestResult:
        """Upsert all patients in one transaction; any exception rolls everything back."""
        result = IngestResult()
        with self.engine.begin() as conn:
            batch: list[dict[str, object]] = []
            for patient in patients:
                batch.append(_row(patient))
                if len(batch) >= batch_size:
                    self._upsert(conn, batch, result)
                    batch = []
            if batch:
                self._upsert(conn, batch, result)
        return result

    def _upsert(self, conn: sa.Connection, rows: list[dict[str, object]], result: IngestResult) -> None:
        seen: dict[str, dict[str, object]] = {}
        for row in rows:  # a later duplicate id in the same batch wins
            seen[row["id"]] = row  # type: ignore[index]
        existing = dict(
            conn.execute(sa.select(PATIENTS.c.id, PATIENTS.c.content_hash).where(PATIENTS.c.id.in_(list(seen)))).all()
        )
        inserts = [r for pid, r in seen.items() if pid not in existing]
        updates = [r for pid, r in seen.items() if pid in existing and existing[pid] != r["content_hash"]]
        result.unchanged += len(seen) - len(inserts) - len(updates)
        if inserts:
            conn.execute(PATIENTS.insert(), inserts)
            result.inserted += len(inserts)
        for row in updates:
            conn.execute(PATIENTS.update().where(PATIENTS.c.id == row["id"]).values(**row))
            result.updated += 1

    def get(self, patient_id: str) -> Patient | None:
        with self.engine.connect() as conn:
            blob = conn.execute(sa.select(PATIENTS.c.document).where(PATIENTS.c.id == patient_id)).scalar_one_or_none()
        return None if blob is None else _decode(blob)

    def __contains__(self, patient_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(PATIENTS.c.id).where(PATIENTS.c.id == patient_id)).first() is not None

    def _where(self, cohort: CohortFilter) -> sa.Select:
        q = sa.select(PATIENTS.c.id).order_by(PATIENTS.c.id)
        if cohort.source is not None:
            q = q.where(PATIENTS.c.source == cohort.source)
        if cohort.sex is not None:
            q = q.where(PATIENTS.c.sex == cohort.sex)
        if cohort.min_age is not None:
            q = q.where(PATIENTS.c.age >= cohort.min_age)
        if cohort.max_age is not None:
            q = q.where(PATIENTS.c.age <= cohort.max_age)
        if cohort.has_notes is not None:
            q = q.where((PATIENTS.c.n_notes > 0) == cohort.has_notes)
        if cohort.has_measurements is not None:
            q = q.where((PATIENTS.c.n_measurements > 0) == cohort.has_measurements)
        if cohort.died_in_hospital is not None:
            q = q.where(PATIENTS.c.died_in_hospital == cohort.died_in_hospital)
        if cohort.limit is not None:
            q = q.limit(cohort.limit)
        return q

    def ids(self, cohort: CohortFilter | None = None) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(self._where(cohort or CohortFilter())).scalars())

    def iter_patients(self, cohort: CohortFilter | None = None, batch_size: int = 100) -> Iterator[Patient]:
        """Stream patients matching the cohort, ``batch_size`` documents at a time."""
        ids = self.ids(cohort)
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            with self.engine.connect() as conn:
                rows = dict(
                    conn.execute(sa.select(PATIENTS.c.id, PATIENTS.c.document).where(PATIENTS.c.id.in_(chunk))).all()
                )
            for pid in chunk:
                yield _decode(rows[pid])

    def summary(self, cohort: CohortFilter | None = None) -> dict[str, object]:
        """Counts for a cohort: patients by source and sex, admissions, notes, deaths."""
        ids = self._where(cohort or CohortFilter()).subquery()
        rows = sa.select(PATIENTS).where(PATIENTS.c.id.in_(sa.select(ids.c.id))).subquery()
        with self.engine.connect() as conn:
            agg = conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.coalesce(sa.func.sum(rows.c.n_admissions), 0),
                    sa.func.coalesce(sa.func.sum(rows.c.n_notes), 0),
                    sa.func.coalesce(sa.func.sum(rows.c.n_measurements), 0),
                    sa.func.coalesce(sa.func.sum(sa.case((rows.c.died_in_hospital.is_(True), 1), else_=0)), 0),
                )
            ).one()
            by_source = dict(conn.execute(sa.select(rows.c.source, sa.func.count()).group_by(rows.c.source)).all())
            by_sex = dict(conn.execute(sa.select(rows.c.sex, sa.func.count()).group_by(rows.c.sex)).all())
        return {
            "patients": agg[0],
            "admissions": agg[1],
            "notes": agg[2],
            "measurements": agg[3],
            "patients_died_in_hospital": agg[4],
            "by_source": by_source,
            "by_sex": by_sex,
        }


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
