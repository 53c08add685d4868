"""The real Serve app on loopback: real workflow (local LLM, lexical grounding), HTTP ingest, jobs,
chat, the OpenAI shape, a Workflow replica killed mid-job, and a restart with pending jobs."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from ehrflow.records.model import Code
from ehrflow.serve.client import EhrflowClient

from .conftest import tiny_patient

pytestmark = pytest.mark.slow
PORT = 8011
APP = "ehrflow-test"


def nodes_once(job: dict) -> None:
    """Each workflow node ran (and was recorded) exactly once, however often the job was resumed."""
    for run in job["result"]["runs"].values():
        names = [n["node"] for n in run["nodes"]]
        assert sorted(names) == sorted(set(names)), names


def deploy(settings, cfg):
    from ray import serve

    from ehrflow.serve.deployments import build_application, wait_ready

    serve.run(build_application(settings, cfg), name=APP, route_prefix="/", blocking=False)
    wait_ready(f"http://127.0.0.1:{PORT}", timeout_s=300)


def test_serve_end_to_end(isolated_ray, tmp_path, physionet_stays, tiny_fusion_config, tiny_medrec):
    from ray import serve

    from ehrflow.config import get_settings
    from ehrflow.demo import demo_data_dir
    from ehrflow.serve.auth import create_api_key
    from ehrflow.serve.settings import ServeSettings
    from ehrflow.training.fusion import train_fusion
    from ehrflow.training.predictor import FusionPredictor

    stays = physionet_stays(60)
    fusion = train_fusion(tiny_fusion_config(tmp_path, trees={"enabled": True, "max_iter": 30}), stays)
    assert fusion.tree_blend  # the served mortality model is the network blended with trees
    settings = get_settings(
        home=tmp_path / "home",
        grounding={"mode": "lexical"},
        models={
            "fusion_checkpoint": fusion.checkpoint,
            "medrec_checkpoint": tiny_medrec[1],
        },
    )
    settings.home.mkdir()
    # the embedder and the trained models run in their own deployments, called by the Workflow replica
    cfg = ServeSettings(
        port=PORT,
        app_name=APP,
        job_workers=1,
        job_lease_s=4,
        poll_interval_s=0.2,
        embedder_deployment=True,
        predictor_deployment=True,
    )
    key = create_api_key(settings, "hospital-a")
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    try:
        deploy(settings, cfg)
        client = EhrflowClient(f"http://127.0.0.1:{PORT}", key)
        assert httpx.get(f"http://127.0.0.1:{PORT}/v1/jobs/x").status_code == 401
        bundle = min((demo_data_dir() / "fhir").glob("*.json"), key=lambda p: p.stat().st_size)
        (fhir_id,) = client.post_patient(json.loads(bundle.read_text()))["patient_ids"]
        assert client.get_patient(fhir_id)["notes"] > 0
        # jobs run on a one-note patient so that the real local LLM keeps the test short
        (pid,) = client.post_patient(tiny_patient("e2e-tiny").model_dump(mode="json"))["patient_ids"]

        job = client.submit_job(pid, ["summary", "phenotypes"], idempotency_key="first")
        assert client.submit_job(pid, ["summary", "phenotypes"], idempotency_key="first")["id"] == job["id"]
        done = client.wait_job(job["id"], timeout_s=300)
        assert done["status"] == "succeeded", done["error"]
        assert done["progress"]["done"] == done["progress"]["total"] == 7
        statements = done["result"]["summary"]["statements"]
        assert statements and all(s["citations"] for s in statements)
        nodes_once(done)

        # one Predictor deployment holds both models: the stay gets a diagnosis so the medication model scores it
        stays[0].admissions[0].diagnoses.append(Code(system="ICD10CM", code="I10", description="Hypertension"))
        (stay_id,) = client.post_patient(stays[0].model_dump(mode="json"))["patient_ids"]
        scored = client.wait_job(client.submit_job(stay_id, ["mortality", "medications"])["id"], timeout_s=300)
        assert scored["status"] == "succeeded", scored["error"]
        assert scored["result"]["mortality"]["available"] and 0 < scored["result"]["mortality"]["probability"] < 1
        expected = FusionPredictor.from_checkpoint(fusion.checkpoint)(stays[0])["mortality"]
        assert scored["result"]["mortality"]["probability"] == pytest.approx(expected, abs=1e-5)
        medications = scored["result"]["medications"]
        assert medications["available"] and all(0.5 <= m["probability"] <= 1 for m in medications["recommended"])
        assert all(m["names"] for m in medications["recommended"])  # the order names behind each ATC class

        answer = client.chat(pid, "Is there any chest pain?")
        assert not answer["no_evidence"] and answer["evidence"] and answer["citations"]
        openai = client.http.post(
            "/v1/chat/completions",
            json={"model": "ehrflow", "messages": [{"role": "user", "content": "zebra xylophone?"}], "user": pid},
        )
        assert openai.status_code == 200 and openai.json()["choices"][0]["message"]["role"] == "assistant"
        assert set(openai.json()["ehrflow"]) == {"citations", "evidence", "no_evidence"}

        # a Workflow replica killed mid-job: the job is retried on the restarted replica and completes
        killed = client.submit_job(pid, ["mortality"])
        while client.get_job(killed["id"])["status"] == "queued":
            time.sleep(0.1)
        workflow = serve.get_deployment_handle("Workflow", app_name=APP)
        os.kill(workflow.pid.remote().result(), signal.SIGKILL)
        done = client.wait_job(killed["id"], timeout_s=300)
        assert done["status"] == "succeeded" and done["attempts"] >= 2, done
        nodes_once(done)

        # a restart with pending jobs: all complete, each node once
        pending = [client.submit_job(pid, [task])["id"] for task in ("readmission", "summary", "phenotypes")]
        serve.delete(APP)
        deploy(settings, cfg)
        finished = [client.wait_job(j, timeout_s=300) for j in pending]
        assert [j["status"] for j in finished] == ["succeeded"] * 3
        for j in finished:
            nodes_once(j)
        metrics = httpx.get(f"http://127.0.0.1:{PORT}/metrics").text
        assert 'ehrflow_jobs{state="succeeded"} 6.0' in metrics
    finally:
        serve.shutdown()
