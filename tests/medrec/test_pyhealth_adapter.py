"""The PyHealth comparison's adapter: its sample layout and vocabulary mapping (PyHealth itself lives in
its own environment, so only the adapter's pure functions are tested here)."""

import importlib.util
from pathlib import Path

ADAPTER = Path(__file__).resolve().parents[2] / "benchmarks" / "external" / "pyhealth_medrec.py"


def _adapter():
    spec = importlib.util.spec_from_file_location("pyhealth_medrec", ADAPTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DOC = {
    "diag_vocab": ["<pad>", "<oov>", "ICD9CM:4019", "ICD9CM:25000"],
    "proc_vocab": ["<pad>", "<oov>", "ICD9PROC:3961"],
    "med_vocab": ["A10B", "C09A", "N02B"],
    "visits": [
        [([2], [2], [0, 1]), ([3], [], [1, 2])],
        [([3], [2], [])],
    ],
}


def test_one_sample_per_visit_with_history_and_without_the_target():
    samples = _adapter().samples_of(DOC, [0, 1])
    assert [s["visit_id"] for s in samples] == ["0-0", "0-1", "1-0"]
    second = samples[1]
    assert second["conditions"] == [["ICD9CM:4019"], ["ICD9CM:25000"]]
    assert second["procedures"] == [["ICD9PROC:3961"], ["<none>"]]  # an empty list gets the placeholder
    assert second["drugs"] == ["C09A", "N02B"]
    assert second["drugs_hist"] == [["A10B", "C09A"], []]  # earlier drugs; the visit's own are the target
    assert second["visit_conditions"] == ["ICD9CM:25000"] and second["visit_procedures"] == ["<none>"]
    assert samples[2]["drugs_hist"] == [[]] and samples[2]["drugs"] == []


def test_shared_columns_map_pyhealth_indices_to_ehrflows():
    theirs, ours = _adapter()._shared_columns({"N02B": 0, "A10B": 1, "ZZZZ": 2}, DOC["med_vocab"])
    assert list(zip(theirs, ours, strict=True)) == [(1, 0), (0, 2)]
