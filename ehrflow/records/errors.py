"""Errors that name the file, the line or resource, and the field that was wrong."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import ValidationError


class RecordError(ValueError):
    """A malformed input record. ``location`` is a line number or a resource id."""

    def __init__(self, source: str | Path, location: str | int | None, field: str | None, message: str):
        self.source = str(source)
        self.location = None if location is None else str(location)
        self.field = field
        self.message = message
        where = self.source
        if self.location is not None:
            where += f", {self.location}"
        if field:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")

    @classmethod
    def from_validation(cls, source: str | Path, location: str | int | None, exc: ValidationError) -> RecordError:
        """Wrap a pydantic error, naming the first failing field path."""
        first = exc.errors()[0]
        field_path = ".".join(str(p) for p in first["loc"]) or None
        return cls(source, location, field_path, first["msg"])


@dataclass
class Rejected:
    source: str
    location: str | None
    field: str | None
    message: str


@dataclass
class ErrorSink:
    """Collects record errors: raises at once when strict, otherwise keeps a report."""

    skip_invalid: bool = False
    rejected: list[Rejected] = field(default_factory=list)
    warnings: list[Rejected] = field(default_factory=list)
    """Rows the source itself marks as unusable (e.g. PhysioNet rows without a parameter name):
    left out and listed, in strict mode too."""

    def warn(self, err: RecordError) -> None:
        self.warnings.append(Rejected(err.source, err.location, err.field, err.message))

    def report(self, err: RecordError) -> None:
        if not self.skip_invalid:
            raise err
        self.rejected.append(Rejected(err.source, err.location, err.field, err.message))

    def write_report(self, path: str | Path) -> Path:
        path = Path(path)
        report = {"rejected": [asdict(r) for r in self.rejected], "warnings": [asdict(r) for r in self.warnings]}
        path.write_text(json.dumps(report, indent=2))
        return path
