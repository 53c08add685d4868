"""A lightweight workflow backend and an app on a temporary home, for the API tests."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from typing import Any

import pytest

from ehrflow.serve.workflow import JobInputError

NOTE_TEXT = "Patient reports crushing chest pain radiating to the left arm."


def tiny_patient(pid: str):
    from ehrflow.records.model import Admission, Measurement, Note, Patient

    t0 = dt.datetime(2020, 1, 1, 8, tzinfo=dt.UTC)
    return Patient(
        id=pid,
        source="test",
        sex="F",
        age=70,
        admissions=[
            Admission(
                id=f"{pid}-adm",
                admit_time=t0,
                discharge_time=t0 + dt.timedelta(days=2),
                notes=[Note(id=f"{pid}-n1", time=t0, category="discharge summary", text=NOTE_TEXT)],
                measurements=[Measurement(time=t0, variable="Potassium", value=6.1, unit="mmol/L")],
            )
        ],
    )


class FakeBackend:
    """Counts runs per job; can fail the first attempts, refuse a patient, or hold jobs until released."""

    def __init__(self, transient_failures: int = 0, hold: threading.Event | None = None):
        self.runs: Counter[str] = Counter()
        self.transient_failures = transient_failures
        self.hold = hold
        self.lock = threading.Lock()

    def run_job(self, job_id: str, patient_id: str, tasks: list[str], progress: Any) -> dict[str, Any]:
        with self.lock:
            self.runs[job_id] += 1
            attempt = self.runs[job_id]
        if self.hold is not None:
            self.hold.wait(10)
        if patient_id == "gone":
            raise JobInputError("patient_id: 'gone' is not in the patient store")
        if attempt <= self.transient_failures:
            raise RuntimeError("replica died")
        for i in range(1, 4):
            progress(i, 3)
        return {"summary": {"statements": [{"text": "potassium high (6.1 mmol/L)", "citations": ["HP:0002153"]}]}}

    def chat(self, patient_id: str, conversation_id: str, message: str) -> dict[str, Any]:
        if len(message) > 2000:
            raise ValueError("message: too long")
        return {
            "answer": "Chest pain is documented [c1].",
            "citations": ["c1"],
            "evidence": [{"chunk_id": "c1", "note_id": "n1", "text": NOTE_TEXT, "score": 1.0}],
            "no_evidence": False,
            "cited_by_model": True,
        }

    def usage(self) -> dict[str, int]:
        return {"calls": 2, "prompt_tokens": 40, "completion_tokens": 12}


@pytest.fixture
def serve_home(tmp_path):
    from ehrflow.config import get_settings
    from ehrflow.records import PatientStore
    from ehrflow.serve.auth import create_api_key

    settings = get_settings(home=tmp_path / "home")
    settings.home.mkdir()
    PatientStore(settings.patient_store_url).ingest([tiny_patient("demo-1")])  # the default tenant's cohort
    keys = {"default": create_api_key(settings, "default"), "other": create_api_key(settings, "other")}
    return settings, keys


def make_client(settings, backend, run_jobs: bool = True, **serve_overrides):
    from fastapi.testclient import TestClient

    from ehrflow.serve.app import build_app
    from ehrflow.serve.settings import ServeSettings

    serve = ServeSettings(poll_interval_s=0.05, job_lease_s=3, **serve_overrides)
    return TestClient(build_app(settings, backend, serve=serve, run_jobs=run_jobs), raise_server_exceptions=False)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
