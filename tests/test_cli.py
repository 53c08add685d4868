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
