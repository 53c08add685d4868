"""The main job on the embedded defaults: what ``make demo`` runs."""

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


def run_demo(settings: Settings) -> int:
    from ehrflow.records import PatientStore, ingest_path

    settings.home.mkdir(parents=True, exist_ok=True)
    data = demo_data_dir()
    store = PatientStore(settings.patient_store_url)
    started = time.perf_counter()

    _step("1. Ingest the demo cohort (Synthea FHIR bundles with notes; 300 PhysioNet 2012 ICU stays)")
    for fmt, path in (("fhir", data / "fhir"), ("physionet2012", data / "physionet2012")):
        rep = ingest_path(store, fmt, path, progress=True)
        r = rep.result
        click.echo(f"  {fmt:14s} {r.inserted} inserted, {r.updated} updated, {r.unchanged} unchanged")

    _step("2. Cohort summary")
    click.echo(json.dumps(store.summary(), indent=2))

    click.echo(f"\ndemo finished in {time.perf_counter() - started:.1f} s; state in {settings.home.resolve()}")
    return 0
