"""The ``ehrflow`` command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from ehrflow.config import Settings, get_settings


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group()
@click.option("-v", "--verbose", count=True, help="-v for INFO, -vv for DEBUG (DEBUG may show identifiers).")
@click.option(
    "--home", type=click.Path(path_type=Path), default=None, help="State directory (default $EHRFLOW_HOME or .ehrflow)."
)
@click.pass_context
def main(ctx: click.Context, verbose: int, home: Path | None) -> None:
    """ehrflow: multimodal EHR AI on Ray."""
    _setup_logging(verbose)
    overrides = {"home": home} if home else {}
    ctx.obj = get_settings(**overrides)


def _store(settings: Settings):
    from ehrflow.records import PatientStore

    return PatientStore(settings.patient_store_url)


@main.command()
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(["mimic3", "mimic4", "fhir", "synthea-csv", "physionet2012", "notes"]),
)
@click.option("--skip-invalid", is_flag=True, help="Ingest the valid records; write a report of the rejected ones.")
@click.option(
    "--report", type=click.Path(path_type=Path), default=None, help="Where to write the rejection report (JSON)."
)
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.pass_obj
def ingest(settings: Settings, fmt: str, skip_invalid: bool, report: Path | None, path: Path) -> None:
    """Load PATH (a file or directory) into the patient store; one transaction per file."""
    from ehrflow.records import RecordError, ingest_path

    store = _store(settings)
    try:
        rep = ingest_path(store, fmt, path, skip_invalid=skip_invalid, progress=True)
    except RecordError as err:
        raise click.ClickException(f"ingest failed, store unchanged for this file: {err}") from err
    r = rep.result
    click.echo(f"{fmt}: {r.inserted} inserted, {r.updated} updated, {r.unchanged} unchanged ({rep.units} file(s))")
    if rep.warnings:
        click.echo(f"{len(rep.warnings)} source rows left out as unusable (see report)")
    if rep.rejected or rep.warnings:
        from ehrflow.records.errors import ErrorSink

        sink = ErrorSink(skip_invalid=True, rejected=rep.rejected, warnings=rep.warnings)
        out = sink.write_report(report or settings.home / f"ingest-report-{fmt}.json")
        click.echo(f"{len(rep.rejected)} record(s) rejected; report: {out}")


@main.group()
def patients() -> None:
    """Inspect the patient store."""


@patients.command("list")
@click.option("--cohort", default="", help='Filter, e.g. "source=physionet2012,died_in_hospital=true,limit=20".')
@click.pass_obj
def patients_list(settings: Settings, cohort: str) -> None:
    """List patient ids matching a cohort filter, then the cohort summary."""
    from ehrflow.records import CohortFilter

    store = _store(settings)
    try:
        flt = CohortFilter.parse(cohort)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--cohort") from err
    for pid in store.ids(flt):
        click.echo(pid)
    click.echo(json.dumps(store.summary(flt), indent=2), err=True)


@patients.command("show")
@click.argument("patient_id")
@click.option("--json", "as_json", is_flag=True, help="Print the full record as JSON.")
@click.pass_obj
def patients_show(settings: Settings, patient_id: str, as_json: bool) -> None:
    """Show one patient's record."""
    patient = _store(settings).get(patient_id)
    if patient is None:
        raise click.ClickException(f"patient {patient_id!r} not found in {settings.patient_store_url}")
    if as_json:
        click.echo(patient.model_dump_json(indent=2))
        return
    click.echo(
        f"{patient.id}  source={patient.source} sex={patient.sex} age={patient.age} birth_date={patient.birth_date}"
    )
    for adm in patient.admissions:
        o = adm.outcomes
        click.echo(
            f"  admission {adm.id} {adm.admit_time} -> {adm.discharge_time} type={adm.admission_type} "
            f"dx={len(adm.diagnoses)} px={len(adm.procedures)} meds={len(adm.medications)} "
            f"measurements={len(adm.measurements)} notes={len(adm.notes)} "
            f"death={o.in_hospital_death} readmit30={o.readmission_30d}"
        )
    if patient.notes:
        click.echo(f"  patient-level notes: {len(patient.notes)}")


@main.command()
@click.pass_obj
def demo(settings: Settings) -> None:
    """Run the main job on the embedded defaults with the demo cohort shipped in the package."""
    from ehrflow.demo import run_demo

    sys.exit(run_demo(settings))


if __name__ == "__main__":
    main()
