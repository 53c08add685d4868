"""Readers for the two KG layouts ehrflow understands: the open KG TSVs and PrimeKG's ``kg.csv``.

Readers yield plain tuples (not pydantic models) because a full KG has ~10^6 rows and is read
once, at index time; ``KnowledgeGraph`` turns rows into ``Node``/``Edge`` on query.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

from ehrflow.knowledge.text import canonical_xref

log = logging.getLogger(__name__)

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # PrimeKG feature texts exceed the default 128 KiB


class KGFormatError(ValueError):
    """A malformed KG file; the message names the file, the line and the column."""

    def __init__(self, path: str | Path, line: int | None, column: str | None, message: str):
        self.path = str(path)
        self.line = line
        self.column = column
        self.message = message
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")


class NodeRow(NamedTuple):
    id: str
    type: str
    name: str
    definition: str | None
    synonyms: tuple[str, ...]
    xrefs: tuple[str, ...]
    source: str
    line: int


class EdgeRow(NamedTuple):
    x_id: str
    relation: str
    display_relation: str
    y_id: str
    source: str
    line: int


OPENKG_NODE_COLUMNS = ("node_id", "node_type", "node_name", "definition", "synonyms", "xrefs", "node_source")
OPENKG_EDGE_COLUMNS = ("x_id", "relation", "display_relation", "y_id", "edge_source")
PRIMEKG_COLUMNS = (
    "relation",
    "display_relation",
    "x_index",
    "x_id",
    "x_type",
    "x_name",
    "x_source",
    "y_index",
    "y_id",
    "y_type",
    "y_name",
    "y_source",
)
DISEASE_DEFINITION_COLUMNS = ("mondo_definition", "umls_description", "orphanet_definition")
DRUG_DEFINITION_COLUMNS = ("description",)


def open_text(path: Path) -> IO[str]:
    """Open a text table, transparently gunzipping ``*.gz``."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def find_table(directory: Path, stem: str) -> Path:
    """``stem`` or ``stem.gz`` inside ``directory``; a clear error when neither exists."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{directory}: neither {stem} nor {stem}.gz found")


def _header_index(path: Path, header: list[str] | None, required: tuple[str, ...]) -> dict[str, int]:
    if header is None:
        raise KGFormatError(path, 1, None, "empty file, expected a header row")
    index = {name.strip(): i for i, name in enumerate(header)}
    for name in required:
        if name not in index:
            raise KGFormatError(path, 1, name, f"missing column (header has: {', '.join(header)})")
    return index


def _split(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in value.split("|") if v.strip()))


def _cell(path: Path, line: int, row: list[str], index: dict[str, int], column: str, required: bool) -> str:
    i = index[column]
    if i >= len(row):
        raise KGFormatError(path, line, column, f"row has {len(row)} fields, expected at least {i + 1}")
    value = row[i].strip()
    if required and not value:
        raise KGFormatError(path, line, column, "empty value")
    return value


def _rows(path: Path, columns: tuple[str, ...], required: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """(line, values in ``columns`` order) of a TSV; short rows and empty required values raise ``KGFormatError``."""
    with open_text(path) as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        index = _header_index(path, next(reader, None), columns)
        positions = [index[c] for c in columns]
        checked = [index[c] for c in required]
        width = max(positions) + 1
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < width or not all(row[i].strip() for i in checked):
                for column in columns:  # slow path only to name the offending column
                    _cell(path, line, row, index, column, column in required)
            yield line, [row[i].strip() for i in positions]


def read_openkg_nodes(path: Path) -> Iterator[NodeRow]:
    """Rows of the open KG ``nodes.tsv(.gz)``; xrefs are put in one spelling per vocabulary."""
    for line, (node_id, node_type, name, definition, synonyms, xrefs, source) in _rows(
        path, OPENKG_NODE_COLUMNS, ("node_id", "node_type", "node_name")
    ):
        yield NodeRow(
            id=node_id,
            type=node_type,
            name=name,
            definition=definition or None,
            synonyms=_split(synonyms) if synonyms else (),
            xrefs=tuple(dict.fromkeys(canonical_xref(x) for x in _split(xrefs))) if xrefs else (),
            source=source,
            line=line,
        )


def read_openkg_edges(path: Path) -> Iterator[EdgeRow]:
    """Rows of the open KG ``edges.tsv(.gz)``."""
    for line, (x_id, relation, display_relation, y_id, source) in _rows(
        path, OPENKG_EDGE_COLUMNS, ("x_id", "relation", "y_id")
    ):
        yield EdgeRow(x_id, relation, display_relation, y_id, source, line)


def _primekg_features(path: Path | None, columns: tuple[str, ...]) -> dict[str, str]:
    """node_index -> first non-empty text among ``columns`` (PrimeKG feature files)."""
    if path is None:
        return {}
    texts: dict[str, str] = {}
    with open_text(path) as fh:
        reader = csv.reader(fh)
        index = _header_index(path, next(reader, None), ("node_index",))
        present = [c for c in columns if c in index]
        if not present:
            raise KGFormatError(path, 1, columns[0], f"missing column: none of {', '.join(columns)} present")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            node_index = _cell(path, line, row, index, "node_index", True)
            for column in present:
                text = row[index[column]].strip() if index[column] < len(row) else ""
                if text:
                    texts.setdefault(node_index, text)
                    break
    return texts


def primekg_node_id(source: str, local_id: str) -> str:
    """PrimeKG ids are local to their source ("MONDO", "5090"); ehrflow ids carry the source: "MONDO:5090"."""
    return f"{source}:{local_id}"


class PrimeKGRow(NamedTuple):
    x: NodeRow
    y: NodeRow
    edge: EdgeRow


def read_primekg(directory: Path) -> Iterator[PrimeKGRow]:
    """Rows of PrimeKG's ``kg.csv`` with node texts joined from ``disease_features.csv`` / ``drug_features.csv``.

    Both feature files are optional; a node's definition is the first of MONDO definition, UMLS
    description, Orphanet definition (diseases) or DrugBank description (drugs).
    """
    kg_path = find_table(directory, "kg.csv")
    features: dict[str, str] = {}
    for stem, columns in (
        ("disease_features.csv", DISEASE_DEFINITION_COLUMNS),
        ("drug_features.csv", DRUG_DEFINITION_COLUMNS),
    ):
        try:
            features.update(_primekg_features(find_table(directory, stem), columns))
        except FileNotFoundError:
            log.info("%s: no %s, nodes keep no definition", directory, stem)
    with open_text(kg_path) as fh:
        reader = csv.reader(fh)
        index = _header_index(kg_path, next(reader, None), PRIMEKG_COLUMNS)
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            sides = []
            for side in ("x", "y"):
                node_index = _cell(kg_path, line, row, index, f"{side}_index", True)
                sides.append(
                    NodeRow(
                        id=primekg_node_id(
                            _cell(kg_path, line, row, index, f"{side}_source", True),
                            _cell(kg_path, line, row, index, f"{side}_id", True),
                        ),
                        type=_cell(kg_path, line, row, index, f"{side}_type", True),
                        name=_cell(kg_path, line, row, index, f"{side}_name", True),
                        definition=features.get(node_index),
                        synonyms=(),
                        xrefs=(),
                        source=f"PrimeKG ({row[index[f'{side}_source']].strip()})",
                        line=line,
                    )
                )
            edge = EdgeRow(
                x_id=sides[0].id,
                relation=_cell(kg_path, line, row, index, "relation", True),
                display_relation=_cell(kg_path, line, row, index, "display_relation", False),
                y_id=sides[1].id,
                source="PrimeKG",
                line=line,
            )
            yield PrimeKGRow(sides[0], sides[1], edge)


class SmilesRow(NamedTuple):
    node_id: str
    smiles: str
    inchikey: str


SMILES_COLUMNS = ("node_id", "smiles", "inchikey")


def read_smiles(path: Path) -> Iterator[SmilesRow]:
    """The shipped ``drug_smiles.tsv.gz`` (drug node id -> structure)."""
    with open_text(path) as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        index = _header_index(path, next(reader, None), SMILES_COLUMNS)
        for line, row in enumerate(reader, start=2):
            if row:
                yield SmilesRow(
                    _cell(path, line, row, index, "node_id", True),
                    _cell(path, line, row, index, "smiles", True),
                    _cell(path, line, row, index, "inchikey", False),
                )
