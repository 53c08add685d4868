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


@pytest.fixture(scope="session")
def physionet_stays(shared_data):
    """``physionet_stays(n)``: the first ``n`` PhysioNet 2012 set-a stays, freshly parsed (callers may mutate them)."""
    import itertools

    from ehrflow.records.errors import ErrorSink
    from ehrflow.records.loaders.physionet2012 import PhysioNet2012Loader

    def first(n: int) -> list:
        stream = PhysioNet2012Loader().load(shared_data / "ehr" / "physionet2012" / "set-a.tar.gz", ErrorSink())
        stays = list(itertools.islice(stream, n))
        stream.close()
        return stays

    return first


@pytest.fixture(scope="session")
def small_medrec_config(shared_data):
    """``small_medrec_config(root, name, **fields)``: a small NLA-MMR config (hashed text, 256-bit molecules,
    two epochs, one Ray Train worker) writing under ``root``; ``fields`` add the data source and overrides."""
    from ehrflow.training.medrec import MedRecConfig

    def build(root: Path, name: str, **fields) -> MedRecConfig:
        base = {
            "model": "nlammr",
            "dim": 16,
            "epochs": 2,
            "batch_size": 8,
            "representations": {
                "text_encoder": "hashed",
                "use_kg": False,
                "smiles_path": str(shared_data / "medrec" / "atc3_smiles.tsv"),
                "molecule_bits": 256,
            },
            "ray": {"num_workers": 1, "storage_path": str(root / "runs"), "name": name},
            "output_dir": str(root / name),
        }
        return MedRecConfig.model_validate({**base, **fields})

    return build


@pytest.fixture(scope="session")
def tiny_medrec(shared_data, small_medrec_config, tmp_path_factory):
    """(store, checkpoint, config): ``small_medrec_config`` trained in Ray Train local mode on the MIMIC-IV demo
    store, with the benchmark's drug mapping."""
    from ehrflow.records import PatientStore
    from ehrflow.records.ingest import ingest_path
    from ehrflow.training.medrec import train_medrec

    root = tmp_path_factory.mktemp("medrec-predictor")
    store = PatientStore(root / "patients.db")
    ingest_path(store, "mimic4", shared_data / "ehr" / "mimic4_demo")
    medrec = shared_data / "medrec"
    config = small_medrec_config(
        root,
        "predictor",
        store_url=f"sqlite:///{root / 'patients.db'}",
        data={"mapping_dir": str(medrec), "ddi_pairs": str(medrec / "ddi_atc3_pairs.tsv"), "top_med": 60},
    )
    config.ray.num_workers = 0
    result = train_medrec(config)
    return store, result.checkpoint, config


@pytest.fixture(scope="session")
def tiny_fusion_config():
    """``tiny_fusion_config(root, **fields)``: a one-step mortality model config (Ray Train local mode), enough
    to exercise checkpoint loading and prediction."""
    from ehrflow.training.fusion import FusionTrainConfig

    def build(root: Path, **fields) -> FusionTrainConfig:
        return FusionTrainConfig.model_validate(
            {
                "tasks": ["mortality"],
                "split": {"fractions": [0.6, 0.2, 0.2], "seed": 1},
                "model": {"hidden": 8, "heads": 2},
                "train": {"epochs": 1, "batch_size": 32, "max_steps_per_epoch": 1},
                "ray": {"num_workers": 0, "storage_path": str(root / "runs"), "name": "tiny"},
                "n_bootstrap": 0,
                **fields,
            }
        )

    return build


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A fresh empty database per test: a SQLite file, and a PostgreSQL database where a server is configured.

    ``EHRFLOW_TEST_POSTGRES_URL`` names a server and a user that may create databases (``.ci/run`` starts a
    throwaway one where PostgreSQL is installed); without it the PostgreSQL case is skipped, saying so.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    server = os.environ.get("EHRFLOW_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("EHRFLOW_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL where it is installed)")
    import uuid

    import sqlalchemy as sa

    admin_url = sa.engine.make_url(server)
    name = f"ehrflow_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def store(database_url):
    from ehrflow.records import PatientStore

    return PatientStore(database_url)


@pytest.fixture
def ray_session(tmp_path_factory):
    """The local Ray instance the tests share: started by the first test that needs it (``ray.init`` costs
    5-7 s here) and shut down at the end of the session, or earlier by ``isolated_ray``."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
        )
    return ray


@pytest.fixture
def isolated_ray(ray_session):
    """Ray for a test that leaves cluster-wide state behind (Ray Serve): shut down afterwards, so the next test
    starts a fresh instance. With one shared instance, the first Ray Train run after ``serve.shutdown()`` hung:
    the driver never saw its controller come alive (in CI and reproduced locally, Ray 2.60)."""
    yield ray_session
    ray_session.shutdown()


def pytest_sessionfinish(session, exitstatus):
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
