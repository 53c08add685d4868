"""The deployment files load into ``Settings`` and ``ServeSettings`` and map to Serve options."""

from __future__ import annotations

from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("name", ["local.yaml", "cluster.yaml"])
def test_deploy_files_load(name, monkeypatch):
    from ehrflow.config import Settings
    from ehrflow.serve.settings import serve_settings

    monkeypatch.setenv("EHRFLOW_CONFIG", str(DEPLOY / name))
    settings = Settings()
    cfg = serve_settings(settings)
    assert settings.profile == name.removesuffix(".yaml")
    options = cfg.workflow.as_options()
    if name == "cluster.yaml":
        assert settings.llm.backend == "openai" and cfg.jobs_url.startswith("postgresql")
        assert settings.checkpoint_location.startswith("postgresql")
        assert options["autoscaling_config"]["max_replicas"] == 32 and "num_replicas" not in options
        assert cfg.llm.ray_actor_options["num_gpus"] == 1
    else:
        assert options["num_replicas"] == 1 and options["ray_actor_options"] == {"num_cpus": 0.25}
        assert cfg.resolved_jobs_url(settings).endswith("/serve.db")
        assert settings.checkpoint_location.endswith("checkpoints.sqlite")


def test_env_overrides_and_bad_section(monkeypatch, tmp_path):
    from ehrflow.config import Settings
    from ehrflow.serve.settings import serve_settings

    monkeypatch.setenv("EHRFLOW_SERVE__MAX_QUEUED_JOBS", "7")
    assert serve_settings(Settings()).max_queued_jobs == 7
    monkeypatch.delenv("EHRFLOW_SERVE__MAX_QUEUED_JOBS")
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve: [1, 2]\n")
    monkeypatch.setenv("EHRFLOW_CONFIG", str(bad))
    with pytest.raises(ValueError, match="serve"):
        Settings()
