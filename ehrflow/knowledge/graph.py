"""The biomedical knowledge graph every grounding and summary step reads.

A ``KnowledgeGraph`` is a read-only view of an indexed SQLite file (see ``build.py``): opening it
loads nothing but a few metadata rows, and every query is an indexed lookup, so the default KG
opens in well under a second once its index exists and stays far below 1.5 GB of memory.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ehrflow.knowledge.build import ABBREVIATION, NORMALIZED, SCHEMA_VERSION, SEPARATOR, TERM_KINDS, cached_index
from ehrflow.knowledge.readers import KGFormatError
from ehrflow.knowledge.text import canonical_xref, casefold_key, is_abbreviation, normalize, series_code

__all__ = ["Edge", "KGFormatError", "KnowledgeGraph", "LexicalMatch", "Node", "NodeNotFound", "default_kg_dir"]

Direction = Literal["out", "in", "both"]
HPO_PHENOTYPIC_ABNORMALITY = "HP:0000118"


class Node(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    type: str
    name: str
    definition: str | None = None
    synonyms: tuple[str, ...] = ()
    xrefs: tuple[str, ...] = ()
    """Cross-references such as "ICD10CM:E87.5", "UMLS:C0020461" (one prefix spelling per vocabulary)."""
    source: str = ""


class Edge(BaseModel):
    model_config = ConfigDict(frozen=True)

    x_id: str
    relation: str
    display_relation: str
    y_id: str
    source: str = ""


class LexicalMatch(BaseModel):
    model_config = ConfigDict(frozen=True)

    node: Node
    kind: Literal["name", "synonym", "abbreviation", "normalized"]
    matched: str
    """The KG string (name, synonym or abbreviation) that matched."""


class NodeNotFound(KeyError):
    """A node id that is not in the graph."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        super().__init__(node_id)

    def __str__(self) -> str:
        return f"node {self.node_id!r} is not in the knowledge graph"


def default_kg_dir() -> Path:
    """The directory of the default KG shipped inside the package."""
    return Path(str(resources.files("ehrflow") / "data" / "kg"))


_NODE_COLUMNS = "n.n, n.id, n.type, n.name, n.definition, n.synonyms, n.xrefs, n.source"
_KIND_RANK = {kind: rank for rank, kind in enumerate(TERM_KINDS)}
_DEFAULT: dict[str, KnowledgeGraph] = {}
_DEFAULT_LOCK = threading.Lock()


def _split(cell: str) -> tuple[str, ...]:
    return tuple(cell.split(SEPARATOR)) if cell else ()


def _type_filter(types: Iterable[str] | None) -> tuple[str, list[str]] | None:
    """SQL (and its arguments) restricting the joined ``nodes n`` to ``types``; None when no type is wanted."""
    if types is None:
        return "", []
    wanted = sorted(set(types))
    if not wanted:
        return None
    return f" AND n.type IN ({','.join('?' * len(wanted))})", wanted


def _node(row: tuple) -> Node:
    _, node_id, node_type, name, definition, synonyms, xrefs, source = row
    return Node(
        id=node_id,
        type=node_type,
        name=name,
        definition=definition,
        synonyms=_split(synonyms),
        xrefs=_split(xrefs),
        source=source,
    )


class KnowledgeGraph:
    """Read-only, lazily queried KG. Safe to share between threads; pickles as its file path (for Ray)."""

    def __init__(self, sqlite_path: str | Path):
        self.path = Path(sqlite_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such KG index")
        self._local = threading.local()
        try:
            meta = dict(self._db().execute("SELECT key, value FROM meta").fetchall())
            rels = self._db().execute("SELECT r, relation, display_relation, source FROM rels").fetchall()
        except sqlite3.DatabaseError as exc:
            raise KGFormatError(self.path, None, None, f"not an ehrflow KG index ({exc})") from exc
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise KGFormatError(
                self.path,
                None,
                "schema_version",
                f"index schema {meta.get('schema_version')!r}, expected {SCHEMA_VERSION!r}",
            )
        self.fingerprint: str = meta["fingerprint"]
        self.layout: str = meta.get("layout", "")
        self._stats: dict[str, Any] = json.loads(meta["stats"])
        self._rels = {r: (relation, display, source) for r, relation, display, source in rels}
        self._rel_ids: dict[str, list[int]] = {}
        for r, (relation, _, _) in self._rels.items():
            self._rel_ids.setdefault(relation, []).append(r)
        self._names_condition: dict[str, bool] = {}

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path) -> KnowledgeGraph:
        """Open a built KG: a SQLite index file, or a directory in the open-KG layout (``nodes.tsv[.gz]``,
        ``edges.tsv[.gz]``) or the PrimeKG layout (``kg.csv`` + optional feature files). Directories are
        indexed once into the cache (``$EHRFLOW_HOME/kg`` or ``~/.cache/ehrflow/kg``) by content fingerprint.
        """
        path = Path(path)
        if path.is_dir():
            return cls(cached_index(path))
        if not path.exists():
            raise FileNotFoundError(f"{path}: no KG file or directory")
        return cls(path)

    @classmethod
    def default(cls) -> KnowledgeGraph:
        """The open KG shipped with ehrflow (one instance per process)."""
        with _DEFAULT_LOCK:
            if "kg" not in _DEFAULT:
                _DEFAULT["kg"] = cls.open(default_kg_dir())
            return _DEFAULT["kg"]

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(f"file:{self.path.resolve()}?mode=ro", uri=True, check_same_thread=False)
            db.execute("PRAGMA query_only=1")
            self._local.db = db
        return db

    def close(self) -> None:
        """Close this thread's connection (other threads' connections close when they are collected)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def __reduce__(self) -> tuple:
        return (type(self), (str(self.path),))

    def __repr__(self) -> str:
        return f"KnowledgeGraph({str(self.path)!r}, nodes={len(self)}, fingerprint={self.fingerprint!r})"

    # ------------------------------------------------------------------ nodes

    def _row(self, node_id: str) -> tuple | None:
        return self._db().execute(f"SELECT {_NODE_COLUMNS} FROM nodes n WHERE n.id = ?", (node_id,)).fetchone()

    def get(self, node_id: str) -> Node | None:
        row = self._row(node_id)
        return None if row is None else _node(row)

    def node(self, node_id: str) -> Node:
        row = self._row(node_id)
        if row is None:
            raise NodeNotFound(node_id)
        return _node(row)

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, str) and self._row(node_id) is not None

    def nodes(self, types: Iterable[str] | None = None) -> Iterator[Node]:
        """All nodes (of the given types), streamed in file order."""
        if types is None:
            cursor = self._db().execute(f"SELECT {_NODE_COLUMNS} FROM nodes n ORDER BY n.n")
        else:
            wanted = sorted(set(types))
            marks = ",".join("?" * len(wanted))
            cursor = self._db().execute(
                f"SELECT {_NODE_COLUMNS} FROM nodes n WHERE n.type IN ({marks}) ORDER BY n.n", wanted
            )
        while rows := cursor.fetchmany(1000):
            yield from (_node(row) for row in rows)

    def by_xref(self, xref: str) -> list[Node]:
        """Nodes listing ``xref`` (e.g. "UMLS:C0020461", "ICD10CM:E87.5"; prefix spellings are canonicalised)."""
        rows = (
            self._db()
            .execute(
                f"SELECT {_NODE_COLUMNS} FROM xrefs x JOIN nodes n ON n.n = x.n WHERE x.xref = ? ORDER BY n.n",
                (canonical_xref(xref),),
            )
            .fetchall()
        )
        return [_node(row) for row in rows]

    def smiles(self, node_id: str) -> str | None:
        """The SMILES of a drug node when the KG ships structures (DrugCentral, CC BY-SA), else None."""
        row = (
            self._db()
            .execute("SELECT s.smiles FROM smiles s JOIN nodes n ON n.n = s.n WHERE n.id = ?", (node_id,))
            .fetchone()
        )
        return None if row is None else row[0]

    # ------------------------------------------------------------------ edges

    def _node_n(self, node_id: str) -> int:
        row = self._db().execute("SELECT n FROM nodes WHERE id = ?", (node_id,)).fetchone()
        if row is None:
            raise NodeNotFound(node_id)
        return row[0]

    def _edge_rows(
        self, node_id: str, relations: Iterable[str] | None, limit: int | None, direction: Direction
    ) -> list[tuple[int, int, int, int]]:
        """(x, r, y, other) rows, outgoing before incoming, without the reverse copies of symmetric edges."""
        if direction not in ("out", "in", "both"):
            raise ValueError(f"direction must be 'out', 'in' or 'both', got {direction!r}")
        if limit is not None and limit <= 0:
            return []
        n = self._node_n(node_id)
        rel_filter, rel_args = "", []
        if relations is not None:
            rel_args = [r for relation in set(relations) for r in self._rel_ids.get(relation, [])]
            if not rel_args:
                return []
            rel_filter = f" AND r IN ({','.join('?' * len(rel_args))})"
        db = self._db()
        rows: list[tuple[int, int, int, int]] = []
        seen: set[tuple[str, int]] = set()
        if direction in ("out", "both"):
            for x, r, y in db.execute(
                f"SELECT x, r, y FROM edges WHERE x = ?{rel_filter} ORDER BY rowid", [n, *rel_args]
            ):
                rows.append((x, r, y, y))
                seen.add((self._rels[r][0], y))
                if limit is not None and len(rows) >= limit:
                    return rows
        if direction in ("in", "both"):
            for x, r, y in db.execute(
                f"SELECT x, r, y FROM edges WHERE y = ?{rel_filter} ORDER BY rowid", [n, *rel_args]
            ):
                if direction == "both" and (self._rels[r][0], x) in seen:
                    continue  # PrimeKG stores undirected edges twice
                rows.append((x, r, y, x))
                if limit is not None and len(rows) >= limit:
                    break
        return rows

    def _ids(self, ns: Iterable[int]) -> dict[int, tuple]:
        wanted = sorted(set(ns))
        found: dict[int, tuple] = {}
        db = self._db()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes n WHERE n.n IN ({marks})", chunk):
                found[row[0]] = row
        return found

    def _edge(self, x: int, r: int, y: int, rows: dict[int, tuple]) -> Edge:
        relation, display, source = self._rels[r]
        return Edge(x_id=rows[x][1], relation=relation, display_relation=display, y_id=rows[y][1], source=source)

    def edges(
        self,
        node_id: str,
        relations: Iterable[str] | None = None,
        limit: int | None = None,
        direction: Direction = "both",
    ) -> list[Edge]:
        """Edges touching ``node_id`` (as x or y; ``direction`` narrows it). Raises ``NodeNotFound``.

        Hierarchy edges point child -> parent, so ``direction="out"`` with ``relations=["code_code"]`` gives parents.
        """
        rows = self._edge_rows(node_id, relations, limit, direction)
        nodes = self._ids(n for x, _, y, _ in rows for n in (x, y))
        return [self._edge(x, r, y, nodes) for x, r, y, _ in rows]

    def neighbors(
        self,
        node_id: str,
        relations: Iterable[str] | None = None,
        limit: int | None = None,
        direction: Direction = "both",
    ) -> list[tuple[Edge, Node]]:
        """(edge, the node at its other end) pairs for ``node_id``. Raises ``NodeNotFound``."""
        rows = self._edge_rows(node_id, relations, limit, direction)
        nodes = self._ids(n for x, _, y, _ in rows for n in (x, y))
        return [(self._edge(x, r, y, nodes), _node(nodes[other])) for x, r, y, other in rows]

    def names_a_condition(self, node_id: str) -> bool:
        """False for HPO terms outside "Phenotypic abnormality" (clinical modifiers such as "Acute" or
        "Moderate", modes of inheritance, frequencies): they name no condition. Other nodes: True."""
        if not node_id.startswith("HP:"):
            return True
        if node_id not in self._names_condition:
            seen, frontier = {node_id}, [node_id]
            while frontier and HPO_PHENOTYPIC_ABNORMALITY not in seen:
                parents = [
                    e.y_id for nid in frontier for e in self.edges(nid, ["phenotype_phenotype"], direction="out")
                ]
                frontier = [p for p in parents if p not in seen]
                seen.update(frontier)
            self._names_condition[node_id] = HPO_PHENOTYPIC_ABNORMALITY in seen
        return self._names_condition[node_id]

    # ------------------------------------------------------------------ lexical lookup

    def lexical_lookup(self, text: str, types: Iterable[str] | None = None) -> list[LexicalMatch]:
        """Nodes whose name, synonym or abbreviation equals ``text`` (ignoring case and spacing), else whose
        normalised label equals ``normalize(text)``. One match per node, best kind first
        (name, synonym, abbreviation, normalized), then in KG order.

        Abbreviations match only when the query itself looks like one ("ALL" finds acute lymphoblastic
        leukemia, "all" does not).
        """
        exact, normal = casefold_key(text), normalize(text)
        if not exact and not normal:
            return []
        sql = f"SELECT t.kind, t.matched, t.key, {_NODE_COLUMNS} FROM terms t JOIN nodes n ON n.n = t.n WHERE t.key IN (?, ?)"
        args: list[str] = [exact, normal]
        type_filter = _type_filter(types)
        if type_filter is None:
            return []
        sql += type_filter[0]
        args += type_filter[1]
        query_is_abbreviation = is_abbreviation(text)
        best: dict[int, tuple[int, str, tuple]] = {}
        for kind, matched, key, *row in self._db().execute(sql, args):
            if kind == NORMALIZED:
                if key != normal:
                    continue
            elif key != exact or (kind == ABBREVIATION and not query_is_abbreviation and text.strip() != matched):
                continue
            n = row[0]
            if n not in best or kind < best[n][0]:
                best[n] = (kind, matched, tuple(row))
        ordered = sorted(best.items(), key=lambda item: (item[1][0], item[0]))
        return [
            LexicalMatch(node=_node(row), kind=TERM_KINDS[kind], matched=matched) for _, (kind, matched, row) in ordered
        ]

    def series_abbreviations(
        self, letters: str, types: Iterable[str] | None = None, limit: int = 500
    ) -> list[tuple[str, Node]]:
        """Abbreviations of the numbered series ``letters`` ("USH" -> USH1, USH2A, ...) with their nodes.

        Lets grounding read an unseen member ("USH3") off its siblings' names ("Usher syndrome type 1").
        """
        key = casefold_key(letters)
        if not key.isalpha():
            return []
        sql = (
            f"SELECT t.matched, {_NODE_COLUMNS} FROM terms t JOIN nodes n ON n.n = t.n "
            "WHERE t.kind = ? AND t.key >= ? AND t.key < ?"  # the letters followed by a digit ("9" < ":")
        )
        args: list[Any] = [ABBREVIATION, key + "0", key + ":"]
        type_filter = _type_filter(types)
        if type_filter is None:
            return []
        sql += type_filter[0]
        args += type_filter[1]
        rows = self._db().execute(sql + " ORDER BY n.n LIMIT ?", [*args, limit])
        return [
            (matched, _node(row))
            for matched, *row in rows
            if (code := series_code(matched)) is not None and code[0] == letters.upper()
        ]

    # ------------------------------------------------------------------ sizes

    def __len__(self) -> int:
        return int(self._stats["nodes"])

    def stats(self) -> dict[str, Any]:
        """Counts recorded when the index was built: nodes, edges, node_types, relations; plus identity."""
        smiles = self._db().execute("SELECT COUNT(*) FROM smiles").fetchone()[0]
        return {
            **self._stats,
            "smiles": smiles,
            "fingerprint": self.fingerprint,
            "layout": self.layout,
            "path": str(self.path),
        }
