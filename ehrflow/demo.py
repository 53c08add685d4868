"""The main job on the embedded defaults: what ``make demo`` runs.

Ingest the demo cohort, train a small mortality model with Ray Train, start the Ray Serve app,
post the Synthea patients over HTTP, run patient jobs through it to completion, ask one chat
question, print the results and shut everything down. Re-running reuses what is already there
(stored patients, the trained checkpoint, the KG index, LLM answers).
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import click

from ehrflow.config import Settings


def demo_data_dir() -> Path:
    """The demo cohort shipped inside the package (see its ATTRIBUTION.md)."""
    return Path(str(resources.files("ehrflow") / "data" / "demo"))


def _step(title: str) -> None:
    click.secho(f"\n== {title}", bold=True)


def _train_mortality_model(settings: Settings) -> Path:
    """A small EMERGE-style fusion model (time series + static) on the 300 PhysioNet stays, 1 Ray worker, blended
    with boosted trees on the stays' summary statistics."""
    from ehrflow.training.fusion import FusionTrainConfig, train_fusion
    from ehrflow.training.ray_utils import RayTrainConfig

    run_dir = settings.home / "runs"
    config = FusionTrainConfig.model_validate(
        {
            "data": {"store_url": settings.patient_store_url, "cohort": "source=physionet2012"},
            "split": {"fractions": (0.7, 0.15, 0.15), "seed": 0},
            "tasks": ["mortality"],
            "train": {"epochs": 8, "patience": 4, "batch_size": 64},
            "trees": {"enabled": True},
            "n_bootstrap": 200,
            "text": {"cache_dir": settings.home / "cache" / "text-embeddings"},
        }
    )
    config.ray = RayTrainConfig(name="demo-mortality", storage_path=run_dir, num_workers=1)
    best = run_dir / "demo-mortality.best"
    if best.is_file():
        click.echo(f"  reusing the trained checkpoint {best.read_text()}")
        return Path(best.read_text())
    result = train_fusion(config)
    best.write_text(str(result.checkpoint))
    auroc = result.test_metrics.get("mortality", {}).get("auroc", {})
    click.echo(
        f"  {result.epochs_run} epochs in {result.wall_seconds:.0f} s; best epoch {result.best_epoch}; "
        f"test AUROC {json.dumps(auroc)} (45 test stays: a smoke test, not an evaluation)"
    )
    if result.tree_blend:
        click.echo(
            f"  blended with boosted trees (rounds and network weight chosen on validation): {result.tree_blend}"
        )
    return result.checkpoint


def run_demo(settings: Settings) -> int:
    import ray

    from ehrflow.graph.deps import WorkflowDeps
    from ehrflow.records import CohortFilter, PatientStore, ingest_path
    from ehrflow.serve.client import EhrflowClient
    from ehrflow.serve.deployments import start_local

    settings.home.mkdir(parents=True, exist_ok=True)
    data = demo_data_dir()
    store = PatientStore(settings.patient_store_url)
    started = time.perf_counter()

    _step("1. Ingest 300 PhysioNet 2012 ICU stays into the patient store (SQLite)")
    rep = ingest_path(store, "physionet2012", data / "physionet2012", progress=True)
    r = rep.result
    click.echo(f"  physionet2012: {r.inserted} inserted, {r.updated} updated, {r.unchanged} unchanged")

    settings.ray.ensure_initialized()
    stop = None
    try:
        _step("2. Train an in-hospital mortality model with Ray Train (1 worker)")
        settings.models.fusion_checkpoint = _train_mortality_model(settings)

        _step("3. Open the knowledge graph and its entity index (built once, then reused)")
        WorkflowDeps.from_settings(settings, progress=True)

        _step("4. Start the Ray Serve app")
        base_url, api_key, stop = start_local(settings)
        client = EhrflowClient(base_url, api_key)
        click.echo(f"  serving at {base_url}")

        _step("5. Post the Synthea FHIR bundles over HTTP")
        synthea_ids: list[str] = []
        for bundle in sorted((data / "fhir").glob("*.json")):
            accepted = client.post_patient(json.loads(bundle.read_text()))
            synthea_ids += accepted["patient_ids"]
        click.echo(f"  {len(synthea_ids)} patients accepted")

        _step("6. Submit patient jobs and wait for them")
        stay = store.ids(CohortFilter.parse("source=physionet2012,died_in_hospital=true,limit=1"))[0]
        submissions = [(stay, ["mortality"]), (synthea_ids[0], ["summary", "phenotypes"])]
        jobs = [
            client.submit_job(pid, tasks, idempotency_key=f"demo-{i}") for i, (pid, tasks) in enumerate(submissions)
        ]
        for job in jobs:
            done = client.wait_job(job["id"], timeout_s=1800)
            click.echo(f"\n  job {done['id']}: {done['status']}")
            result = done.get("result") or {}
            for run in result.get("runs", {}).values():
                click.echo("  " + "\n  ".join((run.get("report") or "").splitlines()[:14]))
            if "mortality" in result:
                click.echo(f"  mortality probability: {result['mortality']['probability']}")
            if "phenotypes" in result:
                click.echo(f"  phenotypes: {', '.join(p['name'] for p in result['phenotypes'][:8])}")

        _step("7. Ask a question through the chat endpoint")
        question = "Does the patient have a history of sinusitis?"
        reply = client.chat(synthea_ids[0], question, conversation_id="demo")
        click.echo(f"  Q: {question}\n  A: {reply['answer']}")
        if not reply["no_evidence"]:
            click.echo(
                "  (the answer's wording comes from the 135M-parameter local model and can be wrong; the evidence "
                "below is what the retriever found" + (", cited by the model)" if reply["cited_by_model"] else ")")
            )
        for chunk in reply.get("evidence", [])[:3]:
            click.echo(f"     [{chunk['chunk_id']}] {' '.join(chunk['text'].split())[:120]}")
    finally:
        _step("8. Shut down")
        if stop is not None:
            stop()
        ray.shutdown()

    click.echo(f"\ndemo finished in {time.perf_counter() - started:.1f} s; state in {settings.home.resolve()}")
    return 0
