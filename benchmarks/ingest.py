"""Ingest throughput and memory of ehrflow's loaders against plain ``pandas.read_csv`` of the same files.

For PhysioNet 2012 sets a and b, and for the MIMIC-III demo (whose bulk is CHARTEVENTS), in one run:

- ``pandas``: ``pandas.read_csv`` of every file the loader reads (for PhysioNet, each record
  member streamed out of the tarball), the baseline a plain CSV parse costs;
- ``loader_parse``: the loader from files to ``Patient`` objects, no database;
- ``loader_parse_items``: the same, then every measurement built as a ``Measurement`` object (loaders hold
  measurements as columns, and a reader that iterates them pays for the objects then);
- ``loader_store``: ``ingest_path`` into a fresh SQLite ``PatientStore`` (parse + serialise + write).

Each is the median of three runs, pandas included.

Rows are the source's data rows (PhysioNet: every line below the header, descriptors included;
MIMIC: the rows of every table the loader reads). Wall and CPU seconds are both reported: the
development machine is shared, so wall time carries other people's load (see ``machine``).

Memory: PhysioNet set a at 1x and replicated to 4x (every record copied under new RecordIDs) is
loaded in a fresh subprocess per size and mode; a streaming loader keeps peak RSS about flat.

    .venv/bin/python benchmarks/ingest.py [--skip-memory] [--skip-mimic]

Prints the JSON and writes ``benchmarks/results/ingest.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from _util import peak_rss_mib, write_result

from ehrflow.records import ErrorSink, PatientStore, ingest_path
from ehrflow.records.loaders import get_loader

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ehr"
PHYSIONET = DATA / "physionet2012"
MIMIC3_DEMO = DATA / "mimic3_demo"
PACKAGES = ("pydantic", "pydantic-core", "pandas", "numpy", "duckdb", "sqlalchemy", "pyarrow")


REPEATS = 3


def _timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process and its threads): the median of ``repeats`` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return result, statistics.median(walls), statistics.median(cpus)


def _tar_members(path: Path) -> Iterator[bytes]:
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            handle = tar.extractfile(member) if member.isfile() else None
            if handle is not None:
                yield handle.read()


def _count_patients(fmt: str, path: Path, items: bool = False) -> dict[str, int]:
    """Load every patient; with ``items``, also build every measurement as a ``Measurement`` object (the loaders
    hold measurements as columns and build items only when a reader iterates them)."""
    loader = get_loader(fmt)
    patients = measurements = 0
    for unit in loader.units(path):
        for patient in loader.load(unit, ErrorSink()):
            patients += 1
            for admission in patient.admissions:
                measurements += sum(1 for _ in admission.measurements) if items else len(admission.measurements)
    return {"patients": patients, "measurements": measurements}


def _store_ingest(fmt: str, path: Path) -> dict[str, int]:
    with tempfile.TemporaryDirectory(prefix="ehrflow-bench-") as tmp:
        report = ingest_path(PatientStore(Path(tmp) / "patients.db"), fmt, path)
    return {"patients": report.result.inserted, "rejected": len(report.rejected)}


def _entry(rows: int, wall: float, cpu: float, **extra: Any) -> dict[str, Any]:
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "rows_per_s_wall": round(rows / wall),
        "rows_per_s_cpu": round(rows / cpu) if cpu else None,
        **extra,
    }


def _compare(rows: int, baseline: dict[str, Any], fmt: str, path: Path) -> dict[str, Any]:
    counted, wall, cpu = _timed(lambda: _count_patients(fmt, path), REPEATS)
    parse = _entry(rows, wall, cpu, **counted)
    counted, wall, cpu = _timed(lambda: _count_patients(fmt, path, items=True), REPEATS)
    items = _entry(rows, wall, cpu, **counted, what="loader_parse, then every measurement built as an object")
    stored, wall, cpu = _timed(lambda: _store_ingest(fmt, path), REPEATS)
    store = _entry(rows, wall, cpu, **stored)
    return {
        "rows": rows,
        "pandas": baseline,
        "loader_parse": parse,
        "loader_parse_items": items,
        "loader_store": store,
        "parse_vs_pandas_wall": round(parse["wall_s"] / baseline["wall_s"], 2),
        "parse_vs_pandas_cpu": round(parse["cpu_s"] / baseline["cpu_s"], 2),
        "parse_items_vs_pandas_wall": round(items["wall_s"] / baseline["wall_s"], 2),
        "store_vs_pandas_wall": round(store["wall_s"] / baseline["wall_s"], 2),
    }


def bench_physionet(set_name: str) -> dict[str, Any]:
    tarball = PHYSIONET / f"{set_name}.tar.gz"

    def pandas_parse() -> int:
        return sum(len(pd.read_csv(io.BytesIO(data))) for data in _tar_members(tarball))

    rows, wall, cpu = _timed(pandas_parse, REPEATS)
    baseline = _entry(rows, wall, cpu, what="pandas.read_csv of each record member, streamed from the tarball")
    return {"input": str(tarball.relative_to(REPO.parent)), **_compare(rows, baseline, "physionet2012", tarball)}


def bench_mimic3() -> dict[str, Any]:
    try:
        from ehrflow.records.loaders.mimic import MIMIC3_TABLES, _find_file
    except ImportError as exc:
        return {"skipped": f"MIMIC-III loader not importable: {exc}"}
    files = sorted({f for table in MIMIC3_TABLES for f in (_find_file(MIMIC3_DEMO, s) for s in table.files) if f})

    def pandas_parse() -> dict[str, int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mixed-type column warnings: the baseline is plain read_csv
            return {f.name: len(pd.read_csv(f)) for f in files}

    per_file, wall, cpu = _timed(pandas_parse, REPEATS)
    rows = sum(per_file.values())
    chart = next(name for name in per_file if name.upper().startswith("CHARTEVENTS"))
    _, chart_wall, chart_cpu = _timed(lambda: len(pd.read_csv(MIMIC3_DEMO / chart)), REPEATS)
    baseline = _entry(
        rows,
        wall,
        cpu,
        what="pandas.read_csv of every table the loader reads",
        chartevents_rows=per_file[chart],
        chartevents_only_wall_s=round(chart_wall, 2),
        chartevents_only_cpu_s=round(chart_cpu, 2),
    )
    result = _compare(rows, baseline, "mimic3", MIMIC3_DEMO)
    return {"input": str(MIMIC3_DEMO.relative_to(REPO.parent)), "files": per_file, **result}


def write_replicated_set(copies: int, folder: Path) -> Path:
    """set-a replicated ``copies`` times under new RecordIDs (+1,000,000 per copy), with its outcomes."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "set-a.tar.gz"
    records = list(_tar_members(PHYSIONET / "set-a.tar.gz"))
    with tarfile.open(out, "w:gz", compresslevel=6) as tar:
        for copy in range(copies):
            for data in records:
                lines = data.decode().splitlines()
                record_id = int(next(line for line in lines if ",RecordID," in line).rsplit(",", 1)[1])
                new_id = record_id + copy * 1_000_000
                text = "\n".join(
                    f"00:00,RecordID,{new_id}" if ",RecordID," in line else line for line in lines
                ).encode()
                info = tarfile.TarInfo(f"set-a/{new_id}.txt")
                info.size = len(text)
                tar.addfile(info, io.BytesIO(text))
    outcomes = (PHYSIONET / "Outcomes-a.txt").read_text().splitlines()
    header, rows = outcomes[0], outcomes[1:]
    replicated = [
        f"{int(r.split(',', 1)[0]) + c * 1_000_000},{r.split(',', 1)[1]}" for c in range(copies) for r in rows
    ]
    (folder / "Outcomes-a.txt").write_text("\n".join([header, *replicated]) + "\n")
    return out


def bench_memory() -> dict[str, Any]:
    """Peak RSS of a fresh process loading set a at 1x and 4x, parse only and with the store write."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ehrflow-bench-rss-") as tmp:
        inputs = {"1x": PHYSIONET / "set-a.tar.gz", "4x": write_replicated_set(4, Path(tmp) / "x4")}
        for mode in ("parse", "store"):
            for size, path in inputs.items():
                done = subprocess.run(
                    [sys.executable, __file__, "--child", mode, str(path)],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                )
                results[f"{mode}_{size}"] = json.loads(done.stdout.strip().splitlines()[-1])
        for mode in ("parse", "store"):
            one, four = results[f"{mode}_1x"], results[f"{mode}_4x"]
            results[f"{mode}_peak_rss_ratio_4x_over_1x"] = round(four["peak_rss_mib"] / one["peak_rss_mib"], 2)
            results[f"{mode}_growth_ratio_4x_over_1x"] = round(
                (four["peak_rss_mib"] - four["rss_after_import_mib"])
                / max(one["peak_rss_mib"] - one["rss_after_import_mib"], 1e-9),
                2,
            )
    return results


def child(mode: str, path: Path) -> None:
    """One measurement in a fresh process: prints a JSON line with its peak RSS."""
    after_import = peak_rss_mib()
    counted, wall, cpu = _timed(
        lambda: _count_patients("physionet2012", path) if mode == "parse" else _store_ingest("physionet2012", path)
    )
    print(
        json.dumps(
            {
                **counted,
                "wall_s": round(wall, 2),
                "cpu_s": round(cpu, 2),
                "rss_after_import_mib": round(after_import, 1),
                "peak_rss_mib": round(peak_rss_mib(), 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-memory", action="store_true", help="leave out the 1x/4x peak-RSS subprocesses")
    parser.add_argument("--skip-mimic", action="store_true", help="leave out the MIMIC-III demo")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return

    started = time.perf_counter()
    physionet = {name: bench_physionet(name) for name in ("set-a", "set-b")}
    rows = sum(r["rows"] for r in physionet.values())
    totals = {
        key: round(rows / sum(r[key]["wall_s"] for r in physionet.values()))
        for key in ("pandas", "loader_parse", "loader_parse_items", "loader_store")
    }
    payload: dict[str, Any] = {
        "goal": "loader parse within 2x of pandas.read_csv of the same files; peak RSS flat from 1x to 4x input",
        "physionet2012": {
            **physionet,
            "sets_a_b": {
                "rows": rows,
                "rows_per_s_wall": totals,
                "parse_vs_pandas_wall": round(totals["pandas"] / totals["loader_parse"], 2),
                "parse_items_vs_pandas_wall": round(totals["pandas"] / totals["loader_parse_items"], 2),
                "store_vs_pandas_wall": round(totals["pandas"] / totals["loader_store"], 2),
            },
        },
    }
    payload["mimic3_demo"] = {"skipped": "--skip-mimic"} if args.skip_mimic else bench_mimic3()
    payload["memory_physionet2012_set_a"] = {"skipped": "--skip-memory"} if args.skip_memory else bench_memory()
    payload["total_wall_s"] = round(time.perf_counter() - started, 1)
    path = write_result("ingest", payload, packages=PACKAGES)
    print(path.read_text())


if __name__ == "__main__":
    main()
