"""Ingest an input path into a ``PatientStore``: one transaction per loader unit."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel
from tqdm import tqdm

from ehrflow.records.errors import ErrorSink, Rejected
from ehrflow.records.labels import derive_outcomes
from ehrflow.records.loaders import get_loader
from ehrflow.records.model import Patient
from ehrflow.records.store import CohortFilter, IngestResult, PatientStore

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    units: int = 0
    result: IngestResult = field(default_factory=IngestResult)
    rejected: list[Rejected] = field(default_factory=list)
    warnings: list[Rejected] = field(default_factory=list)


def ingest_path(
    store: PatientStore,
    fmt: str,
    path: str | Path,
    *,
    skip_invalid: bool = False,
    progress: bool = False,
) -> IngestReport:
    """Load ``path`` with the ``fmt`` loader and upsert it.

    Strict mode (default): the first bad record raises ``RecordError`` and the failing unit's
    transaction rolls back (units already committed stay, each whole). With ``skip_invalid``
    bad records are left out and listed in ``report.rejected``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    loader = get_loader(fmt)
    report = IngestReport()
    units = loader.units(path)
    for number, unit in enumerate(units, 1):
        sink = ErrorSink(skip_invalid=skip_invalid)
        patients = (derive_outcomes(p) for p in loader.load(unit, sink))
        if progress:
            # File names can carry patient names (Synthea bundles): the bar shows a counter instead.
            patients = tqdm(patients, desc=f"{fmt} file {number}/{len(units)}", unit=" patients", leave=False)
        res = store.ingest(patients)
        report.units += 1
        report.result.inserted += res.inserted
        report.result.updated += res.updated
        report.result.unchanged += res.unchanged
        report.rejected.extend(sink.rejected)
        report.warnings.extend(sink.warnings)
        log.info("ingested %s file %d/%d: %s", fmt, number, len(units), res)
        log.debug("file %d is %s", number, unit)
    return report


class InputSpec(BaseModel):
    """A loader input named in a training config: a format (``ehrflow ingest --format``) and a path."""

    format: str
    path: Path


def source_patients(store_url: str | None, cohort: str = "", inputs: Iterable[InputSpec] = ()) -> Iterator[Patient]:
    """Patients from a store (with a cohort filter) or, without one, streamed from loader inputs with their
    outcome labels derived: what a trainer reads when it is not handed patients directly."""
    if store_url:
        yield from PatientStore(store_url).iter_patients(CohortFilter.parse(cohort))
        return
    inputs = list(inputs)
    if not inputs:
        raise ValueError("data: give store_url or inputs")
    for spec in inputs:
        loader = get_loader(spec.format)
        for unit in loader.units(spec.path):
            yield from (derive_outcomes(p) for p in loader.load(unit, ErrorSink()))
