"""TimeSeriesFindings: abnormal lab/vital values -> findings text, before any LLM sees them."""

from __future__ import annotations

from collections.abc import Iterable

from ehrflow.knowledge.findings import Finding, abnormal_findings
from ehrflow.records.model import Measurement


class TimeSeriesFindings:
    """Reference ranges and z-scores from the knowledge package, one finding per analyte and direction."""

    def __call__(self, measurements: Iterable[Measurement]) -> list[Finding]:
        return abnormal_findings(measurements)
