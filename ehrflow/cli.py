"""The ``ehrflow`` command."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import click

from ehrflow.config import Settings, get_settings


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)  # some libraries (bm25s) set DEBUG on their own loggers


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


@main.group()
def kg() -> None:
    """Build, import and inspect knowledge graphs."""


@kg.command("build")
@click.option("--openkg", "openkg_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--drugcentral", "drugcentral_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def kg_build(openkg_dir: Path, drugcentral_dir: Path | None, out_dir: Path) -> None:
    """Build the compact default KG (the one shipped in the package) from the open sources."""
    from ehrflow.knowledge.build import build_default_kg
    from ehrflow.knowledge.readers import KGFormatError

    try:
        rep = build_default_kg(openkg_dir, out_dir, drugcentral_dir=drugcentral_dir)
    except (KGFormatError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(
        f"{rep.nodes} nodes, {rep.edges} edges, {rep.smiles} SMILES, {rep.bytes_on_disk / 1e6:.1f} MB in {out_dir}"
    )
    click.echo(f"use it with EHRFLOW_KNOWLEDGE__PATH={out_dir}")


@kg.command("import-primekg")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="SQLite file to write.")
@click.pass_obj
def kg_import_primekg(settings: Settings, directory: Path, out: Path | None) -> None:
    """Convert a PrimeKG download (kg.csv plus disease/drug features) into ehrflow's indexed form."""
    from ehrflow.knowledge.build import import_primekg
    from ehrflow.knowledge.readers import KGFormatError

    out = out or settings.home / "primekg.sqlite"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        import_primekg(directory, out)
    except KGFormatError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"PrimeKG imported into {out}; use it with EHRFLOW_KNOWLEDGE__PATH={out}")


@kg.command("info")
@click.pass_obj
def kg_info(settings: Settings) -> None:
    """Node and edge counts of the configured KG."""
    from ehrflow.knowledge import KnowledgeGraph

    graph = KnowledgeGraph.open(settings.knowledge.path) if settings.knowledge.path else KnowledgeGraph.default()
    click.echo(json.dumps(graph.stats(), indent=2, default=str))


def _patient_job(settings: Settings):
    from ehrflow.graph.checkpoint import open_checkpointer
    from ehrflow.graph.deps import WorkflowDeps
    from ehrflow.graph.patient_job import build_patient_job

    deps = WorkflowDeps.from_settings(settings, progress=True)
    return deps, build_patient_job(deps, open_checkpointer(settings.checkpoint_location))


@main.command()
@click.option("--patient", "patient_id", help="One patient: print its report and write JSON.")
@click.option("--cohort", help='Many patients on Ray, e.g. "source=physionet2012,limit=50" ("" = everyone).')
@click.option(
    "--task", type=click.Choice(["general", "mortality", "readmission"]), default="general", show_default=True
)
@click.option("--workers", type=int, default=2, show_default=True, help="Ray actors for --cohort.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JSON output (--patient).")
@click.pass_obj
def run(
    settings: Settings, patient_id: str | None, cohort: str | None, task: str, workers: int, out: Path | None
) -> None:
    """Run the agent workflow (extract, ground, retrieve, summarise, predict) for a patient or a cohort.

    Results also go to the workflow-results table the trainers read; finished cohort patients are skipped.
    """
    from ehrflow.graph.cohort import WorkflowResultStore, run_cohort
    from ehrflow.graph.deps import PatientNotFound
    from ehrflow.graph.patient_job import run_patient_job
    from ehrflow.llm import LLMError
    from ehrflow.records import CohortFilter

    if (patient_id is None) == (cohort is None):
        raise click.UsageError("give exactly one of --patient or --cohort")
    settings.home.mkdir(parents=True, exist_ok=True)
    if patient_id is not None:
        deps, graph = _patient_job(settings)
        try:
            state = run_patient_job(graph, patient_id, task)
        except PatientNotFound as err:
            raise click.ClickException(str(err)) from err
        except LLMError as err:
            raise click.ClickException(f"the LLM failed; the job can be resumed by running this again: {err}") from err
        WorkflowResultStore(settings.patient_store_url).put(state)
        digest = hashlib.sha256(patient_id.encode()).hexdigest()[:12]  # no identifier in file names
        out = out or settings.home / "results" / f"{task}-{digest}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(state.model_dump_json(indent=2))
        click.echo(state.report)
        click.echo(f"\nJSON written to {out}")
        return
    try:
        flt = CohortFilter.parse(cohort)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--cohort") from err
    ids = _store(settings).ids(flt)
    rep = run_cohort(settings, ids, task=task, num_workers=workers)
    click.echo(f"{len(ids)} patients: {rep.done} done, {rep.skipped} already done, {rep.failed} failed")
    for error in (rep.errors or {}).values():
        click.echo(f"  failed: {error}", err=True)
    if rep.failed:
        sys.exit(1)


@main.command()
@click.option("--patient", "patient_id", required=True)
@click.option(
    "--conversation", default="cli", show_default=True, help="Conversation id: turns under it are remembered."
)
@click.option("--message", "-m", default=None, help="Ask one question and exit (otherwise an interactive session).")
@click.pass_obj
def chat(settings: Settings, patient_id: str, conversation: str, message: str | None) -> None:
    """Ask questions about one patient; answers cite the note chunks they rest on."""
    from ehrflow.graph.chat import ask, build_chat
    from ehrflow.graph.checkpoint import open_checkpointer
    from ehrflow.graph.deps import PatientNotFound, WorkflowDeps

    settings.home.mkdir(parents=True, exist_ok=True)
    deps = WorkflowDeps.from_settings(settings, progress=True)
    graph = build_chat(deps, open_checkpointer(settings.checkpoint_location))
    questions = [message] if message else iter(lambda: click.prompt("question (empty to quit)", default=""), "")
    for question in questions:
        try:
            answer = ask(graph, patient_id, conversation, question)
        except (ValueError, PatientNotFound) as err:
            raise click.ClickException(str(err)) from err
        click.echo(answer.answer)
        for chunk in answer.evidence:
            mark = "*" if chunk.chunk_id in answer.citations else " "
            click.echo(f" {mark}[{chunk.chunk_id}] {' '.join(chunk.text.split())[:160]}")


@main.group()
def train() -> None:
    """Train models through Ray Train (configs are YAML files; see docs/)."""


@main.group(name="eval")
def evaluate() -> None:
    """Evaluate trained checkpoints with bootstrap intervals."""


def _yaml_config(model: type, path: Path):  # noqa: ANN202
    import yaml
    from pydantic import ValidationError

    try:
        return model.model_validate(yaml.safe_load(path.read_text()) or {})
    except (ValidationError, yaml.YAMLError) as err:
        raise click.ClickException(f"{path}: {err}") from err


def _echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@train.command("fusion")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue the run from its newest checkpoint.")
@click.pass_obj
def train_fusion_cmd(settings: Settings, config_path: Path, resume: bool) -> None:
    """Train an EMERGE or MEDFuse fusion model (mortality, readmission, phenotypes); see docs/fusion.md.

    Without a data source in the YAML, the configured patient store is used."""
    from pydantic import ValidationError

    from ehrflow.training.fusion import ModalityError, train_fusion_from_file

    try:
        result = train_fusion_from_file(config_path, resume=resume, default_store_url=settings.patient_store_url)
    except (ValidationError, ModalityError, FileExistsError, FileNotFoundError, ValueError) as err:
        raise click.ClickException(f"{config_path}: {err}") from err
    _echo_json(
        {
            "checkpoint": result.checkpoint,
            "best_epoch": result.best_epoch,
            "test": result.test_metrics,
            **({"tree_blend": result.tree_blend} if result.tree_blend else {}),
        }
    )
    click.echo(f"model card: {result.model_card}; use it with EHRFLOW_MODELS__FUSION_CHECKPOINT={result.checkpoint}")


@evaluate.command("fusion")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Metrics and plots.")
def eval_fusion_cmd(checkpoint: Path, out: Path | None) -> None:
    """Evaluate a fusion checkpoint on its run's test split."""
    from ehrflow.training.fusion import evaluate_fusion

    _echo_json(evaluate_fusion(checkpoint, output_dir=out))


@train.command("medrec")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def train_medrec_cmd(config_path: Path) -> None:
    """Train a medication recommender (NLA-MMR, GAMENet, or a baseline); see docs/medrec.md."""
    from ehrflow.training.medrec import MedRecConfig, train_medrec

    result = train_medrec(_yaml_config(MedRecConfig, config_path))
    _echo_json(result.model_dump(mode="json", exclude={"dataset_report"}))


@evaluate.command("medrec")
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--ddi-pairs", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--ddi-matrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--rounds", type=int, default=None, help="Bootstrap rounds (default: the run's, 10).")
@click.option("--baselines", is_flag=True, help="Also score the baselines on the same rounds.")
@click.option(
    "--ddi-guard",
    type=click.FloatRange(0, 1),
    default=None,
    help="Cap each visit's interacting-pair share at prediction (default: the run's ddi_guard).",
)
def eval_medrec_cmd(
    checkpoint: Path,
    split: str,
    ddi_pairs: Path | None,
    ddi_matrix: Path | None,
    rounds: int | None,
    baselines: bool,
    ddi_guard: float | None,
) -> None:
    """Jaccard, F1, PRAUC, DDI rate and #drugs (mean +- sd over bootstrap rounds of test patients)."""
    from pydantic import BaseModel

    from ehrflow.training.medrec import evaluate_medrec

    metrics = evaluate_medrec(
        checkpoint,
        split=split,
        ddi_pairs=ddi_pairs,
        ddi_matrix=ddi_matrix,
        rounds=rounds,
        with_baselines=baselines,
        ddi_guard=ddi_guard,
    )
    click.echo(json.dumps(metrics, indent=2, default=lambda v: v.model_dump() if isinstance(v, BaseModel) else str(v)))


@train.command("retriever")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_obj
def train_retriever_cmd(settings: Settings, config_path: Path) -> None:
    """Fine-tune the note retriever on KG and LLM pairs (DR.EHR); see docs/retrieval.md.

    Without a data source in the YAML, the configured patient store is used; the LLM is the configured one."""
    from ehrflow.llm import build_llm
    from ehrflow.training.retriever import RetrieverTrainConfig, train_retriever

    config = _yaml_config(RetrieverTrainConfig, config_path)
    if not config.data.store_url and not config.data.inputs:
        config.data.store_url = settings.patient_store_url
    try:
        result = train_retriever(config, llm=build_llm(settings.llm))
    except (FileExistsError, ValueError) as err:
        raise click.ClickException(f"{config_path}: {err}") from err
    _echo_json(result.model_dump(mode="json"))
    click.echo(f"use it with EHRFLOW_EMBEDDER__MODEL={result.model_dir}")


@train.command("grounding")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_obj
def train_grounding_cmd(settings: Settings, config_path: Path | None) -> None:
    """Fine-tune the entity-grounding encoder on the KG's own synonyms; see docs/knowledge.md.

    The KG and, unless the YAML sets them, the node types and id prefixes are the configured grounding's; without
    --config the other defaults apply (about 16 minutes on 2 CPU cores)."""
    from ehrflow.knowledge import KnowledgeGraph
    from ehrflow.training.grounding_encoder import GroundingEncoderConfig, train_grounding_encoder

    config = _yaml_config(GroundingEncoderConfig, config_path) if config_path else GroundingEncoderConfig()
    for field in ("node_types", "id_prefixes"):
        if field not in config.model_fields_set:
            setattr(config, field, getattr(settings.grounding, field))
    kg = KnowledgeGraph.open(settings.knowledge.path) if settings.knowledge.path else KnowledgeGraph.default()
    try:
        result = train_grounding_encoder(config, kg=kg)
    except (FileExistsError, ValueError) as err:
        raise click.ClickException(f"{config_path or 'defaults'}: {err}") from err
    _echo_json(result.model_dump(mode="json"))
    click.echo(f"use it with EHRFLOW_GROUNDING__MODEL={result.model_dir}")


@main.group(invoke_without_command=True)
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Serve the API with Ray Serve (jobs, chat, OpenAI-shape chat completions); see docs/serving.md."""
    if ctx.invoked_subcommand is None:
        from ehrflow.serve.deployments import serve_app

        settings: Settings = ctx.obj
        click.echo(f"serving on http://{settings.serve.host}:{settings.serve.port} (Ctrl-C stops)")
        serve_app(settings)


@serve.command("create-key")
@click.argument("tenant")
@click.pass_obj
def serve_create_key(settings: Settings, tenant: str) -> None:
    """Create an API key for TENANT; it is shown once and stored only as a salted hash."""
    from ehrflow.serve.auth import create_api_key

    settings.home.mkdir(parents=True, exist_ok=True)
    click.echo(create_api_key(settings, tenant))


@main.command()
@click.pass_obj
def demo(settings: Settings) -> None:
    """Run the main job on the embedded defaults with the demo cohort shipped in the package."""
    from ehrflow.demo import run_demo

    sys.exit(run_demo(settings))


if __name__ == "__main__":
    main()
