"""The cluster profile's Chroma server, by configuration only: a real ``chroma run`` process and ehrflow's note index.

The ``chroma`` executable ships with the chromadb wheel, so this runs wherever the package installs.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ehrflow.config import Settings
from ehrflow.graph.deps import open_note_index
from ehrflow.records.model import Note, Patient
from ehrflow.retrieval import chroma_client

CHROMA = Path(sys.executable).parent / "chroma"


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    assert CHROMA.exists(), f"{CHROMA}: the chromadb wheel's server executable is missing"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path_factory.mktemp("chroma-server")
    process = subprocess.Popen(
        [str(CHROMA), "run", "--path", str(data), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            chroma_client(host="127.0.0.1", port=port).heartbeat()
            break
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"chroma run on port {port} did not come up") from None
            time.sleep(0.5)
    yield port, data
    process.terminate()
    process.wait(timeout=30)


def test_note_index_on_a_chroma_server_by_configuration(chroma_server, tmp_path, monkeypatch):
    port, data = chroma_server
    monkeypatch.setenv("EHRFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EHRFLOW_CHROMA__HOST", "127.0.0.1")
    monkeypatch.setenv("EHRFLOW_CHROMA__PORT", str(port))
    settings = Settings()
    patient = Patient(
        id="p-server",
        source="test",
        notes=[
            Note(id="n1", text="Patient reports crushing chest pain radiating to the left arm."),
            Note(id="n2", text="Skin rash on both forearms after starting amoxicillin."),
        ],
    )
    index = open_note_index(settings)
    assert index.index_patient(patient) == 2

    hits = index.search("myocardial ischemia symptoms", patient_id="p-server", k=1, mode="dense")
    assert hits[0].note_id == "n1"
    # the vectors live in the server, not in an embedded store under EHRFLOW_HOME
    assert not settings.chroma_path.exists()
    assert any(data.iterdir())
    again = open_note_index(Settings())  # a second process-like client sees the same collection
    assert again.count() == 2
