"""The HTTP API (FastAPI): patients, durable jobs, chat (own and OpenAI shape), health, metrics.

``build_app`` takes the workflow backend as a parameter: the Ray Serve ingress passes one that
calls the ``Workflow`` deployment, tests pass a lightweight one. Errors are JSON
``{"error": {"type", "field", "location", "message"}}``; bad input is always a 4xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ehrflow.config import Settings
from ehrflow.records.errors import ErrorSink, RecordError
from ehrflow.records.model import Patient
from ehrflow.records.store import PatientStore
from ehrflow.serve.auth import KeyStore
from ehrflow.serve.jobs import TERMINAL, IdempotencyConflict, Job, JobStore, QueueFull
from ehrflow.serve.metrics import Metrics
from ehrflow.serve.runner import JobRunner
from ehrflow.serve.schemas import (
    ID_PATTERN,
    ChatReply,
    ChatRequest,
    ErrorResponse,
    JobProgress,
    JobRequest,
    JobView,
    OpenAIChatRequest,
    PatientsAccepted,
    PatientView,
)
from ehrflow.serve.settings import ServeSettings, serve_settings
from ehrflow.serve.workflow import WorkflowBackend

log = logging.getLogger(__name__)
_PATIENT_ID = re.compile(ID_PATTERN)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422, 429)
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        field: str | None = None,
        location: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.status, self.type, self.message, self.field, self.location = status, type_, message, field, location
        self.headers = headers
        super().__init__(message)


def _error(status: int, type_: str, message: str, field: str | None = None, location: str | None = None, headers=None):  # noqa: ANN001
    body = {"error": {"type": type_, "field": field, "location": location, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """413 for bodies over ``limit`` bytes, by Content-Length or by counting a chunked body."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = _error(413, "body_too_large", f"request body is over the {self.limit}-byte limit", field="body")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await too_big(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                await too_big(scope, receive, send)
                return
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class LatencyMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the template, never the patient id
            self.metrics.latency.labels(scope["method"], route, str(status)).observe(time.perf_counter() - start)


def job_view(job: Job) -> JobView:
    total = job.progress_total
    return JobView(
        id=job.id,
        patient_id=job.patient_id,
        tasks=job.tasks,
        status=job.status,  # type: ignore[arg-type]
        progress=JobProgress(
            done=job.progress_done, total=total, fraction=round(job.progress_done / total, 4) if total else 0.0
        ),
        attempts=job.attempts,
        created_at=job.created_at.isoformat(),
        finished_at=job.finished_at.isoformat() if job.finished_at else None,
        result=job.result,
        error=job.error,
    )


def parse_patients(doc: Any) -> list[Patient]:
    """A FHIR R4 Bundle (``resourceType: Bundle``) or one ehrflow ``Patient`` JSON object."""
    if not isinstance(doc, dict):
        raise ApiError(422, "invalid_body", f"expected a JSON object, got {type(doc).__name__}", field="body")
    if "resourceType" in doc:
        if doc.get("resourceType") != "Bundle":
            raise ApiError(
                422, "invalid_fhir", f"expected a FHIR Bundle, got {doc.get('resourceType')!r}", "resourceType"
            )
        from ehrflow.records.loaders.fhir import FhirLoader

        with tempfile.TemporaryDirectory(prefix="ehrflow-fhir-") as tmp:
            path = Path(tmp) / "bundle.json"
            path.write_text(json.dumps(doc))
            try:
                patients = list(FhirLoader().load(path, ErrorSink()))
            except RecordError as err:
                raise ApiError(422, "invalid_fhir", err.message, field=err.field, location=err.location) from None
            except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a shape the loader did not foresee
                raise ApiError(422, "invalid_fhir", f"malformed bundle ({type(exc).__name__})", field="entry") from None
        if not patients:
            raise ApiError(422, "invalid_fhir", "the bundle holds no Patient resource", field="entry")
    else:
        try:
            patients = [Patient.model_validate(doc)]
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or None
            raise ApiError(422, "invalid_patient", first["msg"], field=field) from None
    for p in patients:
        if not _PATIENT_ID.match(p.id):
            raise ApiError(422, "invalid_patient", f"patient ids must match {ID_PATTERN}", field="id")
    return patients


def build_app(
    settings: Settings,
    backend: WorkflowBackend,
    *,
    serve: ServeSettings | None = None,
    run_jobs: bool = True,
) -> FastAPI:
    """The API over ``backend``. With ``run_jobs``, the app's lifespan runs a :class:`JobRunner`
    that executes accepted jobs (and those a dead process left behind)."""
    cfg = serve or serve_settings(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    jobs_url = cfg.resolved_jobs_url(settings)
    jobs = JobStore(jobs_url)
    keys = KeyStore(jobs_url)
    patients = PatientStore(settings.patient_store_url)
    metrics = Metrics(jobs.counts, backend.usage)

    def run_job(job: Job, progress: Any) -> dict[str, Any]:
        return backend.run_job(job.id, job.patient_id, job.tasks, progress)

    runner = JobRunner(
        jobs,
        run_job,
        workers=cfg.job_workers,
        lease_s=cfg.job_lease_s,
        max_attempts=cfg.job_max_attempts,
        poll_s=cfg.poll_interval_s,
        on_finish=lambda _job, outcome: metrics.jobs_finished.labels(outcome).inc(),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if run_jobs:
            runner.start()
        yield
        if run_jobs:
            await asyncio.to_thread(runner.stop)

    app = FastAPI(
        title="ehrflow",
        version="0.1",
        description="Multimodal EHR AI: patients, durable patient jobs, cited chat. "
        "Authenticate with `Authorization: Bearer <API key>`.",
        lifespan=lifespan,
    )
    app.state.jobs, app.state.keys, app.state.runner, app.state.metrics = jobs, keys, runner, metrics
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, limit=cfg.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.type, exc.message, exc.field, exc.location, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        if first.get("type") == "json_invalid":
            return _error(
                400, "invalid_json", f"invalid JSON: {first.get('ctx', {}).get('error', first['msg'])}", "body"
            )
        field = ".".join(loc[1:] if loc and loc[0] == "body" else loc) or "body"
        return _error(422, "invalid_request", first["msg"], field)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s", type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
        return _error(500, "internal", "internal error")

    def tenant(authorization: str | None = Header(None, description="`Bearer <API key>`")) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        owner = keys.tenant_of(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if owner is None:
            raise ApiError(
                401,
                "unauthorized",
                "missing or invalid API key",
                "Authorization",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return owner

    def owned_patient(patient_id: str, who: str, field: str = "patient_id") -> None:
        if patient_id not in patients:
            raise ApiError(404, "unknown_patient", f"no patient {patient_id!r}", field)
        if (jobs.owner(patient_id) or cfg.default_tenant) != who:
            raise ApiError(403, "forbidden", "this patient belongs to another tenant", field)

    # -- health ---------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": ErrorResponse}})
    def readyz() -> Response:
        try:
            jobs.counts()
            with patients.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            backend.usage()
        except Exception as exc:  # noqa: BLE001
            return _error(503, "not_ready", f"not ready: {type(exc).__name__}")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["health"], response_class=Response)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- patients -------------------------------------------------------------------------
    @app.post(
        "/v1/patients",
        tags=["patients"],
        response_model=PatientsAccepted,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"type": "object", "description": "A FHIR R4 Bundle or one ehrflow Patient"}
                    }
                },
            }
        },
    )
    async def post_patients(request: Request, who: str = Depends(tenant)) -> PatientsAccepted:
        raw = await request.body()
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = f"line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else None
            raise ApiError(400, "invalid_json", f"invalid JSON: {exc}", "body", where) from None
        parsed = await asyncio.to_thread(parse_patients, doc)
        for p in parsed:
            owner = jobs.owner(p.id) or (cfg.default_tenant if p.id in patients else who)
            if owner != who:
                raise ApiError(403, "forbidden", "a patient with this id belongs to another tenant", "id")
        ids = [p.id for p in parsed]
        jobs.claim_patients(who, ids)
        result = await asyncio.to_thread(patients.ingest, parsed)
        log.info("ingested %d patient(s) over HTTP", len(ids))
        return PatientsAccepted(
            patient_ids=ids, inserted=result.inserted, updated=result.updated, unchanged=result.unchanged
        )

    @app.get("/v1/patients/{patient_id}", tags=["patients"], response_model=PatientView, responses=ERRORS)
    def get_patient(patient_id: str, full: bool = False, who: str = Depends(tenant)) -> PatientView:
        owned_patient(patient_id, who, "patient_id")
        p = patients.get(patient_id)
        if p is None:
            raise ApiError(404, "unknown_patient", f"no patient {patient_id!r}", "patient_id")
        return PatientView(
            id=p.id,
            source=p.source,
            sex=p.sex,
            age=p.age,
            admissions=len(p.admissions),
            notes=len(p.all_notes()),
            measurements=len(p.all_measurements()),
            record=p.model_dump(mode="json") if full else None,
        )

    # -- jobs -----------------------------------------------------------------------------
    @app.post(
        "/v1/jobs",
        tags=["jobs"],
        status_code=202,
        response_model=JobView,
        responses={**ERRORS, 200: {"model": JobView, "description": "the job already made with this idempotency key"}},
    )
    def post_job(body: JobRequest, who: str = Depends(tenant)) -> JSONResponse:
        owned_patient(body.patient_id, who)
        tasks = list(dict.fromkeys(body.tasks))
        try:
            job, created = jobs.submit(who, body.patient_id, tasks, body.idempotency_key, cfg.max_queued_jobs)
        except QueueFull as exc:
            raise ApiError(429, "queue_full", str(exc), headers={"Retry-After": str(cfg.retry_after_s)}) from None
        except IdempotencyConflict as exc:
            raise ApiError(409, "idempotency_conflict", str(exc), "idempotency_key") from None
        if created:
            runner.wake()
        return JSONResponse(
            job_view(job).model_dump(mode="json"),
            status_code=202 if created else 200,
            headers={"Location": f"/v1/jobs/{job.id}"},
        )

    def own_job(job_id: str, who: str) -> Job:
        job = jobs.get(job_id)
        if job is None or job.tenant != who:
            raise ApiError(404, "unknown_job", f"no job {job_id!r}", "job_id")
        return job

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobView, responses=ERRORS)
    def get_job(job_id: str, who: str = Depends(tenant)) -> JobView:
        return job_view(own_job(job_id, who))

    @app.get(
        "/v1/jobs/{job_id}/events",
        tags=["jobs"],
        response_class=StreamingResponse,
        responses={
            **ERRORS,
            200: {"content": {"text/event-stream": {}}, "description": "SSE `progress` events, then `end`"},
        },
    )
    async def job_events(job_id: str, request: Request, who: str = Depends(tenant)) -> StreamingResponse:
        await asyncio.to_thread(own_job, job_id, who)

        async def events() -> AsyncIterator[str]:
            last: tuple[Any, ...] | None = None
            idle = 0.0
            while True:
                job = await asyncio.to_thread(jobs.get, job_id)
                if job is None:
                    return
                state = (job.status, job.progress_done, job.progress_total, job.attempts)
                if state != last:
                    last, idle = state, 0.0
                    view = job_view(job).model_dump(mode="json", exclude={"result"})
                    yield f"event: progress\ndata: {json.dumps(view)}\n\n"
                if job.status in TERMINAL:
                    yield f"event: end\ndata: {json.dumps({'status': job.status})}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(cfg.poll_interval_s)
                idle += cfg.poll_interval_s
                if idle >= 15:
                    idle = 0.0
                    yield ": keep-alive\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- chat -----------------------------------------------------------------------------
    def answer(patient_id: str, conversation_id: str, message: str) -> dict[str, Any]:
        try:
            return backend.chat(patient_id, conversation_id, message)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc).partition(": ")[2] or str(exc), "message") from None

    @app.post("/v1/chat", tags=["chat"], response_model=ChatReply, responses=ERRORS)
    def chat(body: ChatRequest, who: str = Depends(tenant)) -> ChatReply:
        owned_patient(body.patient_id, who)
        return ChatReply.model_validate(answer(body.patient_id, body.conversation_id, body.message))

    @app.post("/v1/chat/completions", tags=["chat"], responses=ERRORS)
    def chat_completions(
        body: OpenAIChatRequest,
        who: str = Depends(tenant),
        x_patient_id: str | None = Header(None, description="The patient, when `metadata.patient_id` is not set"),
    ) -> Response:
        """OpenAI chat-completions shape. The patient is `metadata.patient_id`, else the
        `X-Patient-Id` header, else `user`; the answer's citations are in `ehrflow.citations`."""
        meta = body.metadata or {}
        patient_id = meta.get("patient_id") or x_patient_id or body.user
        if not patient_id:
            raise ApiError(
                422,
                "invalid_request",
                "no patient: set metadata.patient_id, X-Patient-Id or user",
                "metadata.patient_id",
            )
        questions = [m.content for m in body.messages if m.role == "user" and m.content and m.content.strip()]
        if not questions:
            raise ApiError(422, "invalid_request", "no user message with content", "messages")
        owned_patient(patient_id, who, "metadata.patient_id")
        reply = ChatReply.model_validate(answer(patient_id, meta.get("conversation_id", "openai"), questions[-1]))
        completion_id, created = f"chatcmpl-{time.time_ns():x}", int(time.time())
        extra = {
            "citations": reply.citations,
            "evidence": [e.model_dump() for e in reply.evidence],
            "no_evidence": reply.no_evidence,
        }
        if not body.stream:
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": body.model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": reply.answer}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                    "ehrflow": extra,
                }
            )

        def chunks() -> Any:
            def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> str:
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                payload = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": body.model,
                }
                return f"data: {json.dumps(payload | {'choices': [choice]} | more)}\n\n"

            yield chunk({"role": "assistant", "content": ""})
            words = reply.answer.split(" ")
            for i, word in enumerate(words):
                yield chunk({"content": word + (" " if i < len(words) - 1 else "")})
            yield chunk({}, "stop", ehrflow=extra)
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app
