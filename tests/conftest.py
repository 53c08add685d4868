"""Shared fixtures. Tests read the open data sets in ``../shared/data`` through ``shared_data`` only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("LANGGRAPH_STRICT_MSGPACK", "true")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The open data sets (``EHRFLOW_SHARED_DATA`` or ``../shared/data`` beside the repo)."""
    root = Path(os.environ.get("EHRFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (root / "ehr").is_dir():
        pytest.fail(
            f"shared data not found at {root}: clone the repo with ../shared beside it or set EHRFLOW_SHARED_DATA"
        )
    return root


@pytest.fixture
def store(tmp_path):
    from ehrflow.records import PatientStore

    return PatientStore(tmp_path / "patients.db")


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance for the whole test session (``ray.init`` costs 5-7 s here)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
        )
    yield ray
    # Ray is shut down once, at the end of the session (see pytest_sessionfinish).


def pytest_sessionfinish(session, exitstatus):
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
