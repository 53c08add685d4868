"""A small HTTP client for the ehrflow API (what ``make demo`` and the benchmark use)."""

from __future__ import annotations

import time
from typing import Any

import httpx


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any):
        self.status, self.body = status, body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"HTTP {status}: {error.get('message', body)} (field {error.get('field')})")


class EhrflowClient:
    def __init__(self, base_url: str, api_key: str, timeout_s: float = 600.0):
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s
        )

    def _json(self, response: httpx.Response) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise ApiError(response.status_code, body)
        return body

    def post_patient(self, document: dict[str, Any]) -> dict[str, Any]:
        """A FHIR R4 Bundle or one ehrflow Patient; returns ``{patient_ids, inserted, updated, unchanged}``."""
        return self._json(self.http.post("/v1/patients", json=document))

    def get_patient(self, patient_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/patients/{patient_id}"))

    def submit_job(
        self, patient_id: str, tasks: list[str] | None = None, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"patient_id": patient_id, "tasks": tasks or ["summary"]}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return self._json(self.http.post("/v1/jobs", json=body))

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def wait_job(self, job_id: str, timeout_s: float = 600.0, poll_s: float = 0.5) -> dict[str, Any]:
        """Poll until the job succeeded or failed; ``TimeoutError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if job["status"] in ("succeeded", "failed"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def chat(self, patient_id: str, message: str, conversation_id: str = "default") -> dict[str, Any]:
        """``{answer, citations, evidence, no_evidence, cited_by_model}``."""
        body = {"patient_id": patient_id, "conversation_id": conversation_id, "message": message}
        return self._json(self.http.post("/v1/chat", json=body))

    def close(self) -> None:
        self.http.close()
