"""The ``ehrflow`` command: argument checks and clear errors (the heavy paths are tested in their packages)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ehrflow.cli import main


def _run(tmp_path, *args: str):
    return CliRunner().invoke(main, ["--home", str(tmp_path / "home"), *args], catch_exceptions=False)


def test_kg_info_reports_the_shipped_kg(tmp_path):
    result = _run(tmp_path, "kg", "info")
    assert result.exit_code == 0
    stats = json.loads(result.output)
    assert stats["nodes"] > 100_000 and stats["edges"] > 500_000


def test_run_needs_exactly_one_of_patient_or_cohort(tmp_path):
    assert "exactly one of --patient or --cohort" in _run(tmp_path, "run").output
    assert _run(tmp_path, "run", "--patient", "a", "--cohort", "").exit_code != 0


def test_training_config_errors_name_the_file_and_field(tmp_path):
    config = tmp_path / "medrec.yaml"
    config.write_text("model: transformer-of-doom\n")
    result = _run(tmp_path, "train", "medrec", "--config", str(config))
    assert result.exit_code != 0
    assert str(config) in result.output and "model" in result.output


def test_serve_create_key_prints_a_bearer_token(tmp_path):
    result = _run(tmp_path, "serve", "create-key", "clinic-a")
    assert result.exit_code == 0 and result.output.strip().startswith("ehr_")


def test_train_grounding_uses_the_configured_kg_and_names_the_model(tmp_path):
    """Local-mode Ray Train (no workers) for two steps on the committed tiny KG: the command wiring, not quality."""
    from pathlib import Path

    config = tmp_path / "grounding.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'grounding'}\n"
        "train: {batch_size: 8, max_steps: 2, max_seq_length: 32}\n"
        f"ray: {{num_workers: 0, name: cli-grounding, storage_path: {tmp_path / 'runs'}}}\n"
    )
    kg = Path(__file__).resolve().parent / "fixtures" / "kg_tiny"
    result = CliRunner(env={"EHRFLOW_KNOWLEDGE__PATH": str(kg)}).invoke(
        main, ["--home", str(tmp_path / "home"), "train", "grounding", "--config", str(config)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert report["steps"] == 2 and 0 < report["nodes"] < 40  # the tiny KG's DOID/HPO/drug nodes with synonyms
    assert f"EHRFLOW_GROUNDING__MODEL={tmp_path / 'grounding'}" in result.output

    config.write_text("train: {batch_size: 1}\n")
    refused = _run(tmp_path, "train", "grounding", "--config", str(config))
    assert refused.exit_code != 0 and str(config) in refused.output and "batch_size" in refused.output


def test_eval_medrec_applies_a_ddi_guard(tmp_path, tiny_medrec):
    _, checkpoint, _ = tiny_medrec
    result = _run(tmp_path, "eval", "medrec", str(checkpoint), "--rounds", "2", "--ddi-guard", "0")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["test"]["ddi_rate"]["mean"] == 0.0
    assert _run(tmp_path, "eval", "medrec", str(checkpoint), "--ddi-guard", "1.5").exit_code != 0
