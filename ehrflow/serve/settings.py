"""Serving configuration: ports, limits, the job store URL, and Ray Serve deployment options.

``Settings.serve`` holds it, so it comes from the ``serve:`` mapping of the YAML named by
``EHRFLOW_CONFIG`` or from ``EHRFLOW_SERVE__*`` environment variables like every other section.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

if TYPE_CHECKING:  # ehrflow.config may include ServeSettings: no import cycle at run time
    from ehrflow.config import Settings


class DeploymentOptions(BaseModel):
    """Options passed to ``Deployment.options``: replicas or autoscaling, and actor resources."""

    num_replicas: int | None = 1
    autoscaling_config: dict[str, Any] | None = None
    """e.g. ``{min_replicas: 1, max_replicas: 8, target_ongoing_requests: 2}``; replaces ``num_replicas``."""
    max_ongoing_requests: int = 8
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0.25})

    def as_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": self.ray_actor_options,
        }
        if self.autoscaling_config:
            options["autoscaling_config"] = self.autoscaling_config
        else:
            options["num_replicas"] = self.num_replicas
        return options


class ServeSettings(BaseModel):
    """The ``serve`` section of ``Settings``."""

    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "ehrflow"
    jobs_url: str | None = None
    """SQLAlchemy URL of the job and API-key store; default ``sqlite:///<home>/serve.db``."""
    default_tenant: str = "default"
    """Owner of patients that were not posted over HTTP (e.g. the demo cohort ingested by the CLI)."""
    max_body_bytes: int = 8 * 1024 * 1024
    max_queued_jobs: int = 100
    retry_after_s: int = 5
    job_workers: int = 2
    """Jobs one ingress replica runs at a time."""
    job_lease_s: float = 30.0
    """A running job whose lease is not renewed for this long (its replica died) is taken over."""
    job_max_attempts: int = 3
    poll_interval_s: float = 0.5
    ingress: DeploymentOptions = Field(default_factory=DeploymentOptions)
    workflow: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=4))
    llm_deployment: bool = False
    """Run the LLM in its own deployment shared by all workflow replicas (e.g. one GGUF model, or
    ``num_gpus`` for in-process vLLM); off, each workflow replica holds its own LLM client."""
    llm: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=4))
    embedder_deployment: bool = False
    """Encode notes and queries in one ``Embedder`` deployment shared by the workflow replicas."""
    embedder: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=16))
    predictor_deployment: bool = False
    """Score patients in a ``Predictor`` deployment holding ``models.fusion_checkpoint`` and ``models.medrec_checkpoint``."""
    predictor: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=16))

    def resolved_jobs_url(self, settings: Settings) -> str:
        return self.jobs_url or f"sqlite:///{(Path(settings.home) / 'serve.db').resolve()}"


def serve_settings(settings: Settings) -> ServeSettings:
    """The ``serve`` section of ``settings`` (YAML ``serve:`` or ``EHRFLOW_SERVE__*`` variables)."""
    return settings.serve
