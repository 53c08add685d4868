"""Load test of the real Serve app on loopback: job submissions, job completion, chat, and a
schemathesis run of the OpenAPI schema (no 5xx). Bounded in count and time; it stops by itself.

    .venv/bin/python benchmarks/serve_load.py --jobs 200 --chats 500 --concurrency 20 --budget-s 600

Chats and jobs go to the smallest demo FHIR patients, posted over HTTP. Chats run first, on an
idle workflow: each distinct (patient, question) once ("cold": the LLM answers), then many
requests, each its own conversation, so the LLM prompt repeats and hits the LLM cache ("warm":
serving, retrieval and the cached LLM path). Jobs are then submitted at once and run in
the background; the job-completion numbers say how many finished within the time budget. Results: ``benchmarks/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from _util import write_result

TASKS = (["summary"], ["mortality"], ["summary", "phenotypes"], ["readmission"])
QUESTIONS = (
    "Does the patient have hypertension?",
    "Any history of diabetes?",
    "What medications is the patient taking?",
    "Is there any mention of chest pain?",
    "Any allergies documented?",
)


def serve_rss_mib() -> dict[str, float]:
    """RSS of the Serve processes (controller, proxy, replicas) by name, from /proc."""
    found: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            name = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
            if not name.startswith(("ray::Serve", "ray::ProxyActor")):
                continue
            rss_kib = next(
                int(ln.split()[1]) for ln in (proc / "status").read_text().splitlines() if ln.startswith("VmRSS")
            )
        except (OSError, StopIteration, ValueError):
            continue
        found[name] = round(found.get(name, 0.0) + rss_kib / 1024, 1)
    return found


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def timed_calls(fn: Any, items: list[Any], concurrency: int, deadline: float) -> dict[str, Any]:
    """Run ``fn(item) -> status`` over items with ``concurrency`` threads until the deadline."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    def one(item: Any) -> None:
        if time.monotonic() > deadline:
            statuses["skipped_time_budget"] = statuses.get("skipped_time_budget", 0) + 1
            return
        start = time.perf_counter()
        try:
            status = str(fn(item))
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        latencies.append(time.perf_counter() - start)
        statuses[status] = statuses.get(status, 0) + 1

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, items))
    wall = time.perf_counter() - start
    errors = sum(n for s, n in statuses.items() if not s.startswith("2") and s != "skipped_time_budget")
    return {
        "requests": len(latencies),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 2) if wall else None,
        "p50_s": pct(latencies, 0.5),
        "p95_s": pct(latencies, 0.95),
        "statuses": statuses,
        "errors": errors,
    }


def _check_operation(
    operation: Any,
    label: str,
    base_url: str,
    api_key: str,
    max_examples: int,
    cases: dict[str, int],
    server_errors: list[str],
) -> None:
    from hypothesis import HealthCheck, given, settings

    @given(case=operation.as_strategy())
    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: Any) -> None:
        cases[label] = cases.get(label, 0) + 1
        response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120)
        if response.status_code >= 500:
            server_errors.append(f"{label}: {response.status_code} {response.text[:200]}")

    check()


def run_schemathesis(base_url: str, api_key: str, max_examples: int, deadline: float) -> dict[str, Any]:
    """Generated requests for every operation of the served OpenAPI schema; counts 5xx answers."""
    import schemathesis
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    server_errors: list[str] = []
    cases: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if time.monotonic() > deadline:
            break
        label = f"{operation.method.upper()} {operation.path}"

        try:
            _check_operation(operation, label, base_url, api_key, max_examples, cases, server_errors)
        except Unsatisfiable:
            cases.setdefault(label, 0)
    return {
        "cases_by_operation": cases,
        "cases": sum(cases.values()),
        "server_errors": len(server_errors),
        "examples": server_errors[:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--chats", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=600.0, help="stop issuing requests after this long")
    parser.add_argument("--port", type=int, default=8012)
    parser.add_argument("--patients", type=int, default=2, help="the N smallest demo FHIR bundles")
    parser.add_argument("--questions", type=int, default=1, help=f"distinct chat questions (at most {len(QUESTIONS)})")
    parser.add_argument("--request-timeout-s", type=float, default=180.0)
    parser.add_argument("--schemathesis-examples", type=int, default=20, help="per operation; 0 skips it")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["EHRFLOW_SERVE__PORT"] = str(args.port)
    os.environ["EHRFLOW_SERVE__MAX_QUEUED_JOBS"] = str(max(args.jobs, 1))

    from ehrflow.config import get_settings
    from ehrflow.demo import demo_data_dir
    from ehrflow.serve.client import EhrflowClient
    from ehrflow.serve.deployments import start_local

    started = time.monotonic()
    deadline = started + args.budget_s
    home = Path(tempfile.mkdtemp(prefix="ehrflow-serve-load-"))
    settings = get_settings(home=home, grounding={"mode": "lexical"})
    t0 = time.perf_counter()
    base_url, api_key, stop = start_local(settings)
    startup_s = time.perf_counter() - t0
    out: dict[str, Any] = {"config": vars(args), "startup_s": round(startup_s, 1), "rss_mib_at_start": serve_rss_mib()}
    try:
        client = EhrflowClient(base_url, api_key)
        headers = {"Authorization": f"Bearer {api_key}"}
        patients: list[str] = []
        bundles = sorted((demo_data_dir() / "fhir").glob("*.json"), key=lambda p: p.stat().st_size)
        for bundle in bundles[: args.patients]:
            patients += client.post_patient(json.loads(bundle.read_text()))["patient_ids"]
        http = httpx.Client(base_url=base_url, headers=headers, timeout=args.request_timeout_s)
        questions = QUESTIONS[: args.questions]

        def chat(i: int) -> int:
            body = {
                "patient_id": patients[i % len(patients)],
                "conversation_id": f"load-{i}",
                "message": questions[(i // len(patients)) % len(questions)],
            }
            return http.post("/v1/chat", json=body).status_code

        # cold: each distinct (patient, question) once, one at a time (the LLM answers; later ones hit its cache)
        distinct = len(patients) * len(questions)
        out["chats_cold"] = timed_calls(chat, list(range(distinct)), 1, deadline)
        # warm: one conversation per request, so the LLM prompt repeats and the steady state measures
        # serving, retrieval and the cached LLM path
        chat_deadline = min(deadline, time.monotonic() + 0.4 * args.budget_s)  # leave time for the jobs
        out["chats_warm"] = timed_calls(chat, list(range(args.chats)), args.concurrency, chat_deadline)

        submitted: list[str] = []

        def submit(i: int) -> int:
            body = {
                "patient_id": patients[i % len(patients)],
                "tasks": TASKS[i % len(TASKS)],
                "idempotency_key": f"load-{i}",
            }
            r = http.post("/v1/jobs", json=body)
            if r.status_code in (200, 202):
                submitted.append(r.json()["id"])
            return r.status_code

        out["job_submissions"] = timed_calls(submit, list(range(args.jobs)), args.concurrency, deadline)

        # job completion, bounded by the same budget
        pending, done, latencies = set(submitted), {}, []
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                job = http.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed"):
                    pending.discard(job_id)
                    done[job["status"]] = done.get(job["status"], 0) + 1
                    created = dt.datetime.fromisoformat(job["created_at"])
                    latencies.append((dt.datetime.fromisoformat(job["finished_at"]) - created).total_seconds())
            time.sleep(1)
        out["job_completion"] = {
            "submitted": len(submitted),
            "finished": done,
            "unfinished_at_budget": len(pending),
            "queue_to_done_p50_s": pct(latencies, 0.5),
            "queue_to_done_p95_s": pct(latencies, 0.95),
        }
        out["rss_mib_after_jobs"] = serve_rss_mib()
        if args.schemathesis_examples > 0:
            out["schemathesis"] = run_schemathesis(base_url, api_key, args.schemathesis_examples, deadline + 300)
        out["metrics_excerpt"] = [
            line for line in http.get("/metrics").text.splitlines() if line.startswith(("ehrflow_jobs", "ehrflow_llm"))
        ]
    finally:
        t0 = time.perf_counter()
        stop()
        out["shutdown_s"] = round(time.perf_counter() - t0, 1)
    out["total_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(out, indent=2))
    if not args.no_write:
        print(write_result("serve_load", out, packages=("ray", "fastapi", "schemathesis")))


if __name__ == "__main__":
    main()
