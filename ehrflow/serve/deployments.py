"""Ray Serve deployments: ``Ingress`` (the FastAPI app and its job runner) -> ``Workflow``
(LangGraph patient jobs and chat) -> optionally ``LLM``, ``Embedder`` and ``Predictor`` (one
model each, shared by all workflow replicas; on a cluster, the ones given GPUs). Replicas,
autoscaling and actor resources come from :class:`ServeSettings`.

Replicas get the driver's settings as JSON and its working directory, so relative paths in
the configuration mean the same thing in every process on a one-machine cluster; on a real
cluster use absolute paths on shared storage and server URLs (PostgreSQL, Chroma server).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from ehrflow.config import Settings
from ehrflow.llm.base import BaseLLM, GenerationRequest, LLMConfig, RawCompletion
from ehrflow.serve.settings import ServeSettings, serve_settings

log = logging.getLogger(__name__)


def _restore(settings_json: str, cwd: str) -> Settings:
    os.chdir(cwd)
    return Settings.model_validate_json(settings_json)


@serve.deployment(name="LLM")
class LLMDeployment:
    """One loaded model behind a handle; callers keep their own cache and token accounting."""

    def __init__(self, settings_json: str, cwd: str):
        from ehrflow.llm import build_llm

        settings = _restore(settings_json, cwd)
        self.llm = build_llm(settings.llm.model_copy(update={"cache": False}))

    def model_id(self) -> str:
        return self.llm.model_id

    def generate(self, request: GenerationRequest) -> RawCompletion:
        return self.llm._generate(request)


class RemoteLLM(BaseLLM):
    """An LLM whose generation runs in the ``LLM`` deployment."""

    backend = "serve"

    def __init__(self, config: LLMConfig, handle: DeploymentHandle):
        super().__init__(config)
        self.handle = handle
        self._model_id: str | None = None

    @property
    def model_id(self) -> str:
        if self._model_id is None:  # asked lazily: replica constructors may run on an event loop
            self._model_id = self.handle.model_id.remote().result()
        return self._model_id

    def _generate(self, request: GenerationRequest) -> RawCompletion:
        return self.handle.generate.remote(request).result()


@serve.deployment(name="Embedder")
class EmbedderDeployment:
    """The note embedder behind a handle: one loaded model (or one GPU) serves every workflow replica."""

    def __init__(self, settings_json: str, cwd: str):
        from ehrflow.graph.deps import build_embedder

        self.embedder = build_embedder(_restore(settings_json, cwd))

    def info(self) -> tuple[str, int]:
        return self.embedder.name, self.embedder.dim

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.embedder.encode(texts, batch_size)


class RemoteEmbedder:
    """An ``Embedder`` whose encoding runs in the ``Embedder`` deployment.

    ``name`` (the vector space) comes from the settings without loading the model, because replica
    constructors run on an event loop and may not block on a handle; ``dim`` is asked on first use.
    """

    def __init__(self, handle: DeploymentHandle, settings: Settings):
        from ehrflow.graph.deps import build_embedder

        self.handle = handle
        self.name = build_embedder(settings).name  # lazy: no model is loaded here
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.handle.info.remote().result()[1])
        return self._dim

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not one string")
        return self.handle.encode.remote(list(texts), batch_size).result()


@serve.deployment(name="Predictor")
class PredictorDeployment:
    """The trained fusion and medication checkpoints (``models.*_checkpoint``) behind a handle."""

    def __init__(self, settings_json: str, cwd: str):
        from ehrflow.training.predictor import PatientPredictor

        settings = _restore(settings_json, cwd)
        predictor = PatientPredictor.from_settings(settings.models)
        if predictor is None:
            raise ValueError("models: the Predictor deployment needs fusion_checkpoint or medrec_checkpoint")
        self.predictor = predictor

    def predict(self, patient: Any, summary: Any) -> dict[str, Any]:
        """``{"predictions": ...}``, or ``{"unavailable": reason}`` for a patient the model cannot score."""
        from ehrflow.training.predictor import PredictionUnavailable

        try:
            return {"predictions": self.predictor(patient, summary)}
        except PredictionUnavailable as err:
            return {"unavailable": str(err)}


class RemotePredictor:
    """The workflow's ``predictor`` callable over the ``Predictor`` deployment."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    def __call__(self, patient: Any, summary: Any = None) -> dict[str, float]:
        from ehrflow.training.predictor import PredictionUnavailable

        answer = self.handle.predict.remote(patient, summary).result()
        if "unavailable" in answer:
            raise PredictionUnavailable(answer["unavailable"])
        return answer["predictions"]


@serve.deployment(name="Workflow")
class WorkflowDeployment:
    """Runs patient jobs and chat turns; writes job progress to the job store itself."""

    def __init__(
        self,
        settings_json: str,
        serve_json: str,
        cwd: str,
        llm: DeploymentHandle | None = None,
        embedder: DeploymentHandle | None = None,
        predictor: DeploymentHandle | None = None,
    ):
        from ehrflow.graph import WorkflowDeps
        from ehrflow.serve.jobs import JobStore
        from ehrflow.serve.workflow import LocalWorkflow

        settings = _restore(settings_json, cwd)
        cfg = ServeSettings.model_validate_json(serve_json)
        deps = WorkflowDeps.from_settings(
            settings,
            llm=RemoteLLM(settings.llm, llm) if llm is not None else None,
            embedder=RemoteEmbedder(embedder, settings) if embedder is not None else None,
            predictor=RemotePredictor(predictor) if predictor is not None else None,
        )
        self.workflow = LocalWorkflow(settings, deps)
        self.jobs = JobStore(cfg.resolved_jobs_url(settings))

    def run_job(self, job_id: str, patient_id: str, tasks: list[str]) -> dict[str, Any]:
        return self.workflow.run_job(job_id, patient_id, tasks, lambda n, t: self.jobs.set_progress(job_id, n, t))

    def chat(self, patient_id: str, conversation_id: str, message: str) -> dict[str, Any]:
        return self.workflow.chat(patient_id, conversation_id, message)

    def usage(self) -> dict[str, int]:
        return self.workflow.usage()

    def pid(self) -> int:
        """The replica's process id (the end-to-end test kills it mid-job)."""
        return os.getpid()


class HandleBackend:
    """The app's :class:`WorkflowBackend` over the ``Workflow`` deployment handle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    def run_job(self, job_id: str, patient_id: str, tasks: list[str], progress: Callable[[int, int], None]) -> dict:
        return self.handle.run_job.remote(job_id, patient_id, tasks).result()

    def chat(self, patient_id: str, conversation_id: str, message: str) -> dict[str, Any]:
        return self.handle.chat.remote(patient_id, conversation_id, message).result()

    def usage(self) -> dict[str, int]:
        return self.handle.usage.remote().result(timeout_s=10)


@serve.deployment(name="Ingress", logging_config={"enable_access_log": False})
@serve.ingress()
class Ingress:
    """The FastAPI app. Access logs are off: request paths carry patient ids."""

    def __init__(self, settings_json: str, serve_json: str, cwd: str, workflow: DeploymentHandle):
        self.settings = _restore(settings_json, cwd)
        self.cfg = ServeSettings.model_validate_json(serve_json)
        self.workflow = workflow

    def __serve_build_asgi_app__(self):  # noqa: ANN204
        from ehrflow.serve.app import build_app

        return build_app(self.settings, HandleBackend(self.workflow), serve=self.cfg)


def build_application(settings: Settings, serve_cfg: ServeSettings | None = None) -> Any:
    """The bound Serve application (what ``serve.run`` or a ``RayService`` import path takes)."""
    cfg = serve_cfg or serve_settings(settings)
    # the LLM API key is a SecretStr (dumped masked): replicas read it from EHRFLOW_LLM_API_KEY
    settings_json = settings.model_dump_json(exclude={"llm": {"api_key"}})
    serve_json, cwd = cfg.model_dump_json(), os.getcwd()
    llm = embedder = predictor = None
    if cfg.llm_deployment:
        llm = LLMDeployment.options(**cfg.llm.as_options()).bind(settings_json, cwd)
    if cfg.embedder_deployment:
        embedder = EmbedderDeployment.options(**cfg.embedder.as_options()).bind(settings_json, cwd)
    if cfg.predictor_deployment:
        if settings.models.fusion_checkpoint is None and settings.models.medrec_checkpoint is None:
            raise ValueError(
                "serve.predictor_deployment needs models.fusion_checkpoint or models.medrec_checkpoint (a trained model)"
            )
        predictor = PredictorDeployment.options(**cfg.predictor.as_options()).bind(settings_json, cwd)
    workflow = WorkflowDeployment.options(**cfg.workflow.as_options()).bind(
        settings_json, serve_json, cwd, llm, embedder, predictor
    )
    return Ingress.options(**cfg.ingress.as_options()).bind(settings_json, serve_json, cwd, workflow)


def app_from_config(_args: dict[str, str] | None = None) -> Any:
    """Import path for ``serve run`` / KubeRay: ``ehrflow.serve.deployments:app_from_config``;
    settings come from ``EHRFLOW_CONFIG`` and ``EHRFLOW_*`` variables."""
    return build_application(Settings())


def wait_ready(base_url: str, timeout_s: float = 600.0) -> None:
    """Poll ``/readyz`` until the app and its workflow replicas answer."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/readyz", timeout=10)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/readyz not ready after {timeout_s:.0f} s ({last})")


def serve_app(settings: Settings, *, blocking: bool = True, serve_cfg: ServeSettings | None = None) -> str:
    """What ``ehrflow serve`` runs: start (or join) Ray, deploy the app, wait for /readyz.
    Blocking, it serves until interrupted and then shuts Serve down; else it returns the base URL."""
    cfg = serve_cfg or serve_settings(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    settings.ray.ensure_initialized()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_application(settings, cfg), name=cfg.app_name, route_prefix="/", blocking=False)
    base_url = f"http://{cfg.host}:{cfg.port}"
    wait_ready(base_url)
    log.info("ehrflow serving at %s", base_url)
    if not blocking:
        return base_url
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return base_url


def start_local(settings: Settings, tenant: str | None = None) -> tuple[str, str, Callable[[], None]]:
    """Start Serve locally and return ``(base_url, api_key, stop)`` once /readyz is OK.
    The key belongs to ``tenant`` (default: the default tenant, owner of the demo cohort);
    ``stop()`` shuts Serve down, and Ray too when this call started it."""
    import ray

    from ehrflow.serve.auth import create_api_key

    cfg = serve_settings(settings)
    started_ray = not ray.is_initialized()
    api_key = create_api_key(settings, tenant or cfg.default_tenant)
    base_url = serve_app(settings, blocking=False, serve_cfg=cfg)

    def stop() -> None:
        serve.shutdown()
        if started_ray:
            ray.shutdown()

    return base_url, api_key, stop
