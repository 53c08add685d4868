"""Request and response bodies of the HTTP API (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobTask = Literal["summary", "mortality", "readmission", "phenotypes", "medications"]
JobStatus = Literal["queued", "running", "succeeded", "failed"]
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"


class ErrorBody(BaseModel):
    type: str
    field: str | None = None
    location: str | None = None
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class PatientsAccepted(BaseModel):
    patient_ids: list[str]
    inserted: int
    updated: int
    unchanged: int


class PatientView(BaseModel):
    id: str
    source: str
    sex: str
    age: float | None
    admissions: int
    notes: int
    measurements: int
    record: dict[str, Any] | None = None
    """The full ehrflow record, with ``?full=true`` only."""


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patient_id: str = Field(pattern=ID_PATTERN)
    tasks: list[JobTask] = Field(default_factory=lambda: ["summary"], min_length=1, max_length=5)
    idempotency_key: str | None = Field(None, min_length=1, max_length=128)
    """The same key (per tenant) returns the same job and never runs it twice."""


class JobProgress(BaseModel):
    done: int
    total: int
    fraction: float


class JobView(BaseModel):
    id: str
    patient_id: str
    tasks: list[str]
    status: JobStatus
    progress: JobProgress
    attempts: int
    created_at: str
    finished_at: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patient_id: str = Field(pattern=ID_PATTERN)
    conversation_id: str = Field("default", pattern=ID_PATTERN)
    message: str = Field(min_length=1, max_length=2000)


class Evidence(BaseModel):
    chunk_id: str
    note_id: str | None = None
    text: str
    score: float | None = None


class ChatReply(BaseModel):
    answer: str
    citations: list[str]
    evidence: list[Evidence]
    no_evidence: bool
    cited_by_model: bool


class OpenAIMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None


class OpenAIChatRequest(BaseModel):
    """The OpenAI chat-completions request. The patient comes from ``metadata.patient_id``, the
    ``X-Patient-Id`` header, or ``user`` (in that order); ``metadata.conversation_id`` keeps turns together."""

    model_config = ConfigDict(extra="allow")

    model: str = "ehrflow"
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = False
    user: str | None = None
    metadata: dict[str, str] | None = None
