"""The API on a lightweight backend: auth, tenants, bad input, idempotency, back-pressure, chat, metrics."""

from __future__ import annotations

import json
import logging
import time

from .conftest import NOTE_TEXT, FakeBackend, bearer, make_client, tiny_patient


def wait_job(client, job_id: str, headers, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_auth_and_tenants(serve_home):
    settings, keys = serve_home
    with make_client(settings, FakeBackend()) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").json() == {"status": "ready"}
        r = client.get("/v1/patients/demo-1")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert client.get("/v1/patients/demo-1", headers=bearer("ehr_0000_nope")).status_code == 401
        assert client.get("/v1/patients/demo-1", headers={"Authorization": "Basic abc"}).status_code == 401
        forged = keys["other"].rsplit("_", 1)[0] + "_wrongsecret"
        assert client.get("/v1/patients/demo-1", headers=bearer(forged)).status_code == 401

        assert client.get("/v1/patients/demo-1", headers=bearer(keys["default"])).json()["notes"] == 1
        r = client.get("/v1/patients/demo-1", headers=bearer(keys["other"]))
        assert r.status_code == 403 and r.json()["error"]["field"] == "patient_id"

        own = tiny_patient("other-1").model_dump(mode="json")
        r = client.post("/v1/patients", json=own, headers=bearer(keys["other"]))
        assert r.status_code == 200 and r.json()["patient_ids"] == ["other-1"]
        assert client.get("/v1/patients/other-1", headers=bearer(keys["other"])).status_code == 200
        assert client.get("/v1/patients/other-1", headers=bearer(keys["default"])).status_code == 403
        # a tenant cannot overwrite another tenant's (or the default cohort's) patient
        assert client.post("/v1/patients", json=own, headers=bearer(keys["default"])).status_code == 403
        demo = tiny_patient("demo-1").model_dump(mode="json")
        assert client.post("/v1/patients", json=demo, headers=bearer(keys["other"])).status_code == 403
        r = client.post("/v1/jobs", json={"patient_id": "demo-1"}, headers=bearer(keys["other"]))
        assert r.status_code == 403
        r = client.post("/v1/chat", json={"patient_id": "demo-1", "message": "hi"}, headers=bearer(keys["other"]))
        assert r.status_code == 403
        assert client.get("/v1/patients/nobody", headers=bearer(keys["default"])).status_code == 404


def test_fhir_bundle_and_malformed_fhir(serve_home):
    from ehrflow.demo import demo_data_dir

    settings, keys = serve_home
    h = bearer(keys["other"])
    bundle = min((demo_data_dir() / "fhir").glob("*.json"), key=lambda p: p.stat().st_size)
    with make_client(settings, FakeBackend(), run_jobs=False) as client:
        r = client.post("/v1/patients", content=bundle.read_bytes(), headers=h | {"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        (pid,) = r.json()["patient_ids"]
        assert r.json()["inserted"] == 1
        view = client.get(f"/v1/patients/{pid}", headers=h).json()
        assert view["admissions"] > 0
        assert client.post("/v1/patients", content=bundle.read_bytes(), headers=h).json()["unchanged"] == 1

        bad = {
            "resourceType": "Bundle",
            "entry": [{"resource": {"resourceType": "Patient", "id": "p1", "gender": "x"}}],
        }
        r = client.post("/v1/patients", json=bad, headers=h)
        assert r.status_code == 422, r.text
        assert r.json()["error"] == {
            "type": "invalid_fhir",
            "field": "gender",
            "location": r.json()["error"]["location"],
            "message": "not a FHIR gender code: 'x'",
        }
        assert "p1" in r.json()["error"]["location"]
        assert client.get("/v1/patients/fhir-p1", headers=h).status_code == 404
        r = client.post("/v1/patients", json={"resourceType": "Bundle", "entry": {"x": 1}}, headers=h)
        assert r.status_code == 422 and r.json()["error"]["field"] == "entry"
        r = client.post("/v1/patients", json={"resourceType": "Observation"}, headers=h)
        assert r.status_code == 422 and r.json()["error"]["field"] == "resourceType"


def test_bad_input_is_4xx_naming_the_field_and_writes_nothing(serve_home):
    settings, keys = serve_home
    h = bearer(keys["default"])
    with make_client(settings, FakeBackend(), run_jobs=False, max_body_bytes=4096) as client:
        jobs = client.app.state.jobs
        cases = [
            ("/v1/jobs", b"{not json", 400, "body"),
            ("/v1/jobs", json.dumps({"patient_id": 5}).encode(), 422, "patient_id"),
            ("/v1/jobs", json.dumps({"patient_id": "demo-1", "tasks": "summary"}).encode(), 422, "tasks"),
            ("/v1/jobs", json.dumps({"patient_id": "demo-1", "tasks": ["astrology"]}).encode(), 422, "tasks.0"),
            ("/v1/jobs", json.dumps({"patient_id": "demo-1", "colour": 1}).encode(), 422, "colour"),
            ("/v1/jobs", json.dumps({"patient_id": "nobody"}).encode(), 404, "patient_id"),
            ("/v1/jobs", json.dumps([1, 2]).encode(), 422, "body"),
            ("/v1/patients", b"[1, 2", 400, "body"),
            ("/v1/patients", b"[1, 2]", 422, "body"),
            ("/v1/patients", json.dumps({"id": "x", "source": "t", "sex": "Q"}).encode(), 422, "sex"),
            ("/v1/patients", json.dumps({"id": "x" * 300, "source": "t", "sex": "F"}).encode(), 422, "id"),
            ("/v1/patients", json.dumps({"id": "a/b", "source": "t", "sex": "F"}).encode(), 422, "id"),
            (
                "/v1/patients",
                json.dumps({"resourceType": "Bundle", "entry": [1]}).encode(),
                422,
                "resource.resourceType",
            ),
            ("/v1/chat", json.dumps({"patient_id": "demo-1", "message": ""}).encode(), 422, "message"),
            ("/v1/chat", json.dumps({"patient_id": "demo-1", "message": "x" * 3000}).encode(), 422, "message"),
            ("/v1/jobs", b"{" + b" " * 5000 + b"}", 413, "body"),
        ]
        for path, body, status, field in cases:
            r = client.post(path, content=body, headers=h | {"Content-Type": "application/json"})
            assert r.status_code == status, (path, body[:60], r.text)
            assert r.json()["error"]["field"] == field, (path, body[:60], r.text)
        assert jobs.counts() == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0}
        assert client.get("/v1/jobs/nope", headers=h).status_code == 404


def test_job_idempotent_runs_once_with_progress_and_events(serve_home):
    settings, keys = serve_home
    h = bearer(keys["default"])
    backend = FakeBackend()
    with make_client(settings, backend) as client:
        body = {"patient_id": "demo-1", "tasks": ["summary", "mortality"], "idempotency_key": "k-1"}
        first = client.post("/v1/jobs", json=body, headers=h)
        assert first.status_code == 202 and first.headers["Location"] == f"/v1/jobs/{first.json()['id']}"
        again = client.post("/v1/jobs", json=body, headers=h)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        conflict = client.post("/v1/jobs", json=body | {"tasks": ["readmission"]}, headers=h)
        assert conflict.status_code == 409 and conflict.json()["error"]["field"] == "idempotency_key"
        # the other tenant's identical key is a different job namespace (and a 403 on this patient)
        assert client.post("/v1/jobs", json=body, headers=bearer(keys["other"])).status_code == 403

        job = wait_job(client, first.json()["id"], h)
        assert job["status"] == "succeeded" and job["progress"] == {"done": 3, "total": 3, "fraction": 1.0}
        assert job["result"]["summary"]["statements"][0]["citations"] == ["HP:0002153"]
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=h) as events:
            text = "".join(events.iter_text())
        assert "event: progress" in text and 'event: end\ndata: {"status": "succeeded"}' in text
        assert client.post("/v1/jobs", json=body, headers=h).json()["id"] == job["id"]
        assert backend.runs[job["id"]] == 1


def test_queue_bound_gives_429_with_retry_after(serve_home):
    settings, keys = serve_home
    h = bearer(keys["default"])
    with make_client(settings, FakeBackend(), run_jobs=False, max_queued_jobs=2, retry_after_s=7) as client:
        for _ in range(2):
            assert client.post("/v1/jobs", json={"patient_id": "demo-1"}, headers=h).status_code == 202
        r = client.post("/v1/jobs", json={"patient_id": "demo-1"}, headers=h)
        assert r.status_code == 429 and r.headers["Retry-After"] == "7"
        assert client.app.state.jobs.counts()["queued"] == 2


def test_restart_resumes_pending_jobs_none_twice(serve_home):
    """Jobs accepted by a process that died (queued, or running with an expired lease) complete once each."""
    settings, keys = serve_home
    h = bearer(keys["default"])
    with make_client(settings, FakeBackend(), run_jobs=False) as client:
        ids = [client.post("/v1/jobs", json={"patient_id": "demo-1"}, headers=h).json()["id"] for _ in range(4)]
        jobs = client.app.state.jobs
        crashed = jobs.claim("dead-worker", lease_s=0.01)  # running when its process died
        assert crashed is not None and crashed.status == "running"
    time.sleep(0.05)
    backend = FakeBackend()
    with make_client(settings, backend) as client:
        finished = [wait_job(client, i, h) for i in ids]
    assert [j["status"] for j in finished] == ["succeeded"] * 4
    assert dict(backend.runs) == dict.fromkeys(ids, 1)
    assert next(j for j in finished if j["id"] == crashed.id)["attempts"] == 2
    assert not jobs.finish(crashed.id, "dead-worker", {})  # the dead worker cannot record a result later


def test_transient_failure_is_retried_input_error_fails(serve_home):
    settings, keys = serve_home
    h = bearer(keys["default"])
    backend = FakeBackend(transient_failures=1)
    with make_client(settings, backend) as client:
        job = wait_job(client, client.post("/v1/jobs", json={"patient_id": "demo-1"}, headers=h).json()["id"], h)
        assert job["status"] == "succeeded" and job["attempts"] == 2
        client.app.state.jobs.claim_patients("default", ["gone"])
    # a patient deleted after acceptance: failed once, not retried
    from ehrflow.serve.jobs import JobStore

    store = JobStore(f"sqlite:///{settings.home.resolve() / 'serve.db'}")
    gone, _ = store.submit("default", "gone", ["summary"], None, max_queued=10)
    with make_client(settings, backend) as client:
        job = wait_job(client, gone.id, h)
    assert job["status"] == "failed" and job["attempts"] == 1 and "gone" in job["error"]


def test_chat_and_openai_shape(serve_home):
    settings, keys = serve_home
    h = bearer(keys["default"])
    with make_client(settings, FakeBackend(), run_jobs=False) as client:
        r = client.post("/v1/chat", json={"patient_id": "demo-1", "message": "Any chest pain?"}, headers=h)
        assert r.status_code == 200 and r.json()["citations"] == ["c1"]
        assert r.json()["evidence"][0]["chunk_id"] == "c1"
        req = {"model": "ehrflow", "messages": [{"role": "user", "content": "Any chest pain?"}]}
        r = client.post("/v1/chat/completions", json=req | {"metadata": {"patient_id": "demo-1"}}, headers=h)
        body = r.json()
        assert r.status_code == 200 and body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == "Chest pain is documented [c1]."
        assert body["ehrflow"]["citations"] == ["c1"]
        r = client.post("/v1/chat/completions", json=req | {"user": "demo-1"}, headers=h)
        assert r.status_code == 200
        r = client.post("/v1/chat/completions", json=req, headers=h | {"X-Patient-Id": "demo-1"})
        assert r.status_code == 200
        r = client.post("/v1/chat/completions", json=req, headers=h)
        assert r.status_code == 422 and r.json()["error"]["field"] == "metadata.patient_id"
        with client.stream(
            "POST", "/v1/chat/completions", json=req | {"user": "demo-1", "stream": True}, headers=h
        ) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Chest pain is documented [c1]."
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["ehrflow"]["citations"] == ["c1"]


def test_metrics_and_openapi(serve_home):
    settings, keys = serve_home
    h = bearer(keys["default"])
    with make_client(settings, FakeBackend()) as client:
        wait_job(client, client.post("/v1/jobs", json={"patient_id": "demo-1"}, headers=h).json()["id"], h)
        text = client.get("/metrics").text
        assert 'ehrflow_jobs{state="succeeded"} 1.0' in text
        assert 'ehrflow_llm_tokens_total{kind="prompt"} 40.0' in text
        assert 'route="/v1/jobs/{job_id}"' in text and "demo-1" not in text
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/v1/patients", "/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/chat/completions"} <= set(paths)


def test_no_identifiers_or_note_text_in_logs_above_debug(serve_home, caplog):
    settings, keys = serve_home
    h = bearer(keys["other"])
    caplog.set_level(logging.INFO)
    with make_client(settings, FakeBackend()) as client:
        client.post("/v1/patients", json=tiny_patient("secret-pt-9").model_dump(mode="json"), headers=h)
        wait_job(client, client.post("/v1/jobs", json={"patient_id": "secret-pt-9"}, headers=h).json()["id"], h)
        client.post("/v1/chat", json={"patient_id": "secret-pt-9", "message": "chest pain?"}, headers=h)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG)
    assert "ingested 1 patient" in logged
    assert "secret-pt-9" not in logged and NOTE_TEXT not in logged and keys["other"] not in logged
